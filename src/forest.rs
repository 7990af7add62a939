//! Isolation-forest scoring with scikit-learn's semantics (Liu, Ting & Zhou 2008;
//! `sklearn/ensemble/_iforest.py`).
//!
//! A forest arrives as [`ForestSpec`]: trees in scikit-learn's own node-array shape,
//! whether they were fitted by `fad train` or read from a pickled `IsolationForest`.
//! [`Forest::new`] compiles that into one flat array per forest in which the children of
//! a node are adjacent, so that one step of a descent is `next = left + !(x <= t)` with
//! no branch; leaves loop onto themselves, so every row can take exactly `depth` steps
//! and several rows can be in flight through the same tree at once.

use serde::{Deserialize, Serialize};

/// Euler–Mascheroni constant, as used by scikit-learn's `_average_path_length`.
pub const EULER_GAMMA: f64 = 0.577_215_664_901_532_9;

/// Average path length of an unsuccessful search in a binary search tree of `n` nodes,
/// `c(n)` in the paper: the expected depth still to go below a leaf holding `n` rows.
pub fn average_path_length(n: f64) -> f64 {
    if n <= 1.0 {
        0.0
    } else if n <= 2.0 {
        1.0
    } else {
        2.0 * ((n - 1.0).ln() + EULER_GAMMA) - 2.0 * (n - 1.0) / n
    }
}

/// Path length credited for a row that ends in a leaf at `depth` (root 0) holding `n`
/// training rows: depth + c(n), evaluated as scikit-learn evaluates it,
/// `(nodes on the path + c(n)) - 1.0`, so that sums over trees agree to the last bit.
pub fn sklearn_leaf_path(depth: u32, n: u64) -> f64 {
    (depth as f64 + 1.0 + average_path_length(n as f64)) - 1.0
}

/// One tree in scikit-learn's `Tree` layout: node arrays indexed by node id, `-1`
/// children at leaves; `feature` indexes `features` (the tree's feature subset).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TreeSpec {
    /// Columns of the full feature row this tree sees (`estimators_features_`).
    pub features: Vec<u32>,
    pub children_left: Vec<i64>,
    pub children_right: Vec<i64>,
    pub feature: Vec<i64>,
    pub threshold: Vec<f64>,
    pub n_node_samples: Vec<u64>,
}

/// A fitted isolation forest, independent of where it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ForestSpec {
    /// Width of the feature rows the forest scores.
    pub n_features: usize,
    /// `max_samples_`: rows each tree was grown on; normalises path lengths.
    pub max_samples: usize,
    /// `offset_`: `anomaly_score = score_samples - offset`.
    pub offset: f64,
    pub trees: Vec<TreeSpec>,
}

/// A node of the compiled forest. Internal: go to `left` when `x[feature] <= threshold`,
/// else to `left + 1`. Leaf: `threshold` is NaN, so that `!(x <= threshold)` holds for
/// every `x` (NaN and infinities included), and `left` is the node just before it, so a
/// step from a leaf always lands on the leaf itself and further steps stay put.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
struct Node {
    threshold: f32,
    feature: u32,
    left: u32,
}

/// The same node in 8 bytes, used when every feature index fits in 8 bits and every node
/// index in 24: `link` is `left << 8 | feature`. Half the loads of [`Node`] per step.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
struct Packed {
    threshold: f32,
    link: u32,
}

/// One descent step from node `i` for the row at `row`, in a layout.
trait Step: Copy {
    /// # Safety
    /// `i` is a node index of the forest and `row` points at a full feature row.
    unsafe fn step(nodes: &[Self], i: usize, row: *const f32) -> usize;
}

impl Step for Node {
    #[inline(always)]
    unsafe fn step(nodes: &[Node], i: usize, row: *const f32) -> usize {
        // SAFETY: the caller passes a valid node index; features were checked against the
        // row width when the forest was compiled.
        unsafe {
            let n = *nodes.get_unchecked(i);
            let x = *row.add(n.feature as usize);
            n.left as usize + !(x <= n.threshold) as usize
        }
    }
}

impl Step for Packed {
    #[inline(always)]
    unsafe fn step(nodes: &[Packed], i: usize, row: *const f32) -> usize {
        // SAFETY: as for `Node`.
        unsafe {
            let n = *nodes.get_unchecked(i);
            let x = *row.add((n.link & 0xFF) as usize);
            (n.link >> 8) as usize + !(x <= n.threshold) as usize
        }
    }
}

#[derive(Clone, Debug)]
enum Nodes {
    Packed(Vec<Packed>),
    Wide(Vec<Node>),
}

/// A forest compiled for fast scoring. Thresholds are stored as the largest `f32` not
/// above scikit-learn's `f64` threshold, so comparing an `f32` feature against it gives
/// exactly the same side as scikit-learn's `(double) x <= threshold`.
#[derive(Clone, Debug)]
pub struct Forest {
    spec_n_features: usize,
    max_samples: usize,
    offset: f64,
    nodes: Nodes,
    /// Path length credited on reaching each node as a leaf: depth + c(n_node_samples).
    leaf_value: Vec<f64>,
    /// Root node index and number of steps (tree depth) of every tree.
    roots: Vec<(u32, u32)>,
    /// n_trees * c(max_samples); None when that is 0 (one training row), where
    /// scikit-learn takes the normalised path as 1, i.e. a score of -0.5.
    norm: Option<f64>,
}

/// Rows in flight per tree during batch scoring.
const LANES: usize = 16;
/// Rows at most this wide take the fixed-stride path of batch scoring.
const NARROW: usize = 32;

impl Forest {
    /// Checks a spec and compiles it. Errors name the tree and node that is inconsistent.
    pub fn new(spec: &ForestSpec) -> Result<Forest, String> {
        if spec.n_features == 0 {
            return Err("a forest needs at least one feature column".into());
        }
        if spec.trees.is_empty() {
            // It would score every row 0 (an empty mean path), silently.
            return Err("the forest has no trees".into());
        }
        if spec.max_samples == 0 {
            // No tree grows on 0 rows (scikit-learn draws at least 1); it would score 0 too.
            return Err("max_samples is 0: every tree is grown on at least one row".into());
        }
        // Node 0 is padding, so that every leaf has a node before it to point `left` at.
        let mut nodes = vec![Node { threshold: f32::NAN, feature: 0, left: 0 }];
        let mut leaf_value = vec![f64::NAN];
        let mut roots = Vec::with_capacity(spec.trees.len());
        for (t, tree) in spec.trees.iter().enumerate() {
            let n = tree.children_left.len();
            if n == 0
                || tree.children_right.len() != n
                || tree.feature.len() != n
                || tree.threshold.len() != n
                || tree.n_node_samples.len() != n
            {
                return Err(format!("tree {t}: node arrays are empty or of unequal length"));
            }
            for &f in &tree.features {
                if f as usize >= spec.n_features {
                    return Err(format!(
                        "tree {t}: uses feature column {f} but rows have {} features",
                        spec.n_features
                    ));
                }
            }
            let base = nodes.len();
            // Breadth-first renumbering so that the two children of a node are adjacent.
            let mut order: Vec<(usize, u32)> = vec![(0, 0)]; // (spec node id, depth)
            let mut max_depth = 0u32;
            let mut i = 0;
            while i < order.len() {
                let (id, depth) = order[i];
                if order.len() > n {
                    return Err(format!("tree {t}: node graph is not a tree"));
                }
                let l = tree.children_left[id];
                let r = tree.children_right[id];
                if l >= 0 || r >= 0 {
                    if l < 0 || r < 0 || l as usize >= n || r as usize >= n {
                        return Err(format!("tree {t} node {id}: child index out of range"));
                    }
                    let f = tree.feature[id];
                    if f < 0 || f as usize >= tree.features.len() {
                        return Err(format!("tree {t} node {id}: feature {f} out of range"));
                    }
                    order.push((l as usize, depth + 1));
                    order.push((r as usize, depth + 1));
                }
                max_depth = max_depth.max(depth);
                i += 1;
            }
            // Second pass: children of the k-th internal node in `order` sit at the positions
            // they were pushed to, which are adjacent by construction.
            let mut next_child = 1usize;
            for &(id, depth) in &order {
                let l = tree.children_left[id];
                if l >= 0 {
                    let f = tree.features[tree.feature[id] as usize];
                    nodes.push(Node {
                        threshold: f32_at_or_below(tree.threshold[id]),
                        feature: f,
                        left: (base + next_child) as u32,
                    });
                    leaf_value.push(f64::NAN);
                    next_child += 2;
                } else {
                    let me = nodes.len() as u32;
                    nodes.push(Node { threshold: f32::NAN, feature: 0, left: me - 1 });
                    leaf_value.push(sklearn_leaf_path(depth, tree.n_node_samples[id]));
                }
            }
            roots.push((base as u32, max_depth));
        }
        if nodes.len() > u32::MAX as usize / 2 {
            return Err(format!("the forest has {} nodes, too many to index", nodes.len()));
        }
        let nodes = if spec.n_features <= 256 && nodes.len() < 1 << 24 {
            Nodes::Packed(
                nodes.iter().map(|n| Packed { threshold: n.threshold, link: n.left << 8 | n.feature }).collect(),
            )
        } else {
            Nodes::Wide(nodes)
        };
        let denom = spec.trees.len() as f64 * average_path_length(spec.max_samples as f64);
        Ok(Forest {
            spec_n_features: spec.n_features,
            max_samples: spec.max_samples,
            offset: spec.offset,
            nodes,
            leaf_value,
            roots,
            norm: (denom != 0.0).then_some(denom),
        })
    }

    pub fn n_features(&self) -> usize {
        self.spec_n_features
    }
    pub fn n_trees(&self) -> usize {
        self.roots.len()
    }
    pub fn offset(&self) -> f64 {
        self.offset
    }
    pub fn max_samples(&self) -> usize {
        self.max_samples
    }
    pub fn set_offset(&mut self, offset: f64) {
        self.offset = offset;
    }

    /// Sum over trees of the path length of one row.
    fn total_path(&self, row: &[f32]) -> f64 {
        assert_eq!(row.len(), self.spec_n_features, "a row has one value per feature");
        let mut total = [0.0];
        match &self.nodes {
            Nodes::Packed(n) => self.lanes_total::<1, _>(n, row, &mut total),
            Nodes::Wide(n) => self.lanes_total::<1, _>(n, row, &mut total),
        }
        total[0]
    }

    fn path_to_score(&self, total_path: f64) -> f64 {
        match self.norm {
            Some(denom) => -(2f64.powf(-(total_path / denom))),
            None => -0.5,
        }
    }

    /// scikit-learn's `score_samples` for one row (higher is more normal, in [-1, 0]).
    pub fn score_samples_row(&self, row: &[f32]) -> f64 {
        debug_assert_eq!(row.len(), self.spec_n_features);
        self.path_to_score(self.total_path(row))
    }

    /// `score_samples` of `rows` (row-major, `n_features` wide) into `out`.
    pub fn score_samples_batch(&self, rows: &[f32], out: &mut [f64]) {
        let w = self.spec_n_features;
        assert_eq!(rows.len(), out.len() * w, "rows and out disagree on the row count");
        out.fill(0.0);
        for (chunk_rows, chunk_tot) in rows.chunks(w * LANES).zip(out.chunks_mut(LANES)) {
            match &self.nodes {
                Nodes::Packed(n) if w <= NARROW => self.lanes_narrow::<LANES>(n, chunk_rows, chunk_tot),
                Nodes::Packed(n) => self.lanes_total::<LANES, _>(n, chunk_rows, chunk_tot),
                Nodes::Wide(n) => self.lanes_total::<LANES, _>(n, chunk_rows, chunk_tot),
            }
        }
        for o in out.iter_mut() {
            *o = self.path_to_score(*o);
        }
    }

    /// [`lanes_total`](Self::lanes_total) for rows of at most [`NARROW`] features: the rows
    /// are first copied to a buffer with a fixed stride, so that a lane's row is at a
    /// constant offset and a step needs no row pointer (fewer loads, fewer registers).
    fn lanes_narrow<const L: usize>(&self, nodes: &[Packed], rows: &[f32], totals: &mut [f64]) {
        let w = self.spec_n_features;
        let k = totals.len();
        assert!(k >= 1 && k <= L && w <= NARROW && rows.len() == k * w, "rows and totals disagree");
        let mut buf = [[0f32; NARROW]; L];
        for (lane, b) in buf.iter_mut().enumerate() {
            let r = lane.min(k - 1) * w;
            b[..w].copy_from_slice(&rows[r..r + w]);
        }
        let mut sums = [0.0f64; L];
        for &(root, depth) in &self.roots {
            let mut idx = [root as usize; L];
            for _ in 0..depth {
                for (i, row) in idx.iter_mut().zip(&buf) {
                    // SAFETY: indices start at a root and every step leads to a child or
                    // stays on a leaf (checked in `new`); every feature index is below
                    // `w`, which is at most NARROW.
                    *i = unsafe {
                        let n = *nodes.get_unchecked(*i);
                        let x = *row.get_unchecked((n.link & 0xFF) as usize);
                        (n.link >> 8) as usize + !(x <= n.threshold) as usize
                    };
                }
            }
            for (s, &i) in sums.iter_mut().zip(&idx) {
                *s += self.leaf_value[i];
            }
        }
        for (t, s) in totals.iter_mut().zip(sums) {
            *t += s;
        }
    }

    /// Descends up to `L` rows (row-major in `rows`, one total each) through every tree
    /// together: the independent loads of the rows overlap, which is where the speed comes
    /// from. A short chunk repeats its last row in the spare lanes, so the lane loop always
    /// has the same length and unrolls.
    fn lanes_total<const L: usize, N: Step>(&self, nodes: &[N], rows: &[f32], totals: &mut [f64]) {
        let w = self.spec_n_features;
        let k = totals.len();
        assert!(k >= 1 && k <= L && rows.len() == k * w, "rows and totals disagree on the row count");
        let base = rows.as_ptr();
        // SAFETY: lane rows are within `rows` (checked just above).
        let lane_rows: [*const f32; L] = std::array::from_fn(|lane| unsafe { base.add(lane.min(k - 1) * w) });
        let mut sums = [0.0f64; L];
        for &(root, depth) in &self.roots {
            let mut idx = [root as usize; L];
            for _ in 0..depth {
                for (i, &row) in idx.iter_mut().zip(&lane_rows) {
                    // SAFETY: indices start at a root and every step leads to a child or
                    // stays on a leaf (checked in `new`); rows are `w` wide and every
                    // feature index is below `w`.
                    *i = unsafe { N::step(nodes, *i, row) };
                }
            }
            for (s, &i) in sums.iter_mut().zip(&idx) {
                *s += self.leaf_value[i];
            }
        }
        for (t, s) in totals.iter_mut().zip(sums) {
            *t += s;
        }
    }

    /// `decision_function`: `score_samples - offset`; negative means anomalous.
    pub fn anomaly_score_row(&self, row: &[f32]) -> f64 {
        self.score_samples_row(row) - self.offset
    }
}

/// The largest f32 that is <= `t` (for comparisons `x <= t` with f32 `x`, identical
/// outcome to comparing in f64).
pub fn f32_at_or_below(t: f64) -> f32 {
    if t.is_nan() {
        return f32::NAN;
    }
    let f = t as f32;
    if (f as f64) > t { f.next_down() } else { f }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_of_n_matches_the_formula() {
        assert_eq!(average_path_length(0.0), 0.0);
        assert_eq!(average_path_length(1.0), 0.0);
        assert_eq!(average_path_length(2.0), 1.0);
        let c3 = 2.0 * (2f64.ln() + EULER_GAMMA) - 2.0 * 2.0 / 3.0;
        assert!((average_path_length(3.0) - c3).abs() < 1e-15);
        assert!((average_path_length(3.0) - 1.207_392_357_589_622_5).abs() < 1e-12);
        let c256 = 2.0 * (255f64.ln() + EULER_GAMMA) - 2.0 * 255.0 / 256.0;
        assert!((average_path_length(256.0) - c256).abs() < 1e-12);
        assert!((average_path_length(256.0) - 10.244_770_920_116_851).abs() < 1e-9);
    }

    #[test]
    fn f32_rounding_never_moves_a_threshold_up() {
        for t in [0.1f64, 133.401979, -2.5, 1e-30, 123456789.123, -0.3] {
            let f = f32_at_or_below(t);
            assert!((f as f64) <= t);
            assert!((f.next_up() as f64) > t);
        }
    }

    fn stump(threshold: f64) -> ForestSpec {
        // root splits feature 0 at `threshold`; left leaf holds 1 row, right leaf 3 rows
        ForestSpec {
            n_features: 1,
            max_samples: 4,
            offset: -0.5,
            trees: vec![TreeSpec {
                features: vec![0],
                children_left: vec![1, -1, -1],
                children_right: vec![2, -1, -1],
                feature: vec![0, -2, -2],
                threshold: vec![threshold, -2.0, -2.0],
                n_node_samples: vec![4, 1, 3],
            }],
        }
    }

    #[test]
    fn equal_to_threshold_goes_left() {
        let f = Forest::new(&stump(1.5)).unwrap();
        let c4 = average_path_length(4.0);
        let left = -(2f64.powf(-(1.0 + 0.0) / c4));
        let right = -(2f64.powf(-(1.0 + average_path_length(3.0)) / c4));
        assert_eq!(f.score_samples_row(&[1.5]), left);
        assert_eq!(f.score_samples_row(&[1.4]), left);
        assert_eq!(f.score_samples_row(&[1.6]), right);
        let mut out = [0.0; 3];
        f.score_samples_batch(&[1.5, 1.6, 1.4], &mut out);
        assert_eq!(out, [left, right, left]);
    }

    #[test]
    fn malformed_trees_are_refused() {
        let mut s = stump(1.0);
        s.trees[0].children_left[0] = 7;
        assert!(Forest::new(&s).is_err());
        let mut s = stump(1.0);
        s.trees[0].features = vec![3];
        assert!(Forest::new(&s).is_err());
        let mut s = stump(1.0);
        s.trees[0].children_left = vec![0, -1, -1];
        s.trees[0].children_right = vec![0, -1, -1];
        assert!(Forest::new(&s).is_err());
        let mut s = stump(1.0);
        s.trees.clear();
        assert_eq!(Forest::new(&s).unwrap_err(), "the forest has no trees");
        let mut s = stump(1.0);
        s.max_samples = 0;
        assert!(Forest::new(&s).unwrap_err().starts_with("max_samples is 0"));
        s.max_samples = 1;
        assert!(Forest::new(&s).is_ok(), "one training row is a forest (scores -0.5)");
    }
}
