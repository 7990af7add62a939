//! Parity with scikit-learn: pickled IsolationForests (tests/fixtures/sklearn, made by
//! ../shared/fixtures/make_sklearn_fixtures.py with scikit-learn 1.2.2 and 1.9.1) loaded
//! through `Model::load` must reproduce scikit-learn's own `score_samples`,
//! `decision_function` and `predict` of every row of their oracle.csv.
//! The 300-tree variants are not copied into the repository (7 MB); they are tested from
//! ../shared/fixtures when that directory exists.

mod common;
use common::read_oracle;
use fad::model::{Detection, Model};
use std::path::{Path, PathBuf};

const TOLERANCE: f64 = 1e-9;

fn fixture_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for version in std::fs::read_dir(root).unwrap() {
        let version = version.unwrap().path();
        if !version.is_dir() {
            continue; // README.md
        }
        for variant in std::fs::read_dir(version).unwrap() {
            let d = variant.unwrap().path();
            if d.join("model_if.pkl").exists() {
                dirs.push(d);
            }
        }
    }
    dirs.sort();
    dirs
}

/// Scores every oracle row through the library; returns the largest absolute differences
/// (score_samples, decision_function) and asserts parity.
fn check(dir: &Path) -> (f64, f64) {
    let model = Model::load(dir).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
    assert!(model.per_signal.is_none());
    let o = read_oracle(&dir.join("oracle.csv"));
    let n = o.score_samples.len();
    let mut ss = vec![0.0; n];
    model.joint.score_samples_batch(&o.rows, &mut ss);
    let mut det = vec![Detection::default(); n];
    model.detect_batch(&o.rows, &mut det);
    let w = model.n_features();
    let (mut d_ss, mut d_df) = (0f64, 0f64);
    for i in 0..n {
        let row = &o.rows[i * w..(i + 1) * w];
        assert_eq!(model.joint.score_samples_row(row), ss[i], "row and batch scoring differ");
        d_ss = d_ss.max((ss[i] - o.score_samples[i]).abs());
        d_df = d_df.max((det[i].score - o.decision_function[i]).abs());
        let predict = if det[i].score < 0.0 { -1 } else { 1 };
        assert_eq!(predict, o.predict[i], "{}: predict of row {i}", dir.display());
        assert_eq!(det[i].bpm_anomaly, predict == -1);
    }
    eprintln!("{}: {n} rows, max |diff| score_samples {d_ss:e}, decision_function {d_df:e}", dir.display());
    assert!(d_ss <= TOLERANCE && d_df <= TOLERANCE, "{}: {d_ss:e} {d_df:e}", dir.display());
    (d_ss, d_df)
}

#[test]
fn bundled_fixtures_match_scikit_learn() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sklearn");
    let dirs = fixture_dirs(&root);
    assert_eq!(dirs.len(), 6, "two scikit-learn versions, three variants each");
    for d in dirs {
        check(&d);
    }
}

#[test]
fn shared_fixtures_match_scikit_learn_when_present() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    if !root.is_dir() {
        eprintln!("note: {} is absent; the 300-tree fixtures were not tested", root.display());
        return;
    }
    let dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .flat_map(|p| fixture_dirs_in(&p))
        .collect();
    assert!(!dirs.is_empty());
    for d in dirs {
        check(&d);
    }
}

fn fixture_dirs_in(version: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(version)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|d| d.join("model_if.pkl").exists())
        .collect();
    dirs.sort();
    dirs
}
