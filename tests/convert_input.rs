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
}
