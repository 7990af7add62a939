//! `fad stream`: one reply per input line, in order (SPEC section 5).
//!
//! Input is read in chunks of whatever is available; the complete lines of a chunk are
//! parsed and offered to the engine, the windows that filled are scored together, the
//! replies are written, and the output is flushed before the next (possibly blocking)
//! read. A file is thus processed at full speed, and `tail -f` gets each answer at once.

use crate::cli::{ReplyFormat, StreamArgs};
use crate::engine::{Engine, EvictCause, Limits, NAMED_EVICTIONS, Offer, parse_timestamp, parse_value};
use crate::forecast::{self, ForecastError, Forecaster};
use crate::model::{Detection, Model};
use crate::state;
pub use crate::table::{BadId, MAX_ID, bad_id};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::time::Duration;

/// Longest line kept in memory; a longer one is answered with an error, not buffered.
pub const MAX_LINE: usize = 1 << 20;
/// Most bytes one read takes. A read returns what is there, so the size costs a slow feed
/// nothing; a fast one (a file) wakes the line machine four times less often than with
/// 64 KiB (full feed: 3.64 -> 3.55 s CPU, 7 interleaved runs each).
const READ_CHUNK: usize = 1 << 18;

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

/// [`trim_padding`](crate::table::trim_padding), skipped when the field neither starts nor
/// ends with a space of any kind.
#[inline]
fn trim_field(field: &str) -> &str {
    match (field.as_bytes().first(), field.as_bytes().last()) {
        (Some(&a), Some(&b)) if a.is_ascii_graphic() && b.is_ascii_graphic() => field,
        _ => crate::table::trim_padding(field),
    }
}

/// Parses one line `timestamp,bpm,uterus,group_id,sequence_id`.
pub fn parse_line(raw: &[u8]) -> Parsed<'_> {
    let line = clean_line(raw);
    if line.is_empty() {
        return Parsed::Blank;
    }
    let line = if line.is_ascii() {
        // SAFETY: ASCII is UTF-8 (the usual case, checked a word at a time).
        unsafe { std::str::from_utf8_unchecked(line) }
    } else {
        let Ok(line) = std::str::from_utf8(line) else {
            return Parsed::Bad { reason: "not_utf8", key: None };
        };
        line
    };
    let mut f = [""; 5];
    let mut n = 0;
    let mut start = 0;
    let bytes = line.as_bytes();
    // Commas are ASCII, so every cut is on a char boundary.
    for end in memchr::memchr_iter(b',', bytes).chain([bytes.len()]) {
        if n < 5 {
            f[n] = trim_field(&line[start..end]);
        }
        n += 1;
        start = end + 1;
    }
    if n != 5 {
        return Parsed::Bad { reason: "wrong_field_count", key: None };
    }
    if f[0].eq_ignore_ascii_case("timestamp") {
        // A header in another order says the lines after it are in that order, which
        // fad does not read: say so here rather than with a bad_bpm on every line.
        let stream_order = ["timestamp", "bpm", "uterus", "group_id", "sequence_id"];
        if f.iter().zip(stream_order).all(|(a, b)| a.eq_ignore_ascii_case(b)) {
            return Parsed::Header;
        }
        return Parsed::Bad { reason: "wrong_header", key: None };
    }
    let key = (f[3], f[4]);
    if let Some(bad) = bad_id(key.0).max(bad_id(key.1)) {
        return Parsed::Bad { reason: bad.reason(), key: None };
    }
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
    NotReady {
        needed: usize,
        error: Option<&'static str>,
    },
    /// A header line: answered like a message of an unknown series, counted apart.
    Header {
        needed: usize,
    },
    Scored {
        echo: Echo,
        batch_index: usize,
        forecast: Option<Forecast>,
    },
}

/// The --horizon points of one scored message, or why there are none.
pub type Forecast = Result<Vec<FuturePoint>, ForecastError>;

/// One forecast point: (time, bpm, uterus) and its row in the scored batch (None: the
/// point is not scorable, e.g. a value the forecaster could not give).
#[derive(Clone, Debug)]
pub struct FuturePoint {
    pub point: [f64; 3],
    pub batch_index: Option<usize>,
}

/// `--horizon`: how many future points each scored message gets, and who makes them.
pub struct Horizon {
    pub k: usize,
    /// None: the last values are held.
    pub forecaster: Option<Forecaster>,
    /// The forecaster's failure has been told on stderr.
    told: bool,
}

impl Horizon {
    pub fn new(k: usize, forecaster: Option<Forecaster>) -> Horizon {
        Horizon { k, forecaster, told: false }
    }

    /// Samples of raw history the engine must keep per series.
    pub fn history(&self, forecaster_history: usize) -> usize {
        if self.forecaster.is_some() { forecaster_history.max(HOLD_HISTORY) } else { HOLD_HISTORY }
    }

    /// Makes the future points of a series that was just scored and queues them in the
    /// engine's batch; the series itself is not changed.
    fn points(&mut self, engine: &mut Engine, group_id: &str, sequence_id: &str) -> Forecast {
        let history: Vec<[f64; 3]> =
            engine.history(group_id, sequence_id).map(|h| h.iter().copied().collect()).unwrap_or_default();
        let Some(&newest) = history.last() else { return Ok(Vec::new()) };
        let step = sampling_interval(&history);
        let points = match &mut self.forecaster {
            None => forecast::hold(newest, step, self.k),
            Some(f) => {
                let asked = f.ask(group_id, sequence_id, self.k, &history, step);
                if let Err(e) = &asked
                    && !std::mem::replace(&mut self.told, true)
                {
                    note(&format!("fad stream: {}", e.detail()));
                }
                asked?
            }
        };
        let rows = engine.forecast(group_id, sequence_id, &points);
        Ok(points.into_iter().zip(rows).map(|(point, batch_index)| FuturePoint { point, batch_index }).collect())
    }
}

/// Samples kept per series for holding the last values: enough to see the sampling rate.
const HOLD_HISTORY: usize = 8;

/// The series' sampling interval: the shortest step among its last samples (a pause for
/// lost signal is not the rate), 1 s when there is only one sample.
fn sampling_interval(history: &[[f64; 3]]) -> f64 {
    let tail = &history[history.len().saturating_sub(HOLD_HISTORY)..];
    let step = tail.windows(2).map(|w| w[1][0] - w[0][0]).filter(|d| *d > 0.0).fold(f64::INFINITY, f64::min);
    if step.is_finite() { step } else { 1.0 }
}

/// Where the echoed fields of a scored line are in the input buffer (so the line is not
/// parsed a second time when its reply is written), plus the parsed signal values.
struct Echo {
    /// timestamp, bpm, uterus, group_id, sequence_id (byte ranges in the buffer)
    fields: [(u32, u32); 5],
    bpm: f64,
    uterus: f64,
}

impl Echo {
    fn new(buf: &[u8], m: &Message) -> Echo {
        let base = buf.as_ptr() as usize;
        let at = |s: &str| ((s.as_ptr() as usize - base) as u32, s.len() as u32);
        Echo {
            fields: [at(m.timestamp), at(m.bpm_text), at(m.uterus_text), at(m.group_id), at(m.sequence_id)],
            bpm: m.bpm,
            uterus: m.uterus,
        }
    }

    /// When the line was written without padding ("ts,bpm,uterus,gid,sid"), the text reply's
    /// echo in three pieces of it: "ts,", "gid,sid" and ",bpm,uterus," (one copy each
    /// instead of ten small writes).
    fn pieces<'a>(&self, buf: &'a [u8]) -> Option<[&'a [u8]; 3]> {
        let [ts, bpm, uterus, gid, sid] = self.fields.map(|(start, len)| (start as usize, (start + len) as usize));
        let contiguous = bpm.0 == ts.1 + 1 && uterus.0 == bpm.1 + 1 && gid.0 == uterus.1 + 1 && sid.0 == gid.1 + 1;
        contiguous.then(|| [&buf[ts.0..ts.1 + 1], &buf[gid.0..sid.1], &buf[ts.1..uterus.1 + 1]])
    }

    /// The message again, borrowing from `buf` (the same buffer, unchanged since `new`).
    fn message<'a>(&self, buf: &'a [u8]) -> Message<'a> {
        let get = |(start, len): (u32, u32)| {
            let bytes = &buf[start as usize..(start + len) as usize];
            // SAFETY: the range was cut from a &str of this very buffer, at char
            // boundaries, and the buffer has not changed since.
            unsafe { std::str::from_utf8_unchecked(bytes) }
        };
        Message {
            timestamp: get(self.fields[0]),
            time: f64::NAN,
            bpm_text: get(self.fields[1]),
            bpm: self.bpm,
            uterus_text: get(self.fields[2]),
            uterus: self.uterus,
            group_id: get(self.fields[3]),
            sequence_id: get(self.fields[4]),
        }
    }
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
            (ReplyFormat::Text, error) => {
                // Same bytes as "ready:false,detection:,needed:{needed}[,error:{e}]".
                self.out.write_all(b"ready:false,detection:,needed:")?;
                write_decimal(&mut self.out, needed)?;
                if let Some(e) = error {
                    self.out.write_all(b",error:")?;
                    self.out.write_all(e.as_bytes())?;
                }
                self.out.write_all(b"\n")
            }
            (ReplyFormat::Json, None) => writeln!(self.out, r#"{{"ready":false,"detection":null,"needed":{needed}}}"#),
            (ReplyFormat::Json, Some(e)) => {
                writeln!(self.out, r#"{{"ready":false,"detection":null,"needed":{needed},"error":{}}}"#, json_str(e))
            }
        }
    }

    /// A text reply without forecast from the pieces of [`Echo::pieces`]: the bytes
    /// [`scored_with`](Self::scored_with) writes.
    fn scored_text(&mut self, [ts, ids, values]: [&[u8]; 3], d: &Detection) -> io::Result<()> {
        let o = &mut self.out;
        o.write_all(b"ready:true,detection:")?;
        o.write_all(ts)?;
        o.write_all(ids)?;
        o.write_all(values)?;
        o.write_all(&[b'0' + d.bpm_anomaly as u8, b',', b'0' + d.uterus_anomaly as u8, b','])?;
        crate::model::write_f64(o, d.score)?;
        o.write_all(b",needed:0\n")
    }

    pub fn scored(&mut self, m: &Message, d: &Detection) -> io::Result<()> {
        self.scored_with(m, d, None, &[])
    }

    /// A scored reply, with the --horizon points when there are any (`detections` holds
    /// the batch their indices point into).
    pub fn scored_with(
        &mut self,
        m: &Message,
        d: &Detection,
        forecast: Option<&Forecast>,
        detections: &[Detection],
    ) -> io::Result<()> {
        let (b, u) = (d.bpm_anomaly as u8, d.uterus_anomaly as u8);
        match self.format {
            ReplyFormat::Text => {
                // "ready:true,detection:{ts},{gid},{sid},{bpm},{uterus},{b},{u},{score},needed:0"
                let o = &mut self.out;
                o.write_all(b"ready:true,detection:")?;
                for part in [m.timestamp, m.group_id, m.sequence_id, m.bpm_text, m.uterus_text] {
                    o.write_all(part.as_bytes())?;
                    o.write_all(b",")?;
                }
                o.write_all(&[b'0' + b, b',', b'0' + u, b','])?;
                crate::model::write_f64(o, d.score)?;
                o.write_all(b",needed:0")?;
            }
            ReplyFormat::Json => write!(
                self.out,
                r#"{{"ready":true,"detection":{{"timestamp":{},"group_id":{},"sequence_id":{},"bpm":{},"uterus":{},"bpm_anomaly":{b},"uterus_anomaly":{u},"anomaly_score":{}}},"needed":0"#,
                json_str(m.timestamp),
                json_str(m.group_id),
                json_str(m.sequence_id),
                m.bpm,
                m.uterus,
                d.score
            )?,
        }
        match forecast {
            None => {}
            Some(Err(e)) => match self.format {
                ReplyFormat::Text => write!(self.out, ",forecast_error:{}", e.as_str())?,
                ReplyFormat::Json => write!(self.out, r#","forecast_error":{}"#, json_str(e.as_str()))?,
            },
            Some(Ok(points)) => self.forecast(points, detections)?,
        }
        match self.format {
            ReplyFormat::Text => self.out.write_all(b"\n"),
            ReplyFormat::Json => self.out.write_all(b"}\n"),
        }
    }

    fn forecast(&mut self, points: &[FuturePoint], detections: &[Detection]) -> io::Result<()> {
        let json_num = |v: f64| if v.is_finite() { v.to_string() } else { "null".into() };
        match self.format {
            ReplyFormat::Text => write!(self.out, ",forecast:")?,
            ReplyFormat::Json => write!(self.out, r#","forecast":["#)?,
        }
        for (i, p) in points.iter().enumerate() {
            let [t, bpm, uterus] = p.point;
            // Times are sums of steps: written to the microsecond, 15.751588 and not
            // 15.751587999999998 (where microseconds are exact in an f64: epoch times are).
            let t = if (t * 1e6).abs() < 2f64.powi(53) { (t * 1e6).round() / 1e6 } else { t };
            let d = p.batch_index.map(|i| detections[i]);
            match self.format {
                ReplyFormat::Text => {
                    let sep = if i == 0 { "" } else { ";" };
                    match d {
                        Some(d) => write!(
                            self.out,
                            "{sep}{t}/{bpm}/{uterus}/{}/{}/{}",
                            d.bpm_anomaly as u8, d.uterus_anomaly as u8, d.score
                        )?,
                        // A value the forecaster could not give is empty, like the flags.
                        None => {
                            let text = |v: f64| if v.is_finite() { v.to_string() } else { String::new() };
                            write!(self.out, "{sep}{t}/{}/{}///", text(bpm), text(uterus))?
                        }
                    }
                }
                ReplyFormat::Json => {
                    let sep = if i == 0 { "" } else { "," };
                    let (b, u, s) = match d {
                        Some(d) => {
                            ((d.bpm_anomaly as u8).to_string(), (d.uterus_anomaly as u8).to_string(), json_num(d.score))
                        }
                        None => ("null".into(), "null".into(), "null".into()),
                    };
                    write!(
                        self.out,
                        r#"{sep}{{"timestamp":{},"bpm":{},"uterus":{},"bpm_anomaly":{b},"uterus_anomaly":{u},"anomaly_score":{s}}}"#,
                        json_num(t),
                        json_num(bpm),
                        json_num(uterus)
                    )?;
                }
            }
        }
        if self.format == ReplyFormat::Json {
            write!(self.out, "]")?;
        }
        Ok(())
    }
}

/// Writes `n` in decimal, as `{n}` would.
fn write_decimal(out: &mut impl Write, mut n: usize) -> io::Result<()> {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.write_all(&digits[at..])
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
    pub headers: u64,
    pub rejected: BTreeMap<&'static str, u64>,
    /// Series forgotten: (over --max-series, idle).
    pub evicted: (u64, u64),
}

impl Tally {
    pub fn summary(&self) -> String {
        let total: u64 = self.rejected.values().sum();
        let reasons: Vec<String> = self.rejected.iter().map(|(r, n)| format!("{r} {n}")).collect();
        let mut s = format!(
            "fad stream: {} lines, {} scored, {} warming up, {} not scorable",
            self.lines, self.scored, self.warming, total
        );
        if total > 0 {
            s.push_str(&format!(" ({})", reasons.join(", ")));
        }
        if self.headers > 0 {
            s.push_str(&format!(", {} header line(s)", self.headers));
        }
        let (max, idle) = self.evicted;
        if max + idle > 0 {
            s.push_str(&format!("; {} series forgotten ({max} over --max-series, {idle} idle)", max + idle));
        }
        s
    }
}

/// The line machine of `fad stream`: takes input in chunks of any size, answers every
/// complete line, in order, exactly once. It does no reading and no signal handling, so
/// it can be driven by the live loop ([`drive`]) or directly (tests, fuzzing).
pub struct Stream<W: Write> {
    engine: Engine,
    out: ReplyWriter<io::BufWriter<W>>,
    pub tally: Tally,
    /// Unanswered input: the incomplete last line, plus the new chunk while it is processed.
    buf: Vec<u8>,
    lines: Vec<LineRef>,
    replies: Vec<Reply>,
    detections: Vec<Detection>,
    /// Bytes of an over-long line are dropped as they come; the line is answered at its end.
    skipping_long_line: bool,
    horizon: Option<Horizon>,
}

impl<W: Write> Stream<W> {
    pub fn new(engine: Engine, output: W, format: ReplyFormat) -> Self {
        Stream {
            engine,
            out: ReplyWriter::new(io::BufWriter::with_capacity(1 << 16, output), format),
            tally: Tally::default(),
            buf: Vec::with_capacity(READ_CHUNK * 2),
            lines: Vec::new(),
            replies: Vec::new(),
            detections: Vec::new(),
            skipping_long_line: false,
            horizon: None,
        }
    }

    /// Scores --horizon future points after every scored message.
    pub fn with_horizon(mut self, horizon: Horizon, forecaster_history: usize) -> Self {
        self.engine.keep_history(horizon.history(forecaster_history));
        self.horizon = Some(horizon);
        self
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Replaces the engine (model reload) between two chunks.
    pub fn map_engine(&mut self, f: impl FnOnce(Engine) -> Engine) {
        let placeholder = Engine::new(Arc::clone(self.engine.model()));
        let old = std::mem::replace(&mut self.engine, placeholder);
        self.engine = f(old);
    }

    /// Bytes held for a line not yet complete (bounded by [`MAX_LINE`] plus one chunk).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.out.flush()
    }

    /// Answers every line that `chunk` completes.
    pub fn feed(&mut self, chunk: &[u8]) -> io::Result<()> {
        let start = self.buf.len();
        self.buf.extend_from_slice(chunk);
        self.lines.clear();
        let mut line_start = 0;
        // One scan over the new bytes (a search per line paid its set-up every ~50 bytes).
        for end in memchr::memchr_iter(b'\n', &self.buf[start..]).map(|p| start + p) {
            if std::mem::take(&mut self.skipping_long_line) || end - line_start > MAX_LINE {
                self.lines.push(LineRef::TooLong);
            } else {
                self.lines.push(LineRef::Text(line_start..end));
            }
            line_start = end + 1;
        }
        self.answer_lines()?;
        self.buf.drain(..line_start);
        if self.buf.len() > MAX_LINE {
            self.buf.clear();
            self.buf.shrink_to(READ_CHUNK * 2);
            self.skipping_long_line = true;
        }
        Ok(())
    }

    /// End of input: answers a last line that lacks its newline, and flushes.
    pub fn finish(&mut self) -> io::Result<()> {
        self.lines.clear();
        if std::mem::take(&mut self.skipping_long_line) {
            self.lines.push(LineRef::TooLong);
        } else if !self.buf.is_empty() {
            self.lines.push(LineRef::Text(0..self.buf.len()));
        }
        self.answer_lines()?;
        self.buf.clear();
        self.flush()
    }

    /// Offers the lines of `self.lines` to the engine, scores the windows that filled in
    /// one batch, and writes one reply per line, in order.
    fn answer_lines(&mut self) -> io::Result<()> {
        if self.horizon.as_ref().is_some_and(|h| h.forecaster.is_some()) {
            // A forecaster may take its time: line by line, each reply flushed, so that
            // no reply waits for the forecast of a later message.
            for i in 0..self.lines.len() {
                self.answer_batch(i..i + 1)?;
                self.flush()?;
            }
            return Ok(());
        }
        self.answer_batch(0..self.lines.len())
    }

    /// Answers `self.lines[batch]` (see [`Stream::answer_lines`]).
    fn answer_batch(&mut self, batch: Range<usize>) -> io::Result<()> {
        self.replies.clear();
        let warmup = self.engine.model().features.warmup();
        for line in &self.lines[batch] {
            let r = match line {
                LineRef::Text(r) => r,
                LineRef::TooLong => {
                    self.replies.push(Reply::NotReady { needed: warmup, error: Some("line_too_long") });
                    continue;
                }
            };
            let reply = match parse_line(&self.buf[r.clone()]) {
                Parsed::Message(m) => match self.engine.offer(m.group_id, m.sequence_id, m.time, m.bpm, m.uterus) {
                    Offer::WarmingUp { needed } => Reply::NotReady { needed, error: None },
                    Offer::Rejected { reason, needed } => Reply::NotReady { needed, error: Some(reason.as_str()) },
                    Offer::Pending(batch_index) => {
                        let forecast =
                            self.horizon.as_mut().map(|h| h.points(&mut self.engine, m.group_id, m.sequence_id));
                        Reply::Scored { echo: Echo::new(&self.buf, &m), batch_index, forecast }
                    }
                },
                Parsed::Header => Reply::Header { needed: warmup },
                Parsed::Blank => Reply::NotReady { needed: warmup, error: Some("empty_line") },
                Parsed::Bad { reason, key } => {
                    let needed = key.map_or(warmup, |(g, s)| self.engine.needed(g, s));
                    Reply::NotReady { needed, error: Some(reason) }
                }
            };
            self.replies.push(reply);
        }
        self.engine.score_pending(&mut self.detections);
        self.tally.evicted = self.engine.evicted();
        for reply in &self.replies {
            write_reply(&mut self.out, &mut self.tally, &self.buf, &self.detections, reply)?;
        }
        Ok(())
    }
}

/// Writes one reply; the single place a reply leaves fad (a per-reply hook goes here).
fn write_reply<W: Write>(
    out: &mut ReplyWriter<W>,
    tally: &mut Tally,
    buf: &[u8],
    detections: &[Detection],
    reply: &Reply,
) -> io::Result<()> {
    // Counted here, with the outcomes: after a failed write the summary counts the lines
    // answered, not those read.
    tally.lines += 1;
    match reply {
        Reply::Header { needed } => {
            tally.headers += 1;
            out.not_ready(*needed, None)
        }
        Reply::NotReady { needed, error } => {
            match error {
                Some(e) => *tally.rejected.entry(e).or_default() += 1,
                None => tally.warming += 1,
            }
            out.not_ready(*needed, *error)
        }
        Reply::Scored { echo, batch_index, forecast } => {
            tally.scored += 1;
            let d = &detections[*batch_index];
            match echo.pieces(buf) {
                Some(pieces) if forecast.is_none() && out.format == ReplyFormat::Text => out.scored_text(pieces, d),
                _ => out.scored_with(&echo.message(buf), d, forecast.as_ref(), detections),
            }
        }
    }
}

/// Flags set by signal handlers, polled between chunks and while waiting for input.
#[derive(Clone, Default)]
pub struct Control {
    /// SIGHUP: reload the model.
    pub reload: Arc<AtomicBool>,
    /// SIGINT or SIGTERM: the signal number, 0 while none arrived.
    pub stop: Arc<AtomicUsize>,
}

impl Control {
    /// Installs the handlers. A second SIGINT/SIGTERM while the first is being handled
    /// (say, a slow state save) ends the process at once, as users expect of Ctrl-C.
    pub fn install() -> Result<Control> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let c = Control::default();
        signal_hook::flag::register(SIGHUP, Arc::clone(&c.reload)).context("cannot install the SIGHUP handler")?;
        for sig in [SIGINT, SIGTERM] {
            let stopping = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register_conditional_shutdown(sig, 1, Arc::clone(&stopping))
                .context("cannot install the SIGINT/SIGTERM handlers")?;
            signal_hook::flag::register(sig, stopping).context("cannot install the SIGINT/SIGTERM handlers")?;
            signal_hook::flag::register_usize(sig, Arc::clone(&c.stop), sig as usize)
                .context("cannot install the SIGINT/SIGTERM handlers")?;
        }
        Ok(c)
    }
}

/// How the input loop ended.
#[derive(Debug, PartialEq)]
pub enum Ending {
    Eof,
    /// SIGINT or SIGTERM (the number).
    Signal(i32),
}

/// What the input loop does besides answering lines.
pub struct Options {
    /// The --model path as given, so a reload follows a repointed symlink.
    pub model_path: PathBuf,
    pub state: Option<PathBuf>,
    pub checkpoint_every: Option<u64>,
}

/// A chunk of input from the reader thread; empty at end of input.
pub type Chunk = io::Result<Vec<u8>>;

/// Reads `input` on its own thread, so that the main loop never blocks in read(): it
/// waits on the channel with a timeout and notices signals within [`POLL`] however quiet
/// the feed is. The channel is bounded, so memory is too.
pub fn spawn_reader<R: Read + Send + 'static>(mut input: R) -> Receiver<Chunk> {
    let (tx, rx) = mpsc::sync_channel::<Chunk>(READ_AHEAD);
    std::thread::Builder::new()
        .name("fad-reader".into())
        .spawn(move || {
            loop {
                let mut chunk = vec![0u8; READ_CHUNK];
                match input.read(&mut chunk) {
                    Ok(n) => {
                        chunk.truncate(n);
                        if tx.send(Ok(chunk)).is_err() || n == 0 {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
        })
        .expect("cannot start the input thread");
    rx
}

/// Chunks the reader thread may read ahead of the line machine.
const READ_AHEAD: usize = 4;

/// How long the loop waits for input before it looks at the signal flags again.
pub const POLL: Duration = Duration::from_millis(50);

/// The live loop: answers chunks as they come, flushes before it waits, reloads the model
/// on SIGHUP, checkpoints the state, and stops at end of input or on SIGINT/SIGTERM
/// (answering first what was already read).
pub fn drive<W: Write>(
    stream: &mut Stream<W>,
    input: &Receiver<Chunk>,
    ctl: &Control,
    opts: &Options,
) -> Result<Ending> {
    let mut since_checkpoint = 0u64;
    let mut announced_quiet_evictions = false;
    loop {
        let stop = ctl.stop.load(Ordering::SeqCst);
        if stop != 0 {
            // Answer what was already read (the channel holds at most READ_AHEAD chunks),
            // not what the reader goes on reading from a file meanwhile.
            for _ in 0..=READ_AHEAD {
                let Ok(chunk) = input.try_recv() else { break };
                if feed_chunk(stream, chunk)? {
                    break;
                }
            }
            return Ok(Ending::Signal(stop as i32));
        }
        if ctl.reload.swap(false, Ordering::SeqCst) {
            stream.map_engine(|e| reload_model(e, &opts.model_path));
        }
        if let (Some(n), Some(path)) = (opts.checkpoint_every, &opts.state)
            && since_checkpoint >= n
        {
            // Saved before the replies are flushed: a reply seen implies its state is on disk.
            if let Err(e) = state::save(stream.engine(), path) {
                note(&format!("fad stream: checkpoint failed, will retry: {e:#}"));
            }
            since_checkpoint = 0;
        }
        let chunk = match input.try_recv() {
            Ok(c) => c,
            Err(TryRecvError::Empty) => {
                stream.flush()?;
                match input.recv_timeout(POLL) {
                    Ok(c) => c,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => Ok(Vec::new()),
                }
            }
            Err(TryRecvError::Disconnected) => Ok(Vec::new()),
        };
        let before = stream.tally.lines;
        let eof = feed_chunk(stream, chunk)?;
        since_checkpoint += stream.tally.lines - before;
        for ev in stream.engine.take_named_evictions() {
            let why = match ev.cause {
                EvictCause::MaxSeries => "--max-series reached, least recently used",
                EvictCause::Idle => "idle past --idle-timeout",
            };
            note(&format!("fad stream: forgot series {},{} ({why})", ev.group_id, ev.sequence_id));
        }
        let (max, idle) = stream.engine.evicted();
        if !announced_quiet_evictions && max + idle > NAMED_EVICTIONS as u64 {
            announced_quiet_evictions = true;
            note("fad stream: further forgotten series are only counted (summary at the end)");
        }
        if eof {
            return Ok(Ending::Eof);
        }
    }
}

/// Feeds one chunk from the reader; true at end of input.
fn feed_chunk<W: Write>(stream: &mut Stream<W>, chunk: Chunk) -> Result<bool> {
    let chunk = chunk.context("cannot read input")?;
    if chunk.is_empty() {
        stream.finish()?;
        return Ok(true);
    }
    stream.feed(&chunk)?;
    Ok(false)
}

/// Loads the model again from the --model path (resolving a symlink once, so meta.json
/// and the forest files come from the same directory) and swaps it in; a model that does
/// not load leaves the old one in place.
fn reload_model(engine: Engine, path: &Path) -> Engine {
    let resolved = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    match Model::load(&resolved) {
        Ok(new) => {
            let (engine, kept) = Engine::new_keeping_state(engine, Arc::new(new));
            let windows =
                if kept { "windows kept" } else { "it computes other features, so every series warms up again" };
            note(&format!("fad stream: reloaded model from {} ({windows})", resolved.display()));
            engine
        }
        Err(e) => {
            note(&format!("fad stream: kept the old model; the new one in {} is unusable: {e:#}", path.display()));
            engine
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<io::Error>().is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe))
}

/// A line on stderr that never fails (a closed stderr must not crash the stream).
fn note(text: &str) {
    let _ = writeln!(io::stderr(), "{text}");
}

/// Builds the engine, restoring --state when given.
fn start_engine(args: &StreamArgs, model: Arc<Model>) -> Result<Engine> {
    let limits = Limits {
        max_series: Some(usize::try_from(args.max_series).unwrap_or(usize::MAX)),
        idle_timeout: args.idle_timeout,
    };
    let mut engine = Engine::with_limits(Arc::clone(&model), limits);
    let Some(path) = &args.state else { return Ok(engine) };
    state::check_writable(path)?;
    match state::load(&mut engine, path) {
        Ok(r) if r.series > 0 => {
            note(&format!(
                "fad stream: restored {} series from {} ({} kept)",
                r.series,
                path.display(),
                engine.series_count()
            ));
            Ok(engine)
        }
        Ok(_) => Ok(engine),
        Err(e) if args.state_reset => {
            note(&format!("fad stream: starting afresh (--state-reset): {e:#}"));
            Ok(Engine::with_limits(model, limits))
        }
        Err(e) => Err(e),
    }
}

pub fn run(args: StreamArgs) -> Result<()> {
    // Handlers first: a SIGHUP or SIGTERM while the model loads must not kill fad.
    let ctl = Control::install()?;
    let model = Arc::new(Model::load(&args.model)?);
    let engine = start_engine(&args, model)?;
    let input = match &args.input {
        Some(path) => {
            let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            spawn_reader(file)
        }
        None => spawn_reader(io::stdin()),
    };
    let opts =
        Options { model_path: args.model.clone(), state: args.state.clone(), checkpoint_every: args.checkpoint_every };
    let stdout = io::stdout();
    let mut stream = Stream::new(engine, crate::Stdout(stdout.lock()), args.format);
    if let Some(k) = args.horizon {
        let forecaster = match &args.forecaster {
            Some(cmd) => Some(
                Forecaster::start(cmd, Duration::from_secs_f64(args.forecaster_timeout))
                    .with_context(|| format!("cannot start the forecaster {cmd:?}"))?,
            ),
            None => None,
        };
        stream = stream.with_horizon(Horizon::new(k as usize, forecaster), args.forecast_history as usize);
    }
    let ending = drive(&mut stream, &input, &ctl, &opts);
    // Whatever ended the loop (end of input, a signal, a closed stdout), the windows are
    // saved; the replies written so far are flushed first.
    let flushed = stream.flush();
    let saved = match &opts.state {
        Some(path) => state::save(stream.engine(), path),
        None => Ok(()),
    };
    let t = &stream.tally;
    // A closed stdout (`| head`) ends quietly: no summary either.
    let pipe_closed = ending.as_ref().err().is_some_and(is_broken_pipe)
        || flushed.as_ref().is_err_and(|e| e.kind() == io::ErrorKind::BrokenPipe);
    if !pipe_closed && (!t.rejected.is_empty() || t.evicted != (0, 0)) {
        note(&t.summary());
    }
    let ending = ending?;
    flushed?;
    saved?;
    if let Ending::Signal(sig) = ending {
        // End the way the signal would have, so a shell or supervisor sees 128+N.
        drop(stream);
        signal_hook::low_level::emulate_default_handler(sig).context("cannot end on the signal")?;
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
