//! The --state file: restored at start, refused with a clear sentence when it cannot be
//! used (or ignored with --state-reset), never a panic.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// A state file holding one warm series g,s (t = 0..29) and one half-warm g,h.
fn saved_state(dir: &Path) -> PathBuf {
    let state = dir.join("fad.state");
    let feed = series_lines("g", "s", 0, 30) + &series_lines("g", "h", 0, 4);
    let out = stream(&["--state", state.to_str().unwrap()], feed.as_bytes());
    assert!(out.status.success());
    state
}

fn run_with(state: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["--state", state.to_str().unwrap()];
    args.extend_from_slice(extra);
    stream(&args, b"30,140,10,g,s\n")
}

#[test]
fn a_saved_state_makes_a_restart_ready_at_once() {
    let dir = scratch("restart");
    let state = saved_state(&dir);
    let out = stream(&["--state", state.to_str().unwrap()], b"30,140,10,g,s\n4,140,10,g,h\n");
    let r = lines(&out.stdout);
    assert!(r[0].starts_with("ready:true,detection:30,g,s,"), "{r:?}");
    assert_eq!(r[1], "ready:false,detection:,needed:19");
    // Without the state the same lines start from nothing.
    let cold = stream(&[], b"30,140,10,g,s\n");
    assert_eq!(lines(&cold.stdout), ["ready:false,detection:,needed:23"]);
    // The restarted run saved again: a third run continues from t = 30.
    let out = stream(&["--state", state.to_str().unwrap()], b"31,140,10,g,s\n");
    assert!(lines(&out.stdout)[0].starts_with("ready:true,detection:31,g,s,"));
}

#[test]
fn a_missing_state_file_is_a_first_start_and_an_unwritable_one_fails_at_once() {
    let dir = scratch("missing");
    let out = run_with(&dir.join("new.state"), &[]);
    assert!(out.status.success());
    assert!(dir.join("new.state").exists());
    let out = run_with(&dir.join("no/such/dir/x.state"), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "fails before answering anything");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot save the stream state to"));
    let out = run_with(&dir, &["--state-reset"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is a directory"));
}

#[test]
fn damaged_or_foreign_state_files_are_one_clear_error_or_ignored_with_state_reset() {
    let dir = scratch("damaged");
    let good = std::fs::read(saved_state(&dir)).unwrap();
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let mut version = good.clone();
    version[8] = 9;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
        ("empty", Vec::new(), "truncated"),
        ("no checksum", good[..good.len() - 32].to_vec(), "truncated"),
        ("flipped", flipped, "corrupt"),
        ("trailing", [good.as_slice(), b"xx"].concat(), "bytes after its checksum"),
        ("text", b"{\"series\": []}\n".to_vec(), "not a fad state file"),
        ("version", version, "format version 9"),
    ];
    for (name, bytes, why) in cases {
        let path = dir.join(format!("{name}.state"));
        std::fs::write(&path, &bytes).unwrap();
        let out = run_with(&path, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(why) && err.contains(&path.display().to_string()), "{name}: {err}");
        assert!(err.contains("--state-reset") && err.lines().count() == 1, "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        let out = run_with(&path, &["--state-reset"]);
        assert!(out.status.success(), "{name} with --state-reset");
        assert_eq!(lines(&out.stdout), ["ready:false,detection:,needed:23"], "{name}: starts afresh");
        assert!(String::from_utf8_lossy(&out.stderr).contains("starting afresh"));
        // ...and the file was replaced by a good one at exit.
        let out = run_with(&path, &[]);
        assert!(out.status.success(), "{name}: rewritten at exit");
    }
}

#[test]
fn a_state_written_for_other_features_is_refused() {
    let dir = scratch("foreign");
    let state = saved_state(&dir);
    // Same forests, another max_gap_s: the windows mean something else.
    let other = dir.join("other-model");
    std::fs::create_dir_all(&other).unwrap();
    for f in std::fs::read_dir(model()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, other.join(f.file_name().unwrap())).unwrap();
    }
    let meta_path = other.join("meta.json");
    let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["config"]["max_gap_s"] = serde_json::json!(5.0);
    std::fs::write(&meta_path, serde_json::to_vec_pretty(&meta).unwrap()).unwrap();
    let out = fad()
        .args(["stream", "--model"])
        .arg(&other)
        .arg("--state")
        .arg(&state)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("other feature settings"), "{err}");
}

#[test]
fn restoring_more_series_than_max_series_keeps_the_most_recent() {
    let dir = scratch("restore-limit");
    let state = dir.join("fad.state");
    let st = state.to_str().unwrap();
    let feed = series_lines("g", "old", 0, 30) + &series_lines("g", "new", 30, 30);
    assert!(stream(&["--state", st], feed.as_bytes()).status.success());
    let out = stream(&["--state", st, "--max-series", "1"], b"60,140,10,g,new\n60,140,10,g,old\n");
    let r = lines(&out.stdout);
    assert!(r[0].starts_with("ready:true"), "{r:?}");
    assert_eq!(r[1], "ready:false,detection:,needed:23");
    assert!(String::from_utf8_lossy(&out.stderr).contains("restored 2 series"));
}
