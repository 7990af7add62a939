//! `fad stream`: one reply per input line, in order (SPEC section 5).
//!
//! Input is read in chunks of whatever is available; the complete lines of a chunk are
//! parsed and offered to the engine, the windows that filled are scored together, the
//! replies are written, and the output is flushed before the next (possibly blocking)
//! read. A file is thus processed at full speed, and `tail -f` gets each answer at once.

use crate::cli::{ReplyFormat, StreamArgs};
use crate::engine::{Engine, Offer, parse_timestamp, parse_value};
use crate::model::{Detection, Model};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Longest line kept in memory; a longer one is answered with an error, not buffered.
pub const MAX_LINE: usize = 1 << 20;
const READ_CHUNK: usize = 1 << 16;

/// A parsed message, borrowing from the line.
#[derive(Debug, PartialEq)]
pub struct Message<'a> {
    pub timestamp: &'a str,
    pub time: f64,
    pub bpm_text: &'a str,
    pub bpm: f64,
    pub uterus_text: &'a str,
    pub uterus: f64,
    pub group_id: &'a str,
    pub sequence_id: &'a str,
}

/// How a line was understood.
#[derive(Debug, PartialEq)]
pub enum Parsed<'a> {
    Message(Message<'a>),
    Header,
    Blank,
    /// Malformed; the key is given when fields 4-5 were readable, for the `needed` count.
    Bad {
        reason: &'static str,
        key: Option<(&'a str, &'a str)>,
    },
}

/// Strips a UTF-8 BOM, a trailing CR and surrounding spaces.
fn clean_line(mut line: &[u8]) -> &[u8] {
    if let Some(rest) = line.strip_prefix(b"\xEF\xBB\xBF") {
        line = rest;
    }
    if let Some(rest) = line.strip_suffix(b"\r") {
        line = rest;
    }
    line.trim_ascii()
}

/// Parses one line `timestamp,bpm,uterus,group_id,sequence_id`.
pub fn parse_line(raw: &[u8]) -> Parsed<'_> {
    let line = clean_line(raw);
    if line.is_empty() {
        return Parsed::Blank;
    }
    let Ok(line) = std::str::from_utf8(line) else {
        return Parsed::Bad { reason: "not_utf8", key: None };
    };
    let mut f = [""; 5];
    let mut n = 0;
    for part in line.split(',') {
        if n < 5 {
            f[n] = part.trim();
        }
        n += 1;
    }
    if n != 5 {
        return Parsed::Bad { reason: "wrong_field_count", key: None };
    }
    if f[0].eq_ignore_ascii_case("timestamp") {
        return Parsed::Header;
    }
    let key = (f[3], f[4]);
    if key.0.is_empty() {
        return Parsed::Bad { reason: "empty_group_id", key: None };
    }
    if key.1.is_empty() {
        return Parsed::Bad { reason: "empty_sequence_id", key: None };
    }
    let Some(time) = parse_timestamp(f[0]) else {
        return Parsed::Bad { reason: "bad_timestamp", key: Some(key) };
    };
    let Some(bpm) = parse_value(f[1]) else {
        return Parsed::Bad { reason: "bad_bpm", key: Some(key) };
    };
    let Some(uterus) = parse_value(f[2]) else {
        return Parsed::Bad { reason: "bad_uterus", key: Some(key) };
    };
    Parsed::Message(Message {
        timestamp: f[0],
        time,
        bpm_text: f[1],
        bpm,
        uterus_text: f[2],
        uterus,
        group_id: key.0,
        sequence_id: key.1,
    })
}

/// A line of the current chunk: its bytes, or the mark of an over-long line whose bytes
/// were dropped.
#[derive(Clone, Debug)]
enum LineRef {
    Text(Range<usize>),
    TooLong,
}

/// The reply to one line before the batch is scored.
enum Reply {
    NotReady { needed: usize, error: Option<&'static str> },
    Scored { line: Range<usize>, batch_index: usize },
}

/// Writes replies in the text or JSON format.
pub struct ReplyWriter<W: Write> {
    pub out: W,
    format: ReplyFormat,
}

impl<W: Write> ReplyWriter<W> {
    pub fn new(out: W, format: ReplyFormat) -> Self {
        ReplyWriter { out, format }
    }

    pub fn not_ready(&mut self, needed: usize, error: Option<&str>) -> io::Result<()> {
        match (self.format, error) {
            (ReplyFormat::Text, None) => writeln!(self.out, "ready:false,detection:,needed:{needed}"),
            (ReplyFormat::Text, Some(e)) => writeln!(self.out, "ready:false,detection:,needed:{needed},error:{e}"),
            (ReplyFormat::Json, None) => writeln!(self.out, r#"{{"ready":false,"detection":null,"needed":{needed}}}"#),
            (ReplyFormat::Json, Some(e)) => {
                writeln!(self.out, r#"{{"ready":false,"detection":null,"needed":{needed},"error":{}}}"#, json_str(e))
            }
        }
    }

    pub fn scored(&mut self, m: &Message, d: &Detection) -> io::Result<()> {
        let (b, u) = (d.bpm_anomaly as u8, d.uterus_anomaly as u8);
        match self.format {
            ReplyFormat::Text => writeln!(
                self.out,
                "ready:true,detection:{},{},{},{},{},{b},{u},{},needed:0",
                m.timestamp, m.group_id, m.sequence_id, m.bpm_text, m.uterus_text, d.score
            ),
            ReplyFormat::Json => writeln!(
                self.out,
                r#"{{"ready":true,"detection":{{"timestamp":{},"group_id":{},"sequence_id":{},"bpm":{},"uterus":{},"bpm_anomaly":{b},"uterus_anomaly":{u},"anomaly_score":{}}},"needed":0}}"#,
                json_str(m.timestamp),
                json_str(m.group_id),
                json_str(m.sequence_id),
                m.bpm,
                m.uterus,
                d.score
            ),
        }
    }
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serialises")
}

/// Counts of lines by outcome, for the summary on stderr.
#[derive(Default, Debug)]
pub struct Tally {
    pub lines: u64,
    pub scored: u64,
    pub warming: u64,
    pub rejected: BTreeMap<&'static str, u64>,
}

impl Tally {
    pub fn summary(&self) -> String {
        let total: u64 = self.rejected.values().sum();
        let reasons: Vec<String> = self.rejected.iter().map(|(r, n)| format!("{r} {n}")).collect();
        format!(
            "fad stream: {} lines, {} scored, {} warming up, {} not scorable ({})",
            self.lines,
            self.scored,
            self.warming,
            total,
            reasons.join(", ")
        )
    }
}

/// Processes every complete line of `buf` (each ending in '\n'; `last` may lack it).
fn process_lines<W: Write>(
    engine: &mut Engine,
    buf: &[u8],
    lines: &[LineRef],
    replies: &mut Vec<Reply>,
    detections: &mut Vec<Detection>,
    out: &mut ReplyWriter<W>,
    tally: &mut Tally,
) -> io::Result<()> {
    replies.clear();
    let max_lag = engine.model().features.max_lag();
    for line in lines {
        tally.lines += 1;
        let r = match line {
            LineRef::Text(r) => r,
            LineRef::TooLong => {
                replies.push(Reply::NotReady { needed: max_lag, error: Some("line_too_long") });
                continue;
            }
        };
        let reply = match parse_line(&buf[r.clone()]) {
            Parsed::Message(m) => match engine.offer(m.group_id, m.sequence_id, m.time, m.bpm, m.uterus) {
                Offer::WarmingUp { needed } => Reply::NotReady { needed, error: None },
                Offer::Rejected { reason, needed } => Reply::NotReady { needed, error: Some(reason.as_str()) },
                Offer::Pending(batch_index) => Reply::Scored { line: r.clone(), batch_index },
            },
            Parsed::Header => Reply::NotReady { needed: max_lag, error: None },
            Parsed::Blank => Reply::NotReady { needed: max_lag, error: Some("empty_line") },
            Parsed::Bad { reason, key } => {
                let needed = key.map_or(max_lag, |(g, s)| engine.needed(g, s));
                Reply::NotReady { needed, error: Some(reason) }
            }
        };
        replies.push(reply);
    }
    engine.score_pending(detections);
    for reply in replies.iter() {
        match reply {
            Reply::NotReady { needed, error } => {
                match error {
                    Some(e) => *tally.rejected.entry(e).or_default() += 1,
                    None => tally.warming += 1,
                }
                out.not_ready(*needed, *error)?;
            }
            Reply::Scored { line, batch_index } => {
                tally.scored += 1;
                let Parsed::Message(m) = parse_line(&buf[line.clone()]) else {
                    unreachable!("a scored line parsed as a message a moment ago")
                };
                out.scored(&m, &detections[*batch_index])?;
            }
        }
    }
    Ok(())
}

/// Runs the stream loop over `input`, writing to `output`. `reload` is polled between
/// chunks; when set, the model is reloaded from its directory.
pub fn run_stream<R: Read, W: Write>(
    model: Arc<Model>,
    mut input: R,
    output: W,
    format: ReplyFormat,
    reload: Option<&AtomicBool>,
) -> Result<Tally> {
    let mut engine = Engine::new(model);
    let mut out = ReplyWriter::new(io::BufWriter::with_capacity(1 << 16, output), format);
    let mut tally = Tally::default();
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK * 2);
    let mut lines: Vec<LineRef> = Vec::new();
    let (mut replies, mut detections) = (Vec::new(), Vec::new());
    // Bytes of an over-long line are dropped as they come; the line is answered at its end.
    let mut skipping_long_line = false;
    let mut eof = false;
    while !eof {
        if let Some(flag) = reload
            && flag.swap(false, Ordering::SeqCst)
        {
            engine = reload_model(engine);
        }
        out.out.flush()?;
        let start = buf.len();
        buf.resize(start + READ_CHUNK, 0);
        let got = loop {
            match input.read(&mut buf[start..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    if reload.is_some_and(|f| f.load(Ordering::SeqCst)) {
                        break 0usize.wrapping_sub(1); // signal arrived: go reload, then read again
                    }
                }
                Err(e) => return Err(e).context("cannot read input"),
            }
        };
        if got == usize::MAX {
            buf.truncate(start);
            continue;
        }
        buf.truncate(start + got);
        eof = got == 0;
        lines.clear();
        let mut line_start = 0;
        let mut scan = start;
        while let Some(pos) = memchr(b'\n', &buf[scan..]) {
            let end = scan + pos;
            if skipping_long_line {
                skipping_long_line = false;
                lines.push(LineRef::TooLong);
            } else {
                lines.push(LineRef::Text(line_start..end));
            }
            line_start = end + 1;
            scan = end + 1;
        }
        if eof && skipping_long_line {
            lines.push(LineRef::TooLong);
        } else if eof && line_start < buf.len() {
            lines.push(LineRef::Text(line_start..buf.len()));
            line_start = buf.len();
        }
        process_lines(&mut engine, &buf, &lines, &mut replies, &mut detections, &mut out, &mut tally)?;
        buf.drain(..line_start);
        if buf.len() > MAX_LINE {
            buf.clear();
            skipping_long_line = true;
        }
    }
    out.out.flush()?;
    Ok(tally)
}

fn reload_model(engine: Engine) -> Engine {
    let dir = engine.model().dir.clone();
    match Model::load(&dir) {
        Ok(new) => {
            eprintln!("fad stream: reloaded model from {}", dir.display());
            Engine::new_keeping_state(engine, Arc::new(new))
        }
        Err(e) => {
            eprintln!("fad stream: kept the old model; the new one in {} is unusable: {e:#}", dir.display());
            engine
        }
    }
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

pub fn run(args: StreamArgs) -> Result<()> {
    let model = Arc::new(Model::load(&args.model)?);
    let reload = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&reload))
        .context("cannot install the SIGHUP handler")?;
    let stdout = io::stdout();
    let tally = match &args.input {
        Some(path) => {
            let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            run_stream(model, file, stdout.lock(), args.format, Some(&reload))?
        }
        None => run_stream(model, io::stdin().lock(), stdout.lock(), args.format, Some(&reload))?,
    };
    if !tally.rejected.is_empty() {
        eprintln!("{}", tally.summary());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_messages_with_spaces_bom_and_crlf() {
        let Parsed::Message(m) = parse_line(b"\xEF\xBB\xBF 12.5 , 140 ,10,g-1, s1\r") else { panic!() };
        assert_eq!((m.time, m.bpm, m.uterus, m.group_id, m.sequence_id), (12.5, 140.0, 10.0, "g-1", "s1"));
        assert_eq!(m.timestamp, "12.5");
        assert_eq!(parse_line(b"timestamp,bpm,uterus,group_id,sequence_id"), Parsed::Header);
        assert_eq!(parse_line(b"\r"), Parsed::Blank);
    }

    #[test]
    fn malformed_lines_say_why() {
        let bad = |l: &[u8]| match parse_line(l) {
            Parsed::Bad { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(bad(b"1,2,3"), "wrong_field_count");
        assert_eq!(bad(b"1,2,3,4,5,6"), "wrong_field_count");
        assert_eq!(bad(b"x,140,10,g,s"), "bad_timestamp");
        assert_eq!(bad(b"1,abc,10,g,s"), "bad_bpm");
        assert_eq!(bad(b"1,140,1e,g,s"), "bad_uterus");
        assert_eq!(bad(b"1,140,10,,s"), "empty_group_id");
        assert_eq!(bad(b"1,140,10,g,"), "empty_sequence_id");
        assert_eq!(bad(b"1,\xff,10,g,s"), "not_utf8");
        assert!(matches!(parse_line(b"1,,10,g,s"), Parsed::Message(m) if m.bpm.is_nan()));
        assert!(matches!(parse_line(b"1,NaN,10,g,s"), Parsed::Message(m) if m.bpm.is_nan()));
    }
}
