//! Per-series state plus micro-batched scoring: what `stream` and `score` share, so that
//! both give the same detections for the same rows.
//!
//! Samples are offered one by one ([`Engine::offer`]); those that complete a window leave
//! a feature row in a pending batch, and [`Engine::score_pending`] scores the batch in one
//! pass through the forests (several rows in flight per tree).

use crate::features::{Pushed, Rejection, Series};
use crate::model::{Detection, Model};
use indexmap::IndexMap;

/// The series map's hasher: foldhash, seeded per process, is several times faster than
/// the default SipHash on short ids and still resists keys chosen to collide.
type SeriesHasher = foldhash::fast::RandomState;
use std::collections::VecDeque;
use std::sync::Arc;

/// What offering one sample did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Offer {
    WarmingUp {
        needed: usize,
    },
    Rejected {
        reason: Rejection,
        needed: usize,
    },
    /// Scored in the pending batch at this index.
    Pending(usize),
}

/// Bounds on the series kept in memory; `None` means unbounded.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    /// At most this many series; the least recently used one makes room for a new one.
    pub max_series: Option<usize>,
    /// A series that received no valid sample for this many seconds of stream time (the
    /// latest accepted timestamp) is forgotten.
    pub idle_timeout: Option<f64>,
}

/// Why a series was forgotten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictCause {
    MaxSeries,
    Idle,
}

/// One forgotten series, for the note on stderr.
#[derive(Clone, Debug, PartialEq)]
pub struct Eviction {
    pub cause: EvictCause,
    pub group_id: String,
    pub sequence_id: String,
}

/// Evictions named one by one (the rest are only counted), so a flood of keys cannot
/// flood stderr or memory.
pub const NAMED_EVICTIONS: usize = 10;

const NIL: usize = usize::MAX;
/// Separates group and sequence in a map key: 0xFF never occurs in UTF-8, so the pair is
/// unambiguous and one lookup needs no allocation.
const KEY_SEP: u8 = 0xFF;

/// A series plus its place in the least-recently-used list.
#[derive(Clone, Debug)]
struct Slot {
    series: Series,
    /// Stream time when a valid sample last entered this series.
    used_at: f64,
    prev: usize,
    next: usize,
    /// The last valid samples as (time, bpm, uterus), kept only for a forecaster.
    history: VecDeque<[f64; 3]>,
}

/// One series as saved in a state file: key, last use (stream time) and window.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedSeries {
    pub group_id: String,
    pub sequence_id: String,
    pub used_at: f64,
    pub series: Series,
}

pub struct Engine {
    model: Arc<Model>,
    limits: Limits,
    /// Series by key, with an intrusive doubly linked list (by map index) from the least
    /// to the most recently used, so that eviction and touch are O(1).
    series: IndexMap<Box<[u8]>, Slot, SeriesHasher>,
    lru_head: usize,
    lru_tail: usize,
    /// Stream time. A sample moves it forward to its time when that is at most the idle
    /// timeout ahead; a sample further ahead moves it only by its series' own step (time
    /// minus the series' previous time), if that step is at most the timeout. So one
    /// monitor with a wrong clock (epoch seconds among relative ones, a year 2099) cannot
    /// make every other series idle at once, and its later samples move the clock at the
    /// pace of any monitor. Without an idle timeout it is the latest time seen.
    clock: f64,
    key: Vec<u8>,
    evicted: [u64; 2],
    named: Vec<Eviction>,
    named_total: usize,
    pending: Vec<f32>,
    row: Vec<f32>,
    /// Samples of raw history kept per series (0: none).
    history: usize,
}

impl Engine {
    pub fn new(model: Arc<Model>) -> Engine {
        Engine::with_limits(model, Limits::default())
    }

    pub fn with_limits(model: Arc<Model>, limits: Limits) -> Engine {
        let w = model.n_features();
        Engine {
            model,
            limits,
            series: IndexMap::default(),
            lru_head: NIL,
            lru_tail: NIL,
            clock: f64::NEG_INFINITY,
            key: Vec::new(),
            evicted: [0; 2],
            named: Vec::new(),
            named_total: 0,
            pending: Vec::new(),
            row: vec![0.0; w],
            history: 0,
        }
    }

    /// Switches to `model`, keeping every series' window when the new model computes the
    /// same features (a retrained forest), and starting afresh when it does not; the
    /// second value tells which.
    pub fn new_keeping_state(old: Engine, model: Arc<Model>) -> (Engine, bool) {
        let same = old.model.features.state_settings() == model.features.state_settings();
        let mut e = Engine::with_limits(Arc::clone(&model), old.limits);
        e.history = old.history;
        e.evicted = old.evicted;
        e.named_total = old.named_total;
        if same {
            e.series = old.series;
            e.lru_head = old.lru_head;
            e.lru_tail = old.lru_tail;
            e.clock = old.clock;
        }
        (e, same)
    }

    /// Keeps the last `n` valid samples of every series (for a forecaster).
    pub fn keep_history(&mut self, n: usize) {
        self.history = n;
    }

    /// The kept history of a series, oldest first, as (time, bpm, uterus).
    pub fn history(&mut self, group_id: &str, sequence_id: &str) -> Option<&VecDeque<[f64; 3]>> {
        self.make_key(group_id, sequence_id);
        self.series.get(&self.key[..]).map(|s| &s.history)
    }

    /// Scores future `points` (time, bpm, uterus) of a series as if they came next, on a
    /// copy of its state: the series itself is untouched. Each point that would be scored
    /// leaves a row in the pending batch; returns their batch indices (None: the point
    /// would not be scored, e.g. a forecast value that is signal loss).
    pub fn forecast(&mut self, group_id: &str, sequence_id: &str, points: &[[f64; 3]]) -> Vec<Option<usize>> {
        self.make_key(group_id, sequence_id);
        let Some(slot) = self.series.get(&self.key[..]) else { return vec![None; points.len()] };
        let mut copy = slot.series.clone();
        let model = Arc::clone(&self.model);
        points
            .iter()
            .map(|&[t, b, u]| match model.features.push(&mut copy, t, b, u, &mut self.row) {
                Pushed::Ready => {
                    let idx = self.pending.len() / self.row.len();
                    self.pending.extend_from_slice(&self.row);
                    Some(idx)
                }
                _ => None,
            })
            .collect()
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// Stream time (-inf before the first sample; see the field for how it moves).
    pub fn clock(&self) -> f64 {
        self.clock
    }

    /// Series forgotten so far, by cause: (over --max-series, idle).
    pub fn evicted(&self) -> (u64, u64) {
        (self.evicted[0], self.evicted[1])
    }

    /// The first [`NAMED_EVICTIONS`] evictions since the start, each returned once.
    pub fn take_named_evictions(&mut self) -> Vec<Eviction> {
        std::mem::take(&mut self.named)
    }

    fn make_key(&mut self, group_id: &str, sequence_id: &str) {
        self.key.clear();
        self.key.extend_from_slice(group_id.as_bytes());
        self.key.push(KEY_SEP);
        self.key.extend_from_slice(sequence_id.as_bytes());
    }

    /// The window of one series, if it is known.
    pub fn series(&mut self, group_id: &str, sequence_id: &str) -> Option<&Series> {
        self.make_key(group_id, sequence_id);
        self.series.get(&self.key[..]).map(|s| &s.series)
    }

    /// Valid samples a series still needs before it is scored (max_lag for an unknown one).
    pub fn needed(&mut self, group_id: &str, sequence_id: &str) -> usize {
        let warmup = self.model.features.warmup();
        self.series(group_id, sequence_id).map_or(warmup, |s| warmup - s.window_len().min(warmup))
    }

    pub fn offer(&mut self, group_id: &str, sequence_id: &str, time: f64, bpm: f64, uterus: f64) -> Offer {
        self.offer_checking::<false>(group_id, sequence_id, time, bpm, uterus)
    }

    /// [`offer`](Self::offer) for input that comes series by series (a table): the most
    /// recently used series is tried before the map, which spares a run of rows of one
    /// series the key, the hash and the probe (`fad score`, full table: 1.78 -> 1.72 s).
    /// Interleaved input (a live feed) would pay for the failed try.
    pub fn offer_in_runs(&mut self, group_id: &str, sequence_id: &str, time: f64, bpm: f64, uterus: f64) -> Offer {
        self.offer_checking::<true>(group_id, sequence_id, time, bpm, uterus)
    }

    fn offer_checking<const TRY_MOST_RECENT: bool>(
        &mut self,
        group_id: &str,
        sequence_id: &str,
        time: f64,
        bpm: f64,
        uterus: f64,
    ) -> Offer {
        // The model is borrowed field by field below, not cloned: an Arc clone and drop
        // per sample are two atomic operations on the hot path.
        let known = if TRY_MOST_RECENT && self.most_recent_is(group_id, sequence_id) {
            Some(self.lru_tail)
        } else {
            self.make_key(group_id, sequence_id);
            self.series.get_index_of(&self.key[..])
        };
        let idx = match known {
            Some(i) => i,
            None => {
                // A sample that could not enter the window creates no series: garbage keys
                // cost no memory.
                let fc = &self.model.features;
                let reason = if !fc.bpm_is_valid(bpm) {
                    Some(Rejection::BpmSignalLoss)
                } else if !fc.uterus_is_valid(uterus) {
                    Some(Rejection::UterusSignalLoss)
                } else {
                    None
                };
                if let Some(reason) = reason {
                    return Offer::Rejected { reason, needed: fc.warmup() };
                }
                if let Some(max) = self.limits.max_series {
                    while self.series.len() >= max.max(1) && self.lru_head != NIL {
                        self.evict(self.lru_head, EvictCause::MaxSeries);
                    }
                }
                let series = self.model.features.new_series();
                let slot = Slot { series, used_at: time, prev: NIL, next: NIL, history: VecDeque::new() };
                let i = self.series.insert_full(self.key.clone().into_boxed_slice(), slot).0;
                self.link_tail(i);
                i
            }
        };
        let previous = self.series[idx].series.last_time();
        let pushed = self.model.features.push(&mut self.series[idx].series, time, bpm, uterus, &mut self.row);
        if !matches!(pushed, Pushed::Rejected { .. }) {
            if self.history > 0 {
                let h = &mut self.series[idx].history;
                if h.len() >= self.history {
                    h.pop_front();
                }
                h.push_back([time, bpm, uterus]);
            }
            self.touch(idx, time, previous);
            self.evict_idle();
        }
        match pushed {
            Pushed::WarmingUp { needed } => Offer::WarmingUp { needed },
            Pushed::Rejected { reason, needed } => Offer::Rejected { reason, needed },
            Pushed::Ready => {
                let idx = self.pending.len() / self.row.len();
                self.pending.extend_from_slice(&self.row);
                Offer::Pending(idx)
            }
        }
    }

    /// Whether the most recently used series is (group_id, sequence_id): the rows of a
    /// table come series by series, and this spares them the key, the hash and the probe.
    fn most_recent_is(&self, group_id: &str, sequence_id: &str) -> bool {
        let Some((key, _)) = self.series.get_index(self.lru_tail) else { return false };
        let (g, s) = (group_id.as_bytes(), sequence_id.as_bytes());
        key.len() == g.len() + 1 + s.len() && key[g.len()] == KEY_SEP && key.starts_with(g) && key.ends_with(s)
    }

    /// Moves the series at map index `i` to the most recently used end, after a sample at
    /// `time` (its previous one at `previous`); see `clock` for how stream time moves.
    fn touch(&mut self, i: usize, time: f64, previous: Option<f64>) {
        let timeout = self.limits.idle_timeout.unwrap_or(f64::INFINITY);
        if self.clock == f64::NEG_INFINITY || (time > self.clock && time - self.clock <= timeout) {
            self.clock = time;
        } else if let Some(step) = previous.map(|p| time - p).filter(|&s| time > self.clock && s <= timeout) {
            self.clock += step; // less than `time`: time - clock > timeout >= step
        }
        if i != self.lru_tail {
            self.unlink(i);
            self.link_tail(i);
        }
        self.series[i].used_at = self.clock;
    }

    /// Puts index `i` (not in the list) at the most recently used end.
    fn link_tail(&mut self, i: usize) {
        let tail = self.lru_tail;
        let slot = &mut self.series[i];
        slot.prev = tail;
        slot.next = NIL;
        if tail != NIL {
            self.series[tail].next = i;
        } else {
            self.lru_head = i;
        }
        self.lru_tail = i;
    }

    /// Takes index `i` out of the LRU list (a no-op for a slot not in it).
    fn unlink(&mut self, i: usize) {
        let (prev, next) = (self.series[i].prev, self.series[i].next);
        if prev == NIL && next == NIL && self.lru_head != i {
            return;
        }
        if prev != NIL {
            self.series[prev].next = next;
        } else {
            self.lru_head = next;
        }
        if next != NIL {
            self.series[next].prev = prev;
        } else {
            self.lru_tail = prev;
        }
        let slot = &mut self.series[i];
        slot.prev = NIL;
        slot.next = NIL;
    }

    fn evict(&mut self, i: usize, cause: EvictCause) {
        self.unlink(i);
        let last = self.series.len() - 1;
        let (key, _) = self.series.swap_remove_index(i).expect("index in range");
        if i != last {
            // The last entry moved into slot i: repoint its neighbours.
            let (prev, next) = (self.series[i].prev, self.series[i].next);
            if prev != NIL {
                self.series[prev].next = i;
            } else if self.lru_head == last {
                self.lru_head = i;
            }
            if next != NIL {
                self.series[next].prev = i;
            } else if self.lru_tail == last {
                self.lru_tail = i;
            }
        }
        self.evicted[(cause == EvictCause::Idle) as usize] += 1;
        if self.named_total < NAMED_EVICTIONS {
            self.named_total += 1;
            let (g, s) = split_key(&key);
            self.named.push(Eviction { cause, group_id: g, sequence_id: s });
        }
    }

    fn evict_idle(&mut self) {
        let Some(timeout) = self.limits.idle_timeout else { return };
        while self.lru_head != NIL && self.clock - self.series[self.lru_head].used_at > timeout {
            self.evict(self.lru_head, EvictCause::Idle);
        }
    }

    /// Every series, least recently used first, for a state file.
    pub fn saved_series(&self) -> impl Iterator<Item = SavedSeries> + '_ {
        let mut i = self.lru_head;
        std::iter::from_fn(move || {
            if i == NIL {
                return None;
            }
            let (key, slot) = self.series.get_index(i).expect("linked index is valid");
            i = slot.next;
            let (group_id, sequence_id) = split_key(key);
            Some(SavedSeries { group_id, sequence_id, used_at: slot.used_at, series: slot.series.clone() })
        })
    }

    /// Adds a saved series as the most recently used one (restore in saved order), then
    /// applies the limits. The stream clock becomes at least `clock`.
    pub fn restore(&mut self, saved: SavedSeries, clock: f64) {
        if clock > self.clock {
            self.clock = clock;
        }
        self.make_key(&saved.group_id, &saved.sequence_id);
        let slot = Slot {
            series: saved.series,
            used_at: saved.used_at.min(self.clock),
            prev: NIL,
            next: NIL,
            history: VecDeque::new(),
        };
        let i = match self.series.get_index_of(&self.key[..]) {
            Some(i) => {
                self.unlink(i);
                self.series[i] = slot;
                i
            }
            None => self.series.insert_full(self.key.clone().into_boxed_slice(), slot).0,
        };
        self.link_tail(i);
        if let Some(max) = self.limits.max_series {
            while self.series.len() > max.max(1) {
                self.evict(self.lru_head, EvictCause::MaxSeries);
            }
        }
        self.evict_idle();
    }

    /// The feature rows waiting to be scored (row-major), in batch order.
    pub fn pending_rows(&self) -> &[f32] {
        &self.pending
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len() / self.row.len().max(1)
    }

    /// Hands the pending rows over (row-major, in batch order) in `rows` and starts an
    /// empty batch in `rows`' old allocation; the next offer's batch index is 0 again.
    pub fn swap_pending(&mut self, rows: &mut Vec<f32>) {
        rows.clear();
        std::mem::swap(&mut self.pending, rows);
    }

    /// Scores the pending rows into `out` (resized to their count) and clears the batch.
    pub fn score_pending(&mut self, out: &mut Vec<Detection>) {
        let n = self.pending_len();
        out.clear();
        out.resize(n, Detection::default());
        self.model.detect_batch(&self.pending, out);
        self.pending.clear();
    }

    /// Like [`score_pending`](Self::score_pending), spread over the rayon pool in chunks.
    pub fn score_pending_parallel(&mut self, out: &mut Vec<Detection>) {
        use rayon::prelude::*;
        let n = self.pending_len();
        let w = self.row.len();
        out.clear();
        out.resize(n, Detection::default());
        const CHUNK: usize = 2048;
        let model = &self.model;
        out.par_chunks_mut(CHUNK)
            .zip(self.pending.par_chunks(CHUNK * w))
            .for_each(|(o, rows)| model.detect_batch(rows, o));
        self.pending.clear();
    }
}

fn split_key(key: &[u8]) -> (String, String) {
    let cut = key.iter().position(|&b| b == KEY_SEP).unwrap_or(key.len());
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (text(&key[..cut]), text(key.get(cut + 1..).unwrap_or(&[])))
}

/// The latest time an ISO date-time can name (jiff's range: 9999-12-30T22:00:00Z), and a
/// number of seconds too, so that both spellings of one instant agree. A larger
/// |timestamp| is no time a monitor writes, and taken as one it would end its series
/// (every later time "not after").
const LATEST_TIME: f64 = 253_402_207_200.0;

/// Parses a timestamp: seconds (integer or decimal, epoch or relative), or an ISO 8601 /
/// RFC 3339 date-time; one without a zone is taken as UTC.
pub fn parse_timestamp(text: &str) -> Option<f64> {
    if let Some(v) = parse_f64(text) {
        return (v.abs() <= LATEST_TIME).then_some(v);
    }
    if !text.contains('-') {
        return None;
    }
    // Whole seconds and the fraction apart: i128 nanoseconds through f64 would round a
    // whole second off itself.
    let seconds = |ts: jiff::Timestamp| ts.as_second() as f64 + f64::from(ts.subsec_nanosecond()) / 1e9;
    if let Ok(ts) = text.parse::<jiff::Timestamp>() {
        // ISO 8601 and RFC 3339 offsets stay under 24 hours (jiff takes up to 25:59:59).
        let offset = jiff::fmt::temporal::Pieces::parse(text).ok().and_then(|p| p.offset());
        let a_day_or_more = matches!(offset, Some(jiff::fmt::temporal::PiecesOffset::Numeric(n))
            if n.offset().seconds().abs() >= 24 * 3600);
        return (!a_day_or_more).then(|| seconds(ts));
    }
    let civil: jiff::civil::DateTime = text.parse().ok()?;
    Some(seconds(civil.to_zoned_datetime(jiff::tz::TimeZone::UTC).ok()?.timestamp()))
}

/// Parses a signal value; an empty field is a missing value (NaN, i.e. signal loss).
pub fn parse_value(text: &str) -> Option<f64> {
    if text.is_empty() { Some(f64::NAN) } else { parse_f64(text) }
}

/// `text.parse::<f64>().ok()`, with a shortcut for the plain decimals monitors write
/// ("146.25", "-3", "0"): when the digits read as an integer stay below 2^53 and at most
/// 22 follow the point, integer / 10^k divides two exact doubles, and IEEE division
/// rounds that once, to the same double as the decimal (Clinger's fast path). Anything
/// else (exponents, "+", "inf", long or bad text) goes to the standard library. The
/// standard parser spends most of its time classifying the text; with three numbers per
/// line that was about a twentieth of `fad stream`'s work.
#[inline]
pub fn parse_f64(text: &str) -> Option<f64> {
    const POW10: [f64; 23] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19,
        1e20, 1e21, 1e22,
    ];
    let b = text.as_bytes();
    let (negative, digits) = match b.first() {
        Some(b'-') => (true, &b[1..]),
        _ => (false, b),
    };
    let mut mantissa = 0u64;
    let mut count = 0usize;
    let mut point = None;
    for (i, &c) in digits.iter().enumerate() {
        match c {
            b'0'..=b'9' if count < 19 => {
                mantissa = mantissa * 10 + u64::from(c - b'0');
                count += 1;
            }
            b'.' if point.is_none() && i > 0 => point = Some(i),
            _ => return text.parse().ok(),
        }
    }
    let fraction = point.map_or(0, |p| digits.len() - p - 1);
    if count == 0 || (point.is_some() && fraction == 0) || fraction > 22 || mantissa >= 1 << 53 {
        return text.parse().ok();
    }
    let v = mantissa as f64 / POW10[fraction];
    Some(if negative { -v } else { v })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_numeric_and_iso() {
        assert_eq!(parse_timestamp("12.5"), Some(12.5));
        assert_eq!(parse_timestamp("1700000000"), Some(1.7e9));
        assert_eq!(parse_timestamp("1970-01-01T00:00:10Z"), Some(10.0));
        assert_eq!(parse_timestamp("1970-01-01T00:00:10.25"), Some(10.25));
        assert_eq!(parse_timestamp("1970-01-01 00:00:10"), Some(10.0));
        assert_eq!(parse_timestamp("1970-01-01T01:00:10+01:00"), Some(10.0));
        assert_eq!(parse_timestamp("NaN"), None);
        assert_eq!(parse_timestamp("inf"), None);
        assert_eq!(parse_timestamp("yesterday"), None);
        assert_eq!(parse_timestamp(""), None);
        // no time a monitor writes: it would end its series and move the stream clock
        assert_eq!(parse_timestamp("1e308"), None);
        assert_eq!(parse_timestamp("-1e12"), None);
        assert_eq!(LATEST_TIME, jiff::Timestamp::MAX.as_second() as f64);
        assert_eq!(parse_timestamp("1969-12-31T23:59:59.5Z"), Some(-0.5));
        assert_eq!(parse_timestamp("2024-01-01T00:00:00+2400"), None, "no offset of a day or more");
        assert_eq!(parse_timestamp("2024-01-01T00:00:00-25:00"), None);
        assert_eq!(parse_timestamp("2024-01-01T23:00:00+23:00"), Some(1_704_067_200.0));
        assert_eq!(parse_timestamp("2024-12-04T10:00:00.25Z"), Some(1_733_306_400.25));
        assert_eq!(parse_timestamp("253402207200"), Some(253_402_207_200.0));
        assert_eq!(parse_timestamp("9999-12-30T22:00:00Z"), Some(253_402_207_200.0), "the same instant");
        assert_eq!(parse_timestamp("253402207201"), None);
        assert_eq!(parse_timestamp("9999-12-30T22:00:01Z"), None);
    }

    fn tiny_model() -> Arc<Model> {
        use crate::features::{FeatureConfig, FeatureKind};
        model_with(FeatureConfig {
            kind: FeatureKind::Window { lags: vec![1, 2], roll_windows: vec![] },
            ..FeatureConfig::window_default()
        })
    }

    /// A one-leaf forest over the columns of `features`.
    fn model_with(features: crate::features::FeatureConfig) -> Arc<Model> {
        use crate::forest::{Forest, ForestSpec};
        let n = features.n_features();
        let spec: ForestSpec = serde_json::from_value(serde_json::json!({
            "n_features": n, "max_samples": 2, "offset": -0.5,
            "trees": [{"features": (0..n).collect::<Vec<_>>(), "children_left": [-1], "children_right": [-1],
                        "feature": [-2], "threshold": [-2.0], "n_node_samples": [2]}]
        }))
        .expect("a one-leaf forest");
        let meta = crate::model::Meta {
            fad_version: None,
            config: serde_json::json!({}),
            feature_cols: features.feature_cols(),
            max_lag: None,
            model_files: vec![],
            report: None,
        };
        let joint = Forest::new(&spec).expect("valid forest");
        Arc::new(Model { features, meta, joint, per_signal: None, dir: ".".into() })
    }

    #[test]
    fn a_reloaded_model_that_differs_only_in_its_flag_columns_keeps_the_windows() {
        use crate::features::{FeatureConfig, FeatureKind};
        let variant = |f: &dyn Fn(&mut crate::features::FilterParams)| {
            let mut fc = FeatureConfig::default();
            let FeatureKind::Filters(p) = &mut fc.kind else { unreachable!("the default is filters") };
            f(p);
            model_with(fc)
        };
        let fed = || {
            let mut e = Engine::new(model_with(FeatureConfig::default()));
            for t in 0..5 {
                e.offer("g", "s", t as f64, 140.0, 20.0);
            }
            e
        };
        let (e, kept) = Engine::new_keeping_state(fed(), variant(&|p| p.uterus_flag = None));
        assert!(kept);
        assert_eq!(keys(&e), ["g/s"]);
        let (e, kept) = Engine::new_keeping_state(fed(), variant(&|p| p.sd_s = 30.0));
        assert!(!kept);
        assert!(keys(&e).is_empty());
    }

    fn keys(e: &Engine) -> Vec<String> {
        e.saved_series().map(|s| format!("{}/{}", s.group_id, s.sequence_id)).collect()
    }

    #[test]
    fn least_recently_used_series_make_room() {
        let limits = Limits { max_series: Some(3), idle_timeout: None };
        let mut e = Engine::with_limits(tiny_model(), limits);
        for (t, s) in ["a", "b", "c", "a", "d", "e", "a"].iter().enumerate() {
            assert!(!matches!(e.offer("g", s, t as f64 * 0.1, 140.0, 10.0), Offer::Rejected { .. }));
        }
        assert_eq!(keys(&e), ["g/d", "g/e", "g/a"]);
        assert_eq!(e.evicted(), (2, 0));
        let named: Vec<_> = e.take_named_evictions().into_iter().map(|v| v.sequence_id).collect();
        assert_eq!(named, ["b", "c"]);
        assert_eq!(e.needed("g", "a"), 0, "a kept its window: 3 samples >= max_lag 2");
        assert_eq!(e.needed("g", "b"), 2);
        // A rejected sample creates no series and evicts nothing.
        assert!(matches!(e.offer("g", "z", 9.0, 0.0, 10.0), Offer::Rejected { .. }));
        assert_eq!(e.series_count(), 3);
    }

    proptest::proptest! {
        /// The LRU list against a plain reference: same live keys in the same order, after
        /// any sequence of offers (valid or not) under both limits.
        #[test]
        fn lru_matches_a_reference(
            ops in proptest::collection::vec((0u8..8, 0u8..4, proptest::bool::ANY, 0u8..12), 0..300),
            max in 1usize..5,
        ) {
            let limits = Limits { max_series: Some(max), idle_timeout: Some(6.0) };
            let mut e = Engine::with_limits(tiny_model(), limits);
            let mut reference: Vec<(String, f64)> = Vec::new(); // (key, used_at), LRU first
            let mut last: std::collections::HashMap<String, f64> = std::collections::HashMap::new();
            let mut clock = f64::NEG_INFINITY;
            for (n, (k, step, valid, jump)) in ops.into_iter().enumerate() {
                // Sometimes not after the series' last, sometimes far ahead (a wrong clock).
                let t = n as f64 * 0.5 - step as f64 + if jump == 0 { 1000.0 } else { 0.0 };
                let key = format!("{k}");
                let bpm = if valid { 140.0 } else { 0.0 };
                let offer = e.offer("g", &key, t, bpm, 10.0);
                let known = reference.iter().any(|(r, _)| *r == key);
                let accepted = valid && (!known || last.get(&key).is_none_or(|&l| t > l));
                proptest::prop_assert_eq!(matches!(offer, Offer::Rejected { .. }), !accepted);
                if accepted {
                    if clock == f64::NEG_INFINITY || (t > clock && t - clock <= 6.0) {
                        clock = t;
                    } else if let Some(&prev) = last.get(&key).filter(|&&p| t > clock && t - p <= 6.0) {
                        clock += t - prev;
                    }
                    if !known && reference.len() >= max {
                        reference.remove(0);
                    }
                    reference.retain(|(r, _)| *r != key);
                    reference.push((key.clone(), clock));
                    last.insert(key.clone(), t);
                    reference.retain(|(_, used)| clock - used <= 6.0);
                    let live: std::collections::HashSet<&String> = reference.iter().map(|(r, _)| r).collect();
                    last.retain(|k, _| live.contains(k));
                }
                let want: Vec<String> = reference.iter().map(|(r, _)| format!("g/{r}")).collect();
                proptest::prop_assert_eq!(keys(&e), want);
            }
        }
    }

    #[test]
    fn idle_series_are_forgotten_by_stream_time() {
        let limits = Limits { max_series: None, idle_timeout: Some(10.0) };
        let mut e = Engine::with_limits(tiny_model(), limits);
        e.offer("g", "a", 0.0, 140.0, 10.0);
        e.offer("g", "b", 0.0, 140.0, 10.0);
        e.offer("g", "b", 4.0, 140.0, 10.0);
        e.offer("g", "b", 10.0, 140.0, 10.0);
        assert_eq!(e.clock(), 10.0, "one series alone moves stream time by its steps");
        assert_eq!(keys(&e), ["g/a", "g/b"], "10 s idle is not more than 10 s");
        e.offer("g", "b", 10.5, 140.0, 10.0);
        assert_eq!(keys(&e), ["g/b"]);
        assert_eq!(e.evicted(), (0, 1));
        // Stream time never goes back: an old timestamp of a new series does not revive anything.
        e.offer("h", "old", 1.0, 140.0, 10.0);
        assert_eq!(e.clock(), 10.5);
        // A monitor with a wrong clock: its first time is too far ahead to be stream time,
        // and its next steps are a monitor's; nobody becomes idle because of it.
        e.offer("h", "rogue", 1.7e9, 140.0, 10.0);
        e.offer("h", "rogue", 1.7e9 + 0.25, 140.0, 10.0);
        assert_eq!(e.clock(), 10.75);
        // Nor does a step longer than the timeout (a clock reset mid-recording).
        e.offer("h", "old", 3600.0, 140.0, 10.0);
        assert_eq!(e.clock(), 10.75);
        assert_eq!(keys(&e), ["g/b", "h/rogue", "h/old"]);
        assert_eq!(e.evicted(), (0, 1));
    }

    #[test]
    fn saved_series_restore_in_the_same_order_and_state() {
        let mut e = Engine::new(tiny_model());
        for (t, s) in ["a", "b", "a", "c"].iter().enumerate() {
            e.offer("g", s, t as f64, 140.0 + t as f64, 10.0);
        }
        let saved: Vec<_> = e.saved_series().collect();
        let mut r = Engine::with_limits(tiny_model(), Limits { max_series: Some(2), idle_timeout: None });
        for s in saved.clone() {
            r.restore(s, e.clock());
        }
        assert_eq!(keys(&r), ["g/a", "g/c"], "the least recently used one did not fit");
        let back: Vec<_> = r.saved_series().collect();
        assert_eq!(back[0], saved[1]);
        assert_eq!(r.clock(), 3.0);
    }

    #[test]
    fn plain_decimals_parse_as_the_standard_library_does() {
        for t in [
            "0",
            "-0",
            "-0.0",
            "146.25",
            "0.1",
            "0.3",
            "9007199254740991",
            "9007199254740993",
            "1.5e3",
            "+2",
            ".5",
            "5.",
            "1.2.3",
            "-",
            "",
            "12a",
            "0.0000000000000000000001",
            "1234567890.12345678901234567",
        ] {
            let want = t.parse::<f64>().ok().map(f64::to_bits);
            assert_eq!(parse_f64(t).map(f64::to_bits), want, "{t:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn decimals_parse_to_the_same_bits_as_the_standard_library(
            t in "-?[0-9]{0,20}(\\.[0-9]{0,25})?|[-+.0-9eE]{0,12}"
        ) {
            let want = t.parse::<f64>().ok().map(f64::to_bits);
            proptest::prop_assert_eq!(parse_f64(&t).map(f64::to_bits), want);
        }
    }

    #[test]
    fn values() {
        assert!(parse_value("").unwrap().is_nan());
        assert_eq!(parse_value("133.5"), Some(133.5));
        assert_eq!(parse_value("abc"), None);
        assert!(parse_value("NaN").unwrap().is_nan());
    }
}
