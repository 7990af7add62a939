//! Bounded memory whatever the keys: --max-series and --idle-timeout forget the least
//! recently used series, with a note on stderr.

mod common;
use common::*;

#[test]
fn max_series_forgets_the_least_recently_used_with_a_note() {
    let mut feed = series_lines("g", "a", 0, 30) + &series_lines("g", "b", 0, 30);
    feed.push_str("30,140,10,g,a\n"); // a is now the most recent
    feed.push_str("0,140,10,g,c\n"); // room for c: b goes
    feed.push_str("31,140,10,g,a\n30,140,10,g,b\n");
    let out = stream(&["--max-series", "2"], feed.as_bytes());
    let r = lines(&out.stdout);
    assert_eq!(r.len(), 64);
    assert!(r[62].starts_with("ready:true,detection:31,g,a,"), "{}", r[62]);
    assert_eq!(r[63], "ready:false,detection:,needed:23", "b was forgotten");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("forgot series g,b (--max-series reached"), "{err}");
    assert!(err.contains("2 series forgotten (2 over --max-series, 0 idle)"), "{err}");
}

#[test]
fn one_monitor_with_a_wrong_clock_makes_nobody_idle() {
    // Two monitors in relative seconds; a third in epoch seconds, a fourth in year 2099.
    let mut feed = String::new();
    for t in 0..60 {
        feed += &format!("{t},140,10,g,a\n{t},141,11,g,b\n");
        if t == 30 {
            feed += "1733300000,140,10,g,epoch\n2099-01-01T00:00:00Z,140,10,g,future\n";
        }
        if t > 30 {
            feed += &format!("{},140,10,g,epoch\n", 1733300000 + t);
        }
    }
    let out = stream(&["--idle-timeout", "10"], feed.as_bytes());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("forgot series g,a") && !err.contains("forgot series g,b"), "{err}");
    assert!(!err.contains("forgot series g,epoch"), "a monitor with a wrong clock still counts: {err}");
    let replies = lines(&out.stdout);
    assert_eq!(replies.len(), feed.lines().count());
    let scored = |id: &str| replies.iter().filter(|r| r.contains(&format!(",g,{id},"))).count();
    assert_eq!((scored("a"), scored("b")), (60 - 23, 60 - 23), "a and b never warmed up again");
    // The clock still moves with the feed: a monitor that stops is forgotten.
    feed += &series_lines("g", "b", 60, 15);
    let out = stream(&["--idle-timeout", "10"], feed.as_bytes());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("forgot series g,a (idle past --idle-timeout)"), "{err}");
}

#[test]
fn idle_timeout_counts_stream_time_not_wall_time() {
    let mut feed = series_lines("g", "a", 0, 30);
    feed += &series_lines("g", "b", 25, 20); // stream time reaches 44: a (last 29) idle 15 s
    feed.push_str("45,140,10,g,a\n");
    let out = stream(&["--idle-timeout", "10"], feed.as_bytes());
    let r = lines(&out.stdout);
    assert_eq!(r.last().unwrap(), "ready:false,detection:,needed:23");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("forgot series g,a (idle past --idle-timeout)"), "{err}");
    // Without the timeout the same feed keeps a (the 16 s gap restarts its window, though).
    let out = stream(&[], feed.as_bytes());
    assert!(out.stderr.is_empty());
}

#[test]
fn a_flood_of_keys_gives_a_few_notes_not_a_flood() {
    let feed: String = (0..2000).map(|i| format!("{i},140,10,g,s{i}\n")).collect();
    let out = stream(&["--max-series", "5"], feed.as_bytes());
    assert_eq!(lines(&out.stdout).len(), 2000);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.lines().count() <= 13, "{err}");
    assert!(err.contains("1995 series forgotten"), "{err}");
}

/// RSS of `fad stream` over a million distinct sequence ids, with and without limits. Run
/// in release builds (`cargo test --release`); figures go to stderr.
#[test]
#[cfg_attr(debug_assertions, ignore = "a million lines: run with --release")]
fn a_million_distinct_ids_keep_rss_bounded() {
    let dir = scratch("million");
    let feed = dir.join("feed.csv");
    let text: String =
        (0..1_000_000u32).map(|i| format!("{}.{:03},140,10,g{},seq-{i}\n", i / 1000, i % 1000, i % 97)).collect();
    std::fs::write(&feed, text).unwrap();
    let peak = |args: &[&str]| -> u64 {
        let mut child = fad()
            .args(["stream", "--model"])
            .arg(model())
            .args(args)
            .stdin(std::fs::File::open(&feed).unwrap())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut hwm = 0;
        while child.try_wait().unwrap().is_none() {
            hwm = hwm.max(rss_kib(child.id()).0);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        hwm
    };
    let bounded = peak(&["--max-series", "10000"]);
    let idle = peak(&["--idle-timeout", "30"]);
    let by_default = peak(&[]);
    let unbounded = peak(&["--max-series", "2000000"]);
    let _ = std::fs::remove_file(&feed);
    eprintln!(
        "peak RSS for 1M distinct ids: --max-series 10000: {bounded} KiB, --idle-timeout 30: {idle} KiB, \
         default (--max-series 100000): {by_default} KiB, --max-series 2000000: {unbounded} KiB"
    );
    assert!(bounded < 40 * 1024, "--max-series 10000: {bounded} KiB");
    assert!(idle < 40 * 1024, "--idle-timeout 30: {idle} KiB");
    // The default bound: 100,000 series at under 1 KiB each.
    assert!(by_default < bounded + 100 * 1024, "default: {by_default} KiB");
    assert!(unbounded > 2 * by_default, "the default bound made a difference: {unbounded} vs {by_default} KiB");
    // At most 1 KiB per live series beyond the model.
    assert!(unbounded < bounded + 1024 * 1024, "unbounded: {unbounded} KiB");
    assert!(unbounded > 4 * bounded, "the limit made the difference: {unbounded} vs {bounded} KiB");
}
