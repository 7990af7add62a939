//! Artifacts directories of the Python prototype (`model_if.pkl` + its meta.json) through
//! the CLI: `fad stream` and `fad score` agree with each other and with the library on a
//! pickled forest, and every bad pickle is one sentence on stderr with exit status 1.

mod common;
use common::*;
use fad::model::{Detection, Model};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;

fn fixtures() -> PathBuf {
    repo().join("tests/fixtures")
}

/// An artifacts directory holding `pickle` as model_if.pkl, beside the prototype's
/// meta.json (edited by `edit`).
fn artifacts(name: &str, pickle: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = scratch(&format!("pkl-{name}")).join("artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model_if.pkl"), pickle).unwrap();
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("pickles/meta.json")).unwrap()).unwrap();
    edit(&mut meta);
    std::fs::write(dir.join("meta.json"), serde_json::to_vec_pretty(&meta).unwrap()).unwrap();
    dir
}

fn pickle(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("pickles").join(name)).unwrap()
}

/// The merged table of the bundled LCT sample.
fn merged() -> &'static Path {
    static M: OnceLock<PathBuf> = OnceLock::new();
    M.get_or_init(|| {
        let path = scratch("merged").join("merged.csv");
        let out = fad().arg("convert").arg(repo().join("data/sample/lct2025")).output().unwrap();
        assert!(out.status.success());
        std::fs::write(&path, out.stdout).unwrap();
        path
    })
}

fn run(cmd: &mut std::process::Command, input: &[u8]) -> Output {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// The stream messages of a merged table's rows, in table order.
fn feed_of(table: &str) -> String {
    table
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            format!("{},{},{},{},{}\n", f[0], f[3], f[4], f[1], f[2])
        })
        .collect()
}

#[test]
fn stream_score_and_library_agree_on_a_pickled_forest() {
    let model_dir = fixtures().join("sklearn/1.9.1/maxfeat-0.5");
    let table = std::fs::read_to_string(merged()).unwrap();
    let out = run(fad().arg("score").arg("--with-features").arg("--model").arg(&model_dir), table.as_bytes());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let scored = lines(&out.stdout);
    assert!(scored.len() > 30_000, "the prototype's meta.json has no gap limit: almost every row is scored");

    // the library, on the feature values fad score printed
    let model = Model::load(&model_dir).unwrap();
    let w = model.n_features();
    let mut rows = Vec::new();
    let mut printed = Vec::new();
    for line in &scored[1..] {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 8 + w);
        printed.push(f[7].parse::<f64>().unwrap());
        rows.extend(f[8..].iter().map(|v| v.parse::<f32>().unwrap()));
    }
    let mut det = vec![Detection::default(); printed.len()];
    model.detect_batch(&rows, &mut det);
    for (d, p) in det.iter().zip(&printed) {
        assert_eq!(d.score, *p, "the printed score round-trips to the library's");
    }
    let flagged = det.iter().filter(|d| d.score < 0.0).count();
    assert!(flagged > 0 && flagged < det.len());

    // the stream, on the same rows as messages
    let out = run(fad().arg("stream").arg("--model").arg(&model_dir), feed_of(&table).as_bytes());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let detections: Vec<String> = lines(&out.stdout)
        .iter()
        .filter_map(|l| l.strip_prefix("ready:true,detection:").and_then(|d| d.strip_suffix(",needed:0")))
        .map(str::to_owned)
        .collect();
    let score_rows: Vec<String> =
        scored[1..].iter().map(|l| l.split(',').take(8).collect::<Vec<_>>().join(",")).collect();
    assert_eq!(detections, score_rows);
}

/// Runs `fad score` and `fad stream` on `dir`; both must fail with one sentence
/// containing `want`.
fn assert_one_error(name: &str, dir: &Path, want: &str) {
    let table = b"timestamp,group_id,sequence_id,bpm,uterus\n0,g,s,140,10\n";
    for cmd in ["score", "stream"] {
        let input: &[u8] = if cmd == "score" { table } else { b"0,140,10,g,s\n" };
        let out = run(fad().arg(cmd).arg("--model").arg(dir), input);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd} {name}: {err}");
        assert_eq!(err.lines().count(), 1, "{cmd} {name}: one sentence: {err}");
        assert!(err.starts_with("fad: "), "{cmd} {name}: {err}");
        assert!(err.contains(want), "{cmd} {name}: wanted {want:?} in {err}");
        assert!(!err.contains("panicked"), "{cmd} {name}: {err}");
        assert!(out.stdout.is_empty(), "{cmd} {name}");
    }
}

#[test]
fn bad_pickles_are_one_sentence_and_exit_1() {
    let good = pickle("small-p4.pkl");
    let keep = |_: &mut serde_json::Value| {};
    let truncated = artifacts("truncated", &good[..1000], keep);
    assert_one_error(
        "truncated",
        &truncated,
        &format!("{}: truncated pickle (ends at byte 1000 inside a ", truncated.join("model_if.pkl").display()),
    );
    let empty = artifacts("empty", b"", keep);
    assert_one_error("empty", &empty, "model_if.pkl: is empty, not a pickle");
    let other = artifacts("other-class", &pickle("not-iforest-forest.pkl"), keep);
    assert_one_error(
        "other class",
        &other,
        "model_if.pkl: refusing global sklearn.ensemble._forest.RandomForestClassifier: fad imports scikit-learn \
         IsolationForest models only",
    );
    let tree = artifacts("tree", &pickle("not-iforest-tree.pkl"), keep);
    assert_one_error(
        "a tree",
        &tree,
        "model_if.pkl: is a pickle of sklearn.tree._classes.ExtraTreeRegressor, not of a scikit-learn IsolationForest",
    );
    let dict = artifacts("dict", &pickle("not-iforest-dict.pkl"), keep);
    assert_one_error("a dict", &dict, "model_if.pkl: is a pickle of a dict, not of a scikit-learn IsolationForest");
    let os = artifacts("os-system", &pickle("os-system.pkl"), keep);
    assert_one_error("os.system", &os, "model_if.pkl: refusing global os.system: it is not on the allow-list");
    let posix = artifacts("posix-system", &pickle("posix-system.pkl"), keep);
    assert_one_error("posix.system", &posix, "model_if.pkl: refusing global posix.system");
    let narrow = artifacts("narrow", &good, |m| {
        m["config"]["lags"] = serde_json::json!([1, 2, 3]);
        m["config"]["roll_windows"] = serde_json::json!([3]);
        let cols = fad::model::feature_config_from(&m["config"]).unwrap().feature_cols();
        m["feature_cols"] = serde_json::json!(cols);
    });
    assert_one_error(
        "feature count",
        &narrow,
        &format!("model in {} expects 24 features but its meta.json lists 10", narrow.display()),
    );
    let names = artifacts("names", &pickle("other-names.pkl"), keep);
    assert_one_error(
        "column names",
        &names,
        "model_if.pkl: the forest was fitted on columns other than those in meta.json (column 1 is uterus_rollstd_12 \
         in the model, bpm_lag_1 in meta.json)",
    );
    let missing = artifacts("missing", b"", keep);
    std::fs::remove_file(missing.join("model_if.pkl")).unwrap();
    assert_one_error("no pickle", &missing, "lists no model files and");
}
