//! The one feature engine (SPEC section 2), shared by `train`, `score` and `stream` so
//! that a model never sees features computed differently from those it was trained on.
//!
//! A [`Series`] holds the state of one `(group_id, sequence_id)`; [`FeatureConfig::push`]
//! checks a new sample, enters it and, once the series is warm, writes the feature row for
//! it. Two feature sets exist, chosen by the model's config:
//!
//! * `window` (SPEC section 2, the prototype's): lags and rolling mean/std over the last
//!   `max_lag` valid samples, kept in a ring buffer. Imported scikit-learn models use it.
//! * `filters` (what `fad train` fits by default): per signal, exponentially weighted
//!   statistics whose time constants are in seconds, so one model serves a 4 Hz and a
//!   7.87 Hz monitor alike, minutes of context cost a few numbers per series, and short
//!   gaps (the fragmented LCT 2025 recordings) do not throw the context away. See
//!   [`FilterParams`].

use serde::{Deserialize, Serialize};

pub const SIGNALS: [&str; 2] = ["bpm", "uterus"];

/// Feature settings, stored in meta.json's `config` so that a model carries them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeatureConfig {
    pub kind: FeatureKind,
    /// Valid heart rate range (inclusive); `None` (prototype models) accepts any finite value.
    pub bpm_valid_range: Option<[f64; 2]>,
    /// Uterine values below this are signal loss; `None` accepts any finite value.
    pub uterus_valid_min: Option<f64>,
    /// Uterine values above this are artefacts (toco reads 0..100, CTU-UHB up to 127.5);
    /// `None` accepts any finite value.
    #[serde(default)]
    pub uterus_valid_max: Option<f64>,
    /// A value of exactly 0 is lost signal (monitors write 0 when a transducer is off).
    #[serde(default)]
    pub zero_is_loss: bool,
    /// A longer pause between two valid samples restarts the series; `None` never does.
    pub max_gap_s: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureKind {
    Window { lags: Vec<usize>, roll_windows: Vec<usize> },
    Filters(FilterParams),
}

/// The `filters` feature set: for each signal, the features named in `bpm` / `uterus`
/// (columns `bpm_<name>`, then `uterus_<name>`), chosen among:
///
/// | feature | what it is | what it catches |
/// |---|---|---|
/// | `level` | mean over `level_s` | brady-/tachycardia, tone |
/// | `jump` | newest sample minus the level before it | spikes, abrupt changes |
/// | `jump_z` | `jump` over the short-term variability `sd` | spikes in a calm trace |
/// | `dev` | level minus the robust baseline | decelerations, contractions |
/// | `dev_z` | `dev` over the long-term variability `sd_long` | the same, scaled to the trace |
/// | `dev_slow` | mean of `dev` over `slow_s` | sustained shifts (not accelerations) |
/// | `baseline` | Huber-weighted mean over `baseline_s` | sustained level |
/// | `sd` | RMS of the samples around a `reference_s` mean, over `sd_s` | loss of variability |
/// | `sd_long` | RMS of the samples around the baseline, over `burden_s` | the trace's usual spread |
/// | `sd_ratio` | `sd` over `sd_long` | variability lost relative to the trace |
/// | `burden` | mean one-sided deviation over `burden_s` (below baseline for bpm, above for uterus) | recurrent decelerations, frequent contractions |
/// | `flat` | seconds since the value last changed (capped at `flat_cap_s`) | a frozen or dead transducer |
///
/// Every mean is exponentially weighted in time (a sample `dt` seconds older weighs
/// `exp(-dt / tau)` as much) and divided by its total weight, so it is unbiased from the
/// first sample on and independent of the sampling rate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FilterParams {
    pub bpm: Vec<Filter>,
    pub uterus: Vec<Filter>,
    pub level_s: f64,
    pub reference_s: f64,
    pub baseline_s: f64,
    /// Deviations beyond these (below, above the baseline) pull the baseline with weight
    /// `limit / |deviation|`, so a deceleration or contraction barely moves it.
    pub bpm_baseline_limits: [f64; 2],
    pub uterus_baseline_limits: [f64; 2],
    pub sd_s: f64,
    pub slow_s: f64,
    pub burden_s: f64,
    /// Smallest variability the `_z` and `_ratio` features divide by (signal units).
    pub sd_floor: f64,
    pub flat_cap_s: f64,
    /// Valid samples before the first score.
    pub warmup: usize,
    /// After a pause longer than this (lost signal), the short-term state (level,
    /// reference, jump) restarts at the new sample: nothing says how the signal got from
    /// the old value to the new one, and monitors re-acquire at a different level often.
    /// The long-term state (baseline, spread, burden) carries on, decayed by the pause.
    #[serde(default)]
    pub settle_gap_s: Option<f64>,
    /// The columns of its signal that each flag forest sees (None: all of them). The
    /// joint forest, and so `anomaly_score`, always sees every column.
    /// (Not written when None, so that the state fingerprint of models made before these
    /// settings existed is unchanged.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpm_flag: Option<Vec<Filter>>,
    /// External toco is uncalibrated: its amplitude depends on the belt and the mother,
    /// not on the uterus, and differs between monitors and sources. By default the
    /// uterus flags see only features in units of the series' own spread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uterus_flag: Option<Vec<Filter>>,
}

/// One filter feature (see [`FilterParams`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    Level,
    Jump,
    JumpZ,
    Dev,
    DevZ,
    DevSlow,
    Baseline,
    Sd,
    SdLong,
    SdRatio,
    Burden,
    Flat,
}

impl Filter {
    pub const ALL: [Filter; 12] = [
        Filter::Level,
        Filter::Jump,
        Filter::JumpZ,
        Filter::Dev,
        Filter::DevZ,
        Filter::DevSlow,
        Filter::Baseline,
        Filter::Sd,
        Filter::SdLong,
        Filter::SdRatio,
        Filter::Burden,
        Filter::Flat,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Filter::Level => "level",
            Filter::Jump => "jump",
            Filter::JumpZ => "jump_z",
            Filter::Dev => "dev",
            Filter::DevZ => "dev_z",
            Filter::DevSlow => "dev_slow",
            Filter::Baseline => "baseline",
            Filter::Sd => "sd",
            Filter::SdLong => "sd_long",
            Filter::SdRatio => "sd_ratio",
            Filter::Burden => "burden",
            Filter::Flat => "flat",
        }
    }
}

impl Default for FilterParams {
    fn default() -> Self {
        use Filter::*;
        FilterParams {
            bpm: vec![Level, Jump, Dev, Baseline, Sd, Burden, Flat],
            uterus: vec![Level, Jump, Dev, Baseline, Sd, Burden, Flat, JumpZ, DevZ, SdRatio],
            level_s: 4.0,
            reference_s: 15.0,
            baseline_s: 300.0,
            bpm_baseline_limits: [8.0, 8.0],
            uterus_baseline_limits: [20.0, 3.0],
            sd_s: 60.0,
            slow_s: 120.0,
            burden_s: 600.0,
            sd_floor: 0.5,
            flat_cap_s: 600.0,
            warmup: 120,
            settle_gap_s: Some(1.0),
            bpm_flag: None,
            uterus_flag: Some(vec![DevZ, SdRatio]),
        }
    }
}

/// Per-signal filter state: (mean, weight) pairs, then the last value and when it changed.
mod slot {
    pub const LEVEL: usize = 0;
    pub const REFERENCE: usize = 2;
    pub const BASELINE: usize = 4;
    pub const VAR: usize = 6;
    pub const VAR_LONG: usize = 8;
    pub const DEV_SLOW: usize = 10;
    pub const BURDEN: usize = 12;
    pub const PREV: usize = 14;
    pub const CHANGED_AT: usize = 15;
    pub const PER_SIGNAL: usize = 16;
}

impl FeatureConfig {
    /// The SPEC section 2 defaults of the prototype's window features.
    pub fn window_default() -> FeatureConfig {
        FeatureConfig {
            kind: FeatureKind::Window { lags: vec![1, 2, 3, 6, 12, 24], roll_windows: vec![3, 6, 12] },
            bpm_valid_range: Some([50.0, 240.0]),
            uterus_valid_min: Some(0.0),
            uterus_valid_max: Some(200.0),
            zero_is_loss: false,
            max_gap_s: Some(2.0),
        }
    }

    /// What the prototype's meta.json means: window features, no limits at all.
    pub fn prototype(lags: Vec<usize>, roll_windows: Vec<usize>) -> FeatureConfig {
        FeatureConfig {
            kind: FeatureKind::Window { lags, roll_windows },
            bpm_valid_range: None,
            uterus_valid_min: None,
            uterus_valid_max: None,
            zero_is_loss: false,
            max_gap_s: None,
        }
    }
}

impl Default for FeatureConfig {
    /// What `fad train` fits: filter features, with the validity rules and gap limit
    /// chosen on both real sources (README, "Features and model").
    fn default() -> Self {
        FeatureConfig {
            kind: FeatureKind::Filters(FilterParams::default()),
            bpm_valid_range: Some([50.0, 240.0]),
            uterus_valid_min: Some(0.0),
            uterus_valid_max: Some(200.0),
            zero_is_loss: true,
            max_gap_s: Some(60.0),
        }
    }
}

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
    /// Entered the series; `needed` more valid samples until the first feature row.
    WarmingUp { needed: usize },
    /// Entered a warm series; the feature row has been written.
    Ready,
    /// Not entered; the series is unchanged.
    Rejected { reason: Rejection, needed: usize },
}

/// Per-series state. For `window` features, `values` is a ring of interleaved (bpm,
/// uterus) pairs with `head` the next slot; for `filters`, the filter state of both
/// signals. `len` counts valid samples since the last (re)start, up to the warm-up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    values: Box<[f64]>,
    head: u32,
    len: u32,
    last_time: Option<f64>,
}

impl Series {
    /// Valid samples since the last (re)start, counted up to the warm-up.
    pub fn window_len(&self) -> usize {
        self.len as usize
    }
    pub fn last_time(&self) -> Option<f64> {
        self.last_time
    }
    /// The raw state, for a state file: (values, head, len).
    pub fn raw(&self) -> (&[f64], u32, u32) {
        (&self.values, self.head, self.len)
    }
    /// Calls `f(bpm, uterus)` on the newest `n` samples of a window series, newest first
    /// (the order of `at(0), at(1), ...`), walking the ring as two plain slices.
    #[inline]
    fn newest(&self, n: usize, mut f: impl FnMut(f64, f64)) {
        let h = self.head as usize;
        let (before, after) = self.values.split_at(2 * h);
        let first = n.min(h);
        for p in before[2 * (h - first)..].chunks_exact(2).rev() {
            f(p[0], p[1]);
        }
        let rest = n - first;
        for p in after[after.len() - 2 * rest..].chunks_exact(2).rev() {
            f(p[0], p[1]);
        }
    }

    /// Sample `back` steps before the newest (0 = newest) of a window series.
    fn at(&self, back: usize) -> (f64, f64) {
        let cap = self.values.len() / 2;
        // (head - 1 - back) mod cap, without a division: head < cap and back < cap.
        let mut slot = self.head as usize + cap - 1 - back;
        if slot >= cap {
            slot -= cap;
        }
        (self.values[2 * slot], self.values[2 * slot + 1])
    }
}

impl FeatureConfig {
    /// Valid samples a series needs before it is scored.
    pub fn warmup(&self) -> usize {
        match &self.kind {
            FeatureKind::Window { lags, roll_windows } => {
                lags.iter().chain(roll_windows).copied().max().unwrap_or(1).max(1)
            }
            FeatureKind::Filters(p) => p.warmup.max(1),
        }
    }

    /// Length of a series' state vector.
    fn state_len(&self) -> usize {
        match &self.kind {
            FeatureKind::Window { .. } => 2 * self.warmup(),
            FeatureKind::Filters(_) => 2 * slot::PER_SIGNAL,
        }
    }

    pub fn new_series(&self) -> Series {
        Series { values: vec![0.0; self.state_len()].into_boxed_slice(), head: 0, len: 0, last_time: None }
    }

    /// Rebuilds a series from a state file's raw values; `None` when they do not fit
    /// these settings.
    pub fn series_from_raw(&self, values: Vec<f64>, head: u32, len: u32, last_time: Option<f64>) -> Option<Series> {
        let ring = match self.kind {
            FeatureKind::Window { .. } => self.warmup() as u32,
            FeatureKind::Filters(_) => 1,
        };
        let fits = values.len() == self.state_len() && head < ring && len as usize <= self.warmup();
        fits.then(|| Series { values: values.into_boxed_slice(), head, len, last_time })
    }

    /// Names of the feature columns, in the order rows are written.
    /// The settings that shape a series' state, i.e. all but which columns the flag
    /// forests see: equal ones mean interchangeable windows (state files, model reload).
    pub fn state_settings(&self) -> FeatureConfig {
        let mut fc = self.clone();
        if let FeatureKind::Filters(p) = &mut fc.kind {
            p.bpm_flag = None;
            p.uterus_flag = None;
        }
        fc
    }

    /// The columns (indices into [`feature_cols`](Self::feature_cols)) that the bpm and
    /// the uterus flag forests see.
    pub fn flag_columns(&self) -> [Vec<u32>; 2] {
        let cols = self.feature_cols();
        let of_signal = |s: &str| -> Vec<u32> {
            let prefix = format!("{s}_");
            cols.iter().enumerate().filter(|(_, c)| c.starts_with(&prefix)).map(|(i, _)| i as u32).collect()
        };
        let FeatureKind::Filters(p) = &self.kind else { return SIGNALS.map(of_signal) };
        let mut start = 0;
        let mut picked = [Vec::new(), Vec::new()];
        for (out, (list, flag)) in picked.iter_mut().zip([(&p.bpm, &p.bpm_flag), (&p.uterus, &p.uterus_flag)]) {
            *out = (0..list.len())
                .filter(|&i| flag.as_ref().is_none_or(|f| f.contains(&list[i])))
                .map(|i| (start + i) as u32)
                .collect();
            start += list.len();
        }
        picked
    }

    pub fn feature_cols(&self) -> Vec<String> {
        let mut cols = Vec::with_capacity(self.n_features());
        match &self.kind {
            FeatureKind::Window { lags, roll_windows } => {
                for l in lags {
                    for s in SIGNALS {
                        cols.push(format!("{s}_lag_{l}"));
                    }
                }
                for w in roll_windows {
                    for stat in ["rollmean", "rollstd"] {
                        for s in SIGNALS {
                            cols.push(format!("{s}_{stat}_{w}"));
                        }
                    }
                }
            }
            FeatureKind::Filters(p) => {
                for (s, list) in SIGNALS.iter().zip([&p.bpm, &p.uterus]) {
                    for f in list {
                        cols.push(format!("{s}_{}", f.name()));
                    }
                }
            }
        }
        cols
    }

    pub fn n_features(&self) -> usize {
        match &self.kind {
            FeatureKind::Window { lags, roll_windows } => 2 * lags.len() + 4 * roll_windows.len(),
            FeatureKind::Filters(p) => p.bpm.len() + p.uterus.len(),
        }
    }

    /// Checks the settings themselves (zero lags, non-finite limits).
    pub fn validate(&self) -> Result<(), String> {
        match &self.kind {
            FeatureKind::Window { lags, roll_windows } => {
                if lags.is_empty() && roll_windows.is_empty() {
                    return Err("no lags and no rolling windows: there would be no features".into());
                }
                if lags.iter().chain(roll_windows).any(|&v| v == 0) {
                    return Err("lags and rolling windows must be at least 1".into());
                }
                if self.warmup() > 1 << 16 {
                    return Err(format!("a window of {} samples is too long", self.warmup()));
                }
            }
            FeatureKind::Filters(p) => {
                for (signal, list) in [("bpm", &p.bpm), ("uterus", &p.uterus)] {
                    if list.is_empty() {
                        return Err(format!("{signal} has no filter: the {signal} flags need at least one feature"));
                    }
                }
                for (key, list) in [("bpm", Some(&p.bpm)), ("uterus", Some(&p.uterus))]
                    .into_iter()
                    .chain([("bpm_flag", p.bpm_flag.as_ref()), ("uterus_flag", p.uterus_flag.as_ref())])
                {
                    let list = list.map_or(&[][..], |l| &l[..]);
                    if let Some((_, f)) = list.iter().enumerate().find(|(i, f)| list[..*i].contains(f)) {
                        return Err(format!("{key} names {} twice", f.name()));
                    }
                }
                let taus = [p.level_s, p.reference_s, p.baseline_s, p.sd_s, p.slow_s, p.burden_s];
                if taus.iter().any(|&t| !(t > 0.0 && t.is_finite())) {
                    return Err("filter time constants must be positive seconds".into());
                }
                let limits = p.bpm_baseline_limits.iter().chain(&p.uterus_baseline_limits);
                if limits.clone().any(|&c| !(c > 0.0)) || !(p.sd_floor > 0.0) {
                    return Err("baseline limits and sd_floor must be positive".into());
                }
                for (signal, list, flag) in [("bpm", &p.bpm, &p.bpm_flag), ("uterus", &p.uterus, &p.uterus_flag)] {
                    let Some(flag) = flag else { continue };
                    if flag.is_empty() && !list.is_empty() {
                        return Err(format!("{signal}_flag is empty: the {signal} flags would see no feature"));
                    }
                    if let Some(f) = flag.iter().find(|f| !list.contains(f)) {
                        return Err(format!(
                            "{signal}_flag names {}, which is not among the {signal} features",
                            f.name()
                        ));
                    }
                }
                if p.settle_gap_s.is_some_and(|g| !(g > 0.0)) {
                    return Err("settle_gap_s must be positive seconds".into());
                }
                if !(p.flat_cap_s >= 0.0 && p.flat_cap_s.is_finite()) || p.warmup == 0 || p.warmup > 1 << 20 {
                    return Err("flat_cap_s must be finite and warmup between 1 and 2^20".into());
                }
            }
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
        bpm.is_finite()
            && !(self.zero_is_loss && bpm == 0.0)
            && self.bpm_valid_range.is_none_or(|[lo, hi]| bpm >= lo && bpm <= hi)
    }

    pub fn uterus_is_valid(&self, uterus: f64) -> bool {
        uterus.is_finite()
            && !(self.zero_is_loss && uterus == 0.0)
            && self.uterus_valid_min.is_none_or(|lo| uterus >= lo)
            && self.uterus_valid_max.is_none_or(|hi| uterus <= hi)
    }

    /// Offers one sample to a series. Missing values are passed as NaN. On `Ready`, the
    /// feature row (f32, `n_features` wide) has been written to `row`.
    pub fn push(&self, series: &mut Series, time: f64, bpm: f64, uterus: f64, row: &mut [f32]) -> Pushed {
        let warmup = self.warmup();
        let needed_now = warmup - (series.len as usize).min(warmup);
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
        let gap = series.last_time.map(|last| time - last);
        if let (Some(dt), Some(max)) = (gap, self.max_gap_s)
            && dt > max
        {
            series.len = 0;
        }
        let dt = if series.len == 0 { None } else { gap };
        match &self.kind {
            FeatureKind::Window { .. } => {
                let cap = series.values.len() / 2;
                let h = series.head as usize;
                series.values[2 * h] = bpm;
                series.values[2 * h + 1] = uterus;
                series.head = if h + 1 == cap { 0 } else { h as u32 + 1 };
            }
            FeatureKind::Filters(p) => {
                let (b, u) = series.values.split_at_mut(slot::PER_SIGNAL);
                let (rb, ru) = row.split_at_mut(p.bpm.len());
                filter_update(p, b, bpm, time, dt, p.bpm_baseline_limits, Burden::Below, &p.bpm, rb);
                filter_update(p, u, uterus, time, dt, p.uterus_baseline_limits, Burden::Above, &p.uterus, ru);
            }
        }
        series.len = (series.len + 1).min(warmup as u32);
        series.last_time = Some(time);
        if (series.len as usize) < warmup {
            return Pushed::WarmingUp { needed: warmup - series.len as usize };
        }
        if let FeatureKind::Window { lags, roll_windows } = &self.kind {
            write_window_row(series, lags, roll_windows, row);
        }
        Pushed::Ready
    }
}

fn write_window_row(series: &Series, lags: &[usize], roll_windows: &[usize], row: &mut [f32]) {
    let mut k = 0;
    for &l in lags {
        let (b, u) = series.at(l - 1);
        row[k] = b as f32;
        row[k + 1] = u as f32;
        k += 2;
    }
    for &w in roll_windows {
        let (mut sb, mut su) = (0.0, 0.0);
        series.newest(w, |b, u| {
            sb += b;
            su += u;
        });
        let (mb, mu) = (sb / w as f64, su / w as f64);
        let (mut vb, mut vu) = (0.0, 0.0);
        series.newest(w, |b, u| {
            vb += (b - mb) * (b - mb);
            vu += (u - mu) * (u - mu);
        });
        row[k] = mb as f32;
        row[k + 1] = mu as f32;
        row[k + 2] = (vb / w as f64).sqrt() as f32;
        row[k + 3] = (vu / w as f64).sqrt() as f32;
        k += 4;
    }
}

/// Which side of the baseline a signal's burden measures.
#[derive(Clone, Copy)]
enum Burden {
    Below,
    Above,
}

/// Adds `x` to an exponentially weighted mean held as (mean, total weight).
#[inline]
fn ew_add(s: &mut [f64], at: usize, x: f64, decay: f64, weight: f64) {
    let w = s[at + 1] * decay + weight;
    s[at + 1] = w;
    if w > 0.0 {
        s[at] += weight * (x - s[at]) / w;
    }
}

/// One signal's filter step for a valid sample `x` at `time`, `dt` seconds after the
/// previous one (`None`: the first sample of a (re)started series); writes the features
/// in `wanted` to `out`.
#[allow(clippy::too_many_arguments)]
fn filter_update(
    p: &FilterParams,
    s: &mut [f64],
    x: f64,
    time: f64,
    dt: Option<f64>,
    limits: [f64; 2],
    burden: Burden,
    wanted: &[Filter],
    out: &mut [f32],
) {
    use slot::*;
    let mut jump = 0.0;
    // A spike is measured against the variability before it, not one it has inflated.
    let sd_before = s[VAR].max(0.0).sqrt();
    if let Some(dt) = dt {
        let decay = |tau: f64| (-dt / tau).exp();
        if p.settle_gap_s.is_some_and(|g| dt > g) {
            for at in [LEVEL, REFERENCE] {
                s[at] = x;
                s[at + 1] = 1.0;
            }
            ew_add(s, VAR, 0.0, decay(p.sd_s), 0.0);
        } else {
            jump = x - s[LEVEL];
            let residual = x - s[REFERENCE];
            ew_add(s, VAR, residual * residual, decay(p.sd_s), 1.0);
            ew_add(s, LEVEL, x, decay(p.level_s), 1.0);
            ew_add(s, REFERENCE, x, decay(p.reference_s), 1.0);
        }
        let level = s[LEVEL];
        let off = level - s[BASELINE];
        let limit = if off < 0.0 { limits[0] } else { limits[1] };
        let huber = if off.abs() <= limit { 1.0 } else { limit / off.abs() };
        ew_add(s, BASELINE, level, decay(p.baseline_s), huber);
        let dev = level - s[BASELINE];
        let one_sided = match burden {
            Burden::Below => (-dev).max(0.0),
            Burden::Above => dev.max(0.0),
        };
        let long = decay(p.burden_s);
        ew_add(s, BURDEN, one_sided, long, 1.0);
        ew_add(s, VAR_LONG, (x - s[BASELINE]) * (x - s[BASELINE]), long, 1.0);
        ew_add(s, DEV_SLOW, dev, decay(p.slow_s), 1.0);
        if x != s[PREV] {
            s[CHANGED_AT] = time;
            s[PREV] = x;
        }
    } else {
        s.fill(0.0);
        for at in [LEVEL, REFERENCE, BASELINE] {
            s[at] = x;
            s[at + 1] = 1.0;
        }
        s[PREV] = x;
        s[CHANGED_AT] = time;
    }
    let sd = s[VAR].max(0.0).sqrt();
    let sd_long = s[VAR_LONG].max(0.0).sqrt();
    let dev = s[LEVEL] - s[BASELINE];
    for (o, f) in out.iter_mut().zip(wanted) {
        let v = match f {
            Filter::Level => s[LEVEL],
            Filter::Jump => jump,
            Filter::JumpZ => jump / sd_before.max(p.sd_floor),
            Filter::Dev => dev,
            Filter::DevZ => dev / sd_long.max(p.sd_floor),
            Filter::DevSlow => s[DEV_SLOW],
            Filter::Baseline => s[BASELINE],
            Filter::Sd => sd,
            Filter::SdLong => sd_long,
            Filter::SdRatio => sd / sd_long.max(p.sd_floor),
            Filter::Burden => s[BURDEN],
            Filter::Flat => (time - s[CHANGED_AT]).min(p.flat_cap_s),
        };
        *o = v as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> FeatureConfig {
        FeatureConfig {
            kind: FeatureKind::Window { lags: vec![1, 3], roll_windows: vec![2] },
            ..FeatureConfig::window_default()
        }
    }

    #[test]
    fn window_default_columns_are_the_specs_24() {
        let c = FeatureConfig::window_default();
        let cols = c.feature_cols();
        assert_eq!(c.warmup(), 24);
        assert_eq!(cols.len(), 24);
        assert_eq!(&cols[..3], ["bpm_lag_1", "uterus_lag_1", "bpm_lag_2"]);
        assert_eq!(cols[11], "uterus_lag_24");
        assert_eq!(&cols[12..16], ["bpm_rollmean_3", "uterus_rollmean_3", "bpm_rollstd_3", "uterus_rollstd_3"]);
        assert_eq!(cols[23], "uterus_rollstd_12");
    }

    #[test]
    fn hand_made_series_gives_the_values_written_down() {
        let c = small();
        assert_eq!(c.warmup(), 3);
        let mut s = c.new_series();
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
    fn signal_loss_is_rejected_without_touching_the_series() {
        for c in [small(), FeatureConfig::default()] {
            let mut s = c.new_series();
            let mut row = vec![0f32; c.n_features()];
            c.push(&mut s, 0.0, 100.0, 10.0, &mut row);
            let needed = c.warmup() - 1;
            for (bpm, ut, why) in [
                (0.0, 5.0, Rejection::BpmSignalLoss),
                (f64::NAN, 5.0, Rejection::BpmSignalLoss),
                (300.0, 5.0, Rejection::BpmSignalLoss),
                (f64::INFINITY, 5.0, Rejection::BpmSignalLoss),
                (120.0, f64::NAN, Rejection::UterusSignalLoss),
                (120.0, -1.0, Rejection::UterusSignalLoss),
                (120.0, 1e308, Rejection::UterusSignalLoss),
                (120.0, 200.5, Rejection::UterusSignalLoss),
            ] {
                let before = s.clone();
                assert_eq!(c.push(&mut s, 0.5, bpm, ut, &mut row), Pushed::Rejected { reason: why, needed });
                assert_eq!(s, before);
            }
            assert_eq!(
                c.push(&mut s, 0.0, 120.0, 5.0, &mut row),
                Pushed::Rejected { reason: Rejection::TimeNotIncreasing, needed }
            );
            assert_eq!(c.push(&mut s, 1.0, 120.0, 5.0, &mut row), Pushed::WarmingUp { needed: needed - 1 });
        }
    }

    #[test]
    fn a_zero_uterus_is_lost_signal_only_where_the_config_says_so() {
        let mut row = [0f32; 24];
        let fc = FeatureConfig::default();
        let mut s = fc.new_series();
        assert_eq!(
            fc.push(&mut s, 0.0, 140.0, 0.0, &mut row),
            Pushed::Rejected { reason: Rejection::UterusSignalLoss, needed: fc.warmup() }
        );
        let w = FeatureConfig::window_default();
        let mut s = w.new_series();
        assert_eq!(w.push(&mut s, 0.0, 140.0, 0.0, &mut row[..]), Pushed::WarmingUp { needed: 23 });
    }

    #[test]
    fn a_long_gap_restarts_the_warm_up() {
        let c = small();
        let mut s = c.new_series();
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
    fn a_series_rebuilt_from_its_raw_state_continues_identically() {
        for c in [small(), FeatureConfig::default()] {
            let mut s = c.new_series();
            let mut row = vec![0f32; c.n_features()];
            for t in 0..50 {
                c.push(&mut s, t as f64, 100.0 + t as f64, 1.0 + t as f64, &mut row);
            }
            let (values, head, len) = s.raw();
            let values = values.to_vec();
            let mut r = c.series_from_raw(values.clone(), head, len, s.last_time()).unwrap();
            let (mut a, mut b) = (vec![0f32; c.n_features()], vec![0f32; c.n_features()]);
            assert_eq!(c.push(&mut s, 50.0, 90.0, 9.0, &mut a), c.push(&mut r, 50.0, 90.0, 9.0, &mut b));
            assert_eq!(a, b);
            assert!(c.series_from_raw(vec![1.0; 3], 0, 0, None).is_none());
            assert!(c.series_from_raw(values, head, c.warmup() as u32 + 1, None).is_none());
        }
    }

    #[test]
    fn prototype_config_accepts_any_finite_value_and_any_gap() {
        let c = FeatureConfig::prototype(vec![1, 3], vec![2]);
        let mut s = c.new_series();
        let mut row = [0f32; 8];
        assert_eq!(c.push(&mut s, 0.0, 0.0, -3.0, &mut row), Pushed::WarmingUp { needed: 2 });
        assert_eq!(c.push(&mut s, 100.0, 0.0, -3.0, &mut row), Pushed::WarmingUp { needed: 1 });
        assert!(matches!(c.push(&mut s, 101.0, f64::NAN, 1.0, &mut row), Pushed::Rejected { .. }));
    }

    /// Feeds `(t, bpm, uterus)` and returns the last row.
    fn run(c: &FeatureConfig, samples: impl IntoIterator<Item = (f64, f64, f64)>) -> Vec<f32> {
        let mut s = c.new_series();
        let mut row = vec![0f32; c.n_features()];
        for (t, b, u) in samples {
            c.push(&mut s, t, b, u, &mut row);
        }
        row
    }

    /// Every candidate feature for both signals, so tests can look them up by name.
    fn all_filters(warmup: usize) -> FeatureConfig {
        FeatureConfig {
            kind: FeatureKind::Filters(FilterParams {
                bpm: Filter::ALL.to_vec(),
                uterus: Filter::ALL.to_vec(),
                warmup,
                ..FilterParams::default()
            }),
            ..FeatureConfig::default()
        }
    }

    fn get(c: &FeatureConfig, row: &[f32], name: &str) -> f32 {
        let at = c.feature_cols().iter().position(|n| n == name).unwrap_or_else(|| panic!("no column {name}"));
        row[at]
    }

    #[test]
    fn filter_columns_name_their_signal() {
        let c = FeatureConfig::default();
        let cols = c.feature_cols();
        assert_eq!(cols.len(), c.n_features());
        assert_eq!(&cols[..3], ["bpm_level", "bpm_jump", "bpm_dev"]);
        let p = match &c.kind {
            FeatureKind::Filters(p) => p,
            _ => unreachable!(),
        };
        assert!(cols[..p.bpm.len()].iter().all(|c| c.starts_with("bpm_")));
        assert!(cols[p.bpm.len()..].iter().all(|c| c.starts_with("uterus_")));
    }

    #[test]
    fn filters_on_a_constant_signal_are_exact() {
        let c = all_filters(1);
        let row = run(&c, (0..100).map(|i| (i as f64 * 0.25, 140.0, 12.0)));
        for (s, v) in [("bpm", 140.0), ("uterus", 12.0)] {
            assert_eq!(get(&c, &row, &format!("{s}_level")), v);
            assert_eq!(get(&c, &row, &format!("{s}_baseline")), v);
            for zero in ["jump", "jump_z", "dev", "dev_z", "dev_slow", "sd", "sd_long", "sd_ratio", "burden"] {
                assert_eq!(get(&c, &row, &format!("{s}_{zero}")), 0.0, "{s}_{zero}");
            }
            assert_eq!(get(&c, &row, &format!("{s}_flat")), 24.75);
        }
    }

    #[test]
    fn a_step_shows_in_jump_dev_and_burden_with_the_right_sign() {
        let c = all_filters(1);
        let calm = (0..2400).map(|i| (i as f64 * 0.25, 140.0 + (i % 2) as f64, 10.0 + (i % 2) as f64));
        let row = run(&c, calm.chain([(600.0, 110.0, 60.0)]));
        let f = |n: &str| get(&c, &row, n);
        assert!((f("bpm_jump") - (110.0 - 140.5)).abs() < 0.6, "jump {}", f("bpm_jump"));
        assert!((f("uterus_jump") - 49.5).abs() < 0.6);
        // the level moves by 1 - exp(-0.25/4) of the step; the baseline hardly moves
        let a = 1.0 - (-0.25f64 / 4.0).exp();
        assert!((f("bpm_level") as f64 - (140.5 - 30.5 * a)).abs() < 0.6, "level {}", f("bpm_level"));
        assert!(f("bpm_dev") < 0.0 && f("uterus_dev") > 0.0);
        assert!(f("bpm_dev_z") < f("bpm_dev"), "a calm trace makes the deviation large in its own units");
        assert!((f("bpm_baseline") - 140.5).abs() < 0.5 && (f("uterus_baseline") - 10.5).abs() < 0.5);
        assert!(f("bpm_burden") > 0.0 && f("uterus_burden") > 0.0);
        assert!(f("bpm_jump_z") < -20.0, "a 30 bpm step in a trace of sd 0.5: {}", f("bpm_jump_z"));
        assert!(f("bpm_sd") > 0.5, "the step itself is in the variability: {}", f("bpm_sd"));
        assert_eq!(f("bpm_flat"), 0.0);
    }

    #[test]
    fn filters_do_not_depend_on_the_sampling_rate() {
        let c = all_filters(1);
        let wave = |t: f64| (140.0 + 10.0 * (t / 20.0).sin(), 20.0 + 15.0 * (t / 45.0).sin().max(0.0));
        let at =
            |hz: f64| run(&c, (0..(900.0 * hz) as usize).map(|i| i as f64 / hz).map(|t| (t, wave(t).0, wave(t).1)));
        let (slow, fast) = (at(4.0), at(7.87));
        for (name, (a, b)) in c.feature_cols().iter().zip(slow.iter().zip(&fast)) {
            if name.contains("jump") || name.ends_with("flat") {
                continue; // the step between samples scales with the rate; flat is 0 for both
            }
            assert!((a - b).abs() <= 0.05 * a.abs().max(1.0), "{name}: {a} at 4 Hz, {b} at 7.87 Hz");
        }
    }

    #[test]
    fn a_frozen_value_counts_flat_seconds_up_to_the_cap() {
        let c = all_filters(1);
        let live = (0..400).map(|i| (i as f64 * 0.25, 140.0 + (i % 3) as f64, 10.0 + (i % 5) as f64));
        let frozen = (400..4000).map(|i| (i as f64 * 0.25, 140.0 + (i % 3) as f64, 13.0));
        let row = run(&c, live.chain(frozen));
        assert_eq!(get(&c, &row, "bpm_flat"), 0.0);
        assert_eq!(get(&c, &row, "uterus_flat"), 600.0);
        assert!(get(&c, &row, "uterus_sd") < 0.01, "uterus sd after 15 minutes frozen");
        assert!(get(&c, &row, "uterus_sd_ratio") < 0.01);
    }

    #[test]
    fn after_lost_signal_the_short_term_state_settles_on_the_new_value() {
        let c = all_filters(1);
        let before = (0..400).map(|i| (i as f64 * 0.25, 140.0 + (i % 2) as f64, 10.0));
        // 5 s of lost signal (more than settle_gap_s, less than max_gap_s), back at 100 bpm
        let row = run(&c, before.clone().chain([(104.75, 100.0, 10.0)]));
        let f = |n: &str| get(&c, &row, n);
        assert_eq!(f("bpm_jump"), 0.0, "no jump is measured across a pause");
        assert_eq!(f("bpm_level"), 100.0, "the level restarts at the new value");
        assert!((f("bpm_baseline") - 140.5).abs() < 1.0, "the baseline remembers: {}", f("bpm_baseline"));
        assert!(f("bpm_dev") < -35.0, "so the drop still shows against it: {}", f("bpm_dev"));
        // the same drop without a pause is a jump
        let row = run(&c, before.chain([(100.0, 100.0, 10.0)]));
        assert!(get(&c, &row, "bpm_jump") < -35.0);
    }

    #[test]
    fn filter_gap_rule_restarts_the_warm_up() {
        let c = all_filters(5);
        let mut s = c.new_series();
        let mut row = vec![0f32; c.n_features()];
        for i in 0..10 {
            c.push(&mut s, i as f64, 140.0, 10.0, &mut row);
        }
        assert_eq!(c.push(&mut s, 69.0, 140.0, 10.0, &mut row), Pushed::Ready, "60 s is not more than 60 s");
        assert_eq!(c.push(&mut s, 130.0, 100.0, 10.0, &mut row), Pushed::WarmingUp { needed: 4 });
        for i in 1..4 {
            c.push(&mut s, 130.0 + i as f64, 100.0, 10.0, &mut row);
        }
        assert_eq!(c.push(&mut s, 134.0, 100.0, 10.0, &mut row), Pushed::Ready);
        assert_eq!(get(&c, &row, "bpm_baseline"), 100.0, "the baseline restarted with the series");
    }
}
