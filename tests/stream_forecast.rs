//! `fad stream --horizon K [--forecaster CMD]`: future points scored on a copy of the
//! series, the series itself untouched, and a broken forecaster never costs a reply.

mod common;
use common::{fad, model, repo};

/// `n` samples of one series at 4 Hz with a little variation, as stream lines.
fn feed(n: usize) -> String {
    (0..n).map(|i| format!("{},{},{},g,s\n", i as f64 * 0.25, 140 + i % 3, 10 + i % 2)).collect()
}

fn stream(args: &[&str], input: &str) -> (Vec<String>, String) {
    let out = common::stream(args, input.as_bytes());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (common::lines(&out.stdout), String::from_utf8(out.stderr).unwrap())
}

/// The `forecast:` points of a text reply, each split into its six `/` fields.
fn points(reply: &str) -> Vec<Vec<String>> {
    let f = reply.split(",forecast:").nth(1).unwrap_or_else(|| panic!("no forecast in {reply}"));
    f.split(';').map(|p| p.split('/').map(str::to_owned).collect()).collect()
}

#[test]
fn held_values_are_scored_as_if_they_had_come_and_the_series_is_untouched() {
    let (with, _) = stream(&["--horizon", "3"], &feed(30));
    let (without, _) = stream(&[], &feed(30));
    assert_eq!(with.len(), 30);
    for (a, b) in with.iter().zip(&without) {
        // The reply itself is unchanged; the forecast only follows it.
        assert_eq!(a.split(",forecast:").next().unwrap(), b, "the horizon changed a reply or the state");
        assert_eq!(a.contains(",forecast:"), b.starts_with("ready:true"));
    }
    // The last sample is (7.25 s, 142, 11); its points come every 0.25 s with those held.
    let last = points(&with[29]);
    let times: Vec<&str> = last.iter().map(|p| p[0].as_str()).collect();
    assert_eq!(times, ["7.5", "7.75", "8"]);
    assert!(last.iter().all(|p| p[1] == "142" && p[2] == "11"), "{last:?}");
    // Each point's score is what the stream gives when those samples really come.
    let mut real = feed(30);
    for p in &last {
        real.push_str(&format!("{},{},{},g,s\n", p[0], p[1], p[2]));
    }
    let (real, _) = stream(&[], &real);
    for (p, r) in last.iter().zip(&real[30..]) {
        let fields: Vec<&str> = r.split(',').collect();
        assert_eq!([p[3].as_str(), p[4].as_str(), p[5].as_str()], [fields[6], fields[7], fields[8]], "{r}");
    }
}

#[test]
fn a_forecaster_co_process_gives_the_points_and_sees_the_history() {
    let script = repo().join("tests/forecasters/drift.py");
    let log = common::scratch("forecaster-history").join("log");
    let cmd = format!("FAD_TEST_LOG='{}' python3 '{}'", log.display(), script.display());
    let (replies, _) = stream(&["--horizon", "2", "--forecaster", &cmd, "--forecast-history", "10"], &feed(30));
    assert_eq!(replies.len(), 30);
    // One request per scored message (7), each with the last 10 samples of every column.
    let asked = std::fs::read_to_string(&log).unwrap();
    assert_eq!(asked.lines().collect::<Vec<_>>(), ["10 10 10"; 7]);
    let last = points(&replies[29]);
    // The drift of the last 5 samples (i = 25..29): bpm 141,142,140,141,142 -> +0.25 a
    // step; uterus 11,10,11,10,11 -> 0.
    assert_eq!(last[0][..3], ["7.5", "142.25", "11"]);
    assert_eq!(last[1][..3], ["7.75", "142.5", "11"]);
    assert!(last.iter().all(|p| !p[5].is_empty()), "both points scored: {last:?}");
}

#[test]
fn a_point_the_forecaster_cannot_give_is_left_unscored() {
    let script = repo().join("tests/forecasters/drift.py");
    let cmd = format!("FAD_TEST_NULL_LAST=1 python3 {}", script.display());
    let (replies, _) = stream(&["--horizon", "2", "--forecaster", &cmd], &feed(26));
    let last = points(&replies[25]);
    assert!(!last[0][5].is_empty());
    assert_eq!(last[1][2..], ["", "", "", ""], "an unknown value is empty, like its flags");
}

#[test]
fn a_dead_or_babbling_forecaster_costs_no_reply() {
    for (cmd, reason) in [
        ("exit 0", "forecaster_gone"),
        ("while read l; do echo nonsense; done", "forecaster_bad_answer"),
        ("sleep 30", "forecaster_timeout"),
    ] {
        let (replies, err) = stream(&["--horizon", "2", "--forecaster", cmd, "--forecaster-timeout", "0.3"], &feed(30));
        assert_eq!(replies.len(), 30, "{cmd}");
        let scored: Vec<&String> = replies.iter().filter(|r| r.starts_with("ready:true")).collect();
        assert_eq!(scored.len(), 7, "{cmd}");
        for r in scored {
            assert!(r.ends_with(&format!(",needed:0,forecast_error:{reason}")), "{cmd}: {r}");
        }
        assert_eq!(err.matches("forecaster").count(), 1, "told once on stderr: {err}");
    }
}

#[test]
fn json_replies_carry_the_forecast_as_an_array() {
    let (replies, _) = stream(&["--horizon", "2", "--format", "json"], &feed(25));
    let v: serde_json::Value = serde_json::from_str(&replies[24]).unwrap();
    let f = v["forecast"].as_array().unwrap();
    assert_eq!(f.len(), 2);
    assert_eq!(f[0]["timestamp"], 6.25);
    assert!(f[1]["anomaly_score"].is_f64());
    let warming: serde_json::Value = serde_json::from_str(&replies[0]).unwrap();
    assert!(warming.get("forecast").is_none());
}

#[test]
fn forecaster_flags_need_a_horizon() {
    let out = fad().args(["stream", "--model"]).arg(model()).args(["--forecaster", "cat"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Shell that puts the request's id (in line `$l`) into `$n`, for test forecasters to echo.
const ID_OF_REQUEST: &str = r#"n=$(echo "$l" | sed 's/.*"id":\([0-9]*\).*/\1/');"#;

#[test]
fn replies_that_need_no_forecast_do_not_wait_for_the_forecaster() {
    // A forecaster that answers only once a file exists: until then, every reply that
    // needs no forecast (the warm-up) must already be out, with stdin still open.
    let flag = common::scratch("forecaster-gate").join("go");
    let cmd = format!(
        r#"while read l; do {ID} while [ ! -e '{}' ]; do sleep 0.02; done; echo "{{\"id\":$n,\"bpm\":[150],\"uterus\":[20]}}"; done"#,
        flag.display(),
        ID = ID_OF_REQUEST
    );
    let mut live =
        common::Live::start(model(), &["--horizon", "1", "--forecaster", &cmd, "--forecaster-timeout", "60"]);
    live.send(&feed(30));
    let warm = live.replies(23);
    assert!(warm.iter().all(|r| r.starts_with("ready:false")), "{warm:?}");
    std::fs::write(&flag, "").unwrap();
    let scored = live.replies(7);
    assert!(scored.iter().all(|r| r.contains(",needed:0,forecast:")), "{scored:?}");
    let (status, rest, _) = live.finish();
    assert!(status.success() && rest.is_empty());
}

#[test]
fn a_forecaster_that_writes_unasked_lines_is_stopped_not_followed_out_of_step() {
    // Each answer is followed by a second one with the same id, that nobody asked for.
    let cmd = format!(
        r#"while read l; do {ID_OF_REQUEST} echo "{{\"id\":$n,\"bpm\":[150],\"uterus\":[20]}}"; echo "{{\"id\":$n,\"bpm\":[1],\"uterus\":[1]}}"; sleep 0.05; done"#
    );
    let (replies, err) = stream(&["--horizon", "1", "--forecaster", &cmd], &feed(30));
    assert_eq!(replies.len(), 30);
    let scored: Vec<&String> = replies.iter().filter(|r| r.starts_with("ready:true")).collect();
    assert!(scored[0].contains(",needed:0,forecast:6/150/20/"), "{}", scored[0]);
    // No later reply carries the unasked line's values as its forecast.
    assert!(scored.iter().all(|r| !r.contains("/1/1/")), "{scored:?}");
    assert!(scored.last().unwrap().ends_with(",forecast_error:forecaster_out_of_step"), "{scored:?}");
    assert!(err.contains("out of step"), "{err}");
}

#[test]
fn forecast_times_are_written_to_the_microsecond() {
    // LCT 2025's 7.87 Hz: steps of 0.127029 s, whose sums are not exact in binary.
    let feed: String =
        (0..30).map(|i| format!("{:.6},{},{},g,s\n", 15.0 + i as f64 * 0.127029, 140 + i % 3, 10 + i % 2)).collect();
    let (replies, _) = stream(&["--horizon", "3"], &feed);
    let last = points(replies.last().unwrap());
    for p in &last {
        let decimals = p[0].split('.').nth(1).map_or(0, str::len);
        assert!(decimals <= 6, "{:?}", p[0]);
    }
    let t: Vec<f64> = last.iter().map(|p| p[0].parse().unwrap()).collect();
    assert!((t[0] - (15.0 + 30.0 * 0.127029)).abs() < 1e-6, "{t:?}");
}
