//! The one feature engine (SPEC section 2), shared by `train`, `score` and `stream` so
//! that a model never sees features computed differently from those it was trained on.
//!
//! A [`Series`] holds the last `max_lag` valid samples of one `(group_id, sequence_id)`
//! in a ring buffer; [`FeatureConfig::push`] checks a new sample, enters it and, once the
//! window is full, writes the feature row for it.

use serde::{Deserialize, Serialize};

/// Feature settings, stored in meta.json's `config` so that a model carries them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeatureConfig {
    pub lags: Vec<usize>,
    pub roll_windows: Vec<usize>,
    /// Valid heart rate range (inclusive); `None` (prototype models) accepts any finite value.
    pub bpm_valid_range: Option<[f64; 2]>,
    /// Uterine values below this are signal loss; `None` accepts any finite value.
    pub uterus_valid_min: Option<f64>,
    /// A longer pause between two valid samples restarts the window; `None` never does.
    pub max_gap_s: Option<f64>,
}

impl Default for FeatureConfig {
    fn default() -> Self {
        FeatureConfig {
            lags: vec![1, 2, 3, 6, 12, 24],
            roll_windows: vec![3, 6, 12],
            bpm_valid_range: Some([50.0, 240.0]),
            uterus_valid_min: Some(0.0),
            max_gap_s: Some(2.0),
        }
    }
}

pub const SIGNALS: [&str; 2] = ["bpm", "uterus"];

/// Why a sample was not scored; `as_str` is the reason token used in replies and reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rejection {
    BpmSignalLoss,
    UterusSignalLoss,
    TimeNotIncreasing,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::BpmSignalLoss => "bpm_signal_loss",
            Rejection::UterusSignalLoss => "uterus_signal_loss",
            Rejection::TimeNotIncreasing => "timestamp_not_after_previous",
        }
    }
}

/// What pushing one sample did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pushed {
    /// Entered the window; `needed` more valid samples until the first feature row.
    WarmingUp { needed: usize },
    /// Entered a full window; the feature row has been written.
    Ready,
    /// Not entered; the series is unchanged.
    Rejected { reason: Rejection, needed: usize },
}

/// Per-series state: a ring of the last `max_lag` valid samples.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// Interleaved (bpm, uterus) pairs, `capacity = 2 * max_lag`.
    ring: Vec<f64>,
    /// Index of the slot the next sample goes to.
    head: usize,
    /// Valid samples in the window (saturates at max_lag).
    len: usize,
    /// Timestamp of the last valid sample, if any.
    last_time: Option<f64>,
}

impl Series {
    pub fn new(max_lag: usize) -> Series {
        Series { ring: vec![0.0; 2 * max_lag], head: 0, len: 0, last_time: None }
    }
    pub fn window_len(&self) -> usize {
        self.len
    }
    pub fn last_time(&self) -> Option<f64> {
        self.last_time
    }
    /// True when a restored window fits a model with this `max_lag`.
    pub fn fits(&self, max_lag: usize) -> bool {
        self.ring.len() == 2 * max_lag && self.head < max_lag.max(1) && self.len <= max_lag
    }
    /// The window's samples, oldest first, as (bpm, uterus): what a state file keeps.
    pub fn samples(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        (0..self.len).rev().map(|back| self.at(back))
    }
    /// Rebuilds a series from saved samples (oldest first); `None` when there are more
    /// than `max_lag` of them.
    pub fn from_samples(max_lag: usize, samples: &[(f64, f64)], last_time: Option<f64>) -> Option<Series> {
        if samples.len() > max_lag {
            return None;
        }
        let mut s = Series::new(max_lag);
        for (i, &(b, u)) in samples.iter().enumerate() {
            s.ring[2 * i] = b;
            s.ring[2 * i + 1] = u;
        }
        s.head = samples.len() % max_lag.max(1);
        s.len = samples.len();
        s.last_time = last_time;
        Some(s)
    }
    /// Sample `back` steps before the newest (0 = newest), as (bpm, uterus).
    fn at(&self, back: usize) -> (f64, f64) {
        let cap = self.ring.len() / 2;
        let slot = (self.head + cap - 1 - back) % cap;
        (self.ring[2 * slot], self.ring[2 * slot + 1])
    }
}

impl FeatureConfig {
    /// Window length: the longest lag or rolling window.
    pub fn max_lag(&self) -> usize {
        self.lags.iter().chain(&self.roll_windows).copied().max().unwrap_or(1).max(1)
    }

    /// Names of the feature columns, in the order rows are written (SPEC section 2).
    pub fn feature_cols(&self) -> Vec<String> {
        let mut cols = Vec::with_capacity(self.n_features());
        for l in &self.lags {
            for s in SIGNALS {
                cols.push(format!("{s}_lag_{l}"));
            }
        }
        for w in &self.roll_windows {
            for stat in ["rollmean", "rollstd"] {
                for s in SIGNALS {
                    cols.push(format!("{s}_{stat}_{w}"));
                }
            }
        }
        cols
    }

    pub fn n_features(&self) -> usize {
        2 * self.lags.len() + 4 * self.roll_windows.len()
    }

    /// Checks the settings themselves (zero lags, non-finite limits).
    pub fn validate(&self) -> Result<(), String> {
        if self.lags.is_empty() && self.roll_windows.is_empty() {
            return Err("no lags and no rolling windows: there would be no features".into());
        }
        if self.lags.iter().chain(&self.roll_windows).any(|&v| v == 0) {
            return Err("lags and rolling windows must be at least 1".into());
        }
        if let Some([lo, hi]) = self.bpm_valid_range
            && !(lo <= hi)
        {
            return Err(format!("bpm_valid_range [{lo}, {hi}] is empty"));
        }
        if let Some(g) = self.max_gap_s
            && !(g > 0.0)
        {
            return Err(format!("max_gap_s must be positive, got {g}"));
        }
        Ok(())
    }

    pub fn bpm_is_valid(&self, bpm: f64) -> bool {
        bpm.is_finite() && self.bpm_valid_range.is_none_or(|[lo, hi]| bpm >= lo && bpm <= hi)
    }

    pub fn uterus_is_valid(&self, uterus: f64) -> bool {
        uterus.is_finite() && self.uterus_valid_min.is_none_or(|lo| uterus >= lo)
    }

    /// Offers one sample to a series. Missing values are passed as NaN. On `Ready`, the
    /// feature row (f32, `n_features` wide) has been written to `row`.
    pub fn push(&self, series: &mut Series, time: f64, bpm: f64, uterus: f64, row: &mut [f32]) -> Pushed {
        let max_lag = self.max_lag();
        let needed_now = max_lag - series.len.min(max_lag);
        if let Some(last) = series.last_time
            && !(time > last)
        {
            return Pushed::Rejected { reason: Rejection::TimeNotIncreasing, needed: needed_now };
        }
        if !self.bpm_is_valid(bpm) {
            return Pushed::Rejected { reason: Rejection::BpmSignalLoss, needed: needed_now };
        }
        if !self.uterus_is_valid(uterus) {
            return Pushed::Rejected { reason: Rejection::UterusSignalLoss, needed: needed_now };
        }
        if let (Some(last), Some(gap)) = (series.last_time, self.max_gap_s)
            && time - last > gap
        {
            series.len = 0;
        }
        let cap = series.ring.len() / 2;
        series.ring[2 * series.head] = bpm;
        series.ring[2 * series.head + 1] = uterus;
        series.head = (series.head + 1) % cap;
        series.len = (series.len + 1).min(cap);
        series.last_time = Some(time);
        if series.len < max_lag {
            return Pushed::WarmingUp { needed: max_lag - series.len };
        }
        self.write_row(series, row);
        Pushed::Ready
    }

    fn write_row(&self, series: &Series, row: &mut [f32]) {
        let mut k = 0;
        for &l in &self.lags {
            let (b, u) = series.at(l - 1);
            row[k] = b as f32;
            row[k + 1] = u as f32;
            k += 2;
        }
        for &w in &self.roll_windows {
            let (mut sb, mut su) = (0.0, 0.0);
            for back in 0..w {
                let (b, u) = series.at(back);
                sb += b;
                su += u;
            }
            let (mb, mu) = (sb / w as f64, su / w as f64);
            let (mut vb, mut vu) = (0.0, 0.0);
            for back in 0..w {
                let (b, u) = series.at(back);
                vb += (b - mb) * (b - mb);
                vu += (u - mu) * (u - mu);
            }
            row[k] = mb as f32;
            row[k + 1] = mu as f32;
            row[k + 2] = (vb / w as f64).sqrt() as f32;
            row[k + 3] = (vu / w as f64).sqrt() as f32;
            k += 4;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> FeatureConfig {
        FeatureConfig {
            lags: vec![1, 3],
            roll_windows: vec![2],
            bpm_valid_range: Some([50.0, 240.0]),
            uterus_valid_min: Some(0.0),
            max_gap_s: Some(2.0),
        }
    }

    #[test]
    fn default_columns_are_the_specs_24() {
        let c = FeatureConfig::default();
        let cols = c.feature_cols();
        assert_eq!(c.max_lag(), 24);
        assert_eq!(cols.len(), 24);
        assert_eq!(&cols[..3], ["bpm_lag_1", "uterus_lag_1", "bpm_lag_2"]);
        assert_eq!(cols[11], "uterus_lag_24");
        assert_eq!(&cols[12..16], ["bpm_rollmean_3", "uterus_rollmean_3", "bpm_rollstd_3", "uterus_rollstd_3"]);
        assert_eq!(cols[23], "uterus_rollstd_12");
    }

    #[test]
    fn hand_made_series_gives_the_values_written_down() {
        let c = small();
        assert_eq!(c.max_lag(), 3);
        let mut s = Series::new(3);
        let mut row = [0f32; 8];
        assert_eq!(c.push(&mut s, 0.0, 100.0, 10.0, &mut row), Pushed::WarmingUp { needed: 2 });
        assert_eq!(c.push(&mut s, 1.0, 110.0, 20.0, &mut row), Pushed::WarmingUp { needed: 1 });
        assert_eq!(c.push(&mut s, 2.0, 120.0, 40.0, &mut row), Pushed::Ready);
        // lag1 = newest, lag3 = oldest; W=2 over (110,120) and (20,40)
        assert_eq!(row, [120.0, 40.0, 100.0, 10.0, 115.0, 30.0, 5.0, 10.0]);
        assert_eq!(c.push(&mut s, 3.0, 90.0, 40.0, &mut row), Pushed::Ready);
        assert_eq!(row, [90.0, 40.0, 110.0, 20.0, 105.0, 40.0, 15.0, 0.0]);
    }

    #[test]
    fn signal_loss_is_rejected_without_touching_the_window() {
        let c = small();
        let mut s = Series::new(3);
        let mut row = [0f32; 8];
        c.push(&mut s, 0.0, 100.0, 10.0, &mut row);
        for (bpm, ut, why) in [
            (0.0, 5.0, Rejection::BpmSignalLoss),
            (f64::NAN, 5.0, Rejection::BpmSignalLoss),
            (300.0, 5.0, Rejection::BpmSignalLoss),
            (f64::INFINITY, 5.0, Rejection::BpmSignalLoss),
            (120.0, f64::NAN, Rejection::UterusSignalLoss),
            (120.0, -1.0, Rejection::UterusSignalLoss),
        ] {
            let before = s.clone();
            assert_eq!(c.push(&mut s, 0.5, bpm, ut, &mut row), Pushed::Rejected { reason: why, needed: 2 });
            assert_eq!(s, before);
        }
        assert_eq!(
            c.push(&mut s, 0.0, 120.0, 5.0, &mut row),
            Pushed::Rejected { reason: Rejection::TimeNotIncreasing, needed: 2 }
        );
        assert_eq!(c.push(&mut s, 1.0, 120.0, 5.0, &mut row), Pushed::WarmingUp { needed: 1 });
    }

    #[test]
    fn a_long_gap_restarts_the_warm_up() {
        let c = small();
        let mut s = Series::new(3);
        let mut row = [0f32; 8];
        for t in 0..3 {
            c.push(&mut s, t as f64, 120.0, 5.0, &mut row);
        }
        assert_eq!(c.push(&mut s, 4.0, 120.0, 5.0, &mut row), Pushed::Ready); // gap 2.0: kept
        assert_eq!(c.push(&mut s, 6.5, 120.0, 5.0, &mut row), Pushed::WarmingUp { needed: 2 });
        assert_eq!(c.push(&mut s, 7.0, 120.0, 5.0, &mut row), Pushed::WarmingUp { needed: 1 });
        assert_eq!(c.push(&mut s, 8.0, 130.0, 5.0, &mut row), Pushed::Ready);
        assert_eq!(row[0], 130.0);
        assert_eq!(row[2], 120.0);
    }

    #[test]
    fn a_series_rebuilt_from_its_samples_continues_identically() {
        let c = small();
        let mut s = Series::new(3);
        let mut row = [0f32; 8];
        for t in 0..5 {
            c.push(&mut s, t as f64, 100.0 + t as f64, t as f64, &mut row);
        }
        let saved: Vec<_> = s.samples().collect();
        assert_eq!(saved, [(102.0, 2.0), (103.0, 3.0), (104.0, 4.0)]);
        let mut r = Series::from_samples(3, &saved, s.last_time()).unwrap();
        let (mut a, mut b) = ([0f32; 8], [0f32; 8]);
        assert_eq!(c.push(&mut s, 5.0, 90.0, 9.0, &mut a), c.push(&mut r, 5.0, 90.0, 9.0, &mut b));
        assert_eq!(a, b);
        assert!(Series::from_samples(3, &[(1.0, 1.0); 4], None).is_none());
        let partial = Series::from_samples(3, &saved[..1], Some(2.0)).unwrap();
        assert_eq!(partial.window_len(), 1);
        assert!(partial.fits(3));
    }

    #[test]
    fn prototype_config_accepts_any_finite_value_and_any_gap() {
        let c = FeatureConfig { bpm_valid_range: None, uterus_valid_min: None, max_gap_s: None, ..small() };
        let mut s = Series::new(3);
        let mut row = [0f32; 8];
        assert_eq!(c.push(&mut s, 0.0, 0.0, -3.0, &mut row), Pushed::WarmingUp { needed: 2 });
        assert_eq!(c.push(&mut s, 100.0, 0.0, -3.0, &mut row), Pushed::WarmingUp { needed: 1 });
        assert!(matches!(c.push(&mut s, 101.0, f64::NAN, 1.0, &mut row), Pushed::Rejected { .. }));
    }
}
