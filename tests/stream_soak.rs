//! Soak: 2 million lines over 5,000 interleaved series with bad lines mixed in, through a
//! live `fad stream` with checkpoints. Lines in = replies out, every reply is the one its
//! own line calls for (so none is out of order), and RSS stays flat. Release builds only:
//! `cargo test --release --test stream_soak -- --nocapture` prints the figures.

mod common;
use common::*;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::process::Stdio;

const SERIES: u64 = 5_000;
const STEPS: u64 = 400;
const LINES: u64 = SERIES * STEPS;
const BAD_EVERY: u64 = 97;

/// What line `i` is, and what its reply must be.
enum Kind {
    Good,
    Bad(&'static str),
}

fn line(i: u64) -> (Vec<u8>, Kind) {
    let (t, k) = (i / SERIES, i % SERIES);
    let (g, s) = (k % 50, k);
    let (bpm, ut) = (110 + (i * 7 + k) % 60, (i * 3 + k) % 40);
    if !i.is_multiple_of(BAD_EVERY) {
        return (format!("{t},{bpm},{ut},grp-{g},seq-{s}\n").into_bytes(), Kind::Good);
    }
    match (i / BAD_EVERY) % 6 {
        0 => (format!("{t},{bpm},grp-{g},seq-{s}\n").into_bytes(), Kind::Bad("wrong_field_count")),
        1 => (format!("{t},abc,{ut},grp-{g},seq-{s}\n").into_bytes(), Kind::Bad("bad_bpm")),
        2 => (format!("{t},0,{ut},grp-{g},seq-{s}\r\n").into_bytes(), Kind::Bad("bpm_signal_loss")),
        3 if t > 0 => {
            (format!("{},{bpm},{ut},grp-{g},seq-{s}\n", t - 1).into_bytes(), Kind::Bad("timestamp_not_after_previous"))
        }
        4 => {
            let l = [format!("{t},{bpm},").as_bytes(), b"\xff\xfe", format!(",grp-{g},seq-{s}\n").as_bytes()].concat();
            (l, Kind::Bad("not_utf8"))
        }
        _ => (b"\n".to_vec(), Kind::Bad("empty_line")),
    }
}

#[test]
#[cfg_attr(debug_assertions, ignore = "2 million lines: run with --release")]
fn two_million_lines_over_five_thousand_series() {
    let dir = scratch("soak");
    let state = dir.join("soak.state");
    let started = std::time::Instant::now();
    let mut child = fad()
        .args(["stream", "--max-series", "20000", "--checkpoint-every", "250000", "--state"])
        .arg(&state)
        .arg("--model")
        .arg(model())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let mut w = BufWriter::with_capacity(1 << 16, stdin);
        for i in 0..LINES {
            w.write_all(&line(i).0).unwrap();
        }
    });
    let mut replies = BufReader::with_capacity(1 << 16, child.stdout.take().unwrap());
    let mut count = vec![0u32; SERIES as usize];
    let mut rss = Vec::new();
    let mut reply = String::new();
    let (mut scored, mut rejected) = (0u64, 0u64);
    for i in 0..LINES {
        reply.clear();
        assert!(replies.read_line(&mut reply).unwrap() > 0, "no reply for line {i}");
        let reply = reply.trim_end();
        let (t, k) = (i / SERIES, i % SERIES);
        let c = &mut count[k as usize];
        match line(i).1 {
            Kind::Good => {
                *c += 1;
                if *c >= 24 {
                    let echo = format!("ready:true,detection:{t},");
                    let key = format!(",grp-{},seq-{k},", k % 50);
                    assert!(reply.starts_with(&echo) && reply.contains(&key), "line {i}: {reply}");
                    scored += 1;
                } else {
                    assert_eq!(reply, format!("ready:false,detection:,needed:{}", 24 - *c), "line {i}");
                }
            }
            Kind::Bad(why) => {
                assert!(reply.ends_with(&format!(",error:{why}")), "line {i} ({why}): {reply}");
                rejected += 1;
            }
        }
        if i % (LINES / 10) == LINES / 10 - 1 {
            rss.push(rss_kib(pid).1);
        }
    }
    writer.join().unwrap();
    let mut extra = String::new();
    assert_eq!(replies.read_line(&mut extra).unwrap(), 0, "a reply too many: {extra}");
    let status = wait_with_patience(&mut child);
    assert!(status.success());
    let elapsed = started.elapsed();
    eprintln!(
        "soak: {LINES} lines ({scored} scored, {rejected} rejected) in {:.1} s; RSS at each tenth (KiB): {rss:?}",
        elapsed.as_secs_f64()
    );
    // Flat: from the second tenth on (all 5,000 series exist from the first), RSS grows by
    // less than 8 MiB.
    let base = rss[1];
    assert!(base > 0);
    for (k, r) in rss.iter().enumerate().skip(1) {
        assert!(*r < base + 8 * 1024, "RSS grew to {r} KiB at tenth {} (from {base} KiB)", k + 1);
    }
    // The state saved at the end holds every series.
    let out = stream(&["--state", state.to_str().unwrap()], b"400,140,10,grp-1,seq-1\n");
    assert!(lines(&out.stdout)[0].starts_with("ready:true"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("restored 5000 series"));
}
