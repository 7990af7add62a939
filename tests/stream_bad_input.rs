//! Nasty input to `fad stream`: every line still gets exactly one reply, in order, saying
//! what was wrong; a summary by reason goes to stderr at the end.

mod common;
use common::*;

/// (line, what its reply must contain). The series g,s is warmed up first (t = 0..29).
fn cases() -> Vec<(Vec<u8>, &'static str)> {
    let big_number = format!("34,{}140,10,g,s", "0".repeat(200 * 1024));
    let big_junk = "j".repeat(200 * 1024);
    vec![
        (b"1,2,3".to_vec(), "needed:24,error:wrong_field_count"),
        (b"31,140,10,g,s,extra".to_vec(), "error:wrong_field_count"),
        (b",,,,".to_vec(), "error:empty_group_id"),
        (b",140,10,g,s".to_vec(), "needed:0,error:bad_timestamp"),
        (b"31,,10,g,s".to_vec(), "needed:0,error:bpm_signal_loss"),
        (b"31,140,,g,s".to_vec(), "needed:0,error:uterus_signal_loss"),
        (b"31,140,10,,s".to_vec(), "error:empty_group_id"),
        (b"31,140,10,g,".to_vec(), "error:empty_sequence_id"),
        (b"31,abc,10,g,s".to_vec(), "needed:0,error:bad_bpm"),
        (b"31,140,1.2.3,g,s".to_vec(), "needed:0,error:bad_uterus"),
        (b"NaN,140,10,g,s".to_vec(), "error:bad_timestamp"),
        (b"31,NaN,10,g,s".to_vec(), "error:bpm_signal_loss"),
        (b"31,140,nan,g,s".to_vec(), "error:uterus_signal_loss"),
        (b"inf,140,10,g,s".to_vec(), "error:bad_timestamp"),
        (b"31,inf,10,g,s".to_vec(), "error:bpm_signal_loss"),
        (b"31,140,-inf,g,s".to_vec(), "error:uterus_signal_loss"),
        (b"31,1e308,10,g,s".to_vec(), "error:bpm_signal_loss"),
        (b"31,140,1e309,g,s".to_vec(), "error:uterus_signal_loss"),
        (b"31,-140,10,g,s".to_vec(), "error:bpm_signal_loss"),
        (b"31,140,-1,g,s".to_vec(), "error:uterus_signal_loss"),
        (b"31,0,10,g,s".to_vec(), "error:bpm_signal_loss"),
        (b"29,140,10,g,s".to_vec(), "needed:0,error:timestamp_not_after_previous"),
        (b"yesterday,140,10,g,s".to_vec(), "error:bad_timestamp"),
        // A sound line, then the same line again: the duplicate is not after the first.
        (b"31,140,10,g,s".to_vec(), "ready:true,detection:31,g,s,140,10,"),
        (b"31,140,10,g,s".to_vec(), "needed:0,error:timestamp_not_after_previous"),
        // A BOM in the middle of the stream, CRLF, spaces: accepted.
        (b"\xEF\xBB\xBF32,140,10,g,s".to_vec(), "ready:true,detection:32,g,s,140,10,"),
        (b" 33 , 141 , 11 , g , s \r".to_vec(), "ready:true,detection:33,g,s,141,11,"),
        (b"\xEF\xBB\xBFtimestamp,bpm,uterus,group_id,sequence_id\r".to_vec(), "ready:false,detection:,needed:24"),
        (b"33.5,\xff\xfe,10,g,s".to_vec(), "error:not_utf8"),
        (b"33.5,140,10,g\xc3,s".to_vec(), "error:not_utf8"),
        (b"33.5,140,10,g,\x00".to_vec(), "needed:24,error:control_char_in_id"),
        (b"33.5,140,10,g\x1b[31m,s".to_vec(), "needed:24,error:control_char_in_id"),
        (b"33.5,140,10,g,s\rs".to_vec(), "needed:24,error:control_char_in_id"),
        (big_number.into_bytes(), "ready:true,detection:34,g,s,"),
        (big_junk.into_bytes(), "error:wrong_field_count"),
        (format!("35,140,10,{},s", "x".repeat(300)).into_bytes(), "error:id_too_long"),
        (b"".to_vec(), "error:empty_line"),
        (b"   ".to_vec(), "error:empty_line"),
        // A huge uterus value is an artefact (above uterus_valid_max), not a sample.
        (b"35,140,1e308,g,s".to_vec(), "needed:0,error:uterus_signal_loss"),
        (b"36,140,10,g,s".to_vec(), "ready:true,detection:36,g,s,140,10,"),
        // A timestamp no monitor writes does not end the series.
        (b"1e308,140,10,g,s".to_vec(), "needed:0,error:bad_timestamp"),
        (b"37,140,10,g,s".to_vec(), "ready:true,detection:37,g,s,140,10,"),
        // A C1 control character (CSI) in an id, as UTF-8.
        ("37.5,140,10,g\u{9b}31m,s".as_bytes().to_vec(), "error:control_char_in_id"),
        // A header in another order: the lines after it would not be read as written.
        (b"timestamp,group_id,sequence_id,bpm,uterus".to_vec(), "needed:24,error:wrong_header"),
        (b"TIMESTAMP,BPM,Uterus,group_id,sequence_id".to_vec(), "ready:false,detection:,needed:24"),
        // NEL (U+0085) is a control character, not padding: not the series g,s.
        ("38,140,10,g,s\u{85}".as_bytes().to_vec(), "error:control_char_in_id"),
        // A no-break space is padding.
        ("38,140,10,\u{a0}g\u{a0},s".as_bytes().to_vec(), "ready:true,detection:38,g,s,140,10,"),
    ]
}

fn warm_feed() -> Vec<u8> {
    series_lines("g", "s", 0, 30).into_bytes()
}

#[test]
fn every_nasty_line_gets_exactly_one_reply_saying_why() {
    let mut input = warm_feed();
    let cases = cases();
    for (line, _) in &cases {
        input.extend_from_slice(line);
        input.push(b'\n');
    }
    let out = stream(&[], &input);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let replies = lines(&out.stdout);
    assert_eq!(replies.len(), 30 + cases.len(), "one reply per line");
    for (i, (line, want)) in cases.iter().enumerate() {
        let got = &replies[30 + i];
        let shown = String::from_utf8_lossy(&line[..line.len().min(60)]);
        assert!(got.contains(want), "line {shown:?}: reply {got:?} lacks {want:?}");
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let summary = err.lines().last().unwrap_or("");
    assert!(summary.contains(&format!("{} lines", 30 + cases.len())), "{err}");
    for reason in [
        "wrong_field_count 3",
        "bad_timestamp 5",
        "bpm_signal_loss 6",
        "uterus_signal_loss 6",
        "timestamp_not_after_previous 2",
    ] {
        assert!(summary.contains(reason), "summary lacks {reason}: {summary}");
    }
}

#[test]
fn the_same_lines_in_json_are_one_parseable_object_each() {
    let mut input = warm_feed();
    for (line, _) in cases() {
        input.extend_from_slice(&line);
        input.push(b'\n');
    }
    let out = stream(&["--format", "json"], &input);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("JSON output is UTF-8 even for non-UTF-8 input");
    let mut n = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["ready"].is_boolean() && v["needed"].is_u64(), "{line}");
        if v["ready"] == true {
            assert!(v["detection"]["anomaly_score"].is_f64(), "{line}");
        }
        n += 1;
    }
    assert_eq!(n, 30 + cases().len());
    // jq, when installed, agrees that every line is one JSON value.
    if let Ok(mut jq) = std::process::Command::new("jq")
        .args(["-c", "."])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
    {
        use std::io::Write;
        jq.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = jq.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), n);
    }
}

#[test]
fn iso_times_with_and_without_zone_are_seconds() {
    let mut input = String::new();
    for t in 0..26 {
        input.push_str(&format!("2025-03-01T10:00:{t:02}Z,140,10,g,zoned\n"));
        input.push_str(&format!("2025-03-01 12:00:{t:02}.5,140,10,g,naive\n"));
        input.push_str(&format!("2025-03-01T11:00:{t:02}+01:00,140,10,g,offset\n"));
    }
    let out = stream(&[], input.as_bytes());
    let replies = lines(&out.stdout);
    assert_eq!(replies.len(), 78);
    // The 24th sample of each series is the first scored one.
    for (k, sid) in ["zoned", "naive", "offset"].iter().enumerate() {
        assert!(replies[23 * 3 + k].starts_with("ready:true"), "{sid}: {}", replies[23 * 3 + k]);
        assert!(replies[22 * 3 + k].ends_with("needed:1"), "{sid}: {}", replies[22 * 3 + k]);
    }
    // A zone-less time in the past of a zoned one (same instant, UTC) is not after it.
    let out = stream(&[], b"2025-03-01T10:00:00Z,140,10,g,s\n2025-03-01T11:00:00+01:00,140,10,g,s\n");
    assert!(lines(&out.stdout)[1].ends_with("error:timestamp_not_after_previous"));
}

#[test]
fn a_last_line_without_newline_and_crlf_files_are_answered() {
    let out = stream(&[], b"timestamp,bpm,uterus,group_id,sequence_id\r\n1,140,10,g,s\r\n2,141,10,g,s");
    assert_eq!(
        lines(&out.stdout),
        ["ready:false,detection:,needed:24", "ready:false,detection:,needed:23", "ready:false,detection:,needed:22"]
    );
    assert!(out.stderr.is_empty(), "no summary when nothing was rejected");
}

#[test]
fn fifty_mebibytes_without_a_newline_cost_bounded_memory_and_one_reply() {
    use std::io::Write;
    let mut live = Live::start(model(), &[]);
    let block = vec![b'7'; 1 << 20];
    for _ in 0..50 {
        live.send(std::str::from_utf8(&block).unwrap());
    }
    // Everything but a pipe's worth has been read by now; then the line ends.
    let (peak_kib, _) = rss_kib(live.child.id());
    live.stdin.as_mut().unwrap().write_all(b"\n1,140,10,g,s\n").unwrap();
    assert_eq!(live.reply(), "ready:false,detection:,needed:24,error:line_too_long");
    assert_eq!(live.reply(), "ready:false,detection:,needed:23");
    // And once more without any newline before the end of input.
    live.send(std::str::from_utf8(&block[..]).unwrap());
    live.send(std::str::from_utf8(&block[..]).unwrap());
    let (status, rest, err) = live.finish();
    assert!(status.success());
    assert_eq!(rest, ["ready:false,detection:,needed:24,error:line_too_long"]);
    assert!(err.contains("line_too_long 2"), "{err}");
    eprintln!("peak RSS while reading a 50 MiB line: {peak_kib} KiB");
    assert!(peak_kib > 0 && peak_kib < 48 * 1024, "peak RSS {peak_kib} KiB");
}

#[test]
fn the_summary_counts_header_lines_apart() {
    let out = stream(&[], b"timestamp,bpm,uterus,group_id,sequence_id\n0,140,10,g,s\nx,1,2,g,s\n");
    let err = String::from_utf8_lossy(&out.stderr);
    let want = "3 lines, 0 scored, 1 warming up, 1 not scorable (bad_timestamp 1), 1 header line(s)";
    assert!(err.contains(want), "{err}");
}
