//! Property tests (proptest) of the stream line parser and line machine: arbitrary bytes,
//! cut into arbitrary chunks, never panic and always get exactly one reply per line, the
//! same replies however the input is chunked. More cases: PROPTEST_CASES=100000.

mod common;
use fad::cli::ReplyFormat;
use fad::cmd::stream::{MAX_ID, Parsed, Stream, parse_line};
use fad::engine::{Engine, Limits};
use fad::model::Model;
use proptest::prelude::*;
use std::sync::{Arc, OnceLock};

fn model() -> Arc<Model> {
    static M: OnceLock<Arc<Model>> = OnceLock::new();
    Arc::clone(M.get_or_init(|| Arc::new(Model::load(common::model()).unwrap())))
}

/// Runs the line machine over `input` cut at `cuts`; returns the output.
fn run(input: &[u8], cuts: &[usize], limits: Limits) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut s = Stream::new(Engine::with_limits(model(), limits), &mut out, ReplyFormat::Text);
        let mut at = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        for c in cuts {
            s.feed(&input[at..c.max(at)]).unwrap();
            at = c.max(at);
        }
        s.feed(&input[at..]).unwrap();
        s.finish().unwrap();
    }
    out
}

fn expected_replies(input: &[u8]) -> usize {
    let newlines = input.iter().filter(|&&b| b == b'\n').count();
    newlines + usize::from(!input.is_empty() && *input.last().unwrap() != b'\n')
}

/// Lines that are nearly right: fields from a pool of good, odd and broken values.
fn nasty_line() -> impl Strategy<Value = Vec<u8>> {
    let ts = prop_oneof![
        (0u32..100).prop_map(|t| t.to_string()),
        Just("2025-01-01T00:00:00Z".to_string()),
        Just("2025-01-01 00:00:01".to_string()),
        Just("1e308".to_string()),
        Just("-0".to_string()),
        Just("NaN".to_string()),
        Just("".to_string()),
        "[0-9:T+-]{0,25}",
    ];
    let val = prop_oneof![
        (50u32..240).prop_map(|v| v.to_string()),
        Just("".to_string()),
        Just("inf".to_string()),
        Just("-1".to_string()),
        Just("1e308".to_string()),
        "[0-9.eE+-]{0,12}",
    ];
    let id = prop_oneof![Just("g".to_string()), Just("s".to_string()), "[a-z0-9\\-_ ]{0,6}", "\\PC{0,4}"];
    let sep = prop_oneof![8 => Just(",".to_string()), 1 => Just(", ".to_string()), 1 => Just(";".to_string())];
    let end = prop_oneof![8 => Just("".to_string()), 1 => Just("\r".to_string()), 1 => Just(",x".to_string())];
    let bom = prop_oneof![9 => Just(Vec::new()), 1 => Just(b"\xEF\xBB\xBF".to_vec())];
    (bom, ts, val.clone(), val, id.clone(), id, sep, end).prop_map(|(bom, t, b, u, g, s, sep, end)| {
        let mut l = bom;
        l.extend_from_slice(format!("{t}{sep}{b}{sep}{u}{sep}{g}{sep}{s}{end}").as_bytes());
        l
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, ..ProptestConfig::default() })]

    #[test]
    fn parse_line_never_panics_and_messages_are_sane(line in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Parsed::Message(m) = parse_line(&line) {
            prop_assert!(m.time.is_finite());
            prop_assert!(!m.group_id.is_empty() && !m.sequence_id.is_empty());
            prop_assert!(m.group_id.len() <= MAX_ID && m.sequence_id.len() <= MAX_ID);
            prop_assert!(!m.group_id.chars().chain(m.sequence_id.chars()).any(|c| c.is_ascii_control()));
            prop_assert!(!m.timestamp.contains(',') && m.timestamp.trim() == m.timestamp);
        }
    }

    #[test]
    fn arbitrary_bytes_in_any_chunks_get_one_reply_per_line(
        input in proptest::collection::vec(prop_oneof![4 => any::<u8>(), 1 => Just(b'\n'), 1 => Just(b',')], 0..2000),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let whole = run(&input, &[], Limits::default());
        let text = String::from_utf8_lossy(&whole);
        prop_assert_eq!(text.lines().count(), expected_replies(&input));
        prop_assert!(text.lines().all(|l| l.starts_with("ready:")));
        prop_assert_eq!(run(&input, &cuts, Limits::default()), whole);
    }

    #[test]
    fn nasty_lines_get_one_reply_each_in_order(
        lines in proptest::collection::vec(nasty_line(), 1..300),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
        max_series in 1usize..4,
    ) {
        let mut input = Vec::new();
        for l in &lines {
            input.extend_from_slice(l);
            input.push(b'\n');
        }
        let limits = Limits { max_series: Some(max_series), idle_timeout: Some(5.0) };
        let whole = run(&input, &[], limits);
        let text = String::from_utf8_lossy(&whole);
        let replies: Vec<&str> = text.lines().collect();
        prop_assert_eq!(replies.len(), lines.len());
        for (l, r) in lines.iter().zip(&replies) {
            if let Some(rest) = r.strip_prefix("ready:true,detection:") {
                // A scored reply echoes its own line's first field.
                let Parsed::Message(m) = parse_line(l) else { panic!("scored a malformed line") };
                let echo = format!("{},", m.timestamp);
                prop_assert!(rest.starts_with(&echo), "{} does not echo {}", r, echo);
            }
        }
        prop_assert_eq!(run(&input, &cuts, limits), whole);
    }
}
