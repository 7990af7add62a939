//! Import of pickled scikit-learn IsolationForest models (`model_if.pkl`).
//!
//! [`crate::pickle`] turns the file into an inert value tree; this module reads the
//! fitted state out of it, the way scikit-learn's `score_samples` uses it:
//! - `estimators_`: `ExtraTreeRegressor`s, each with a `tree_` whose `nodes` array holds
//!   the node records (7 fields before scikit-learn 1.3, 8 since: `missing_go_to_left`
//!   was added; fields are read by name and offset, so either layout loads);
//! - `estimators_features_`: the columns each tree sees, which scikit-learn only applies
//!   when `_max_features` is less than `n_features_in_` (otherwise every tree scores the
//!   full row, whatever the list says);
//! - `_max_samples` (= `max_samples_`), which normalises path lengths, and `offset_`.
//!
//! The result is a [`ForestSpec`], compiled by the same [`crate::forest::Forest`] that
//! scores the forests `fad train` makes.

use crate::forest::{ForestSpec, TreeSpec};
use crate::pickle::{self, DTYPE, EXTRA_TREE, FROMBUFFER, ISOLATION_FOREST, JOBLIB_ARRAY, Obj, Pickle, RECONSTRUCT};
use crate::pickle::{SCALAR, TREE, Value};
use anyhow::{Context, Result, anyhow};
use std::path::Path;

/// Pickles above this size are refused before they are read (a 300-tree forest is a few MB).
pub const MAX_PICKLE_BYTES: u64 = 1 << 30;

/// Said when a pickle asks its reader for more work than its size allows (shared objects
/// referenced over and over): no real IsolationForest pickle does that.
const TOO_BIG: &str = "refers to its objects more often than a pickled IsolationForest does (refusing to expand it)";

/// The widest feature rows an imported forest may have (fad's feature sets have 24 or so).
const MAX_FEATURES: usize = 1 << 16;

/// A forest read from a pickle, with what the pickle says about where it came from.
#[derive(Clone, Debug)]
pub struct Imported {
    pub spec: ForestSpec,
    /// `feature_names_in_`: present when the forest was fitted on a pandas DataFrame.
    pub feature_names: Option<Vec<String>>,
    /// `_sklearn_version`: the scikit-learn that pickled it.
    pub sklearn_version: Option<String>,
}

/// Reads the forest of a pickled `sklearn.ensemble.IsolationForest`.
pub fn load_forest_spec(path: &Path) -> Result<ForestSpec> {
    Ok(import(path)?.spec)
}

/// Reads a pickled `IsolationForest`. Errors are one sentence naming the file.
pub fn import(path: &Path) -> Result<Imported> {
    let len = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
    if len > MAX_PICKLE_BYTES {
        return Err(anyhow!(
            "{}: {len} bytes is more than a pickled IsolationForest can plausibly hold (the limit is {} bytes)",
            path.display(),
            MAX_PICKLE_BYTES
        ));
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    import_bytes(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Reads a pickled `IsolationForest` from memory. The error is one sentence without the
/// file name ("truncated pickle (...)", "refusing global os.system: ...").
pub fn import_bytes(bytes: &[u8]) -> std::result::Result<Imported, String> {
    if bytes.is_empty() {
        return Err("is empty, not a pickle".into());
    }
    if let Some(kind) = compression(bytes) {
        return Err(format!(
            "is a {kind}-compressed file, not a plain pickle (save the model with pickle.dump, or with \
             joblib.dump without compress)"
        ));
    }
    if bytes[0] != 0x80 {
        return Err("is not a pickle of protocol 2 to 5 (it does not start with a PROTO opcode)".into());
    }
    let p = pickle::parse(bytes).map_err(|e| e.0)?;
    forest(&p)
}

fn compression(bytes: &[u8]) -> Option<&'static str> {
    let starts = |m: &[u8]| bytes.starts_with(m);
    if starts(b"\x1f\x8b") {
        Some("gzip")
    } else if bytes.len() >= 2 && bytes[0] == 0x78 && matches!(bytes[1], 0x01 | 0x5e | 0x9c | 0xda) {
        Some("zlib")
    } else if starts(b"BZh") {
        Some("bz2")
    } else if starts(b"\xfd7zXZ\x00") {
        Some("xz")
    } else if starts(b"\x04\x22\x4d\x18") {
        Some("lz4")
    } else if starts(b"ZF") {
        Some("joblib zlib")
    } else {
        None
    }
}

/// The scalar type of a numpy dtype, or a structured record of named fields.
#[derive(Clone, Debug, PartialEq)]
pub struct Dtype {
    /// numpy's kind character: b'i', b'u', b'f', b'b', b'O', b'V', ...
    pub kind: u8,
    /// Item size in bytes.
    pub size: usize,
    pub big_endian: bool,
    /// Fields of a structured dtype (empty otherwise).
    pub fields: Vec<Field>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Field {
    pub name: String,
    pub dtype: Dtype,
    pub offset: usize,
}

impl Dtype {
    fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// The value at `bytes[..size]` as an integer, if this is an integer or bool type.
    fn int_at(&self, bytes: &[u8]) -> Option<i64> {
        let b = bytes.get(..self.size)?;
        let mut buf = [0u8; 8];
        let n = self.size;
        if !(matches!(self.kind, b'i' | b'u' | b'b') && matches!(n, 1 | 2 | 4 | 8)) {
            return None;
        }
        if self.big_endian {
            for (i, &x) in b.iter().rev().enumerate() {
                buf[i] = x;
            }
        } else {
            buf[..n].copy_from_slice(b);
        }
        let raw = u64::from_le_bytes(buf);
        Some(if self.kind == b'i' {
            let shift = 64 - 8 * n as u32;
            ((raw << shift) as i64) >> shift
        } else if n == 8 {
            i64::try_from(raw).ok()?
        } else {
            raw as i64
        })
    }

    /// The value at `bytes[..size]` as a float, if this is a float or integer type.
    fn float_at(&self, bytes: &[u8]) -> Option<f64> {
        let b = bytes.get(..self.size)?;
        match (self.kind, self.size) {
            (b'f', 8) => {
                let a: [u8; 8] = b.try_into().ok()?;
                Some(if self.big_endian { f64::from_be_bytes(a) } else { f64::from_le_bytes(a) })
            }
            (b'f', 4) => {
                let a: [u8; 4] = b.try_into().ok()?;
                Some(if self.big_endian { f32::from_be_bytes(a) } else { f32::from_le_bytes(a) } as f64)
            }
            _ => self.int_at(b).map(|v| v as f64),
        }
    }
}

/// Reads a `numpy.dtype` value (its constructor arguments and `__setstate__` tuple).
pub fn dtype(p: &Pickle, v: Value) -> std::result::Result<Dtype, String> {
    dtype_at(p, v, 0)
}

fn dtype_at(p: &Pickle, v: Value, depth: u32) -> std::result::Result<Dtype, String> {
    let Some(Obj::Instance { class, args, state, .. }) = p.obj(v) else {
        return Err(format!("a dtype that is {}", p.describe(v)));
    };
    if *class != DTYPE || depth > 8 {
        return Err(format!("a dtype that is {class}"));
    }
    let typestr = p.args(*args).first().and_then(|a| p.str(*a)).ok_or("a dtype without its type string")?;
    let mut t = typestr.as_bytes();
    let mut big_endian = false;
    if let Some((&c, rest)) = t.split_first()
        && matches!(c, b'<' | b'>' | b'=' | b'|')
    {
        big_endian = c == b'>';
        t = rest;
    }
    let (&kind, digits) = t.split_first().ok_or("an empty dtype string")?;
    let mut size: usize = std::str::from_utf8(digits).ok().and_then(|d| d.parse().ok()).unwrap_or(0);
    if kind == b'U' {
        size = size.saturating_mul(4);
    }
    let mut fields = Vec::new();
    if let Some(state) = state {
        let items = p.items(*state).ok_or("a dtype whose state is not a tuple")?;
        if !(7..=9).contains(&items.len()) {
            return Err(format!("a dtype state of {} items (numpy writes 8 or 9)", items.len()));
        }
        match p.str(items[1]) {
            Some("<" | "|" | "=") => big_endian = false,
            Some(">") => big_endian = true,
            _ => return Err("a dtype with an unknown byte order".into()),
        }
        if items[2] != Value::None {
            return Err("a sub-array dtype (not used by IsolationForest)".into());
        }
        if let (Some(names), Some(Obj::Dict(_))) = (p.items(items[3]), p.obj(items[4])) {
            for &name in names {
                let n = p.str(name).ok_or("a dtype field name that is not a string")?;
                let spec = p.dict_get(items[4], n).and_then(|f| p.items(f)).ok_or("a dtype field without its type")?;
                let (Some(&fd), Some(&Value::Int(off))) = (spec.first(), spec.get(1)) else {
                    return Err(format!("dtype field {n} without type and offset"));
                };
                let offset = usize::try_from(off).map_err(|_| format!("dtype field {n} at a negative offset"))?;
                if !p.charge(1) {
                    return Err(TOO_BIG.into());
                }
                fields.push(Field { name: n.to_owned(), dtype: dtype_at(p, fd, depth + 1)?, offset });
            }
        }
        if let Value::Int(elsize) = items[5]
            && elsize > 0
            && (kind == b'V' || !fields.is_empty())
        {
            size = elsize as usize;
        }
    }
    if kind == b'O' {
        size = 8;
    }
    for f in &fields {
        if f.offset.checked_add(f.dtype.size).is_none_or(|end| end > size) {
            return Err(format!("dtype field {} reaches past its record of {size} bytes", f.name));
        }
    }
    if size == 0 {
        return Err(format!("a dtype {typestr:?} without a size"));
    }
    Ok(Dtype { kind, size, big_endian, fields })
}

/// A numpy array of the pickle, whichever way numpy or joblib wrote it.
pub struct Array<'p> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: ArrayData<'p>,
}

pub enum ArrayData<'p> {
    /// Items back to back, `dtype.size` bytes each.
    Raw(&'p [u8]),
    /// Python objects (dtype `O`).
    Objects(&'p [Value]),
}

fn shape_of(p: &Pickle, v: Value) -> Option<Vec<usize>> {
    p.items(v)?.iter().map(|d| int(p, *d).and_then(|d| usize::try_from(d).ok())).collect()
}

/// Reads an array value: `_reconstruct` + state (every protocol), `_frombuffer` (protocol
/// 5), or joblib's `NumpyArrayWrapper`.
pub fn array(p: &Pickle, v: Value) -> std::result::Result<Array<'_>, String> {
    array_at(p, v, 0)
}

fn array_at(p: &Pickle, v: Value, depth: u32) -> std::result::Result<Array<'_>, String> {
    let not_array = || format!("{} where an array belongs", p.describe(v));
    let Some(Obj::Instance { class, args, state, raw }) = p.obj(v) else { return Err(not_array()) };
    let (dtype, shape, data) = if RECONSTRUCT.contains(class) {
        let st = state.and_then(|s| p.items(s)).ok_or("an array without its state")?;
        let st = match st.len() {
            5 => &st[1..],
            4 => st,
            n => return Err(format!("an array state of {n} items")),
        };
        (dtype(p, st[1])?, shape_of(p, st[0]).ok_or("an array with a malformed shape")?, st[3])
    } else if FROMBUFFER.contains(class) {
        let [buf, dt, shape, _order] = p.args(*args) else { return Err("a _frombuffer call of another form".into()) };
        (dtype(p, *dt)?, shape_of(p, *shape).ok_or("an array with a malformed shape")?, *buf)
    } else if *class == JOBLIB_ARRAY {
        let st = state.ok_or("a joblib array without its state")?;
        let dt = dtype(p, p.dict_get(st, "dtype").ok_or("a joblib array without dtype")?)?;
        let shape = p.dict_get(st, "shape").and_then(|s| shape_of(p, s)).ok_or("a joblib array without shape")?;
        if let Some(raw) = raw {
            return checked(Array { dtype: dt, shape, data: ArrayData::Raw(raw) });
        }
        let inner = *p.args(*args).first().ok_or("a joblib array without its data")?;
        if depth > 2 {
            return Err("arrays nested too deeply".into());
        }
        let a = array_at(p, inner, depth + 1)?;
        return checked(Array { dtype: dt, shape, data: a.data });
    } else {
        return Err(not_array());
    };
    let data = match p.obj(data) {
        Some(Obj::Bytes(b)) => ArrayData::Raw(b),
        Some(Obj::List(items)) if dtype.kind == b'O' => ArrayData::Objects(items),
        _ => return Err("an array whose data is neither bytes nor a list of objects".into()),
    };
    checked(Array { dtype, shape, data })
}

fn checked(a: Array<'_>) -> std::result::Result<Array<'_>, String> {
    let count = a.len().ok_or("an array whose shape overflows")?;
    let ok = match &a.data {
        ArrayData::Raw(b) => count.checked_mul(a.dtype.size) == Some(b.len()) && a.dtype.kind != b'O',
        ArrayData::Objects(items) => items.len() == count,
    };
    if !ok {
        return Err(format!("an array of shape {:?} whose data does not have that size", a.shape));
    }
    Ok(a)
}

impl Array<'_> {
    fn len(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }

    /// Items of a 1-D integer array.
    fn ints(&self, p: &Pickle) -> Option<Vec<i64>> {
        let ArrayData::Raw(b) = self.data else { return None };
        if self.shape.len() != 1 || !p.charge(self.shape[0] as u64) {
            return None;
        }
        b.chunks_exact(self.dtype.size).map(|c| self.dtype.int_at(c)).collect()
    }

    /// Items of a 1-D array of str objects.
    fn strings(&self, p: &Pickle) -> Option<Vec<String>> {
        let ArrayData::Objects(items) = self.data else { return None };
        if !p.charge(items.len() as u64) {
            return None;
        }
        items.iter().map(|v| p.str(*v).map(str::to_owned)).collect()
    }
}

fn int(p: &Pickle, v: Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(i),
        _ => match p.obj(v) {
            Some(Obj::Instance { class, args, .. }) if SCALAR.contains(class) => {
                let [dt, bytes] = p.args(*args) else { return None };
                let Some(Obj::Bytes(b)) = p.obj(*bytes) else { return None };
                let dt = dtype(p, *dt).ok()?;
                if b.len() != dt.size {
                    return None;
                }
                dt.int_at(b)
            }
            _ => None,
        },
    }
}

fn float(p: &Pickle, v: Value) -> Option<f64> {
    match v {
        Value::Float(f) => Some(f),
        Value::Int(i) => Some(i as f64),
        _ => match p.obj(v) {
            Some(Obj::Instance { class, args, .. }) if SCALAR.contains(class) => {
                let [dt, bytes] = p.args(*args) else { return None };
                let Some(Obj::Bytes(b)) = p.obj(*bytes) else { return None };
                let dt = dtype(p, *dt).ok()?;
                if b.len() != dt.size {
                    return None;
                }
                dt.float_at(b)
            }
            _ => None,
        },
    }
}

/// The attribute dict of an object: `__getstate__` gives a dict, or (dict, slots).
fn attrs(p: &Pickle, state: Option<Value>) -> Option<Value> {
    let s = state?;
    match p.obj(s) {
        Some(Obj::Dict(_)) => Some(s),
        Some(Obj::Tuple(items)) if items.len() == 2 && matches!(p.obj(items[0]), Some(Obj::Dict(_))) => Some(items[0]),
        _ => None,
    }
}

/// The fitted forest of the pickle's IsolationForest.
fn forest(p: &Pickle) -> std::result::Result<Imported, String> {
    let root = p.root;
    let state = match p.obj(root) {
        Some(Obj::Instance { class, state, .. }) if ISOLATION_FOREST.contains(class) => *state,
        _ => return Err(format!("is a pickle of {}, not of a scikit-learn IsolationForest", p.describe(root))),
    };
    let forest_attrs = attrs(p, state).ok_or("holds an IsolationForest without its attributes")?;
    let get = |k: &str| p.dict_get(forest_attrs, k);
    let estimators = get("estimators_").ok_or("holds an IsolationForest that was never fitted (no estimators_)")?;
    let estimators = p.items(estimators).ok_or("holds an IsolationForest whose estimators_ is not a list")?;
    if estimators.is_empty() {
        return Err("holds an IsolationForest without trees".into());
    }
    let n_features = get("n_features_in_")
        .or_else(|| get("n_features_"))
        .and_then(|v| int(p, v))
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n > 0 && n <= MAX_FEATURES)
        .ok_or("holds an IsolationForest without a valid n_features_in_")?;
    let max_samples = get("_max_samples")
        .or_else(|| get("max_samples_"))
        .and_then(|v| int(p, v))
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n > 0)
        .ok_or("holds an IsolationForest without a valid max_samples_")?;
    let offset = get("offset_")
        .and_then(|v| float(p, v))
        .filter(|o| o.is_finite())
        .ok_or("holds an IsolationForest without a finite offset_")?;
    let features = get("estimators_features_")
        .and_then(|v| p.items(v))
        .ok_or("holds an IsolationForest without estimators_features_")?;
    if features.len() != estimators.len() {
        return Err(format!("holds {} estimators_ but {} estimators_features_", estimators.len(), features.len()));
    }
    let features: Vec<Vec<u32>> = features
        .iter()
        .enumerate()
        .map(|(i, &f)| {
            let cols = array(p, f).map_err(|e| format!("estimators_features_[{i}] is {e}"))?;
            let cols = cols.ints(p).ok_or(format!("estimators_features_[{i}] is not a list of column numbers"))?;
            cols.iter()
                .map(|&c| u32::try_from(c).ok().filter(|&c| (c as usize) < n_features))
                .collect::<Option<Vec<u32>>>()
                .ok_or(format!("estimators_features_[{i}] names a column outside the {n_features} features"))
        })
        .collect::<std::result::Result<_, String>>()?;
    // scikit-learn scores the full row unless fewer features than n_features_in_ were drawn.
    let subsample = match get("_max_features").and_then(|v| int(p, v)) {
        Some(m) => m != n_features as i64,
        None => features.iter().any(|f| f.len() != n_features || f.iter().enumerate().any(|(i, &c)| i != c as usize)),
    };
    let all: Vec<u32> = (0..n_features as u32).collect();
    let mut trees = Vec::with_capacity(estimators.len());
    let mut version = get("_sklearn_version").and_then(|v| p.str(v)).map(str::to_owned);
    for (i, &est) in estimators.iter().enumerate() {
        let cols = if subsample { features[i].clone() } else { all.clone() };
        if !p.charge(cols.len() as u64) {
            return Err(TOO_BIG.into());
        }
        let (tree, v) = tree(p, est, cols).map_err(|e| format!("estimators_[{i}] {e}"))?;
        version = version.or(v);
        trees.push(tree);
    }
    let feature_names = match get("feature_names_in_") {
        None | Some(Value::None) => None,
        Some(v) => Some(
            array(p, v)
                .ok()
                .and_then(|a| a.strings(p))
                .ok_or("holds an IsolationForest whose feature_names_in_ are not strings")?,
        ),
    };
    Ok(Imported {
        spec: ForestSpec { n_features, max_samples, offset, trees },
        feature_names,
        sklearn_version: version,
    })
}

/// One `ExtraTreeRegressor`'s tree; `cols` are the row columns it sees.
fn tree(p: &Pickle, est: Value, cols: Vec<u32>) -> std::result::Result<(TreeSpec, Option<String>), String> {
    let state = match p.obj(est) {
        Some(Obj::Instance { class, state, .. }) if EXTRA_TREE.contains(class) => *state,
        _ => return Err(format!("is {}, not an ExtraTreeRegressor", p.describe(est))),
    };
    let est_attrs = attrs(p, state).ok_or("has no attributes")?;
    let version = p.dict_get(est_attrs, "_sklearn_version").and_then(|v| p.str(v)).map(str::to_owned);
    let t = p.dict_get(est_attrs, "tree_").ok_or("has no tree_ (not fitted)")?;
    let (args, tstate) = match p.obj(t) {
        Some(Obj::Instance { class, args, state, .. }) if *class == TREE => (args, *state),
        _ => return Err(format!("has a tree_ that is {}", p.describe(t))),
    };
    if let Some(n) = p.args(*args).first().and_then(|v| int(p, *v))
        && n != cols.len() as i64
    {
        return Err(format!("was fitted on {n} features, but the forest gives it {}", cols.len()));
    }
    let tattrs = attrs(p, tstate).ok_or("has a tree_ without its state")?;
    let nodes = p.dict_get(tattrs, "nodes").ok_or("has a tree_ without nodes")?;
    let nodes = array(p, nodes).map_err(|e| format!("has tree_.nodes that is {e}"))?;
    let ArrayData::Raw(raw) = nodes.data else { return Err("has tree_.nodes that are not node records".into()) };
    if nodes.shape.len() != 1 {
        return Err("has tree_.nodes that is not a 1-D array".into());
    }
    let n = nodes.shape[0];
    if !p.charge(n as u64) {
        return Err(TOO_BIG.into());
    }
    if let Some(count) = p.dict_get(tattrs, "node_count").and_then(|v| int(p, v))
        && count != n as i64
    {
        return Err(format!("has node_count {count} but {n} node records"));
    }
    let field = |name: &str| {
        nodes.dtype.field(name).ok_or(format!("has node records without a {name} field (fields: {})", {
            let names: Vec<&str> = nodes.dtype.fields.iter().map(|f| f.name.as_str()).collect();
            names.join(", ")
        }))
    };
    let size = nodes.dtype.size;
    let ints = |name: &str| -> std::result::Result<Vec<i64>, String> {
        let f = field(name)?;
        (0..n)
            .map(|k| f.dtype.int_at(&raw[k * size + f.offset..]))
            .collect::<Option<Vec<i64>>>()
            .ok_or(format!("has node records whose {name} is not an integer"))
    };
    let children_left = ints("left_child")?;
    let children_right = ints("right_child")?;
    let feature = ints("feature")?;
    let n_node_samples = ints("n_node_samples")?
        .into_iter()
        .map(|s| u64::try_from(s).ok())
        .collect::<Option<Vec<u64>>>()
        .ok_or("has a node with a negative n_node_samples")?;
    let f = field("threshold")?;
    let threshold = (0..n)
        .map(|k| f.dtype.float_at(&raw[k * size + f.offset..]))
        .collect::<Option<Vec<f64>>>()
        .ok_or("has node records whose threshold is not a number")?;
    Ok((TreeSpec { features: cols, children_left, children_right, feature, threshold, n_node_samples }, version))
}
