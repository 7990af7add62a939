//! `fad train`: features -> group split -> isolation forests -> artifacts + report
//! (SPEC sections 3-4).

use crate::cli::TrainArgs;
use crate::cli::{FeatureSet, Join};
use crate::cmd::convert;
use crate::features::{FeatureConfig, Pushed, Series};
use crate::fit::{Contamination, FitParams, MaxFeatures, MaxSamples, Rows, fit, fit_calibrated, percentile};
use crate::forest::ForestSpec;
use crate::model::{Meta, Model, PICKLE_FILE, Role, feature_config_from, feature_config_json, sha256_hex};
use crate::model::{check_out_dir, write_artifacts};
use crate::table;
use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_pcg::Pcg64;
use rayon::prelude::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

/// Recordings' feature rows, with the series each row came from.
pub struct Dataset {
    pub n_features: usize,
    pub rows: Vec<f32>,
    pub row_series: Vec<u32>,
    pub series: Vec<SeriesInfo>,
    pub rows_read: u64,
    pub rejected: BTreeMap<&'static str, u64>,
}

pub struct SeriesInfo {
    pub group_id: String,
    pub sequence_id: String,
    pub target: Option<String>,
}

impl Dataset {
    pub fn n_rows(&self) -> usize {
        self.row_series.len()
    }

    /// Sequences with at least one scorable row (a short one may never finish its warm-up).
    pub fn n_scorable_series(&self) -> usize {
        let mut seen = vec![false; self.series.len()];
        for &s in &self.row_series {
            seen[s as usize] = true;
        }
        seen.into_iter().filter(|&x| x).count()
    }
}

/// Reads a merged table and computes the feature rows of every series. The first
/// malformed row is an error naming the input, line and field.
pub fn build_dataset(input: impl std::io::Read, name: &str, fc: &FeatureConfig) -> Result<Dataset> {
    let w = fc.n_features();
    let mut ds = Dataset {
        n_features: w,
        rows: Vec::new(),
        row_series: Vec::new(),
        series: Vec::new(),
        rows_read: 0,
        rejected: BTreeMap::new(),
    };
    let mut index: HashMap<(String, String), u32> = HashMap::new();
    let mut states: Vec<Series> = Vec::new();
    // A table holds a series' rows together: the map is consulted when the key changes.
    let mut current: Option<u32> = None;
    let mut row = vec![0f32; w];
    table::for_each_row(input, name, |r| {
        let r = r?;
        ds.rows_read += 1;
        let same = current.is_some_and(|i| {
            let s = &ds.series[i as usize];
            s.group_id == r.group_id && s.sequence_id == r.sequence_id
        });
        if !same {
            let key = (r.group_id.to_owned(), r.sequence_id.to_owned());
            let i = *index.entry(key).or_insert_with(|| {
                ds.series.push(SeriesInfo {
                    group_id: r.group_id.to_owned(),
                    sequence_id: r.sequence_id.to_owned(),
                    target: r.target.map(str::to_owned),
                });
                states.push(fc.new_series());
                (ds.series.len() - 1) as u32
            });
            current = Some(i);
        }
        let idx = current.expect("set above");
        // A series whose first rows had no target takes the first one given (the table
        // reader has refused any other), so that it stays with its patient in the split.
        if ds.series[idx as usize].target.is_none() && r.target.is_some() {
            ds.series[idx as usize].target = r.target.map(str::to_owned);
        }
        match fc.push(&mut states[idx as usize], r.time, r.bpm, r.uterus, &mut row) {
            Pushed::Ready => {
                ds.rows.extend_from_slice(&row);
                ds.row_series.push(idx);
            }
            Pushed::Rejected { reason, .. } => *ds.rejected.entry(reason.as_str()).or_default() += 1,
            Pushed::WarmingUp { .. } => {}
        }
        Ok(())
    })?;
    Ok(ds)
}

/// [`build_dataset`] for a data directory, without the detour through a table: every file
/// pair is one series, so the pairs are read and turned into feature rows in parallel.
/// The rows, series and counts are those of its converted table, in the same order.
/// A malformed file is an error, or with `skip_bad` named on stderr and left out.
pub fn build_dataset_from_dir(
    dir: &std::path::Path,
    join: Join,
    skip_bad: bool,
    fc: &FeatureConfig,
) -> Result<Dataset> {
    /// The rows of one pair: feature rows, rows read, rejections by reason.
    type PairRows = (Vec<f32>, u64, BTreeMap<&'static str, u64>);
    let pair_rows = |pair: &crate::data::Pair| -> Result<PairRows> {
        let merged = crate::data::merge_pair(pair, join)?;
        let mut series = fc.new_series();
        let mut row = vec![0f32; fc.n_features()];
        let (mut rows, mut rejected) = (Vec::new(), BTreeMap::new());
        for i in 0..merged.len() {
            let (_, b, u) = merged.row(i);
            let value = |text: &str| crate::engine::parse_value(text).unwrap_or(f64::NAN);
            match fc.push(&mut series, merged.time(i), value(b), value(u), &mut row) {
                Pushed::Ready => rows.extend_from_slice(&row),
                Pushed::Rejected { reason, .. } => *rejected.entry(reason.as_str()).or_default() += 1,
                Pushed::WarmingUp { .. } => {}
            }
        }
        Ok((rows, merged.len() as u64, rejected))
    };
    let pairs = convert::usable_pairs(dir, "train")?;
    let mut skipped = 0usize;
    let w = fc.n_features();
    let mut ds = Dataset {
        n_features: w,
        rows: Vec::new(),
        row_series: Vec::new(),
        series: Vec::new(),
        rows_read: 0,
        rejected: BTreeMap::new(),
    };
    // In batches, so that only one batch of pairs is held twice.
    for batch in pairs.chunks(64) {
        let done: Vec<Result<PairRows>> = batch.par_iter().map(pair_rows).collect();
        for (pair, result) in batch.iter().zip(done) {
            let (rows, read, rejected) = match result {
                Ok(r) => r,
                Err(e) if skip_bad => {
                    convert::warn("train", &format!("skipped {}: {e:#}", pair.stem));
                    skipped += 1;
                    continue;
                }
                Err(e) => return Err(convert::with_skip_bad_hint(e)),
            };
            if read == 0 {
                continue; // no row in the table, so no series either
            }
            let idx = ds.series.len() as u32;
            ds.series.push(SeriesInfo {
                group_id: pair.group_id(),
                sequence_id: pair.stem.clone(),
                target: Some(pair.class.clone()),
            });
            ds.rows_read += read;
            ds.row_series.extend(std::iter::repeat_n(idx, rows.len() / w));
            ds.rows.extend_from_slice(&rows);
            for (reason, n) in rejected {
                *ds.rejected.entry(reason).or_default() += n;
            }
        }
    }
    convert::report_skipped("train", skipped);
    Ok(ds)
}

/// A patient: `(target, group_id)`, since folder numbers repeat across classes.
fn group_key(s: &SeriesInfo) -> (&str, &str) {
    (s.target.as_deref().unwrap_or_default(), &s.group_id)
}

/// Splits unique `(target, group_id)` groups with the seeded RNG; returns per-series
/// "is validation" flags and the training and validation group counts. Only groups with
/// a series that has scorable rows (`scorable[i]` for series i) take part, as in the
/// prototype, which split the rows left after warm-up: a group without rows could be
/// neither fitted nor validated.
pub fn split_groups(series: &[SeriesInfo], scorable: &[bool], val_size: f64, seed: u64) -> (Vec<bool>, usize, usize) {
    let mut groups: Vec<(String, String)> = series
        .iter()
        .zip(scorable)
        .filter(|(_, ok)| **ok)
        .map(|(s, _)| (s.target.clone().unwrap_or_default(), s.group_id.clone()))
        .collect();
    groups.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| crate::data::natural_cmp(&a.1, &b.1)).then_with(|| a.1.cmp(&b.1)));
    groups.dedup();
    let mut rng = Pcg64::seed_from_u64(seed);
    groups.shuffle(&mut rng);
    let mut n_val = (val_size * groups.len() as f64).ceil() as usize;
    if n_val >= groups.len() && groups.len() > 1 {
        n_val = groups.len() - 1; // the forest needs at least one training group
    }
    if groups.len() <= 1 {
        n_val = 0;
    }
    let val: std::collections::HashSet<&(String, String)> = groups[..n_val].iter().collect();
    let flags =
        series.iter().map(|s| val.contains(&(s.target.clone().unwrap_or_default(), s.group_id.clone()))).collect();
    (flags, groups.len() - n_val, n_val)
}

/// Area under the ROC curve of `score` (higher = more positive) with average ranks for
/// ties; None without both classes.
pub fn roc_auc(score: &[f64], positive: &[bool]) -> Option<f64> {
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..score.len()).collect();
    order.sort_by(|&a, &b| score[a].total_cmp(&score[b]));
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && score[order[j + 1]] == score[order[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            if positive[k] {
                rank_sum_pos += avg_rank;
            }
        }
        i = j + 1;
    }
    let u = rank_sum_pos - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos as f64 * n_neg as f64))
}

/// Training rows scored at most (see [`calibration_sample`]).
const CALIBRATION_ROWS: usize = 250_000;

/// Positions (in 0..n, ascending) of the training rows that are scored: all of them, or a
/// sample of CALIBRATION_ROWS drawn with the seed, so that the same input and seed give
/// the same offsets whatever --n-jobs is.
fn calibration_sample(n: usize, seed: u64) -> Vec<usize> {
    if n <= CALIBRATION_ROWS {
        return (0..n).collect();
    }
    let mut rng = Pcg64::seed_from_u64(seed ^ 0x6361_6c69_6272_6174);
    let mut picked = rand::seq::index::sample(&mut rng, n, CALIBRATION_ROWS).into_vec();
    picked.sort_unstable();
    picked
}

/// Groups, sequences and rows of one side of the split.
fn side_counts(ds: &Dataset, rows: &[usize]) -> Value {
    let mut seqs = std::collections::BTreeSet::new();
    let mut groups = std::collections::BTreeSet::new();
    for &r in rows {
        let s = ds.row_series[r];
        seqs.insert(s);
        groups.insert(group_key(&ds.series[s as usize]));
    }
    json!({"groups": groups.len(), "sequences": seqs.len(), "rows": rows.len()})
}

/// Statistics of one side of the split.
fn side_report(ds: &Dataset, rows: &[usize], scores: &[f64], flags: &[[bool; 2]], with_auc: bool) -> Value {
    let n = rows.len();
    let mut seqs: BTreeMap<u32, (u64, u64)> = BTreeMap::new(); // series -> (rows, flagged)
    let mut groups = std::collections::BTreeSet::new();
    let (mut flagged, mut fb, mut fu) = (0u64, 0u64, 0u64);
    for (k, &r) in rows.iter().enumerate() {
        let s = ds.row_series[r];
        let e = seqs.entry(s).or_default();
        e.0 += 1;
        if scores[k] < 0.0 {
            flagged += 1;
            e.1 += 1;
        }
        fb += flags[k][0] as u64;
        fu += flags[k][1] as u64;
        groups.insert(group_key(&ds.series[s as usize]));
    }
    let rate = |x: u64| if n == 0 { Value::Null } else { json!(x as f64 / n as f64) };
    let q = |p: f64| if n == 0 { Value::Null } else { json!(percentile(scores, p)) };
    let mut v = json!({
        "groups": groups.len(),
        "sequences": seqs.len(),
        "rows": n,
        "anomaly_rate": rate(flagged),
        "bpm_anomaly_rate": rate(fb),
        "uterus_anomaly_rate": rate(fu),
        "score_quantiles": {"p01": q(1.0), "p05": q(5.0), "p25": q(25.0), "p50": q(50.0), "p75": q(75.0), "p95": q(95.0), "p99": q(99.0)},
    });
    if with_auc {
        let is_hyp = |s: u32| ds.series[s as usize].target.as_deref() == Some("hypoxia");
        let pos: Vec<bool> = rows.iter().map(|&r| is_hyp(ds.row_series[r])).collect();
        let neg_score: Vec<f64> = scores.iter().map(|s| -s).collect();
        let seq_rate: Vec<f64> = seqs.values().map(|&(n, f)| f as f64 / n as f64).collect();
        let seq_pos: Vec<bool> = seqs.keys().map(|&s| is_hyp(s)).collect();
        v["roc_auc_rows"] = json!(roc_auc(&neg_score, &pos));
        v["roc_auc_sequences"] = json!(roc_auc(&seq_rate, &seq_pos));
    }
    v
}

fn fmt_side(name: &str, v: &Value) -> String {
    let f = |k: &str| v[k].as_f64().map_or("-".to_string(), |x| format!("{:.4}", x));
    let sampled = match (v["scored_rows"].as_u64(), v["rows"].as_u64()) {
        (Some(k), Some(n)) if k < n => format!(" (rates and quantiles of {k} sampled rows)"),
        _ => String::new(),
    };
    let mut s = format!(
        "{name}: {} groups, {} sequences, {} rows; anomaly rate {}{sampled} (bpm {}, uterus {}); score p01 {} p50 {} p99 {}",
        v["groups"],
        v["sequences"],
        v["rows"],
        f("anomaly_rate"),
        f("bpm_anomaly_rate"),
        f("uterus_anomaly_rate"),
        v["score_quantiles"]["p01"].as_f64().map_or("-".into(), |x| format!("{x:.4}")),
        v["score_quantiles"]["p50"].as_f64().map_or("-".into(), |x| format!("{x:.4}")),
        v["score_quantiles"]["p99"].as_f64().map_or("-".into(), |x| format!("{x:.4}")),
    );
    if v.get("roc_auc_rows").is_some() {
        s += &format!("; ROC AUC hypoxia vs regular: rows {}, sequences {}", f("roc_auc_rows"), f("roc_auc_sequences"));
    }
    s
}

pub fn run(args: TrainArgs) -> Result<()> {
    if let Some(dir) = &args.from_pickle {
        return convert_pickle(dir, &args.out_dir, args.force);
    }
    let input = args.input.clone().or(args.input_csv.clone()).expect("clap requires one of them");
    if let Some(n) = args.n_jobs {
        crate::set_threads(n)?;
    }
    let usage = |e: String| anyhow::Error::new(crate::UsageError(e));
    let params = FitParams {
        n_estimators: args.n_estimators,
        max_samples: MaxSamples::parse(&args.max_samples).map_err(usage)?,
        max_features: MaxFeatures::parse(&args.max_features).map_err(usage)?,
        contamination: Contamination::parse(&args.contamination).map_err(usage)?,
        random_state: args.random_state,
    };
    if args.n_estimators == 0 {
        bail!(crate::UsageError("--n-estimators must be at least 1".into()));
    }
    if !(0.0..1.0).contains(&args.val_size) {
        bail!(crate::UsageError(format!("--val-size must be in [0, 1), got {}", args.val_size)));
    }
    if !(args.flag_rate > 0.0 && args.flag_rate <= 0.5) {
        bail!(crate::UsageError(format!("--flag-rate must be in (0, 0.5], got {}", args.flag_rate)));
    }
    let fc = feature_settings(&args)?;
    if let MaxFeatures::Count(k) = params.max_features
        && k > fc.n_features()
    {
        // scikit-learn raises for an int max_features above n_features, too.
        bail!(crate::UsageError(format!(
            "--max-features {k} is more than the {} feature columns; give a count up to {} or a fraction",
            fc.n_features(),
            fc.n_features()
        )));
    }
    // Before any data is read: a non-empty --out-dir would otherwise be found only after
    // the whole training.
    check_out_dir(&args.out_dir, args.force)?;
    let t0 = Instant::now();
    let name = table::input_name(&input);
    let ds = if input.is_dir() {
        build_dataset_from_dir(&input, args.join, args.bad_files.skip_bad, &fc)?
    } else {
        build_dataset(table::open(&input, args.join, args.bad_files.skip_bad, "train")?, &name, &fc)?
    };
    let t_features = t0.elapsed();
    if ds.n_rows() == 0 {
        bail!(
            "{name}: no scorable rows ({} rows read; every series needs {} valid samples in a row)",
            ds.rows_read,
            fc.warmup()
        );
    }
    let mut scorable = vec![false; ds.series.len()];
    for &s in &ds.row_series {
        scorable[s as usize] = true;
    }
    let (is_val, n_train_groups, n_val_groups) = split_groups(&ds.series, &scorable, args.val_size, args.random_state);
    let all_groups: std::collections::BTreeSet<_> = ds.series.iter().map(group_key).collect();
    let groups_without_rows = all_groups.len() - n_train_groups - n_val_groups;
    if let Some(class) = &args.train_class
        && !ds.series.iter().any(|s| s.target.as_deref() == Some(class.as_str()))
    {
        bail!(crate::UsageError(format!("--train-class {class}: no sequence of {name} has that target")));
    }
    let fits_class = |s: &SeriesInfo| args.train_class.as_ref().is_none_or(|c| s.target.as_deref() == Some(c));
    let val_idx: Vec<usize> = (0..ds.n_rows()).filter(|&r| is_val[ds.row_series[r] as usize]).collect();
    let train_idx: Vec<usize> = (0..ds.n_rows())
        .filter(|&r| {
            let s = ds.row_series[r] as usize;
            !is_val[s] && fits_class(&ds.series[s])
        })
        .collect();
    if train_idx.is_empty() {
        bail!("{name}: the training groups have no scorable rows");
    }
    let w = ds.n_features;
    let gather =
        |idx: &[usize]| -> Vec<f32> { idx.iter().flat_map(|&r| ds.rows[r * w..(r + 1) * w].iter().copied()).collect() };
    let train_rows = gather(&train_idx);
    let rows = Rows { data: &train_rows, n_features: w };
    let [bpm_cols, uterus_cols] = fc.flag_columns();
    let all: Vec<u32> = (0..w as u32).collect();
    // The training rows that are scored: the per-signal offsets and the training side of
    // the report come from them. All rows up to CALIBRATION_ROWS, else a seeded sample.
    let calibration = calibration_sample(train_idx.len(), args.random_state);
    let calibration_idx: Vec<usize> = calibration.iter().map(|&p| train_idx[p]).collect();
    let calibration_rows = gather(&calibration_idx);
    let t1 = Instant::now();
    let (joint, joint_train) = match params.contamination {
        // scikit-learn's offset is a percentile of every training row's score
        Contamination::Fraction(_) => {
            let (spec, scores) = fit(&rows, &all, &params, 0);
            (spec, calibration.iter().map(|&p| scores[p]).collect())
        }
        Contamination::Auto => fit_calibrated(&rows, &all, &params, 0, &calibration_rows),
    };
    let signal_params = FitParams { contamination: Contamination::Fraction(args.flag_rate), ..params.clone() };
    let (bpm, bpm_train) = fit_calibrated(&rows, &bpm_cols, &signal_params, 1, &calibration_rows);
    let (uterus, uterus_train) = fit_calibrated(&rows, &uterus_cols, &signal_params, 2, &calibration_rows);
    let t_fit = t1.elapsed();

    let forests: [&ForestSpec; 3] = [&joint, &bpm, &uterus];
    let compiled: Vec<crate::forest::Forest> =
        forests.iter().map(|s| crate::forest::Forest::new(s).expect("fitted forests are well formed")).collect();
    let anomaly = |ss: &[f64], f: &ForestSpec| -> Vec<f64> { ss.iter().map(|s| s - f.offset).collect() };
    let train_scores = anomaly(&joint_train, &joint);
    let train_flags: Vec<[bool; 2]> =
        bpm_train.iter().zip(&uterus_train).map(|(b, u)| [b - bpm.offset < 0.0, u - uterus.offset < 0.0]).collect();
    let val_rows = gather(&val_idx);
    let val_ss: Vec<Vec<f64>> = compiled.iter().map(|f| crate::fit::score_all(f, &val_rows)).collect();
    let val_scores = anomaly(&val_ss[0], &joint);
    let val_flags: Vec<[bool; 2]> =
        val_ss[1].iter().zip(&val_ss[2]).map(|(b, u)| [b - bpm.offset < 0.0, u - uterus.offset < 0.0]).collect();
    let has_target = ds.series.iter().any(|s| s.target.is_some());
    let mut train_report = side_report(&ds, &calibration_idx, &train_scores, &train_flags, false);
    if calibration_idx.len() < train_idx.len() {
        // Counts are of the whole training side; rates and quantiles of its scored sample.
        let whole = side_counts(&ds, &train_idx);
        for key in ["groups", "sequences", "rows"] {
            train_report[key] = whole[key].clone();
        }
    }
    train_report["scored_rows"] = json!(calibration_idx.len());
    let val_report = side_report(&ds, &val_idx, &val_scores, &val_flags, has_target);
    // The split's counts; the report's train side counts only the groups the forests
    // were fitted on, which differ with --train-class.
    let mut split = format!("{n_train_groups} train / {n_val_groups} validation groups");
    if let Some(class) = &args.train_class {
        split += &format!(" (forests fitted on the {} train groups of class {class})", train_report["groups"]);
    }
    if groups_without_rows > 0 {
        split += &format!(", {groups_without_rows} without scorable rows left out");
    }
    eprintln!(
        "fad train: {} rows read in {} sequences, {} scorable rows in {} of them; {split}; features {:.2}s, fit {:.2}s",
        ds.rows_read,
        ds.series.len(),
        ds.n_rows(),
        ds.n_scorable_series(),
        t_features.as_secs_f64(),
        t_fit.as_secs_f64()
    );
    eprintln!("fad train: {}", fmt_side("train", &train_report));
    eprintln!("fad train: {}", fmt_side("validation", &val_report));

    let mut config = json!({
        "time_col": "timestamp", "group_col": "group_id", "seq_col": "sequence_id",
        "target_cols": ["bpm", "uterus"],
        "val_size": args.val_size, "random_state": args.random_state,
        "n_estimators": args.n_estimators, "max_samples": args.max_samples, "contamination": args.contamination,
        "max_features": args.max_features, "n_jobs": args.n_jobs, "join": format!("{:?}", args.join).to_lowercase(),
        "per_signal_forests": true, "flag_rate": args.flag_rate, "train_class": args.train_class,
    });
    config.as_object_mut().expect("an object").extend(feature_config_json(&fc));
    config["default_reasons"] = reasons_for(&config);
    let meta = Meta {
        fad_version: Some(env!("CARGO_PKG_VERSION").to_string()),
        config,
        feature_cols: fc.feature_cols(),
        max_lag: Some(fc.warmup()),
        model_files: vec![],
        report: Some(json!({
            "rows_read": ds.rows_read,
            "rows_scorable": ds.n_rows(),
            "sequences": ds.series.len(),
            "sequences_scorable": ds.n_scorable_series(),
            "groups_without_scorable_rows": groups_without_rows,
            "rejected_samples": ds.rejected,
            "train": train_report,
            "validation": val_report,
        })),
    };
    write_artifacts(
        &args.out_dir,
        meta,
        &[(Role::Joint, &joint), (Role::Bpm, &bpm), (Role::Uterus, &uterus)],
        args.force,
    )?;
    eprintln!("fad train: wrote {} ({:.2}s in all)", args.out_dir.display(), t0.elapsed().as_secs_f64());
    Ok(())
}

/// The reasons of [`default_reasons`] for the settings `config` (a model's meta.json
/// config) has at their default value: a model does not explain settings it lacks.
fn reasons_for(config: &Value) -> Value {
    let mut defaults = json!({ "join": "inner", "flag_rate": 0.005 });
    defaults.as_object_mut().expect("an object").extend(feature_config_json(&FeatureConfig::default()));
    // A setting is at the top of config or among the filter settings.
    let at = |c: &Value, key: &str| c.get(key).or_else(|| c.get("filters").and_then(|f| f.get(key))).cloned();
    let Value::Object(all) = default_reasons() else { unreachable!("an object") };
    let kept = all.into_iter().filter(|(key, _)| at(config, key).is_some() && at(config, key) == at(&defaults, key));
    Value::Object(kept.collect())
}

/// Why fad's defaults are what they are, measured on both public sources (README,
/// "Defaults and why"); stored in meta.json so that a model says what it assumes.
fn default_reasons() -> Value {
    json!({
        "feature_set": "filters: exponentially weighted statistics with time constants in seconds, so one \
            model reads a 4 Hz (CTU-UHB) and a 7.87 Hz (LCT 2025) monitor alike and sees minutes of context \
            for a few numbers per series; lags counted in samples would span 6 s at one rate and 3 s at the other",
        "max_gap_s": "60: LCT 2025 is fragmented (median unbroken stretch 1.9 s, pauses mostly under 2 s, \
            18,394 pauses over 2 s); with a 40-sample warm-up a 2 s limit would leave 24 % of its valid samples \
            unscored (CTU-UHB 7.6 %), 60 s leaves 2.2 % (0.6 %); past a minute the context is stale",
        "warmup": "120 samples (30 s at 4 Hz, 15 s at 7.87 Hz): with 40, the first 40 scored samples after a \
            start were flagged 4-11 times as often as samples after 2 minutes (CTU-UHB bpm 2.2 %, uterus 3.5 %; \
            LCT 2025 1.9 %, 4.0 %), the minute-long filters still unsettled; 120 brings that to 1.6 %, 2.8 % and \
            0.9 %, 1.8 %, for 1.9 % (CTU-UHB) and 6.0 % (LCT 2025) of valid samples unscored instead of 0.6 % \
            and 2.2 %",
        "settle_gap_s": "1: after lost signal monitors re-acquire at another level often; with the short-term \
            state carried across pauses, 67 % of the flags on clean CTU-UHB samples fell within 5 s after a \
            pause, with it restarted 29 %",
        "bpm_valid_range": "[50, 240]: CTU-UHB keeps artefacts up to 293 bpm and LCT 2025 is clipped to 50..210",
        "uterus_valid_max": "200: toco reads 0..100 (LCT 2025 at most 100, CTU-UHB 127.5); a larger value is an \
            artefact, and one huge value would dominate the minutes-long filters of its series",
        "zero_is_loss": "true: CTU-UHB writes 0 for lost signal (18.6 % of heart-rate and 19.5 % of toco \
            samples); 0 is a transducer off, not a heart rate or a uterus at rest",
        "join": "inner: a sample needs both signals to be scored; --join outer keeps one-sided rows, which \
            the engine then rejects as signal loss",
        "uterus_flag": "dev_z, sd_ratio: external toco is uncalibrated (the belt and the mother set its \
            amplitude) and CTU-UHB toco reads higher than LCT 2025's (90th percentile of the 4-second level 50 \
            against 27); trained on LCT 2025, a uterus flag forest on every uterus column flagged 3.10 % of clean \
            CTU-UHB samples, on these two 0.54 % (0.50 % and 0.39 % on the source trained on); with jump_z too \
            the flags spread over many more sequences; the joint forest keeps every column",
        "flag_rate": "0.005 per signal: 0.2-0.6 % of clean held-out samples flagged per signal on the source \
            a model was trained on (bench/quality)",
    })
}

/// `--from-pickle`: writes the forest of a prototype's artifacts directory (model_if.pkl
/// plus its meta.json) as fad's own artifacts: meta.json keeps the prototype's config and
/// feature_cols, so the features are the same, and forest.json holds the same trees.
/// There are no per-signal forests: the flags are the joint forest's, as when the pickle
/// is served directly.
pub fn convert_pickle(dir: &Path, out_dir: &Path, force: bool) -> Result<()> {
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(dir, out_dir) {
        bail!(crate::UsageError(format!(
            "--out-dir {} is the --from-pickle directory; write the converted model elsewhere",
            out_dir.display()
        )));
    }
    check_out_dir(out_dir, force)?;
    // Load it as `fad score` would: meta.json, features, pickle and their agreement.
    let model = Model::load(dir)?;
    if !model.meta.model_files.is_empty() {
        bail!(
            "{} already holds fad's own model (its meta.json lists forest files), not a pickle to convert",
            dir.display()
        );
    }
    let pkl = dir.join(PICKLE_FILE);
    let bytes = std::fs::read(&pkl).with_context(|| format!("cannot read {}", pkl.display()))?;
    let imported = crate::sklearn::import(&pkl)?;
    let spec = &imported.spec;
    let meta = Meta {
        fad_version: Some(env!("CARGO_PKG_VERSION").to_string()),
        config: model.meta.config.clone(),
        feature_cols: model.meta.feature_cols.clone(),
        max_lag: Some(model.features.warmup()),
        model_files: vec![],
        report: Some(json!({
            "imported_from": {
                "file": pkl.display().to_string(),
                "sha256": sha256_hex(&bytes),
                "sklearn_version": imported.sklearn_version,
                "n_estimators": spec.trees.len(),
                "max_samples": spec.max_samples,
                "offset": spec.offset,
            }
        })),
    };
    write_artifacts(out_dir, meta, &[(Role::Joint, spec)], force)?;
    eprintln!(
        "fad train: converted {} ({} trees{}) into {}",
        pkl.display(),
        spec.trees.len(),
        imported.sklearn_version.as_deref().map(|v| format!(", scikit-learn {v}")).unwrap_or_default(),
        out_dir.display()
    );
    Ok(())
}

/// The feature settings of `--features`, with `--feature-config` laid over them.
fn feature_settings(args: &TrainArgs) -> Result<FeatureConfig> {
    let base = match args.features {
        FeatureSet::Filters => FeatureConfig::default(),
        FeatureSet::Window => FeatureConfig::window_default(),
    };
    let Some(path) = &args.feature_config else { return Ok(base) };
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read --feature-config {}: {e}", path.display()))?;
    let overlay: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("--feature-config {} is not valid JSON: {e}", path.display()))?;
    if !overlay.is_object() {
        bail!("--feature-config {} must hold a JSON object", path.display());
    }
    if overlay.get("feature_set").is_some() {
        bail!("--feature-config {}: feature_set is chosen with --features, not in the file", path.display());
    }
    let mut overlay = overlay;
    if let Some(Value::Object(filters)) = overlay.get_mut("filters") {
        // A signal's columns chosen anew: its flags see all of them unless told otherwise
        // (the default choice names columns the new list may lack).
        for signal in ["bpm", "uterus"] {
            let flag = format!("{signal}_flag");
            if filters.contains_key(signal) && !filters.contains_key(&flag) {
                filters.insert(flag, Value::Null);
            }
        }
    }
    let mut merged = Value::Object(feature_config_json(&base));
    merge_json(&mut merged, overlay.clone());
    let fc = feature_config_from(&merged).map_err(|e| anyhow::anyhow!("--feature-config {}: {e:#}", path.display()))?;
    // Every key must be a setting of the resulting features: a misspelt one would
    // otherwise be ignored without a word.
    let known = Value::Object(feature_config_json(&fc));
    if let Some((key, choices)) = unknown_key(&overlay, &known, "") {
        bail!("--feature-config {}: unknown key {key:?} (known here: {choices})", path.display());
    }
    Ok(fc)
}

/// The first key of `given` (an object, nested objects included) that `known` lacks, as
/// a dotted path, with the keys known at that level.
fn unknown_key(given: &Value, known: &Value, prefix: &str) -> Option<(String, String)> {
    let (Value::Object(g), Value::Object(k)) = (given, known) else { return None };
    for (key, value) in g {
        let path = format!("{prefix}{key}");
        match k.get(key) {
            None => return Some((path, k.keys().cloned().collect::<Vec<_>>().join(", "))),
            Some(slot) => {
                if let Some(found) = unknown_key(value, slot, &format!("{path}.")) {
                    return Some(found);
                }
            }
        }
    }
    None
}

/// Lays `top` over `base`, object by object.
fn merge_json(base: &mut Value, top: Value) {
    match (base, top) {
        (Value::Object(b), Value::Object(t)) => {
            for (k, v) in t {
                match b.get_mut(&k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge_json(slot, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, t) => *b = t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_gives_the_rows_of_its_converted_table() {
        for source in ["lct2025", "ctu-uhb"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample").join(source);
            for join in [Join::Inner, Join::Outer] {
                for fc in [FeatureConfig::default(), FeatureConfig::window_default()] {
                    let mut table = Vec::new();
                    crate::cmd::convert::write_table(&dir, join, false, "train", &mut table).unwrap();
                    let a = build_dataset(&table[..], "table", &fc).unwrap();
                    let b = build_dataset_from_dir(&dir, join, false, &fc).unwrap();
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                    assert!(a.n_rows() > 1000, "{source}: {} rows", a.n_rows());
                    assert!(bits(&a.rows) == bits(&b.rows), "{source} {join:?}: feature rows differ");
                    assert_eq!(a.row_series, b.row_series);
                    assert_eq!((a.rows_read, &a.rejected), (b.rows_read, &b.rejected), "{source} {join:?}");
                    let info = |d: &Dataset| {
                        d.series
                            .iter()
                            .map(|s| (s.group_id.clone(), s.sequence_id.clone(), s.target.clone()))
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(info(&a), info(&b));
                }
            }
        }
    }

    fn settings_from(json: &str) -> Result<FeatureConfig> {
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fc.json");
        std::fs::write(&path, json).unwrap();
        let args = crate::cli::Cli::try_parse_from(
            ["fad", "train", "x", "--out-dir", "o", "--feature-config"].iter().copied().chain([path.to_str().unwrap()]),
        )
        .unwrap();
        let crate::cli::Command::Train(args) = args.command else { unreachable!() };
        feature_settings(&args).map_err(|e| anyhow::anyhow!("{e:#}").context(path.display().to_string()))
    }

    #[test]
    fn feature_config_refuses_unknown_keys_by_name() {
        let fc = settings_from(r#"{"max_gap_s": 30, "filters": {"warmup": 50}}"#).unwrap();
        assert_eq!((fc.max_gap_s, fc.warmup()), (Some(30.0), 50));
        for (json, key) in [
            (r#"{"max_gap": 30}"#, "\"max_gap\""),
            (r#"{"filters": {"warm_up": 50}}"#, "\"filters.warm_up\""),
            // window settings mean nothing to the filters features
            (r#"{"lags": [1, 2]}"#, "\"lags\""),
        ] {
            let e = format!("{:#}", settings_from(json).unwrap_err());
            assert!(e.contains("fc.json: unknown key") && e.contains(key), "{json}: {e}");
        }
        let e = format!("{:#}", settings_from(r#"{"filters": {"warm_up": 50}}"#).unwrap_err());
        assert!(e.contains("known here:") && e.contains("warmup"), "{e}");
    }

    #[test]
    fn auc_counts_ties_as_half() {
        assert_eq!(roc_auc(&[0.1, 0.2, 0.3, 0.4], &[false, false, true, true]), Some(1.0));
        assert_eq!(roc_auc(&[0.4, 0.3, 0.2, 0.1], &[false, false, true, true]), Some(0.0));
        assert_eq!(roc_auc(&[0.5, 0.5], &[false, true]), Some(0.5));
        assert_eq!(roc_auc(&[0.5, 0.5], &[true, true]), None);
        let auc = roc_auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]).unwrap();
        assert!((auc - 0.75).abs() < 1e-12);
    }

    #[test]
    fn split_keeps_same_folder_in_different_classes_apart_and_is_seeded() {
        let s = |g: &str, t: &str| SeriesInfo { group_id: g.into(), sequence_id: "x".into(), target: Some(t.into()) };
        let series: Vec<SeriesInfo> =
            (0..10).map(|i| s(&format!("g{i}"), if i % 2 == 0 { "hypoxia" } else { "regular" })).collect();
        let ok = vec![true; 10];
        let (a, n_train, n_val) = split_groups(&series, &ok, 0.2, 42);
        assert_eq!((n_train, n_val), (8, 2));
        assert_eq!(a.iter().filter(|&&v| v).count(), 2);
        let (b, _, _) = split_groups(&series, &ok, 0.2, 42);
        assert_eq!(a, b);
        let (_, _, n_val) = split_groups(&series, &ok, 0.25, 1);
        assert_eq!(n_val, 3); // ceil(2.5)
        // Groups without scorable rows are not split: 8 left, ceil(0.25 * 8) = 2.
        let some = (0..10).map(|i| i >= 2).collect::<Vec<_>>();
        let (c, n_train, n_val) = split_groups(&series, &some, 0.25, 1);
        assert_eq!((n_train, n_val), (6, 2));
        assert!(!c[0] && !c[1]);
    }
}
