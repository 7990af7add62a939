//! Bad input through `convert`, `train` and `score`: one clear sentence naming the file,
//! line and field, exit status 1. Broken models: one clear error. Conventions: --help
//! examples, nothing decorative on a non-terminal stderr.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// A data tree with one recording whose bpm file is `bpm` (uterus is sound).
fn tree(dir: &Path, bpm: &[u8]) -> PathBuf {
    let root = dir.join("data");
    let rec = root.join("regular/1");
    std::fs::create_dir_all(rec.join("bpm")).unwrap();
    std::fs::create_dir_all(rec.join("uterus")).unwrap();
    std::fs::write(rec.join("bpm/r_1.csv"), bpm).unwrap();
    let ut: String = "time_sec,value\n".to_string() + &(0..40).map(|t| format!("{t},10\n")).collect::<String>();
    std::fs::write(rec.join("uterus/r_2.csv"), ut).unwrap();
    root
}

fn one_error(out: &std::process::Output) -> String {
    assert_eq!(out.status.code(), Some(1), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    err.lines().last().unwrap_or("").to_string()
}

#[test]
fn convert_names_the_file_line_and_field() {
    let good: String = (0..40).map(|t| format!("{t},140\n")).collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("fields", format!("time_sec,value\n{good}5,140,9\n").into_bytes(), "line 42: expected 2 fields"),
        (
            "number",
            format!("time_sec,value\n{good}41,abc\n").into_bytes(),
            "line 42, field value: \"abc\" is not a number",
        ),
        ("time", format!("time_sec,value\n{good}inf,140\n").into_bytes(), "line 42, field time_sec: \"inf\""),
        ("empty time", format!("time_sec,value\n{good},140\n").into_bytes(), "line 42, field time_sec: \"\""),
        ("utf8", [format!("time_sec,value\n{good}").as_bytes(), b"41,1\xff4\n"].concat(), "line 42: not UTF-8"),
        ("header", b"when,what\n1,2\n".to_vec(), "line 1: expected the header time_sec,value"),
    ];
    for (name, bpm, want) in cases {
        let dir = scratch(&format!("convert-{name}"));
        let root = tree(&dir, &bpm);
        let out = fad().arg("convert").arg(&root).output().unwrap();
        let err = one_error(&out);
        assert!(err.contains("regular/1/bpm/r_1.csv") && err.contains(want), "{name}: {err}");
        // --skip-bad leaves the file out and says so, with a count, exit 0; so does the feed.
        for kind in ["table", "feed"] {
            let out = fad().arg("convert").arg(&root).args(["--skip-bad", "--as", kind]).output().unwrap();
            assert!(out.status.success(), "{name}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("skipped") && err.contains("1 malformed file pair(s) skipped"),
                "{name} {kind}: {err}"
            );
        }
    }
    // Oddities that are data, not errors: CRLF, a BOM, empty values, negative and huge numbers.
    let dir = scratch("convert-odd");
    let root = tree(&dir, b"\xEF\xBB\xBFtime_sec,value\r\n0,140\r\n1,\r\n2,-5\r\n3,1e308\r\n");
    let out = fad().arg("convert").arg(&root).args(["--join", "outer"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("3,regular-1,r_1,1e308,10,regular"));
}

const HEADER: &str = "timestamp,group_id,sequence_id,bpm,uterus,target\n";

fn table_cases() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let good: String = (0..40).map(|t| format!("{t},g,s,140,10,regular\n")).collect();
    let with = |bad: &[u8]| [HEADER.as_bytes(), good.as_bytes(), bad].concat();
    vec![
        ("fields", with(b"41,g,s,140\n"), "line 42: expected 6 fields, found 4"),
        ("bpm", with(b"41,g,s,abc,10,regular\n"), "line 42, field bpm: \"abc\" is not a number"),
        ("uterus", with(b"41,g,s,140,1.2.3,regular\n"), "line 42, field uterus"),
        ("time", with(b"inf,g,s,140,10,regular\n"), "line 42, field timestamp: \"inf\" is not a time"),
        ("empty time", with(b",g,s,140,10,regular\n"), "line 42, field timestamp"),
        ("group", with(b"41,,s,140,10,regular\n"), "line 42, field group_id: empty"),
        ("sequence", with(b"41,g,,140,10,regular\n"), "line 42, field sequence_id: empty"),
        ("utf8", with(b"41,g,s,1\xff0,10,regular\n"), "line 42, field bpm: not UTF-8"),
        ("iso junk", with(b"2025-13-45T99:00:00,g,s,140,10,regular\n"), "line 42, field timestamp"),
        ("header", b"a,b,c\n1,2,3\n".to_vec(), "line 1: no column \"timestamp\""),
        ("long line", with(&vec![b'7'; 3 << 20]), "line 42 is longer than"),
    ]
}

#[test]
fn score_and_train_name_the_file_line_and_field() {
    for (name, bytes, want) in table_cases() {
        let dir = scratch(&format!("table-{name}"));
        let path = dir.join("merged.csv");
        std::fs::write(&path, &bytes).unwrap();
        let out = fad().arg("score").arg(&path).arg("--model").arg(model()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "score {name}: {err}");
        assert!(err.contains(&format!("{}", path.display())) && err.contains(want), "score {name}: {err}");
        let out = fad().arg("train").arg(&path).arg("--out-dir").arg(dir.join("m")).output().unwrap();
        let err = one_error(&out);
        assert!(err.contains(&format!("{}", path.display())) && err.contains(want), "train {name}: {err}");
        assert!(!dir.join("m").exists(), "train {name} left a model behind");
    }
}

#[test]
fn odd_but_valid_table_rows_are_data_not_errors() {
    // CRLF, a BOM before a row, spaces, ISO times with and without zone, negative and
    // huge values, a duplicate row: scored or skipped, never an error.
    let mut t = String::from("\u{feff}timestamp,group_id,sequence_id,bpm,uterus\r\n");
    for s in 0..30 {
        t.push_str(&format!("2025-01-01T00:00:{s:02}Z, g , s ,140,10\r\n"));
    }
    t.push_str("\u{feff}2025-01-01T00:00:30,g,s,140,10\r\n");
    t.push_str("2025-01-01T00:00:30,g,s,140,10\r\n");
    t.push_str("2025-01-01T00:00:31,g,s,-140,1e308\r\n");
    let dir = scratch("table-odd");
    let path = dir.join("merged.csv");
    std::fs::write(&path, t).unwrap();
    let out = fad().arg("score").arg(&path).arg("--model").arg(model()).arg("--all").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = lines(&out.stdout);
    assert_eq!(rows.len(), 1 + 33);
    assert!(rows[31].starts_with("2025-01-01T00:00:30,g,s,140,10,") && !rows[31].ends_with(",,,"));
    assert!(rows[32].ends_with(",,,"), "the duplicate is not scored: {}", rows[32]);
}

/// A copy of the shared model, changed by `f`.
fn broken_model(name: &str, f: impl FnOnce(&Path)) -> PathBuf {
    let dir = scratch(&format!("model-{name}")).join("m");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(model()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    f(&dir);
    dir
}

#[test]
fn a_broken_model_is_one_clear_error() {
    let edit_meta = |dir: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let p = dir.join("meta.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    };
    // A forest file emptied of trees, with its checksum in meta.json updated to match.
    let no_trees = |dir: &Path, file: &str| {
        let p = dir.join(file);
        let mut forest: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        forest["trees"] = serde_json::json!([]);
        let bytes = serde_json::to_vec(&forest).unwrap();
        std::fs::write(&p, &bytes).unwrap();
        let sum = fad::model::sha256_hex(&bytes);
        edit_meta(dir, &|v| {
            for mf in v["model_files"].as_array_mut().unwrap() {
                if mf["name"] == file {
                    mf["sha256"] = serde_json::json!(sum);
                }
            }
        });
    };
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        ("no trees", broken_model("no-trees", |d| no_trees(d, "forest.json")), "forest.json: the forest has no trees"),
        (
            "no bpm trees",
            broken_model("no-bpm-trees", |d| no_trees(d, "forest_bpm.json")),
            "forest_bpm.json: the forest has no trees",
        ),
        (
            "truncated meta",
            broken_model("truncated-meta", |d| {
                let t = std::fs::read(d.join("meta.json")).unwrap();
                std::fs::write(d.join("meta.json"), &t[..t.len() / 2]).unwrap();
            }),
            "meta.json is not valid model metadata",
        ),
        (
            "truncated forest",
            broken_model("truncated-forest", |d| {
                let t = std::fs::read(d.join("forest.json")).unwrap();
                std::fs::write(d.join("forest.json"), &t[..t.len() - 10]).unwrap();
            }),
            "forest.json has SHA-256",
        ),
        (
            "checksum",
            broken_model("checksum", |d| {
                edit_meta(d, &|v| v["model_files"][0]["sha256"] = serde_json::json!("00"));
            }),
            "but meta.json expects 00",
        ),
        (
            "missing file",
            broken_model("missing", |d| std::fs::remove_file(d.join("forest_bpm.json")).unwrap()),
            "cannot read model file",
        ),
        (
            "missing meta",
            broken_model("missing-meta", |d| std::fs::remove_file(d.join("meta.json")).unwrap()),
            "cannot read model metadata",
        ),
        (
            "feature list",
            broken_model("features", |d| {
                edit_meta(d, &|v| v["feature_cols"].as_array_mut().unwrap().swap(0, 1));
            }),
            "feature_cols (24 columns) do not match",
        ),
        (
            "lags",
            broken_model("lags", |d| edit_meta(d, &|v| v["config"]["lags"] = serde_json::json!([1, 2]))),
            "do not match the features its config defines",
        ),
    ];
    for (name, dir, want) in cases {
        for cmd in ["score", "stream"] {
            let out = fad().arg(cmd).arg("--model").arg(&dir).stdin(std::process::Stdio::null()).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{cmd} {name}: {err}");
            assert_eq!(err.lines().count(), 1, "{cmd} {name}: one sentence: {err}");
            assert!(err.contains(want), "{cmd} {name}: {err}");
            assert!(out.stdout.is_empty(), "{cmd} {name}");
        }
    }
}

#[test]
fn every_subcommand_has_worked_examples_in_help() {
    for cmd in ["convert", "train", "score", "stream"] {
        let out = fad().args([cmd, "--help"]).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        let examples = text.split("Examples:").nth(1).unwrap_or_else(|| panic!("{cmd} --help has no examples"));
        assert!(examples.lines().filter(|l| l.contains(&format!("fad {cmd}"))).count() >= 2, "{cmd}: {examples}");
    }
    let top = fad().arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&top.stdout).contains("Exit status"));
}

#[test]
fn every_example_line_stays_one_line_in_help() {
    // The width clap wraps help to when stdout is not a terminal (100), and a terminal's 80.
    let commands = ["convert", "train", "score", "stream"];
    for (cmd, columns) in commands.iter().flat_map(|c| [(*c, "100"), (*c, "80")]) {
        let out = fad().args([cmd, "--help"]).env("COLUMNS", columns).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let examples = text.split("Examples:").nth(1).unwrap();
        assert!(examples.lines().nth(1).is_some_and(|l| l.starts_with("  ")), "{cmd}: {examples}");
        for line in examples.lines().skip(1).take_while(|l| !l.is_empty()) {
            let first = line.split_whitespace().next().unwrap_or("");
            assert!(
                line.starts_with("  ") && ["fad", "tail", "ln"].contains(&first) && line.trim().contains(' '),
                "{cmd} --help at {columns} columns: example wrapped mid-command at {line:?}"
            );
            assert!(!line.trim_end().ends_with('#'), "{cmd}: {line:?}");
        }
    }
}

#[test]
fn train_help_describes_the_default_model() {
    let out = fad().args(["train", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    let about = text.split("Usage:").next().unwrap();
    for want in ["--features filters (the default)", "three isolation forests", "bpm_anomaly and uterus_anomaly"] {
        assert!(about.contains(want), "train --help lacks {want:?}: {about}");
    }
    assert!(!about.contains("fits an isolation forest"), "{about}");
}

#[test]
fn nothing_decorative_on_a_stderr_that_is_not_a_terminal() {
    let out = fad().arg("convert").arg(repo().join("data/sample/lct2025")).output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains('\r') && !err.contains('\u{1b}') && !err.contains("=>"), "{err:?}");
    let dir = scratch("quiet-train");
    let out = fad()
        .args(["train", "--n-estimators", "5", "--out-dir"])
        .arg(dir.join("m"))
        .arg(repo().join("data/sample/lct2025"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains('\r') && !err.contains('\u{1b}'), "{err:?}");
}

#[test]
fn a_full_disk_on_stdout_is_named_exit_1() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        eprintln!("note: no /dev/full here; skipped");
        return;
    };
    let sample = repo().join("data/sample/ctu-uhb");
    let feed = scratch("full-disk").join("feed.csv");
    std::fs::write(&feed, series_lines("g", "s", 0, 40)).unwrap();
    let runs: [Vec<std::ffi::OsString>; 3] = [
        vec!["convert".into(), sample.clone().into()],
        vec!["score".into(), sample.into(), "--model".into(), model().into()],
        vec!["stream".into(), "--model".into(), model().into(), "--input".into(), feed.into()],
    ];
    for args in runs {
        let out = fad().args(&args).stdout(full.try_clone().unwrap()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("fad: cannot write to standard output: No space left on device"), "{args:?}: {err}");
    }
}

/// A write that fails in the middle of a chunk leaves a summary whose parts add up to its
/// line count (it counted every line read, answered or not).
#[test]
fn after_a_failed_write_the_summary_counts_add_up() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        eprintln!("note: no /dev/full here; skipped");
        return;
    };
    let feed = scratch("full-disk-summary").join("feed.csv");
    // A bad first line, so that there is a summary; enough lines to fill the reply buffer
    // many times over within one read.
    std::fs::write(&feed, format!("bad\n{}", series_lines("g", "s", 0, 20_000))).unwrap();
    let out = fad().args(["stream", "--model"]).arg(model()).arg("--input").arg(&feed).stdout(full).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let summary = err.lines().find(|l| l.starts_with("fad stream: ")).unwrap_or_else(|| panic!("no summary: {err}"));
    let numbers: Vec<u64> =
        summary.split(|c: char| !c.is_ascii_digit()).filter(|w| !w.is_empty()).map(|w| w.parse().unwrap()).collect();
    // "N lines, A scored, B warming up, C not scorable (wrong_field_count C)"
    let [lines, scored, warming, rejected, ..] = numbers[..] else { panic!("{summary}") };
    assert_eq!(lines, scored + warming + rejected, "{summary}");
    assert!(lines < 20_001, "{summary}");
}
