//! End-to-end tests of each subcommand on the bundled real sample (data/sample).

use assert_cmd::Command;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;

fn sample(source: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample").join(source)
}

fn fad() -> Command {
    Command::cargo_bin("fad").unwrap()
}

fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The merged LCT sample and a model trained on it, made once per test run.
struct Fixture {
    _dir: tempfile::TempDir,
    merged: PathBuf,
    model: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let merged = dir.path().join("merged.csv");
        let text = stdout_of(fad().arg("convert").arg(sample("lct2025")));
        std::fs::write(&merged, text).unwrap();
        let model = dir.path().join("model");
        fad().args(["train", "--n-estimators", "40", "--out-dir"]).arg(&model).arg(&merged).assert().success();
        Fixture { _dir: dir, merged, model }
    })
}

fn meta_of(model: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(model.join("meta.json")).unwrap()).unwrap()
}

/// Valid samples a series of the fixture's model needs before its first score.
fn warmup() -> usize {
    meta_of(&fixture().model)["max_lag"].as_u64().unwrap() as usize
}

fn csv_rows(text: &str) -> Vec<Vec<String>> {
    text.lines().map(|l| l.split(',').map(str::to_owned).collect()).collect()
}

#[test]
fn convert_writes_the_header_and_keeps_the_order() {
    let text = std::fs::read_to_string(&fixture().merged).unwrap();
    let rows = csv_rows(&text);
    assert_eq!(rows[0].join(","), "timestamp,group_id,sequence_id,bpm,uterus,target");
    let body = &rows[1..];
    assert!(body.len() > 10_000, "only {} rows", body.len());
    // Same folder number under both classes gives two distinct groups.
    let groups: std::collections::BTreeSet<&str> = body.iter().map(|r| r[1].as_str()).collect();
    assert_eq!(groups.into_iter().collect::<Vec<_>>(), ["hypoxia-19", "hypoxia-21", "regular-19"]);
    // Ordered by class, group (numeric-aware), sequence, then time within a sequence.
    let class_rank = |r: &Vec<String>| (r[5] == "regular") as u8;
    let group_num = |r: &Vec<String>| r[1].rsplit('-').next().unwrap().parse::<u32>().unwrap();
    for w in body.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let ka = (class_rank(a), group_num(a), a[2].clone());
        let kb = (class_rank(b), group_num(b), b[2].clone());
        assert!(ka <= kb, "rows out of order: {a:?} then {b:?}");
        if ka == kb {
            assert!(a[0].parse::<f64>().unwrap() < b[0].parse::<f64>().unwrap(), "time not increasing: {a:?} {b:?}");
        }
        assert_eq!(a[1], format!("{}-{}", a[5], group_num(a)));
    }
    // `_3` bpm files pair with `_4` uterus files.
    assert!(body.iter().any(|r| r[2] == "20250904-00800003_3"));
    // Output is deterministic.
    assert_eq!(stdout_of(fad().arg("convert").arg(sample("lct2025"))), text);
}

#[test]
fn convert_outer_join_keeps_rows_with_one_signal() {
    let inner = stdout_of(fad().arg("convert").arg(sample("lct2025"))).lines().count();
    let outer = stdout_of(fad().args(["convert", "--join", "outer"]).arg(sample("lct2025")));
    let one_sided =
        outer.lines().skip(1).filter(|l| l.split(',').nth(3) == Some("") || l.split(',').nth(4) == Some(""));
    let n_one_sided = one_sided.count();
    assert!(n_one_sided > 0, "the sample has rows with only one signal");
    assert_eq!(outer.lines().count(), inner + n_one_sided);
}

#[test]
fn convert_feed_is_in_timestamp_order_with_stream_fields() {
    let feed = stdout_of(fad().args(["convert", "--as", "feed"]).arg(sample("ctu-uhb")));
    let mut last = f64::NEG_INFINITY;
    let mut n = 0;
    for line in feed.lines() {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 5, "{line}");
        let t: f64 = f[0].parse().unwrap();
        assert!(t >= last);
        last = t;
        assert!(f[3].starts_with("hypoxia-") || f[3].starts_with("regular-"));
        n += 1;
    }
    let table = stdout_of(fad().arg("convert").arg(sample("ctu-uhb")));
    assert_eq!(n, table.lines().count() - 1, "feed and table hold the same rows");
}

/// A tree with one good pair, one bpm file without partner and one `_13` file that must
/// not pair with `_2` (suffix, not substring).
fn small_tree(dir: &Path, bad_value: Option<&str>) {
    let bpm = dir.join("regular/7/bpm");
    let ut = dir.join("regular/7/uterus");
    std::fs::create_dir_all(&bpm).unwrap();
    std::fs::create_dir_all(&ut).unwrap();
    let mut b = String::from("time_sec,value\n");
    let mut u = String::from("time_sec,value\n");
    for i in 0..30 {
        b += &format!("{}.0,{}\n", i, 130 + i % 5);
        u += &format!("{}.0,{}\n", i, 10 + i % 3);
    }
    if let Some(v) = bad_value {
        b += &format!("30.0,{v}\n");
    }
    std::fs::write(bpm.join("rec_1.csv"), b).unwrap();
    std::fs::write(ut.join("rec_2.csv"), u).unwrap();
    std::fs::write(bpm.join("lonely_1.csv"), "time_sec,value\n0,120\n").unwrap();
    std::fs::write(bpm.join("rec_13.csv"), "time_sec,value\n0,120\n").unwrap();
}

#[test]
fn convert_names_unpaired_files_and_malformed_lines() {
    let dir = tempfile::tempdir().unwrap();
    small_tree(dir.path(), None);
    let out = fad().arg("convert").arg(dir.path()).output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lonely_1.csv") && err.contains("rec_13.csv"), "{err}");
    assert!(err.contains("2 unpaired"), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 31);

    let bad = tempfile::tempdir().unwrap();
    small_tree(bad.path(), Some("12x"));
    let out = fad().arg("convert").arg(bad.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rec_1.csv line 32, field value") && err.contains("12x"), "{err}");
    let out = fad().args(["convert", "--skip-bad"]).arg(bad.path()).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 malformed"));
}

#[test]
fn train_writes_artifacts_and_refuses_a_non_empty_dir() {
    let f = fixture();
    for name in ["meta.json", "forest.json", "forest_bpm.json", "forest_uterus.json"] {
        assert!(f.model.join(name).is_file(), "{name} missing");
    }
    let meta = meta_of(&f.model);
    let cols = meta["feature_cols"].as_array().unwrap();
    assert!(cols.len() >= 2, "{cols:?}");
    assert!(cols.iter().any(|c| c.as_str().unwrap().starts_with("bpm_")));
    assert!(cols.iter().any(|c| c.as_str().unwrap().starts_with("uterus_")));
    assert!(meta["max_lag"].as_u64().unwrap() >= 1);
    // ROC AUC needs both classes among the validation groups; with one it is null.
    let val = &meta["report"]["validation"];
    let auc = val.get("roc_auc_sequences").expect("the report always has the AUC key");
    assert_eq!(auc.is_null(), val["groups"] == 1, "{val}");
    assert!(meta["report"]["train"]["rows"].as_u64().unwrap() > 10_000);
    let out = fad().args(["train", "--n-estimators", "5", "--out-dir"]).arg(&f.model).arg(&f.merged).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--force"), "{err}");
    // Refused before any data is read or any forest fitted: no report, one sentence.
    assert!(!err.contains("rows read") && !err.contains("validation:"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // Even an input that does not exist is not opened first.
    let out = fad().args(["train", "/nonexistent/merged.csv", "--out-dir"]).arg(&f.model).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not empty; use --force"));
}

#[test]
fn train_is_deterministic_whatever_n_jobs_and_takes_the_prototype_spellings() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    fad()
        .args(["train", "--n-estimators", "20", "--n-jobs", "1", "--out-dir"])
        .arg(&a)
        .arg(&f.merged)
        .assert()
        .success();
    fad()
        .args(["train", "--n_estimators", "20", "--n_jobs", "2", "--random_state", "42", "--val_size", "0.2"])
        .args(["--max_samples", "auto", "--max_features", "1.0", "--contamination", "auto", "--out_dir"])
        .arg(&b)
        .arg("--input_csv")
        .arg(&f.merged)
        .assert()
        .success();
    for name in ["meta.json", "forest.json", "forest_bpm.json", "forest_uterus.json"] {
        let (x, y) = (std::fs::read(a.join(name)).unwrap(), std::fs::read(b.join(name)).unwrap());
        if name == "meta.json" {
            // As the README says: the recorded n_jobs is the one line that differs.
            let (x, y) = (String::from_utf8(x).unwrap(), String::from_utf8(y).unwrap());
            assert_eq!(x.lines().count(), y.lines().count());
            let differ: Vec<(&str, &str)> = x.lines().zip(y.lines()).filter(|(a, b)| a != b).collect();
            assert_eq!(differ, [(r#"    "n_jobs": 1,"#, r#"    "n_jobs": 2,"#)], "meta.json differs elsewhere");
        } else {
            assert!(x == y, "{name} differs between --n-jobs 1 and 2");
        }
    }
}

#[test]
fn usage_errors_exit_2() {
    let f = fixture();
    let out = fad().args(["train", "--max-samples", "0", "--out-dir", "/tmp/never"]).arg(&f.merged).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = fad().args(["stream"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    // An int max_features above the number of columns, as scikit-learn refuses it.
    let out = fad().args(["train", "--max-features", "99", "--out-dir", "/tmp/never"]).arg(&f.merged).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--max-features 99 is more than the 17 feature columns"), "{err}");
    let out = fad()
        .args(["train", "--features", "window", "--max-features", "25", "--out-dir", "/tmp/never"])
        .arg(&f.merged)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("more than the 24 feature columns"));
    let dir = tempfile::tempdir().unwrap();
    for (set, all) in [("filters", "14"), ("window", "24")] {
        fad()
            .args(["train", "--n-estimators", "3", "--features", set, "--max-features", all, "--out-dir"])
            .arg(dir.path().join(set))
            .arg(sample("ctu-uhb"))
            .assert()
            .success();
    }
    let out = fad().args(["score", "--model", "/nonexistent/model"]).arg(&f.merged).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model/meta.json"));
}

/// The merged table turned into stream messages, in table order.
fn feed_of(merged: &str) -> String {
    merged
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            format!("{},{},{},{},{}\n", f[0], f[3], f[4], f[1], f[2])
        })
        .collect()
}

#[test]
fn score_rows_equal_stream_detections() {
    let f = fixture();
    let merged = std::fs::read_to_string(&f.merged).unwrap();
    let scored = stdout_of(fad().arg("score").arg(&f.merged).arg("--model").arg(&f.model));
    let mut lines = scored.lines();
    assert_eq!(
        lines.next(),
        Some("timestamp,group_id,sequence_id,bpm,uterus,bpm_anomaly,uterus_anomaly,anomaly_score")
    );
    let from_score: Vec<String> = lines.map(str::to_owned).collect();
    let replies = stdout_of(fad().arg("stream").arg("--model").arg(&f.model).write_stdin(feed_of(&merged)));
    assert_eq!(replies.lines().count(), merged.lines().count() - 1, "one reply per line");
    let from_stream: Vec<String> = replies
        .lines()
        .filter_map(|r| r.strip_prefix("ready:true,detection:"))
        .map(|r| r.strip_suffix(",needed:0").unwrap().to_owned())
        .collect();
    assert!(from_score.len() > 1000);
    assert_eq!(from_score, from_stream);
    let flagged = from_score.iter().filter(|r| r.split(',').nth(7).unwrap().starts_with('-')).count();
    assert!(flagged > 0 && flagged < from_score.len(), "{flagged} of {} flagged", from_score.len());
}

#[test]
fn warm_up_counts_down_then_scores() {
    let f = fixture();
    // warm-up + 6 samples of one series at 4 Hz with no gap, real values from the sample
    let w = warmup();
    let merged = std::fs::read_to_string(&f.merged).unwrap();
    let feed: String = feed_of(&merged)
        .lines()
        .take(w + 6)
        .enumerate()
        .map(|(i, l)| {
            let f: Vec<&str> = l.split(',').collect();
            format!("{},{},{},g,s\n", i as f64 * 0.25, f[1], f[2])
        })
        .collect();
    let replies = stdout_of(fad().arg("stream").arg("--model").arg(&f.model).write_stdin(feed));
    let replies: Vec<&str> = replies.lines().collect();
    for (i, r) in replies.iter().take(w - 1).enumerate() {
        assert_eq!(*r, format!("ready:false,detection:,needed:{}", w - 1 - i));
    }
    assert!(replies[w - 1].starts_with("ready:true,detection:"), "{}", replies[w - 1]);
    assert!(replies[w - 1].ends_with(",needed:0"));
}

#[test]
fn window_features_are_the_specs_24_columns_with_a_warm_up_of_24() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("w");
    fad()
        .args(["train", "--features", "window", "--n-estimators", "10", "--out-dir"])
        .arg(&model)
        .arg(&f.merged)
        .assert()
        .success();
    let meta = meta_of(&model);
    let cols: Vec<&str> = meta["feature_cols"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(cols.len(), 24);
    assert_eq!(&cols[..3], ["bpm_lag_1", "uterus_lag_1", "bpm_lag_2"]);
    assert_eq!(cols[23], "uterus_rollstd_12");
    assert_eq!(meta["max_lag"], 24);
    let feed: String = (0..24).map(|i| format!("{},{},10,g,s\n", i as f64 * 0.25, 140 + i % 3)).collect();
    let replies = stdout_of(fad().arg("stream").arg("--model").arg(&model).write_stdin(feed));
    let replies: Vec<&str> = replies.lines().collect();
    assert_eq!(replies[0], "ready:false,detection:,needed:23");
    assert_eq!(replies[22], "ready:false,detection:,needed:1");
    assert!(replies[23].starts_with("ready:true,detection:5.75,g,s,142,10,"), "{}", replies[23]);
}

#[test]
fn a_malformed_line_gets_an_error_and_the_next_is_answered() {
    let f = fixture();
    let feed =
        "0,140,10,g,s\n0.25,abc,10,g,s\nnot,a,line\n0.5,141,11,g,s\n0.75,0,11,g,s\n1970-01-01T00:00:01Z,142,12,g,s\n";
    let w = warmup();
    let replies = stdout_of(fad().arg("stream").arg("--model").arg(&f.model).write_stdin(feed));
    let replies: Vec<&str> = replies.lines().collect();
    let want = [
        format!("ready:false,detection:,needed:{}", w - 1),
        format!("ready:false,detection:,needed:{},error:bad_bpm", w - 1),
        format!("ready:false,detection:,needed:{w},error:wrong_field_count"),
        format!("ready:false,detection:,needed:{}", w - 2),
        format!("ready:false,detection:,needed:{},error:bpm_signal_loss", w - 2),
        format!("ready:false,detection:,needed:{}", w - 3),
    ];
    assert_eq!(replies, want);
}

#[test]
fn stream_answers_while_stdin_stays_open() {
    let f = fixture();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fad"))
        .arg("stream")
        .arg("--model")
        .arg(&f.model)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let w = warmup();
    for (i, want) in [format!("needed:{}", w - 1), format!("needed:{}", w - 2)].iter().enumerate() {
        writeln!(stdin, "{i},140,10,g,s").unwrap();
        stdin.flush().unwrap();
        let mut reply = String::new();
        stdout.read_line(&mut reply).unwrap(); // blocks forever if fad waits for EOF
        assert!(reply.trim_end().ends_with(want), "{reply}");
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

#[test]
fn closed_stdout_ends_quietly() {
    let f = fixture();
    let merged = std::fs::read_to_string(&f.merged).unwrap();
    for args in [vec!["stream", "--model"], vec!["score", "--model"]] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fad"));
        cmd.args(&args).arg(&f.model);
        if args[0] == "score" {
            cmd.arg(&f.merged);
        }
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let feed = feed_of(&merged);
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(feed.as_bytes()); // fails once fad has gone: fine
        });
        let mut stdout = child.stdout.take().unwrap();
        let mut first = [0u8; 1];
        std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
        drop(stdout); // like `| head -c1`
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panick"), "{args:?}: {err}");
        assert!(!err.contains("Broken pipe"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
}

#[test]
fn score_reads_a_data_directory_and_all_keeps_unscored_rows() {
    let f = fixture();
    let from_dir = stdout_of(fad().arg("score").arg(sample("lct2025")).arg("--model").arg(&f.model));
    let from_csv = stdout_of(fad().arg("score").arg(&f.merged).arg("--model").arg(&f.model));
    assert_eq!(from_dir, from_csv);
    let all = stdout_of(fad().args(["score", "--all"]).arg(&f.merged).arg("--model").arg(&f.model));
    let merged_rows = std::fs::read_to_string(&f.merged).unwrap().lines().count();
    assert_eq!(all.lines().count(), merged_rows);
    assert!(all.lines().any(|l| l.ends_with(",,,")));
}

#[test]
fn score_names_the_file_line_and_field_of_a_bad_row_and_scores_the_rest() {
    let f = fixture();
    let merged = std::fs::read_to_string(&f.merged).unwrap();
    let mut lines: Vec<String> = merged.lines().map(str::to_owned).collect();
    let mut bad = lines[5].split(',').map(str::to_owned).collect::<Vec<_>>();
    bad[3] = "fast".into();
    lines[5] = bad.join(",");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.csv");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let out = fad().arg("score").arg(&path).arg("--model").arg(&f.model).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.csv line 6, field bpm") && err.contains("fast"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).lines().count() > 1000, "the rest is still scored");
}

#[test]
fn score_refuses_the_ids_stream_refuses_and_scores_the_rest() {
    let f = fixture();
    let merged = std::fs::read_to_string(&f.merged).unwrap();
    let mut lines: Vec<String> = merged.lines().map(str::to_owned).collect();
    let mut set = |i: usize, field: usize, value: String| {
        let mut row = lines[i].split(',').map(str::to_owned).collect::<Vec<_>>();
        row[field] = value;
        lines[i] = row.join(",");
    };
    set(7, 1, "ward\u{1b}[31m".into());
    set(8, 2, "s".repeat(300));
    set(10, 1, r#""g,h""#.into()); // CSV-quoted ids that fad would write back unquoted
    set(11, 2, r#""q""x""#.into());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ids.csv");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let out = fad().arg("score").arg(&path).args(["--all", "--model"]).arg(&f.model).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ids.csv line 8, field group_id") && err.contains("control_char_in_id"), "{err}");
    assert!(err.contains("ids.csv line 9, field sequence_id") && err.contains("id_too_long"), "{err}");
    assert!(err.contains("ids.csv line 11, field group_id") && err.contains("comma"), "{err}");
    assert!(err.contains("ids.csv line 12, field sequence_id") && err.contains("double quote"), "{err}");
    assert!(!out.stdout.contains(&0x1b) && !out.stderr.contains(&0x1b), "no raw escape reaches a terminal");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.lines().all(|l| l.split(',').count() == 8), "every row keeps its 8 fields");
    assert_eq!(stdout.lines().count(), merged.lines().count() - 4, "every other row is still answered");
}

#[test]
fn train_reads_stdin_and_data_directories() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let from_stdin = dir.path().join("stdin");
    fad()
        .args(["train", "-", "--n-estimators", "5", "--out-dir"])
        .arg(&from_stdin)
        .write_stdin(std::fs::read(&f.merged).unwrap())
        .assert()
        .success();
    let from_dir = dir.path().join("dir");
    let out = fad()
        .args(["train", "--n-estimators", "5", "--val-size", "0.5", "--out-dir"])
        .arg(&from_dir)
        .arg(sample("ctu-uhb"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("validation:") && err.contains("anomaly rate"), "{err}");
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(from_dir.join("meta.json")).unwrap()).unwrap();
    assert_eq!(
        meta["report"]["train"]["groups"].as_u64().unwrap() + meta["report"]["validation"]["groups"].as_u64().unwrap(),
        4
    );
    // CTU-UHB codes lost signal as 0: those samples are rejected, not scored as a heart rate
    assert!(meta["report"]["rejected_samples"]["bpm_signal_loss"].as_u64().unwrap() > 100, "{}", meta["report"]);
}

#[test]
fn realtime_feed_keeps_the_content_and_checks_its_flags() {
    let dir = tempfile::tempdir().unwrap();
    small_tree(dir.path(), None);
    let plain = stdout_of(fad().args(["convert", "--as", "feed"]).arg(dir.path()));
    let paced = stdout_of(fad().args(["convert", "--as", "feed", "--realtime", "1000"]).arg(dir.path()));
    assert_eq!(plain, paced);
    assert_eq!(plain.lines().count(), 30);
    for bad in [vec!["--as", "feed", "--realtime", "0"], vec!["--realtime", "2"]] {
        let out = fad().arg("convert").args(&bad).arg(dir.path()).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }
}

#[test]
fn train_force_replaces_the_model_and_leaves_no_temporary_directories() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    for n in ["3", "4"] {
        let mut cmd = fad();
        cmd.args(["train", "--n-estimators", n, "--out-dir"]).arg(&model).arg(sample("ctu-uhb"));
        if n == "4" {
            cmd.arg("--force");
        }
        cmd.assert().success();
    }
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(model.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["config"]["n_estimators"], 4);
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, [std::ffi::OsString::from("m")]);
}

#[test]
fn train_class_fits_on_one_class_and_still_validates_on_all() {
    let dir = tempfile::tempdir().unwrap();
    let (all, regular) = (dir.path().join("all"), dir.path().join("regular"));
    let train = |out: &Path, extra: &[&str]| {
        fad()
            .args(["train", "--n-estimators", "10", "--force", "--out-dir"])
            .arg(out)
            .args(extra)
            .arg(sample("ctu-uhb"))
            .assert()
            .success();
        meta_of(out)
    };
    let groups = |m: &serde_json::Value| m["report"]["train"]["groups"].as_u64().unwrap();
    // No validation: the forests see every patient (the sample has 2 of each class), or
    // only the 2 regular ones.
    let no_val = ["--val-size", "0"];
    assert_eq!(groups(&train(&all, &no_val)), 4);
    assert_eq!(groups(&train(&regular, &["--val-size", "0", "--train-class", "regular"])), 2);
    let val = ["--val-size", "0.25"];
    let (a, r) = (train(&all, &val), train(&regular, &["--val-size", "0.25", "--train-class", "regular"]));
    assert_eq!(r["config"]["train_class"], "regular");
    assert!(a["config"]["train_class"].is_null());
    // Same split: the validation side is the same patients, every class of them.
    for key in ["groups", "sequences", "rows"] {
        assert_eq!(a["report"]["validation"][key], r["report"]["validation"][key], "{key}");
    }
    // One patient is held out; of the other three, the forests saw the regular ones only.
    assert_eq!(groups(&a), 3);
    assert!((1..=2).contains(&groups(&r)));
    assert!(r["report"]["train"]["rows"].as_u64() < a["report"]["train"]["rows"].as_u64());
    // Per-signal rates are in the report, and the defaults carry their reasons.
    for side in ["train", "validation"] {
        for key in ["bpm_anomaly_rate", "uterus_anomaly_rate"] {
            assert!(r["report"][side][key].is_f64(), "{side}.{key}");
        }
    }
    assert!(r["config"]["default_reasons"]["max_gap_s"].as_str().unwrap().contains("LCT 2025"));
    let out = fad()
        .args(["train", "--train-class", "nope", "--out-dir"])
        .arg(dir.path().join("x"))
        .arg(sample("ctu-uhb"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--train-class nope"));
}

#[test]
fn train_counts_the_same_groups_on_stderr_and_in_meta_json() {
    // Folder 7 under both classes is two patients; patient regular-short has too few
    // samples for a single score, so it can be neither fitted nor validated.
    let dir = tempfile::tempdir().unwrap();
    let mut table = String::from("timestamp,group_id,sequence_id,bpm,uterus,target\n");
    for (target, group, n) in [
        ("hypoxia", "7", 120),
        ("regular", "7", 120),
        ("hypoxia", "8", 120),
        ("regular", "9", 120),
        ("regular", "short", 5),
    ] {
        for i in 0..n {
            let bpm = 130 + (i * 7 + group.len() * 3) % 25;
            let uterus = 10 + (i * 13) % 40;
            table += &format!("{:.2},{group},{target}{group}_1,{bpm},{uterus},{target}\n", i as f64 * 0.25);
        }
    }
    let merged = dir.path().join("merged.csv");
    std::fs::write(&merged, table).unwrap();
    let train = |out: &str, extra: &[&str]| {
        let model = dir.path().join(out);
        let out = fad()
            .args(["train", "--n-estimators", "3", "--val-size", "0.5", "--random-state", "2", "--out-dir"])
            .arg(&model)
            .args(extra)
            .arg(&merged)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        (err, meta_of(&model)["report"].clone())
    };
    let (err, report) = train("all", &[]);
    let groups = |side: &str| report[side]["groups"].as_u64().unwrap();
    assert_eq!((groups("train"), groups("validation")), (2, 2), "{report}");
    assert!(err.contains("2 train / 2 validation groups, 1 without scorable rows left out;"), "{err}");
    assert_eq!(report["groups_without_scorable_rows"], 1);
    // Five sequences read, four of them with scorable rows, which the two sides share.
    assert!(err.contains("rows read in 5 sequences, ") && err.contains(" scorable rows in 4 of them;"), "{err}");
    assert_eq!((report["sequences"].as_u64(), report["sequences_scorable"].as_u64()), (Some(5), Some(4)));
    let seqs = |side: &str| report[side]["sequences"].as_u64().unwrap();
    assert_eq!(seqs("train") + seqs("validation"), 4, "{report}");
    // With --train-class the train side of the report is what the forests were fitted on,
    // and the summary line says so.
    let (err, report) = train("regular", &["--train-class", "regular"]);
    let counts = (report["train"]["groups"].as_u64(), report["validation"]["groups"].as_u64());
    assert_eq!(counts, (Some(1), Some(2)), "{report}");
    let want = "2 train / 2 validation groups (forests fitted on the 1 train groups of class regular)";
    assert!(err.contains(want), "{err}");
}

#[test]
fn a_bad_feature_config_file_is_a_data_error_naming_it() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    for (name, text, says) in [
        ("array.json", "[1]", "must hold a JSON object"),
        ("broken.json", "{\"filters\": ", "is not valid JSON"),
        ("typo.json", "{\"filters\": {\"warm_up\": 60}}", "warm_up"),
        ("flag.json", "{\"filters\": {\"uterus_flag\": [\"sd_long\"]}}", "uterus_flag names sd_long"),
        ("noflag.json", "{\"filters\": {\"bpm_flag\": []}}", "bpm_flag is empty"),
        // One signal without columns used to panic in the fit of its flag forest.
        ("nouterus.json", "{\"filters\": {\"uterus\": []}}", "uterus has no filter"),
        ("twice.json", "{\"filters\": {\"uterus\": [\"dev_z\", \"sd\", \"dev_z\"]}}", "uterus names dev_z twice"),
        ("kind.json", "{\"filters\": {\"uterus_flag\": [1]}}", "config.filters.uterus_flag[0] is malformed"),
        ("list.json", "{\"filters\": []}", "config.filters must be an object"),
        ("set.json", "{\"feature_set\": 1}", "feature_set is chosen with --features"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = fad()
            .args(["train", "--n-estimators", "2", "--feature-config"])
            .arg(&path)
            .arg("--out-dir")
            .arg(dir.path().join("m"))
            .arg(&f.merged)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(name) && err.contains(says), "{name}: {err}");
    }
}

#[test]
fn each_flag_forest_sees_its_signal_and_the_uterus_one_only_relative_columns() {
    let f = fixture();
    let meta = meta_of(&f.model);
    let cols: Vec<&str> = meta["feature_cols"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let seen = |file: &str| -> std::collections::BTreeSet<String> {
        let spec: serde_json::Value = serde_json::from_slice(&std::fs::read(f.model.join(file)).unwrap()).unwrap();
        let trees = spec["trees"].as_array().unwrap();
        trees
            .iter()
            .flat_map(|t| {
                t["features"].as_array().unwrap().iter().map(|i| cols[i.as_u64().unwrap() as usize].to_owned())
            })
            .collect()
    };
    let bpm: Vec<&str> = cols.iter().copied().filter(|c| c.starts_with("bpm_")).collect();
    assert_eq!(seen("forest_bpm.json").iter().map(String::as_str).collect::<Vec<_>>(), {
        let mut b = bpm.clone();
        b.sort();
        b
    });
    // Toco amplitude is uncalibrated: the uterus flags see features relative to the
    // series' own spread, while the joint forest sees every column.
    let uterus = ["uterus_dev_z", "uterus_sd_ratio"];
    assert_eq!(seen("forest_uterus.json").iter().map(String::as_str).collect::<Vec<_>>(), uterus);
    assert!(cols.contains(&"uterus_level") && cols.contains(&"uterus_baseline"), "{cols:?}");
    assert_eq!(seen("forest.json").len(), cols.len());
    let filters = &meta["config"]["filters"];
    assert_eq!(filters["uterus_flag"], serde_json::json!(["dev_z", "sd_ratio"]));
    assert!(filters["bpm_flag"].is_null(), "{filters}");
    // Uterus columns chosen anew: the uterus flags see all of them (the default flag
    // columns are not among them), unless the file says which.
    let dir = tempfile::tempdir().unwrap();
    for (config, want) in [
        (r#"{"filters": {"uterus": ["level", "dev"]}}"#, vec!["uterus_dev", "uterus_level"]),
        (r#"{"filters": {"uterus": ["level", "dev"], "uterus_flag": ["dev"]}}"#, vec!["uterus_dev"]),
    ] {
        let path = dir.path().join("config.json");
        std::fs::write(&path, config).unwrap();
        let model = dir.path().join("m");
        fad()
            .args(["train", "--force", "--n-estimators", "3", "--feature-config"])
            .arg(&path)
            .arg("--out-dir")
            .arg(&model)
            .arg(&f.merged)
            .assert()
            .success();
        let cols: Vec<String> = meta_of(&model)["feature_cols"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect();
        let spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(model.join("forest_uterus.json")).unwrap()).unwrap();
        let seen: std::collections::BTreeSet<&str> = spec["trees"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|t| t["features"].as_array().unwrap().iter().map(|i| cols[i.as_u64().unwrap() as usize].as_str()))
            .collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), want, "{config}");
    }
}

#[test]
fn two_patients_under_the_same_ids_are_named_not_mixed() {
    // The prototype mixed up patients whose folder names repeat across classes; a table
    // whose ids repeat under another target is refused row by row, naming the first line.
    let f = fixture();
    let merged = std::fs::read_to_string(&f.merged).unwrap();
    let mut lines = merged.lines();
    let header = lines.next().unwrap();
    assert!(header.ends_with(",target"), "{header}");
    let all: Vec<&str> = lines.collect();
    let ids = |l: &str| l.split(',').skip(1).take(2).collect::<Vec<_>>().join(",");
    // The longest series of the sample, up to 300 rows.
    let mut counts = std::collections::HashMap::new();
    for l in &all {
        *counts.entry(ids(l)).or_insert(0) += 1;
    }
    let longest = counts.into_iter().max_by_key(|(k, n)| (*n, k.clone())).unwrap().0;
    let first: Vec<&str> = all.iter().copied().filter(|l| ids(l) == longest).take(300).collect();
    assert_eq!(first.len(), 300, "a series of 300 rows in the sample");
    let other = if first[0].ends_with(",hypoxia") { "regular" } else { "hypoxia" };
    let mut table = format!("{header}\n");
    for l in &first {
        table.push_str(l);
        table.push('\n');
    }
    for l in &first {
        table.push_str(&format!("{},{other}\n", l.rsplit_once(',').unwrap().0));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("same-ids.csv");
    std::fs::write(&path, &table).unwrap();
    let out = fad().args(["score", "--model"]).arg(&f.model).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 302, field target") && err.contains("was") && err.contains("line 2"), "{err}");
    assert!(err.contains("two patients share these ids"), "{err}");
    assert!(err.contains("300 malformed row(s)"), "{err}");
    // The first patient's rows are still scored, as if the second were not there.
    let alone = dir.path().join("alone.csv");
    std::fs::write(&alone, table.lines().take(301).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let want = stdout_of(fad().args(["score", "--model"]).arg(&f.model).arg(&alone));
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    let out = fad()
        .args(["train", "--n-estimators", "2", "--out-dir"])
        .arg(dir.path().join("m"))
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("two patients share these ids"));
    // Every colliding row is refused, whatever came between (found by a breaker: a row of
    // another series, or one without a target, used to let the rest through).
    let head = "timestamp,group_id,sequence_id,bpm,uterus,target\n";
    for (rows, refused) in [
        ("0,A,s,140,10,hypoxia\n0,B,s,140,10,regular\n1,A,s,140,10,regular\n2,A,s,140,10,regular\n", vec![4, 5]),
        (
            "0,A,s,140,10,hypoxia\n0,B,s,140,10,\n1,B,s,140,10,hypoxia\n2,C,s,140,10,regular\n3,B,s,140,10,regular\n",
            vec![6],
        ),
    ] {
        std::fs::write(&path, format!("{head}{rows}")).unwrap();
        let out = fad().args(["score", "--all", "--model"]).arg(&f.model).arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let named: Vec<u64> =
            err.lines().filter_map(|l| l.split(" line ").nth(1)?.split(',').next()?.parse().ok()).collect();
        assert_eq!(named, refused, "{rows}: {err}");
        let written = String::from_utf8_lossy(&out.stdout).lines().count() - 1;
        assert_eq!(written, rows.lines().count() - refused.len(), "{rows}");
    }
}

#[test]
fn meta_json_gives_reasons_only_for_the_defaults_a_model_has() {
    let f = fixture();
    let reasons = |meta: &serde_json::Value| -> Vec<String> {
        meta["config"]["default_reasons"].as_object().unwrap().keys().cloned().collect()
    };
    let all = reasons(&meta_of(&f.model));
    for key in ["feature_set", "max_gap_s", "warmup", "settle_gap_s", "uterus_flag", "flag_rate", "join"] {
        assert!(all.iter().any(|k| k == key), "{key} missing from {all:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("window");
    fad()
        .args(["train", "--features", "window", "--flag-rate", "0.01", "--n-estimators", "2", "--out-dir"])
        .arg(&model)
        .arg(&f.merged)
        .assert()
        .success();
    let window = reasons(&meta_of(&model));
    for key in ["feature_set", "max_gap_s", "warmup", "settle_gap_s", "uterus_flag", "flag_rate", "zero_is_loss"] {
        assert!(!window.iter().any(|k| k == key), "{key} explained for a model without that default: {window:?}");
    }
    assert!(window.iter().any(|k| k == "join"), "{window:?}");
}

#[test]
fn a_series_whose_first_row_lacks_its_target_stays_with_its_patient() {
    let f = fixture();
    let merged = std::fs::read_to_string(&f.merged).unwrap();
    let mut lines: Vec<String> = merged.lines().map(str::to_owned).collect();
    // The first row of the longest series (the first series of the sample is never scored).
    let ids = |l: &str| l.split(',').skip(1).take(2).collect::<Vec<_>>().join(",");
    let mut counts = std::collections::HashMap::new();
    for l in &lines[1..] {
        *counts.entry(ids(l)).or_insert(0) += 1;
    }
    let longest = counts.into_iter().max_by_key(|(k, n)| (*n, k.clone())).unwrap().0;
    let at = lines.iter().position(|l| ids(l) == longest).unwrap();
    lines[at] = format!("{},", lines[at].rsplit_once(',').unwrap().0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blank-first-target.csv");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let groups = |input: &Path, out: &str| {
        let model = dir.path().join(out);
        fad().args(["train", "--n-estimators", "2", "--out-dir"]).arg(&model).arg(input).assert().success();
        let report = &meta_of(&model)["report"];
        (report["train"]["groups"].clone(), report["validation"]["groups"].clone())
    };
    assert_eq!(groups(&path, "blank"), groups(&f.merged, "plain"));
}

#[test]
fn errors_name_the_right_line_whatever_the_line_endings() {
    // The csv crate places a record after a CRLF on the line before (rust-csv#395).
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    for (name, end) in [("lf.csv", "\n"), ("crlf.csv", "\r\n")] {
        let rows = ["timestamp,group_id,sequence_id,bpm,uterus", "0,A,s,140,10", "1,A,s,140,10", "2,A,s,x,10"];
        let rows = [&rows[..], &["3,\"A", "B\",s,140,10", "4,A,s,y,10"]].concat();
        let path = dir.path().join(name);
        std::fs::write(&path, rows.join(end) + end).unwrap();
        let out = fad().args(["score", "--model"]).arg(&f.model).arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{name} line 4, field bpm")), "{err}");
        assert!(err.contains(&format!("{name} line 7, field bpm")), "{err}");
    }
}
