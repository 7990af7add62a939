//! Isolation-forest scoring with scikit-learn's semantics (Liu, Ting & Zhou 2008;
//! `sklearn/ensemble/_iforest.py`).
//!
//! A forest arrives as [`ForestSpec`]: trees in scikit-learn's own node-array shape,
//! whether they were fitted by `fad train` or read from a pickled `IsolationForest`.
//! [`Forest::new`] compiles that into one flat array per forest in which the children of
//! a node are adjacent, so that one step of a descent is `next = left + !(x <= t)` with
//! no branch; leaves loop onto themselves, so every row can take exactly `depth` steps
//! and several rows can be in flight through the same tree at once. On x86-64 with
//! AVX-512, batches of narrow rows can instead take 16 trees per vector, one row at a time
//! (several rows in flight), which cuts the cost to about a third on the bench machine;
//! whether they do is measured on a trial batch when the forest is compiled, since
//! gathers are slow on some CPUs that have AVX-512.
//!
//! Every path sums the trees' path lengths in the same order (tree `t` into partial sum
//! `t % 16`, the 16 partial sums then left to right), so a row scores to the same bit
//! alone, in a batch, with or without AVX-512.

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
/// `(nodes on the path + c(n)) - 1.0`, so that each tree's part agrees to the last bit.
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
    /// The trees in runs of [`GROUP`] for the vector path; empty when rows are wider than
    /// [`NARROW`], the nodes are wide, or the CPU has no AVX-512.
    groups: Vec<Group>,
    /// Whether batches take the vector path: it exists and was the faster of the two on a
    /// trial batch (see [`Forest::faster_path_is_vector`]).
    use_vector: bool,
}

/// Trees scored side by side in one vector, and the partial sums the path lengths
/// are kept in (tree `t` goes to sum `t % GROUP`).
const GROUP: usize = 16;

/// [`GROUP`] consecutive trees (the last run padded with a leaf worth 0): the nodes
/// of their first two levels laid out lane by lane, so that the first two steps load
/// them instead of gathering, and the steps that take every tree to a leaf.
#[derive(Clone, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86-64 vector path only
struct Group {
    /// Each lane's first [`TOP_LEVELS`] levels in heap order: root, its left and right
    /// child, their children... (below a leaf: the node before it, never taken, and
    /// the leaf itself, as a step from a leaf gives).
    top: [[Packed; GROUP]; TOP_NODES],
    depth: u32,
}

/// Levels of every group's trees that the vector path loads instead of gathering.
const TOP_LEVELS: usize = 3;
const TOP_NODES: usize = (1 << TOP_LEVELS) - 1;

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
        // A leaf worth 0 for the spare lanes of the last group.
        let zero_leaf = nodes.len() as u32;
        nodes.push(Node { threshold: f32::NAN, feature: 0, left: zero_leaf - 1 });
        leaf_value.push(0.0);
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
        let groups = match nodes {
            Nodes::Packed(_) if spec.n_features <= NARROW && vector::available() => roots
                .chunks(GROUP)
                .map(|run| {
                    let Nodes::Packed(packed) = &nodes else { unreachable!() };
                    // Heap order: node k's children are 2k+1 and 2k+2.
                    let mut at = [[0usize; GROUP]; TOP_NODES];
                    for (j, root) in at[0].iter_mut().enumerate() {
                        *root = run.get(j).map_or(zero_leaf, |r| r.0) as usize;
                    }
                    for k in 1..TOP_NODES {
                        at[k] = std::array::from_fn(|j| {
                            let parent = at[(k - 1) / 2][j];
                            (packed[parent].link >> 8) as usize + (k + 1) % 2
                        });
                    }
                    Group {
                        top: at.map(|level| level.map(|i| packed[i])),
                        depth: run.iter().map(|r| r.1).max().unwrap_or(0),
                    }
                })
                .collect(),
            _ => Vec::new(),
        };
        let mut forest = Forest {
            spec_n_features: spec.n_features,
            max_samples: spec.max_samples,
            offset: spec.offset,
            nodes,
            leaf_value,
            roots,
            norm: (denom != 0.0).then_some(denom),
            use_vector: !groups.is_empty(),
            groups,
        };
        if forest.use_vector {
            forest.use_vector = forest.faster_path_is_vector();
        }
        Ok(forest)
    }

    /// Times both paths on a trial batch and says whether the vector one was faster.
    /// Gathers are fast on some CPUs with AVX-512 and slow on others, so this is measured,
    /// not assumed; both paths give the same bits, so the choice changes only the speed.
    /// Costs well under a millisecond for 300 trees.
    fn faster_path_is_vector(&mut self) -> bool {
        const TRIAL_ROWS: usize = 96; // whole runs of both paths (8 x 12, 6 x 16)
        const ROUNDS: usize = 3;
        let w = self.spec_n_features;
        let Nodes::Packed(packed) = &self.nodes else { return false };
        // Rows made of the forest's own thresholds, so that descents spread over the trees
        // as real rows do (both paths take a fixed number of steps whatever the values).
        let mut by_feature: Vec<Vec<f32>> = vec![Vec::new(); w];
        for n in packed.iter().filter(|n| !n.threshold.is_nan()) {
            by_feature[(n.link & 0xFF) as usize].push(n.threshold);
        }
        let mut x = 0x853c_49e6_748f_ea9bu64;
        let rows: Vec<f32> = (0..TRIAL_ROWS * w)
            .map(|i| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let pool = &by_feature[i % w];
                if pool.is_empty() { 0.0 } else { pool[(x >> 33) as usize % pool.len()] }
            })
            .collect();
        let mut out = vec![0.0; TRIAL_ROWS];
        let (mut vector, mut portable) = (std::time::Duration::MAX, std::time::Duration::MAX);
        for _ in 0..ROUNDS {
            for use_vector in [true, false] {
                self.use_vector = use_vector;
                let t = std::time::Instant::now();
                self.score_samples_batch(std::hint::black_box(&rows), &mut out);
                let took = t.elapsed();
                let best = if use_vector { &mut vector } else { &mut portable };
                *best = (*best).min(took);
            }
        }
        vector < portable
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
        if self.use_vector {
            self.vector_totals(rows, out);
        } else {
            for (chunk_rows, chunk_tot) in rows.chunks(w * LANES).zip(out.chunks_mut(LANES)) {
                match &self.nodes {
                    Nodes::Packed(n) if w <= NARROW => self.lanes_narrow::<LANES>(n, chunk_rows, chunk_tot),
                    Nodes::Packed(n) => self.lanes_total::<LANES, _>(n, chunk_rows, chunk_tot),
                    Nodes::Wide(n) => self.lanes_total::<LANES, _>(n, chunk_rows, chunk_tot),
                }
            }
        }
        for o in out.iter_mut() {
            *o = self.path_to_score(*o);
        }
    }

    /// Turns the vector path off, so that the portable one can be checked against it
    /// (tests) and timed beside it (`examples/forest_loop`).
    #[doc(hidden)]
    pub fn without_vector_path(mut self) -> Forest {
        self.use_vector = false;
        self
    }

    /// Turns the vector path on where it exists, whichever path was faster on the trial
    /// batch (tests check it against the portable one).
    #[doc(hidden)]
    pub fn with_vector_path(mut self) -> Forest {
        self.use_vector = !self.groups.is_empty();
        self
    }

    /// Whether batches take the AVX-512 path.
    pub fn vector_path(&self) -> bool {
        self.use_vector
    }

    /// Total path lengths of `rows` by the AVX-512 path: [`ROWS_IN_FLIGHT`] rows at a
    /// time, and a short tail (a stream's micro-batch of one or two rows, say) in runs of
    /// 4 or 1, so that few lanes are spent on padding.
    fn vector_totals(&self, rows: &[f32], totals: &mut [f64]) {
        const R: usize = vector::ROWS_IN_FLIGHT;
        let w = self.spec_n_features;
        let mut done = 0;
        while done < totals.len() {
            let k = totals.len() - done;
            let run = if k >= R - 2 {
                R
            } else if k >= 2 {
                4
            } else {
                1
            };
            let (rows, totals) = (&rows[done * w..], &mut totals[done..]);
            done += match run {
                R => self.vector_run::<R>(rows, totals),
                4 => self.vector_run::<4>(rows, totals),
                _ => self.vector_run::<1>(rows, totals),
            };
        }
    }

    /// Scores the first `N` rows of `rows` (fewer if there are fewer, the last repeated in
    /// the spare lanes) into `totals`; returns how many it scored.
    fn vector_run<const N: usize>(&self, rows: &[f32], totals: &mut [f64]) -> usize {
        let Nodes::Packed(nodes) = &self.nodes else { unreachable!("groups are built for packed nodes only") };
        let w = self.spec_n_features;
        let k = totals.len().min(N);
        // Rows padded to NARROW with zeros (never read: every feature index is below w).
        let mut buf = [[0f32; NARROW]; N];
        for (r, b) in buf.iter_mut().enumerate() {
            let at = r.min(k - 1) * w;
            b[..w].copy_from_slice(&rows[at..at + w]);
        }
        let mut sums = [[0f64; GROUP]; N];
        // SAFETY: `groups` is only filled when the CPU has AVX-512F; every root and every
        // node reachable from it is in `nodes`, leaves step onto themselves and feature
        // indices are below w <= NARROW (all checked in `new`).
        unsafe { vector::lane_sums(nodes, &self.leaf_value, &self.groups, &buf, &mut sums) };
        for (t, s) in totals[..k].iter_mut().zip(&sums) {
            *t = fold_lanes(s);
        }
        k
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
        let mut sums = [[0.0f64; GROUP]; L];
        for (t, &(root, depth)) in self.roots.iter().enumerate() {
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
                s[t % GROUP] += self.leaf_value[i];
            }
        }
        for (t, s) in totals.iter_mut().zip(&sums) {
            *t = fold_lanes(s);
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
        let mut sums = [[0.0f64; GROUP]; L];
        for (t, &(root, depth)) in self.roots.iter().enumerate() {
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
                s[t % GROUP] += self.leaf_value[i];
            }
        }
        for (t, s) in totals.iter_mut().zip(&sums) {
            *t = fold_lanes(s);
        }
    }

    /// `decision_function`: `score_samples - offset`; negative means anomalous.
    pub fn anomaly_score_row(&self, row: &[f32]) -> f64 {
        self.score_samples_row(row) - self.offset
    }
}

/// Whether this CPU (and the environment: `FAD_NO_AVX512`) lets forests of rows up to
/// [`NARROW`] features take the vector path.
pub fn vector_path_available() -> bool {
    vector::available()
}

/// The total path length from the [`GROUP`] partial sums, in the one order every path uses.
fn fold_lanes(sums: &[f64; GROUP]) -> f64 {
    sums.iter().fold(0.0, |total, &s| total + s)
}

/// The AVX-512 path: 16 trees of a [`Group`] per vector, one row per vector, and
/// [`ROWS_IN_FLIGHT`] rows at once so that the gathers of one hide the latency of another.
/// A step is two gathers of 8 nodes (8 bytes each: threshold and link), two permutes that
/// split them into 16 thresholds and 16 links, one permute that picks each tree's feature
/// from the row held in two registers, a compare and a masked add.
#[cfg(target_arch = "x86_64")]
mod vector {
    use super::{GROUP, Group, NARROW, Packed, TOP_LEVELS};
    use std::arch::x86_64::*;

    pub const ROWS_IN_FLIGHT: usize = 12;

    pub fn available() -> bool {
        std::env::var_os("FAD_NO_AVX512").is_none() && is_x86_feature_detected!("avx512f")
    }

    /// Adds up, per row of `rows` and per lane, the path lengths of the trees in `groups`:
    /// `sums[r][j]` is the sum over groups, in order, of lane `j`'s leaf value.
    ///
    /// # Safety
    /// The CPU has AVX-512F; every root in `groups` indexes `nodes`, and `depth` steps
    /// from it end on a leaf; every node's feature index is below `NARROW`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn lane_sums<const R: usize>(
        nodes: &[Packed],
        leaf_value: &[f64],
        groups: &[Group],
        rows: &[[f32; NARROW]; R],
        sums: &mut [[f64; GROUP]; R],
    ) {
        const { assert!(NARROW == 32 && GROUP == 16 && TOP_LEVELS == 3) };
        // A Packed node is 8 bytes: the threshold, then the link (left << 8 | feature).
        let packed = nodes.as_ptr() as *const i64;
        // SAFETY (whole body): the caller's promises above; gathers read only nodes that
        // are reachable, and leaf values of the nodes the descent ends on.
        unsafe {
            let lo: [__m512; R] = std::array::from_fn(|r| _mm512_loadu_ps(rows[r].as_ptr()));
            let hi: [__m512; R] = std::array::from_fn(|r| _mm512_loadu_ps(rows[r].as_ptr().add(16)));
            let mut acc_lo = [_mm512_setzero_pd(); R];
            let mut acc_hi = [_mm512_setzero_pd(); R];
            let one = _mm512_set1_epi32(1);
            let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            for g in groups {
                // The first TOP_LEVELS steps read the group's top levels from `top`:
                // per heap position, the threshold and link of 16 nodes, split out of
                // their 8-byte pairs.
                let split = |nodes: &[Packed; GROUP]| {
                    let first = _mm512_loadu_si512(nodes.as_ptr() as *const _);
                    let second = _mm512_loadu_si512(nodes.as_ptr().add(8) as *const _);
                    (
                        _mm512_castsi512_ps(_mm512_permutex2var_epi32(first, evens, second)),
                        _mm512_permutex2var_epi32(first, odds, second),
                    )
                };
                let top = g.top.each_ref().map(split);
                let mut idx = [_mm512_setzero_si512(); R];
                for (i, (lo, hi)) in idx.iter_mut().zip(lo.iter().zip(&hi)) {
                    // The top levels in heap order: a lane's choices so far pick its
                    // node by blends (newest choice between siblings first), not by a
                    // gather.
                    let blend = |c: __mmask16, (tl, ll): (__m512, __m512i), (tr, lr): (__m512, __m512i)| {
                        (_mm512_mask_blend_ps(c, tl, tr), _mm512_mask_blend_epi32(c, ll, lr))
                    };
                    let step = |(threshold, link): (__m512, __m512i)| {
                        let x = _mm512_permutex2var_ps(*lo, link, *hi);
                        _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(x, threshold)
                    };
                    let a = step(top[0]);
                    let b = step(blend(a, top[1], top[2]));
                    let level2 = blend(a, blend(b, top[3], top[4]), blend(b, top[5], top[6]));
                    let c = step(level2);
                    let left = _mm512_srli_epi32::<8>(level2.1);
                    *i = _mm512_mask_add_epi32(left, c, left, one);
                }
                // Leaves step onto themselves, so TOP_LEVELS steps are no harm to a
                // group shallower than that.
                for _ in TOP_LEVELS as u32..g.depth {
                    for (i, (lo, hi)) in idx.iter_mut().zip(lo.iter().zip(&hi)) {
                        let first = _mm512_i32gather_epi64::<8>(_mm512_castsi512_si256(*i), packed);
                        let second = _mm512_i32gather_epi64::<8>(_mm512_extracti64x4_epi64::<1>(*i), packed);
                        let threshold = _mm512_castsi512_ps(_mm512_permutex2var_epi32(first, evens, second));
                        let link = _mm512_permutex2var_epi32(first, odds, second);
                        // The permute reads the low 5 bits of the link: the feature.
                        let x = _mm512_permutex2var_ps(*lo, link, *hi);
                        let right = _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(x, threshold);
                        let left = _mm512_srli_epi32::<8>(link);
                        *i = _mm512_mask_add_epi32(left, right, left, one);
                    }
                }
                for r in 0..R {
                    let first = _mm512_castsi512_si256(idx[r]);
                    let second = _mm512_extracti64x4_epi64::<1>(idx[r]);
                    acc_lo[r] = _mm512_add_pd(acc_lo[r], _mm512_i32gather_pd::<8>(first, leaf_value.as_ptr()));
                    acc_hi[r] = _mm512_add_pd(acc_hi[r], _mm512_i32gather_pd::<8>(second, leaf_value.as_ptr()));
                }
            }
            for r in 0..R {
                _mm512_storeu_pd(sums[r].as_mut_ptr(), acc_lo[r]);
                _mm512_storeu_pd(sums[r].as_mut_ptr().add(8), acc_hi[r]);
            }
        }
    }
}

/// Elsewhere there is no vector path: `groups` stays empty and this is never called.
#[cfg(not(target_arch = "x86_64"))]
mod vector {
    use super::{GROUP, Group, NARROW, Packed};

    pub const ROWS_IN_FLIGHT: usize = 12;

    pub fn available() -> bool {
        false
    }

    pub unsafe fn lane_sums<const R: usize>(
        _: &[Packed],
        _: &[f64],
        _: &[Group],
        _: &[[f32; NARROW]; R],
        _: &mut [[f64; GROUP]; R],
    ) {
        unreachable!("no vector path on this architecture")
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
