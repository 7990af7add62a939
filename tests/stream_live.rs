//! `fad stream` as a live process: flushing before a blocking read, SIGHUP model switches
//! under a running feed, SIGINT/SIGTERM, and closed pipes.

mod common;
use common::*;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn ln_sfn(target: &Path, link: &Path) {
    let st = Command::new("ln").arg("-sfn").arg(target).arg(link).status().unwrap();
    assert!(st.success());
}

#[test]
fn one_line_in_gets_its_reply_while_stdin_stays_open() {
    let mut live = Live::start(model(), &[]);
    live.send("0,140,10,g,s\n");
    assert_eq!(live.reply(), "ready:false,detection:,needed:23");
    live.send("1,140,10,g,s\n2,140,10,g,s\n");
    assert_eq!(live.replies(2), ["ready:false,detection:,needed:22", "ready:false,detection:,needed:21"]);
    // A partial line is not answered until it ends.
    live.send("3,140,");
    live.send("10,g,s\n");
    assert_eq!(live.reply(), "ready:false,detection:,needed:20");
    let (status, rest, _) = live.finish();
    assert!(status.success() && rest.is_empty());
}

/// The last reply `fad stream` gives for `feed` with `model`.
fn last_reply(model: &Path, feed: &str) -> String {
    let out = fad().arg("stream").arg("--model").arg(model).arg("--input").arg(write_tmp(feed)).output().unwrap();
    lines(&out.stdout).pop().unwrap()
}

fn write_tmp(text: &str) -> std::path::PathBuf {
    let dir = scratch(&format!("feed-{}", text.len()));
    let p = dir.join("feed.csv");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn sighup_while_the_feed_is_quiet_swaps_the_model_and_keeps_the_windows() {
    let dir = scratch("hup-quiet");
    let (a, b, current) = (dir.join("a"), dir.join("b"), dir.join("current"));
    train(&a, 1);
    train(&b, 2);
    ln_sfn(&a, &current);
    let warm = series_lines("g", "s", 0, 30);
    let next = "30,150,12,g,s\n";
    let score_a = last_reply(&a, &format!("{warm}{next}"));
    let score_b = last_reply(&b, &format!("{warm}{next}"));
    assert_ne!(score_a, score_b, "two seeds should give two forests");

    let mut live = Live::start(&current, &[]);
    live.send(&warm);
    live.replies(30);
    ln_sfn(&b, &current);
    // No input arrives: fad is waiting for a line when the signal comes.
    live.signal(libc::SIGHUP);
    let err = live.wait_stderr("reloaded model");
    assert!(err.contains("windows kept"), "{err}");
    live.send(next);
    assert_eq!(live.reply(), score_b, "the next reply comes from the new model, at once ready");
    let (status, _, _) = live.finish();
    assert!(status.success());
}

#[test]
fn ln_sfn_and_sighup_under_a_running_feed_lose_no_reply_and_keep_the_old_model_if_the_new_is_broken() {
    let dir = scratch("hup-running");
    let (a, b, broken, current) = (dir.join("a"), dir.join("b"), dir.join("broken"), dir.join("current"));
    train(&a, 1);
    train(&b, 2);
    // A broken model: b's files with a forest file truncated.
    std::fs::create_dir_all(&broken).unwrap();
    for f in std::fs::read_dir(&b).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, broken.join(f.file_name().unwrap())).unwrap();
    }
    let forest = broken.join("forest.json");
    let text = std::fs::read(&forest).unwrap();
    std::fs::write(&forest, &text[..text.len() / 2]).unwrap();
    ln_sfn(&a, &current);

    let mut live = Live::start(&current, &[]);
    let mut stdin = live.stdin.take().unwrap();
    const N: u64 = 40_000;
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        for t in 0..N {
            // Two series, so replies from both sides of a swap are checked.
            writeln!(stdin, "{t},{},{},g,{}", 120 + t % 30, 10 + t % 7, t % 2).unwrap();
            if t % 100 == 0 {
                stdin.flush().unwrap();
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    });
    let mut got = Vec::new();
    let (mut reloads, mut refusals) = (0, 0);
    for target in [&b, &broken, &a, &broken, &b] {
        got.extend((0..1000).map(|_| live.reply_or(|| panic!("stderr: {}", live.stderr.lock().unwrap()))));
        ln_sfn(target, &current);
        live.signal(libc::SIGHUP);
        if *target == broken {
            refusals += 1;
        } else {
            reloads += 1;
        }
        // Wait for the swap (or refusal) to be reported before the next one: signals that
        // arrive together are one reload.
        let start = std::time::Instant::now();
        loop {
            let e = live.stderr.lock().unwrap().clone();
            if e.matches("reloaded model").count() == reloads && e.matches("kept the old model").count() == refusals {
                break;
            }
            assert!(start.elapsed() < PATIENCE, "{e}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    writer.join().unwrap();
    let (status, rest, err) = live.finish();
    assert!(status.success(), "{err}");
    got.extend(rest);
    assert_eq!(got.len() as u64, N, "lines in = replies out");
    // In order: every scored reply echoes its own line's timestamp, and no error crept in.
    for (t, r) in got.iter().enumerate() {
        assert!(!r.contains("error:"), "line {t}: {r}");
        if r.starts_with("ready:true") {
            assert!(r.starts_with(&format!("ready:true,detection:{t},g,{},", t % 2)), "line {t}: {r}");
        }
    }
    assert!(got[N as usize - 1].starts_with("ready:true"), "windows survive every swap");
    assert!(err.contains("forest.json") && err.contains("SHA-256"), "names the broken file: {err}");
}

#[test]
fn sigterm_and_sigint_save_the_state_and_end_as_the_signal_says() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let dir = scratch(&format!("term-{sig}"));
        let state = dir.join("fad.state");
        let st = state.to_str().unwrap();
        let mut live = Live::start(model(), &["--state", st]);
        live.send(&series_lines("g", "s", 0, 30));
        live.replies(30);
        // stdin stays open: fad is blocked waiting for input when the signal comes.
        live.signal(sig);
        let status = wait_with_patience(&mut live.child);
        assert_eq!(status.signal(), Some(sig), "ends by the signal, for the shell to see 128+{sig}");
        assert!(state.exists(), "state saved on signal {sig}");
        let out = stream(&["--state", st], b"30,140,10,g,s\n31,140,10,new,s\n");
        let r = lines(&out.stdout);
        assert!(r[0].starts_with("ready:true,detection:30,g,s,140,10,"), "{}", r[0]);
        assert_eq!(r[1], "ready:false,detection:,needed:23");
        assert!(String::from_utf8_lossy(&out.stderr).contains("restored 1 series"));
    }
}

#[test]
fn sigterm_in_the_middle_of_a_long_file_stops_soon_not_at_its_end() {
    let dir = scratch("term-file");
    let feed = dir.join("feed.csv");
    let lines_in = 2_000_000usize;
    let text: String = (0..lines_in).map(|i| format!("{},140,10,g{},s\n", i / 100, i % 100)).collect();
    std::fs::write(&feed, text).unwrap();
    let mut live = Live::start(model(), &["--input", feed.to_str().unwrap()]);
    live.reply(); // it is busy answering the file
    live.signal(libc::SIGTERM);
    let status = wait_with_patience(&mut live.child);
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    let (_, answered, _) = live.finish();
    assert!(answered.len() < lines_in / 2, "{} of {lines_in} lines answered after SIGTERM", answered.len());
}

#[test]
fn a_sighup_while_the_model_loads_does_not_kill_fad() {
    let mut live = Live::start(model(), &[]);
    // Until fad's main runs, the default action of SIGHUP would end any process; wait for
    // the handler (SigCgt bit 0), which fad installs before it loads the model.
    let status = format!("/proc/{}/status", live.child.id());
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&status).unwrap_or_default().lines().any(|l| {
        l.strip_prefix("SigCgt:").and_then(|m| u64::from_str_radix(m.trim(), 16).ok()).is_some_and(|m| m & 1 == 1)
    }) {
        assert!(start.elapsed() < PATIENCE, "fad never caught SIGHUP");
        std::thread::sleep(Duration::from_millis(1));
    }
    live.signal(libc::SIGHUP);
    live.send("0,140,10,g,s\n");
    assert_eq!(live.reply(), "ready:false,detection:,needed:23");
    let (status, _, _) = live.finish();
    assert!(status.success(), "{status:?}");
}

#[test]
fn after_kill_9_a_restart_from_the_last_checkpoint_is_ready_at_once() {
    let dir = scratch("kill9");
    let state = dir.join("fad.state");
    let st = state.to_str().unwrap();
    let mut live = Live::start(model(), &["--state", st, "--checkpoint-every", "1"]);
    for sid in ["a", "b", "c"] {
        live.send(&series_lines("g", sid, 0, 26));
        live.replies(26);
    }
    live.send(&series_lines("g", "d", 0, 5));
    live.replies(5);
    live.child.kill().unwrap(); // SIGKILL: no chance to save anything more
    let status = wait_with_patience(&mut live.child);
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let mut live = Live::start(model(), &["--state", st]);
    live.send("26,140,10,g,a\n26,140,10,g,b\n26,140,10,g,c\n5,140,10,g,d\n0,140,10,g,e\n");
    let r = live.replies(5);
    for (i, sid) in ["a", "b", "c"].iter().enumerate() {
        assert!(r[i].starts_with(&format!("ready:true,detection:26,g,{sid},")), "{}", r[i]);
    }
    assert_eq!(r[3], "ready:false,detection:,needed:18", "a half-warm window is restored half-warm");
    assert_eq!(r[4], "ready:false,detection:,needed:23");
    let (status, _, err) = live.finish();
    assert!(status.success(), "{err}");
    assert!(err.contains("restored 4 series"), "{err}");
}

#[test]
fn a_closed_stdout_ends_quietly_fifty_times_in_a_row() {
    let dir = scratch("pipe");
    let feed = dir.join("feed.csv");
    let mut text = String::new();
    for k in 0..40 {
        text.push_str(&series_lines("g", &k.to_string(), 0, 500));
        text.push_str("bad line\n"); // rejected lines: still no summary after a closed pipe
    }
    std::fs::write(&feed, text).unwrap();
    let script = format!(
        "'{}' stream --model '{}' < '{}' | head -n 1 > /dev/null; exit ${{PIPESTATUS[0]}}",
        env!("CARGO_BIN_EXE_fad"),
        model().display(),
        feed.display()
    );
    for i in 0..50 {
        let out = Command::new("bash").arg("-c").arg(&script).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "run {i}: status {:?}, stderr {err}", out.status);
        assert!(err.is_empty(), "run {i}: stderr {err}");
    }
    // A live feed too: the reader side goes away between two lines.
    let mut live = Live::start(model(), &[]);
    live.send("0,140,10,g,s\n");
    live.reply();
    drop(live.child.stdout.take());
    let script = format!(
        "(echo 0,140,10,g,s; sleep 0.3; seq 1 5000 | sed 's/$/,140,10,g,s/') | '{}' stream --model '{}' | head -n 1 > /dev/null; exit ${{PIPESTATUS[1]}}",
        env!("CARGO_BIN_EXE_fad"),
        model().display()
    );
    let out = Command::new("bash").arg("-c").arg(&script).output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{:?} {}", out.status, String::from_utf8_lossy(&out.stderr));
    let (status, _, _) = live.finish();
    assert!(status.success());
}

#[test]
fn usage_and_data_errors_have_their_exit_codes() {
    let run = |args: &[&str]| fad().args(args).output().unwrap();
    let m = model().to_str().unwrap();
    assert_eq!(run(&["stream", "--model", m, "--bogus"]).status.code(), Some(2));
    assert_eq!(run(&["stream", "--model", m, "--checkpoint-every", "5"]).status.code(), Some(2));
    assert_eq!(run(&["stream", "--model", m, "--max-series", "0"]).status.code(), Some(2));
    assert_eq!(run(&["stream", "--model", m, "--idle-timeout", "-3"]).status.code(), Some(2));
    let missing = run(&["stream", "--model", "/nonexistent/model"]);
    assert_eq!(missing.status.code(), Some(1));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("/nonexistent/model/meta.json") && err.lines().count() == 1, "{err}");
    let no_input = run(&["stream", "--model", m, "--input", "/nonexistent/feed.csv"]);
    assert_eq!(no_input.status.code(), Some(1));
}

#[test]
fn score_and_convert_end_quietly_on_a_closed_pipe_fifty_times() {
    let dir = scratch("pipe-batch");
    let table = dir.join("merged.csv");
    let mut text = String::from("timestamp,group_id,sequence_id,bpm,uterus\n");
    for t in 0..8000 {
        text.push_str(&format!("{t},g,{},{},10\n", t % 3, 120 + t % 40));
    }
    std::fs::write(&table, text).unwrap();
    let data = repo().join("data/sample/lct2025");
    let fad = env!("CARGO_BIN_EXE_fad");
    let m = model().display().to_string();
    for (name, cmd) in [
        ("score", format!("'{fad}' score '{}' --model '{m}' --all", table.display())),
        ("convert", format!("'{fad}' convert '{}'", data.display())),
    ] {
        // 50 runs in one shell; any failure or any stderr text is reported with its run.
        let script = format!(
            "for i in $(seq 1 50); do {cmd} 2>err.txt | head -n 1 > /dev/null; s=${{PIPESTATUS[0]}}; \
             if [ $s -ne 0 ] || [ -s err.txt ]; then echo \"run $i: status $s: $(cat err.txt)\"; fi; done"
        );
        let out = Command::new("bash").arg("-c").arg(&script).current_dir(&dir).output().unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && report.is_empty(), "{name}: {report}");
    }
}
