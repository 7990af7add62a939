//! Growing an isolation forest (Liu, Ting & Zhou 2008), with the choices scikit-learn's
//! `IsolationForest` makes: rows per tree drawn without replacement, a split feature drawn
//! uniformly among those not constant in the node, a threshold uniform in [min, max), and
//! leaves at depth ceil(log2(max_samples)). Each tree has its own seed drawn up front from
//! `random_state`, so the forest does not depend on how many threads grow it.

use crate::forest::{Forest, ForestSpec, TreeSpec};
use rand::seq::index;
use rand::{RngExt, SeedableRng};
use rand_pcg::Pcg64;
use rayon::prelude::*;

/// scikit-learn's FEATURE_THRESHOLD: a feature whose range in a node is at most this is
/// constant there.
const FEATURE_THRESHOLD: f64 = 1e-7;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MaxSamples {
    Auto,
    Count(usize),
    Fraction(f64),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MaxFeatures {
    Count(usize),
    Fraction(f64),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Contamination {
    Auto,
    Fraction(f64),
}

impl MaxSamples {
    pub fn parse(s: &str) -> Result<MaxSamples, String> {
        if s == "auto" {
            return Ok(MaxSamples::Auto);
        }
        if let Ok(n) = s.parse::<usize>() {
            return if n >= 1 { Ok(MaxSamples::Count(n)) } else { Err("max_samples must be at least 1".into()) };
        }
        match s.parse::<f64>() {
            Ok(f) if f > 0.0 && f <= 1.0 => Ok(MaxSamples::Fraction(f)),
            _ => Err(format!("max_samples must be auto, a count or a fraction in (0, 1], got {s:?}")),
        }
    }
    /// Rows each tree is grown on, for `n` training rows (scikit-learn clamps to n).
    pub fn resolve(self, n: usize) -> usize {
        match self {
            MaxSamples::Auto => n.min(256),
            MaxSamples::Count(k) => k.min(n),
            MaxSamples::Fraction(f) => ((f * n as f64).floor() as usize).max(1),
        }
        .max(1)
    }
}

impl MaxFeatures {
    pub fn parse(s: &str) -> Result<MaxFeatures, String> {
        if !s.contains('.')
            && let Ok(n) = s.parse::<usize>()
        {
            return if n >= 1 { Ok(MaxFeatures::Count(n)) } else { Err("max_features must be at least 1".into()) };
        }
        match s.parse::<f64>() {
            Ok(f) if f > 0.0 && f <= 1.0 => Ok(MaxFeatures::Fraction(f)),
            _ => Err(format!("max_features must be a count or a fraction in (0, 1], got {s:?}")),
        }
    }
    pub fn resolve(self, n_features: usize) -> usize {
        match self {
            MaxFeatures::Count(k) => k.min(n_features),
            MaxFeatures::Fraction(f) => (f * n_features as f64) as usize,
        }
        .clamp(1, n_features.max(1))
    }
}

impl Contamination {
    pub fn parse(s: &str) -> Result<Contamination, String> {
        if s == "auto" {
            return Ok(Contamination::Auto);
        }
        match s.parse::<f64>() {
            Ok(f) if f > 0.0 && f <= 0.5 => Ok(Contamination::Fraction(f)),
            _ => Err(format!("contamination must be auto or a fraction in (0, 0.5], got {s:?}")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct FitParams {
    pub n_estimators: usize,
    pub max_samples: MaxSamples,
    pub max_features: MaxFeatures,
    pub contamination: Contamination,
    pub random_state: u64,
}

/// Training rows, row-major, `n_features` wide.
pub struct Rows<'a> {
    pub data: &'a [f32],
    pub n_features: usize,
}

impl Rows<'_> {
    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.n_features).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn get(&self, row: usize, col: usize) -> f32 {
        self.data[row * self.n_features + col]
    }
}

/// Fits a forest on `rows` using only the columns in `allowed` (all columns for the joint
/// model, one signal's columns for a per-signal model). `salt` separates the random streams
/// of forests fitted from the same seed. The offset is set from `contamination` over every
/// training row, as scikit-learn does; returns the forest and the training rows'
/// `score_samples`.
pub fn fit(rows: &Rows, allowed: &[u32], params: &FitParams, salt: u64) -> (ForestSpec, Vec<f64>) {
    fit_calibrated(rows, allowed, params, salt, rows.data)
}

/// [`fit`], with the offset set from the scores of `calibration` rows (row-major, as wide
/// as `rows`) instead of all training rows; returns their `score_samples`. Scoring a few
/// hundred thousand rows pins a percentile as well as scoring millions does, for a
/// fraction of the time.
pub fn fit_calibrated(
    rows: &Rows,
    allowed: &[u32],
    params: &FitParams,
    salt: u64,
    calibration: &[f32],
) -> (ForestSpec, Vec<f64>) {
    let n = rows.len();
    assert!(n > 0, "fit needs at least one row");
    let max_samples = params.max_samples.resolve(n);
    let per_tree_features = params.max_features.resolve(allowed.len());
    let max_depth = (max_samples.max(2) as f64).log2().ceil() as u32;
    let mut master = Pcg64::seed_from_u64(params.random_state ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let seeds: Vec<u64> = (0..params.n_estimators).map(|_| master.random()).collect();
    let trees: Vec<TreeSpec> = seeds
        .par_iter()
        .map(|&seed| {
            let mut rng = Pcg64::seed_from_u64(seed);
            let mut sample: Vec<u32> = index::sample(&mut rng, n, max_samples).into_iter().map(|i| i as u32).collect();
            let mut features: Vec<u32> = if per_tree_features == allowed.len() {
                allowed.to_vec()
            } else {
                index::sample(&mut rng, allowed.len(), per_tree_features).into_iter().map(|i| allowed[i]).collect()
            };
            features.sort_unstable();
            grow_tree(rows, &mut sample, features, max_depth, &mut rng)
        })
        .collect();
    let mut spec = ForestSpec { n_features: rows.n_features, max_samples, offset: -0.5, trees };
    let forest = Forest::new(&spec).expect("a fitted forest is well formed");
    let scores = score_all(&forest, calibration);
    if let Contamination::Fraction(c) = params.contamination {
        spec.offset = percentile(&scores, 100.0 * c);
    }
    (spec, scores)
}

/// `score_samples` of many rows, in parallel chunks (results in row order).
pub fn score_all(forest: &Forest, data: &[f32]) -> Vec<f64> {
    let w = forest.n_features();
    let n = data.len() / w;
    let mut out = vec![0.0; n];
    const CHUNK: usize = 4096;
    out.par_chunks_mut(CHUNK).zip(data.par_chunks(CHUNK * w)).for_each(|(o, d)| forest.score_samples_batch(d, o));
    out
}

/// numpy's default (`linear`) percentile of `values`, q in [0, 100].
pub fn percentile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_unstable_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let pos = q / 100.0 * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    let frac = pos - lo as f64;
    v[lo] + (v[hi] - v[lo]) * frac
}

struct Builder<'a, 'r> {
    rows: &'a Rows<'r>,
    tree: TreeSpec,
    max_depth: u32,
}

fn grow_tree(rows: &Rows, sample: &mut [u32], features: Vec<u32>, max_depth: u32, rng: &mut Pcg64) -> TreeSpec {
    let mut b = Builder {
        rows,
        tree: TreeSpec {
            features,
            children_left: vec![],
            children_right: vec![],
            feature: vec![],
            threshold: vec![],
            n_node_samples: vec![],
        },
        max_depth,
    };
    b.node(sample, 0, rng);
    b.tree
}

impl Builder<'_, '_> {
    /// Adds the node holding `rows` (and, recursively, its subtree); returns its id.
    fn node(&mut self, sample: &mut [u32], depth: u32, rng: &mut Pcg64) -> usize {
        let id = self.tree.children_left.len();
        let t = &mut self.tree;
        t.children_left.push(-1);
        t.children_right.push(-1);
        t.feature.push(-2);
        t.threshold.push(-2.0);
        t.n_node_samples.push(sample.len() as u64);
        if depth >= self.max_depth || sample.len() < 2 {
            return id;
        }
        let Some((local, threshold)) = self.draw_split(sample, rng) else {
            return id;
        };
        let col = self.tree.features[local] as usize;
        // Partition: x <= threshold to the front.
        let mut split = 0;
        for i in 0..sample.len() {
            if (self.rows.get(sample[i] as usize, col) as f64) <= threshold {
                sample.swap(i, split);
                split += 1;
            }
        }
        let (left_rows, right_rows) = sample.split_at_mut(split);
        self.tree.feature[id] = local as i64;
        self.tree.threshold[id] = threshold;
        let l = self.node(left_rows, depth + 1, rng);
        let r = self.node(right_rows, depth + 1, rng);
        self.tree.children_left[id] = l as i64;
        self.tree.children_right[id] = r as i64;
        id
    }

    /// Draws features in random order until one is not constant in the node; returns its
    /// index in the tree's feature list and a threshold uniform in [min, max).
    fn draw_split(&self, sample: &[u32], rng: &mut Pcg64) -> Option<(usize, f64)> {
        let mut candidates: Vec<usize> = (0..self.tree.features.len()).collect();
        while !candidates.is_empty() {
            let pick = rng.random_range(0..candidates.len());
            let local = candidates.swap_remove(pick);
            let col = self.tree.features[local] as usize;
            let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
            for &r in sample {
                let x = self.rows.get(r as usize, col);
                lo = lo.min(x);
                hi = hi.max(x);
            }
            let (lo, hi) = (lo as f64, hi as f64);
            if hi - lo <= FEATURE_THRESHOLD {
                continue;
            }
            let mut threshold = lo + (hi - lo) * rng.random::<f64>();
            if threshold >= hi {
                threshold = lo;
            }
            return Some((local, threshold));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(n_estimators: usize, contamination: Contamination) -> FitParams {
        FitParams {
            n_estimators,
            max_samples: MaxSamples::Auto,
            max_features: MaxFeatures::Fraction(1.0),
            contamination,
            random_state: 7,
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// The AVX-512 path, the portable batch path and the one-row path give the same
        /// bits, for forests of any tree count (groups of 16 and a padded remainder),
        /// shallow and deep trees, rows up to the vector path's width and beyond, and
        /// rows with ties, NaN and infinities.
        #[test]
        fn every_scoring_path_gives_the_same_bits(
            n_trees in 1usize..40,
            n_features in 1usize..36,
            n_rows in 1usize..300,
            seed in 0u64..1_000_000,
            odd in proptest::collection::vec((0usize..300, 0usize..36, 0u8..4), 0..20),
        ) {
            let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let mut next = move || {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (x >> 40) as f32 / 1024.0
            };
            // Few distinct values per column: ties with thresholds and shallow leaves.
            let mut data: Vec<f32> = (0..n_rows * n_features).map(|i| (next() * (1 + i % 7) as f32).round()).collect();
            let fitted = {
                let rows = Rows { data: &data, n_features };
                let allowed: Vec<u32> = (0..n_features as u32).collect();
                fit(&rows, &allowed, &params(n_trees, Contamination::Auto), seed).0
            };
            // Values on and just above the trees' thresholds, in the columns they split.
            let splits: Vec<(usize, f32)> = fitted.trees.iter().flat_map(|t| {
                t.feature.iter().zip(&t.threshold).filter(|(f, _)| **f >= 0)
                    .map(|(f, th)| (t.features[*f as usize] as usize, crate::forest::f32_at_or_below(*th)))
            }).collect();
            for (i, row) in data.chunks_mut(n_features).enumerate() {
                if let Some(&(c, t)) = splits.get(i % 3 * i % splits.len().max(1)) {
                    row[c] = if i % 2 == 0 { t } else { t.next_up() };
                }
            }
            for (r, c, kind) in odd {
                let v = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0][kind as usize];
                data[(r % n_rows) * n_features + c % n_features] = v;
            }
            let vector = Forest::new(&fitted).unwrap().with_vector_path();
            if n_features <= 32 && crate::forest::vector_path_available() {
                proptest::prop_assert!(vector.vector_path(), "the vector path should be on here");
            }
            let portable = vector.clone().without_vector_path();
            let (mut a, mut b) = (vec![0.0; n_rows], vec![0.0; n_rows]);
            vector.score_samples_batch(&data, &mut a);
            portable.score_samples_batch(&data, &mut b);
            for (i, row) in data.chunks(n_features).enumerate() {
                let one = portable.score_samples_row(row);
                proptest::prop_assert_eq!(a[i].to_bits(), b[i].to_bits(), "row {}: vector {} portable {}", i, a[i], b[i]);
                proptest::prop_assert_eq!(one.to_bits(), b[i].to_bits(), "row {}: alone {} batch {}", i, one, b[i]);
            }
        }
    }

    #[test]
    fn one_training_row_scores_minus_one_half_and_is_not_flagged() {
        let data = [3.0f32, 4.0];
        let rows = Rows { data: &data, n_features: 2 };
        let (spec, scores) = fit(&rows, &[0, 1], &params(10, Contamination::Auto), 0);
        assert_eq!(spec.max_samples, 1);
        assert_eq!(scores, vec![-0.5]);
        let f = Forest::new(&spec).unwrap();
        assert_eq!(f.score_samples_row(&[100.0, -5.0]), -0.5);
        assert!(f.anomaly_score_row(&[3.0, 4.0]) >= 0.0);
    }

    #[test]
    fn constant_training_data_scores_minus_one_half_everywhere() {
        let data = vec![1.5f32; 50 * 3];
        let rows = Rows { data: &data, n_features: 3 };
        let (spec, _) = fit(&rows, &[0, 1, 2], &params(20, Contamination::Auto), 0);
        let f = Forest::new(&spec).unwrap();
        // every tree is one leaf of 50 rows: path c(50) = c(max_samples) -> 2^-1
        for row in [[1.5f32, 1.5, 1.5], [0.0, 9.0, -3.0]] {
            assert!((f.score_samples_row(&row) + 0.5).abs() < 1e-12);
        }
    }

    #[test]
    fn contamination_flags_the_exact_share_of_training_rows() {
        let data: Vec<f32> = (0..1000).flat_map(|i| [((i * 37) % 1000) as f32, ((i * 91) % 997) as f32]).collect();
        let rows = Rows { data: &data, n_features: 2 };
        let (spec, scores) = fit(&rows, &[0, 1], &params(50, Contamination::Fraction(0.1)), 0);
        let flagged = scores.iter().filter(|&&s| s - spec.offset < 0.0).count();
        assert_eq!(flagged, 100, "offset {} should be the 10th percentile", spec.offset);
        assert_eq!(spec.offset, percentile(&scores, 10.0));
    }

    #[test]
    fn percentile_interpolates_like_numpy() {
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.5);
        assert!((percentile(&[10.0, 0.0, 5.0], 10.0) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn max_samples_is_clamped_and_never_zero() {
        assert_eq!(MaxSamples::Count(1000).resolve(300), 300);
        assert_eq!(MaxSamples::Auto.resolve(300), 256);
        assert_eq!(MaxSamples::Auto.resolve(10), 10);
        assert_eq!(MaxSamples::Fraction(0.001).resolve(100), 1);
        assert_eq!(MaxSamples::Fraction(0.5).resolve(101), 50);
        assert_eq!(MaxSamples::parse("0.5"), Ok(MaxSamples::Fraction(0.5)));
        assert_eq!(MaxSamples::parse("64"), Ok(MaxSamples::Count(64)));
        assert!(MaxSamples::parse("0").is_err());
        assert!(MaxSamples::parse("1.5").is_err());
        assert_eq!(MaxFeatures::Fraction(0.5).resolve(24), 12);
        assert_eq!(MaxFeatures::Fraction(0.01).resolve(24), 1);
        assert_eq!(MaxFeatures::parse("1.0"), Ok(MaxFeatures::Fraction(1.0)));
        assert_eq!(MaxFeatures::parse("3"), Ok(MaxFeatures::Count(3)));
    }

    #[test]
    fn same_seed_same_forest_and_per_signal_columns_are_respected() {
        let data: Vec<f32> = (0..600).map(|i| ((i * 7919) % 613) as f32).collect();
        let rows = Rows { data: &data, n_features: 3 };
        let p = params(30, Contamination::Auto);
        let (a, _) = fit(&rows, &[0, 2], &p, 1);
        let (b, _) = fit(&rows, &[0, 2], &p, 1);
        assert_eq!(a, b);
        assert!(a.trees.iter().all(|t| t.features == vec![0, 2]));
        let depth_limit = 8; // ceil(log2(200))
        for t in &a.trees {
            assert!(t.n_node_samples[0] == 200);
            assert!(t.children_left.len() < 2usize.pow(depth_limit + 1));
        }
        let (c, _) = fit(&rows, &[0, 2], &p, 2);
        assert_ne!(a, c);
    }
}
