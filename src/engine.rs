//! Per-series state plus micro-batched scoring: what `stream` and `score` share, so that
//! both give the same detections for the same rows.
//!
//! Samples are offered one by one ([`Engine::offer`]); those that complete a window leave
//! a feature row in a pending batch, and [`Engine::score_pending`] scores the batch in one
//! pass through the forests (several rows in flight per tree).

use crate::features::{Pushed, Rejection, Series};
use crate::model::{Detection, Model};
use std::collections::HashMap;
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

pub struct Engine {
    model: Arc<Model>,
    /// group_id -> sequence_id -> series; two levels so lookups by `&str` allocate nothing.
    series: HashMap<String, HashMap<String, Series>>,
    n_series: usize,
    pending: Vec<f32>,
    row: Vec<f32>,
}

impl Engine {
    pub fn new(model: Arc<Model>) -> Engine {
        let w = model.n_features();
        Engine { model, series: HashMap::new(), n_series: 0, pending: Vec::new(), row: vec![0.0; w] }
    }

    /// Switches to `model`, keeping every series' window when the new model computes the
    /// same features (a retrained forest), and starting afresh when it does not.
    pub fn new_keeping_state(old: Engine, model: Arc<Model>) -> Engine {
        let mut e = Engine::new(Arc::clone(&model));
        if old.model.features == model.features {
            e.series = old.series;
            e.n_series = old.n_series;
        }
        e
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn series_count(&self) -> usize {
        self.n_series
    }

    /// Valid samples a series still needs before it is scored (max_lag for an unknown one).
    pub fn needed(&self, group_id: &str, sequence_id: &str) -> usize {
        let max_lag = self.model.features.max_lag();
        self.series
            .get(group_id)
            .and_then(|m| m.get(sequence_id))
            .map_or(max_lag, |s| max_lag - s.window_len().min(max_lag))
    }

    pub fn offer(&mut self, group_id: &str, sequence_id: &str, time: f64, bpm: f64, uterus: f64) -> Offer {
        let fc = &self.model.features;
        let by_seq = match self.series.get_mut(group_id) {
            Some(m) => m,
            None => self.series.entry(group_id.to_owned()).or_default(),
        };
        let series = match by_seq.get_mut(sequence_id) {
            Some(s) => s,
            None => {
                self.n_series += 1;
                by_seq.entry(sequence_id.to_owned()).or_insert_with(|| Series::new(fc.max_lag()))
            }
        };
        match fc.push(series, time, bpm, uterus, &mut self.row) {
            Pushed::WarmingUp { needed } => Offer::WarmingUp { needed },
            Pushed::Rejected { reason, needed } => Offer::Rejected { reason, needed },
            Pushed::Ready => {
                let idx = self.pending.len() / self.row.len();
                self.pending.extend_from_slice(&self.row);
                Offer::Pending(idx)
            }
        }
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len() / self.row.len().max(1)
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

/// Parses a timestamp: seconds (integer or decimal, epoch or relative), or an ISO 8601 /
/// RFC 3339 date-time; one without a zone is taken as UTC.
pub fn parse_timestamp(text: &str) -> Option<f64> {
    if let Ok(v) = text.parse::<f64>() {
        return v.is_finite().then_some(v);
    }
    if !text.contains('-') {
        return None;
    }
    if let Ok(ts) = text.parse::<jiff::Timestamp>() {
        return Some(ts.as_nanosecond() as f64 / 1e9);
    }
    let civil: jiff::civil::DateTime = text.parse().ok()?;
    let ts = civil.to_zoned_datetime(jiff::tz::TimeZone::UTC).ok()?.timestamp();
    Some(ts.as_nanosecond() as f64 / 1e9)
}

/// Parses a signal value; an empty field is a missing value (NaN, i.e. signal loss).
pub fn parse_value(text: &str) -> Option<f64> {
    if text.is_empty() { Some(f64::NAN) } else { text.parse::<f64>().ok() }
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
    }

    #[test]
    fn values() {
        assert!(parse_value("").unwrap().is_nan());
        assert_eq!(parse_value("133.5"), Some(133.5));
        assert_eq!(parse_value("abc"), None);
        assert!(parse_value("NaN").unwrap().is_nan());
    }
}
