//! What `fad convert` (and `score`/`train`, given a data directory) do with odd data trees:
//! folder and file names that cannot become ids, trees with no recordings, malformed files.

mod common;
use common::*;
use std::path::Path;

/// One recording `DIR/<class>/<folder>/{bpm,uterus}/<stem>_{1,2}.csv` of `n` rows.
fn recording(root: &Path, class: &str, folder: &str, stem: &str, n: usize) {
    let rec = root.join(class).join(folder);
    std::fs::create_dir_all(rec.join("bpm")).unwrap();
    std::fs::create_dir_all(rec.join("uterus")).unwrap();
    let rows = |v: &dyn Fn(usize) -> usize| -> String {
        "time_sec,value\n".to_string() + &(0..n).map(|t| format!("{}.25,{}\n", t, v(t))).collect::<String>()
    };
    std::fs::write(rec.join("bpm").join(format!("{stem}_1.csv")), rows(&|t| 130 + t % 7)).unwrap();
    std::fs::write(rec.join("uterus").join(format!("{stem}_2.csv")), rows(&|t| 10 + t % 5)).unwrap();
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn names_that_cannot_be_ids_are_skipped_with_a_warning() {
    let root = scratch("odd-names").join("data");
    recording(&root, "regular", "1", "good", 30);
    recording(&root, "regular", "1,2", "a", 30); // comma in the group id
    recording(&root, "regular", "3", "b,c", 30); // comma in the sequence id
    recording(&root, "regular", "4", "q\"x", 30); // double quote
    recording(&root, "regular", "5", "e\x1b[31m", 30); // ESC
    recording(&root, "regular", "6", "nl\nx", 30); // newline
    recording(&root, "regular", &"7".repeat(250), "long", 30); // group id of 258 bytes

    for kind in ["table", "feed"] {
        let out = fad().arg("convert").arg(&root).args(["--as", kind]).output().unwrap();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(0), "{kind}: {stderr}");
        // Only the good recording, every row with its fields intact.
        let want_fields = if kind == "table" { 6 } else { 5 };
        let body: Vec<&str> = stdout.lines().filter(|l| !l.starts_with("timestamp")).collect();
        assert_eq!(body.len(), 30, "{kind}: {stdout}");
        for l in &body {
            assert_eq!(l.split(',').count(), want_fields, "{kind}: {l:?}");
            assert!(l.contains("regular-1") && l.contains("good_1"), "{kind}: {l:?}");
        }
        // Each skipped pair is named, control characters escaped, with a count at the end.
        assert!(!out.stderr.iter().any(|&b| b == 0x1b || b == b'\r'), "{kind}: raw control in {stderr:?}");
        let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("fad convert: skipped")).collect();
        assert_eq!(warnings.len(), 6, "{kind}: {stderr}");
        for (needle, why) in [
            ("1,2/bpm/a_1.csv", "comma"),
            ("3/bpm/b,c_1.csv", "comma"),
            ("4/bpm/q\"x_1.csv", "double quote"),
            ("5/bpm/e\\u{1b}[31m_1.csv", "control_char_in_id"),
            ("6/bpm/nl\\nx_1.csv", "control_char_in_id"),
            ("7777/bpm/long_1.csv", "id_too_long"),
        ] {
            assert!(warnings.iter().any(|w| w.contains(needle) && w.contains(why)), "{kind}: {needle}: {stderr}");
        }
        assert!(
            stderr.lines().last().unwrap().contains("6 file pair(s) with unusable ids left out"),
            "{kind}: {stderr}"
        );
    }

    // The table is one `fad score` takes whole, and `score` on the directory agrees.
    let table = fad().arg("convert").arg(&root).output().unwrap();
    let scored = assert_cmd::Command::from_std(fad())
        .args(["score", "--all", "--model"])
        .arg(model())
        .write_stdin(table.stdout)
        .output()
        .unwrap();
    assert_eq!(scored.status.code(), Some(0), "{}", text(&scored.stderr));
    assert_eq!(text(&scored.stdout).lines().count(), 31);
    let direct = fad().args(["score", "--all", "--model"]).arg(model()).arg(&root).output().unwrap();
    assert_eq!(direct.status.code(), Some(0), "{}", text(&direct.stderr));
    assert_eq!(direct.stdout, scored.stdout);

    // Without the good recording nothing usable is left: an error, not a bare header.
    std::fs::remove_dir_all(root.join("regular/1")).unwrap();
    let out = fad().arg("convert").arg(&root).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    let last = text(&out.stderr).lines().last().unwrap_or("").to_owned();
    assert!(last.contains("holds no usable recordings: all 6 pair(s) were left out"), "{last}");
}

#[test]
fn a_directory_without_recordings_is_an_error_naming_it() {
    let empty = scratch("no-recordings");
    let only_unpaired = scratch("only-unpaired").join("data");
    std::fs::create_dir_all(only_unpaired.join("regular/1/bpm")).unwrap();
    std::fs::write(only_unpaired.join("regular/1/bpm/x_1.csv"), "time_sec,value\n0,140\n").unwrap();
    // One level too deep, a source folder, an empty one, one with a bpm file only.
    for dir in [repo().join("data/sample/lct2025/hypoxia"), repo().join("src"), empty, only_unpaired] {
        let out = fad().arg("convert").arg(&dir).output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {err}", dir.display());
        assert!(out.stdout.is_empty(), "{}: {}", dir.display(), text(&out.stdout));
        let last = err.lines().last().unwrap_or("");
        assert!(last.starts_with(&format!("fad: {} holds no recordings", dir.display())), "{last}");
        assert!(last.contains("<class>/<folder>/bpm/<stem>_1.csv"), "{last}");
        // A class folder given instead of the data directory is recognised as such.
        assert_eq!(last.contains("looks like one class folder"), dir.ends_with("hypoxia"), "{last}");
        // score and train say the same.
        let out = fad().args(["score", "--model"]).arg(model()).arg(&dir).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out.stderr).contains("holds no recordings"), "{}", text(&out.stderr));
        let out = fad().arg("train").arg(&dir).arg("--out-dir").arg(scratch("no-recordings-model")).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out.stderr).contains("holds no recordings"), "{}", text(&out.stderr));
    }
}

#[test]
fn csv_extensions_are_found_in_any_case() {
    let root = scratch("upper-case").join("data");
    recording(&root, "regular", "1", "r", 30);
    let rec = root.join("regular/1");
    std::fs::rename(rec.join("bpm/r_1.csv"), rec.join("bpm/r_1.CSV")).unwrap();
    std::fs::rename(rec.join("uterus/r_2.csv"), rec.join("uterus/r_2.Csv")).unwrap();
    let out = fad().arg("convert").arg(&root).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 31, "{stdout}");
    assert!(stdout.lines().nth(1).unwrap().starts_with("0.25,regular-1,r_1,130,10,regular"), "{stdout}");
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn score_and_train_take_skip_bad_for_a_data_directory_and_warn_in_their_own_name() {
    let root = scratch("skip-bad").join("data");
    copy_tree(&repo().join("data/sample/ctu-uhb"), &root);
    recording(&root, "regular", "9", "bad", 30);
    std::fs::write(root.join("regular/9/bpm/bad_1.csv"), "time_sec,value\n0,140\n1,abc\n").unwrap();
    std::fs::write(root.join("regular/9/bpm/lonely_1.csv"), "time_sec,value\n0,140\n").unwrap();
    let model_dir = scratch("skip-bad-model").join("m");
    let train = |extra: &[&str]| {
        let _ = std::fs::remove_dir_all(&model_dir);
        fad()
            .args(["train", "--n-estimators", "5", "--out-dir"])
            .arg(&model_dir)
            .arg(&root)
            .args(extra)
            .output()
            .unwrap()
    };
    let score = |extra: &[&str]| fad().args(["score", "--model"]).arg(model()).arg(&root).args(extra).output().unwrap();

    for (command, out) in [("score", score(&[])), ("train", train(&[]))] {
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {err}");
        let last = err.lines().last().unwrap();
        assert!(last.contains("regular/9/bpm/bad_1.csv line 3, field value") && last.contains("--skip-bad"), "{last}");
        assert!(last.find("bad_1.csv") < last.find("--skip-bad"), "the problem first, then the hint: {last}");
        assert!(err.contains(&format!("fad {command}: no partner for")), "{command}: {err}");
        assert!(!err.contains("fad convert"), "{command}: {err}");
    }
    for (command, out) in [("score", score(&["--skip-bad"])), ("train", train(&["--skip-bad"]))] {
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{command}: {err}");
        assert!(err.contains(&format!("fad {command}: skipped bad_1: ")), "{command}: {err}");
        assert!(err.contains(&format!("fad {command}: 1 malformed file pair(s) skipped")), "{command}: {err}");
        assert!(!err.contains("fad convert"), "{command}: {err}");
    }
    // What is left is the sample: the same rows as scoring it.
    let sample =
        fad().args(["score", "--model"]).arg(model()).arg(repo().join("data/sample/ctu-uhb")).output().unwrap();
    assert_eq!(sample.status.code(), Some(0));
    assert_eq!(score(&["--skip-bad"]).stdout, sample.stdout);
}

#[test]
fn repeated_times_are_kept_and_named() {
    let root = scratch("repeated-times").join("data");
    recording(&root, "regular", "1", "twice", 10);
    let bpm = root.join("regular/1/bpm/twice_1.csv");
    let mut text_of_bpm = std::fs::read_to_string(&bpm).unwrap();
    text_of_bpm.push_str("9.25,140\n"); // the last time again
    std::fs::write(&bpm, text_of_bpm).unwrap();
    for kind in ["table", "feed"] {
        let out = fad().arg("convert").arg(&root).args(["--as", kind]).output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert_eq!(text(&out.stdout).lines().filter(|l| l.starts_with("9.25,")).count(), 2, "kept: {kind}");
        assert!(err.contains("twice_1.csv: 1 row(s) repeat the time of the row before"), "{kind}: {err}");
    }
}
