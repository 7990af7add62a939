//! A reader for Python pickles (protocols 2 to 5) that never runs anything.
//!
//! Python's own unpickler imports every global a pickle names and calls whatever the
//! pickle asks it to call, so loading an untrusted pickle runs arbitrary code. This reader
//! is a stack machine over the same opcodes that builds an inert value tree instead:
//! a global becomes a name checked against [`ALLOWED`] (the classes and functions that
//! scikit-learn `IsolationForest` pickles use), a call (`REDUCE`, `NEWOBJ`) becomes an
//! [`Obj::Instance`] that records the callee and its arguments, and `BUILD` records the
//! state. Interpreting that tree is up to the caller ([`crate::sklearn`]).
//!
//! Resource use is bounded: every opcode creates at most one object and the values of a
//! pickle are capped ([`MAX_VALUES`]), lengths are checked against the bytes that remain
//! before anything is allocated, shared objects are referenced, never copied, and the only
//! recursion (joblib's pickles inside a pickle) is at most four deep. Random bytes end in
//! an error, never in a panic or an out-of-memory.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;

/// A Python global that pickles of scikit-learn isolation forests may name. Nothing is
/// imported or called: the name is all the value tree keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Global {
    pub module: &'static str,
    pub name: &'static str,
}

impl fmt::Display for Global {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}.{}", self.module, self.name)
    }
}

const fn g(module: &'static str, name: &'static str) -> Global {
    Global { module, name }
}

pub const ISOLATION_FOREST: [Global; 2] =
    [g("sklearn.ensemble._iforest", "IsolationForest"), g("sklearn.ensemble.iforest", "IsolationForest")];
pub const EXTRA_TREE: [Global; 2] =
    [g("sklearn.tree._classes", "ExtraTreeRegressor"), g("sklearn.tree.tree", "ExtraTreeRegressor")];
pub const TREE: Global = g("sklearn.tree._tree", "Tree");
pub const NDARRAY: Global = g("numpy", "ndarray");
pub const DTYPE: Global = g("numpy", "dtype");
pub const RECONSTRUCT: [Global; 2] =
    [g("numpy.core.multiarray", "_reconstruct"), g("numpy._core.multiarray", "_reconstruct")];
pub const SCALAR: [Global; 2] = [g("numpy.core.multiarray", "scalar"), g("numpy._core.multiarray", "scalar")];
pub const FROMBUFFER: [Global; 2] = [g("numpy.core.numeric", "_frombuffer"), g("numpy._core.numeric", "_frombuffer")];
pub const JOBLIB_ARRAY: Global = g("joblib.numpy_pickle", "NumpyArrayWrapper");
const CODECS_ENCODE: Global = g("_codecs", "encode");
const BYTEARRAY: Global = g("builtins", "bytearray");
const BYTES: Global = g("builtins", "bytes");
const RECONSTRUCTOR: Global = g("copyreg", "_reconstructor");
const OBJECT: Global = g("builtins", "object");

/// Every global a pickle may name. The first group is the model itself (the `.iforest` and
/// `.tree.tree` paths are scikit-learn before 0.22); then numpy arrays, dtypes and scalars
/// (numpy 1.x `numpy.core`, 2.x `numpy._core`; `_frombuffer` for protocol 5); numpy
/// random states, which appear when a `RandomState` was passed as `random_state`; joblib's
/// array wrapper; and the helpers Python itself uses for protocol 2 bytes and old classes.
pub const ALLOWED: &[Global] = &[
    ISOLATION_FOREST[0],
    ISOLATION_FOREST[1],
    EXTRA_TREE[0],
    EXTRA_TREE[1],
    TREE,
    NDARRAY,
    DTYPE,
    RECONSTRUCT[0],
    RECONSTRUCT[1],
    SCALAR[0],
    SCALAR[1],
    FROMBUFFER[0],
    FROMBUFFER[1],
    g("numpy.random._pickle", "__randomstate_ctor"),
    g("numpy.random._pickle", "__bit_generator_ctor"),
    g("numpy.random._pickle", "__generator_ctor"),
    g("numpy.random", "__RandomState_ctor"),
    g("numpy.random.mtrand", "RandomState"),
    g("numpy.random._mt19937", "MT19937"),
    g("numpy.random._pcg64", "PCG64"),
    g("numpy.random._pcg64", "PCG64DXSM"),
    g("numpy.random._philox", "Philox"),
    g("numpy.random._sfc64", "SFC64"),
    JOBLIB_ARRAY,
    CODECS_ENCODE,
    BYTEARRAY,
    BYTES,
    RECONSTRUCTOR,
    OBJECT,
];

/// Looks a global up in [`ALLOWED`], with Python 2 module names (which protocol 2 pickles
/// written by Python 3 use for builtins) mapped to Python 3's.
pub fn allowed_global(module: &str, name: &str) -> Option<Global> {
    let module = match module {
        "__builtin__" => "builtins",
        "copy_reg" => "copyreg",
        m => m,
    };
    ALLOWED.iter().copied().find(|a| a.module == module && a.name == name)
}

/// Index of an object in [`Pickle::objs`].
pub type Id = u32;

/// A value on the stack or in a container: small values inline, everything else by
/// reference, so that memo lookups share objects as Python does and never copy them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Obj(Id),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Obj {
    Str(String),
    /// `bytes` or `bytearray`.
    Bytes(Vec<u8>),
    /// An int that does not fit in 64 bits (its value is not kept).
    BigInt,
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Key-value pairs in insertion order; a repeated key counts with its last value.
    Dict(Vec<(Value, Value)>),
    Set(Vec<Value>),
    Global(Global),
    /// `class(*args)` or `function(*args)`, as REDUCE / NEWOBJ asked for it (`args` is a
    /// tuple, shared and not copied; see [`Pickle::args`]), with the state BUILD gave it.
    /// joblib arrays keep the bytes that follow their state in `raw`.
    Instance {
        class: Global,
        args: Value,
        state: Option<Value>,
        raw: Option<Vec<u8>>,
    },
}

/// The value tree of a pickle.
#[derive(Debug)]
pub struct Pickle {
    pub objs: Vec<Obj>,
    pub root: Value,
    /// Work its readers may still do (see [`Pickle::charge`]).
    budget: Cell<u64>,
}

/// Work (dict entries scanned, items decoded) a reader of the value tree may do per byte
/// of pickle: objects may be shared any number of times, and this keeps a reader that
/// follows every reference linear in the file's size.
const WORK_PER_BYTE: u64 = 64;

impl Pickle {
    fn new(objs: Vec<Obj>, root: Value, input_len: usize) -> Pickle {
        Pickle { objs, root, budget: Cell::new(WORK_PER_BYTE * input_len as u64 + (1 << 20)) }
    }

    /// Counts `n` units of work against the budget; false once it is spent.
    pub fn charge(&self, n: u64) -> bool {
        let left = self.budget.get();
        self.budget.set(left.saturating_sub(n));
        left >= n
    }

    /// The arguments of an [`Obj::Instance`].
    pub fn args(&self, args: Value) -> &[Value] {
        self.items(args).unwrap_or(&[])
    }

    pub fn obj(&self, v: Value) -> Option<&Obj> {
        get(&self.objs, v)
    }

    pub fn str(&self, v: Value) -> Option<&str> {
        match self.obj(v) {
            Some(Obj::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// Items of a tuple or list.
    pub fn items(&self, v: Value) -> Option<&[Value]> {
        match self.obj(v) {
            Some(Obj::Tuple(items) | Obj::List(items)) => Some(items),
            _ => None,
        }
    }

    /// The value of a string key in a dict (None once the work budget is spent).
    pub fn dict_get(&self, dict: Value, key: &str) -> Option<Value> {
        match self.obj(dict) {
            Some(Obj::Dict(pairs)) if self.charge(pairs.len() as u64) => {
                pairs.iter().rev().find(|(k, _)| self.str(*k) == Some(key)).map(|(_, v)| *v)
            }
            _ => None,
        }
    }

    /// What a value is, for error messages: "a list", "an int", "numpy.ndarray", ...
    pub fn describe(&self, v: Value) -> String {
        describe(&self.objs, v)
    }
}

/// What a value is, for error messages: "a list", "an int", "numpy.ndarray", ...
fn describe(objs: &[Obj], v: Value) -> String {
    match v {
        Value::None => "None".into(),
        Value::Bool(_) => "a bool".into(),
        Value::Int(_) => "an int".into(),
        Value::Float(_) => "a float".into(),
        Value::Obj(_) => match get(objs, v) {
            Some(Obj::Str(_)) => "a str".into(),
            Some(Obj::Bytes(_)) => "bytes".into(),
            Some(Obj::BigInt) => "an int".into(),
            Some(Obj::Tuple(_)) => "a tuple".into(),
            Some(Obj::List(_)) => "a list".into(),
            Some(Obj::Dict(_)) => "a dict".into(),
            Some(Obj::Set(_)) => "a set".into(),
            Some(Obj::Global(g)) => format!("the name {g}"),
            Some(Obj::Instance { class, .. }) => {
                // numpy arrays are built by helper functions: name the array's class.
                if RECONSTRUCT.contains(class) || FROMBUFFER.contains(class) || *class == JOBLIB_ARRAY {
                    "numpy.ndarray".into()
                } else if SCALAR.contains(class) {
                    "a numpy scalar".into()
                } else {
                    class.to_string()
                }
            }
            None => "nothing".into(),
        },
    }
}

fn get(objs: &[Obj], v: Value) -> Option<&Obj> {
    match v {
        Value::Obj(id) => objs.get(id as usize),
        _ => None,
    }
}

/// Why a pickle could not be read: one sentence, without the file name.
#[derive(Debug, Clone, PartialEq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

type Result<T> = std::result::Result<T, Error>;

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error(msg.into()))
}

/// The name of an opcode byte, for messages.
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown opcode",
    }
}

/// How deeply joblib files may nest pickles (object arrays are pickles inside the pickle).
const MAX_NESTED: u32 = 4;

/// Values a pickle may push, store or create in all. A 300-tree IsolationForest makes about
/// 70,000 (its arrays are bulk bytes); this bounds the memory random or hostile input
/// can claim, whatever its size.
pub const MAX_VALUES: usize = 1 << 22;

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Where the current opcode started, and which one it is (for messages).
    op_pos: usize,
    op: u8,
    objs: Vec<Obj>,
    stack: Vec<Value>,
    /// Stack heights at each MARK still open.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    nested: u32,
    /// Values pushed, stored in the memo or created so far (see [`MAX_VALUES`]).
    values: usize,
    /// Bytes that calls may still copy (protocol 2 `bytes` are built by a call whose
    /// argument may be shared any number of times).
    copy_budget: usize,
}

/// Reads a whole pickle into its value tree. Bytes after STOP are ignored, as Python does.
pub fn parse(data: &[u8]) -> Result<Pickle> {
    let mut m = Machine::new(data, 0);
    let root = m.run()?;
    Ok(Pickle::new(m.objs, root, data.len()))
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8], nested: u32) -> Machine<'a> {
        Machine {
            data,
            pos: 0,
            op_pos: 0,
            op: 0,
            objs: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            nested,
            values: 0,
            copy_budget: data.len().saturating_mul(4).saturating_add(1 << 20),
        }
    }

    fn fail<T>(&self, what: impl fmt::Display) -> Result<T> {
        err(format!("{what} at byte {} ({})", self.op_pos, opcode_name(self.op)))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.data.len() - self.pos {
            return err(format!(
                "truncated pickle (ends at byte {} inside a {} that starts at byte {})",
                self.data.len(),
                opcode_name(self.op),
                self.op_pos
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    /// A length prefix that must fit in the bytes left (checked before any allocation).
    fn len_prefixed(&mut self, width: usize) -> Result<&'a [u8]> {
        let n = match width {
            1 => self.u8()? as u64,
            4 => u32::from_le_bytes(self.le()?) as u64,
            _ => u64::from_le_bytes(self.le()?),
        };
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        self.take(n)
    }

    /// A text argument ending in '\n' (GLOBAL).
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return err(format!(
                "truncated pickle (ends at byte {} inside a {} that starts at byte {})",
                self.data.len(),
                opcode_name(self.op),
                self.op_pos
            ));
        };
        self.pos += end + 1;
        match std::str::from_utf8(&rest[..end]) {
            Ok(s) => Ok(s),
            Err(_) => self.fail("a global name that is not UTF-8"),
        }
    }

    fn alloc(&mut self, o: Obj) -> Value {
        self.values += 1;
        self.objs.push(o);
        Value::Obj((self.objs.len() - 1) as Id)
    }

    fn push(&mut self, v: Value) {
        self.values += 1;
        self.stack.push(v);
    }

    fn push_obj(&mut self, o: Obj) {
        let v = self.alloc(o);
        self.push(v);
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Value> {
        if self.stack.len() <= self.floor() {
            return self.fail("stack underflow");
        }
        Ok(self.stack.pop().expect("checked above"))
    }

    fn top(&self) -> Result<Value> {
        if self.stack.len() <= self.floor() {
            return self.fail("stack underflow");
        }
        Ok(*self.stack.last().expect("checked above"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        match self.marks.pop() {
            Some(m) => Ok(self.stack.split_off(m)),
            None => self.fail("no MARK to end"),
        }
    }

    fn obj_mut(&mut self, v: Value) -> Option<&mut Obj> {
        match v {
            Value::Obj(id) => self.objs.get_mut(id as usize),
            _ => None,
        }
    }

    fn global(&mut self, module: &str, name: &str) -> Result<()> {
        match allowed_global(module, name) {
            Some(g) => {
                self.push_obj(Obj::Global(g));
                Ok(())
            }
            None if module == "sklearn" || module.starts_with("sklearn.") => {
                err(format!("refusing global {module}.{name}: fad imports scikit-learn IsolationForest models only"))
            }
            None => err(format!(
                "refusing global {module}.{name}: it is not on the allow-list of IsolationForest components \
                 (fad never runs code from a pickle)"
            )),
        }
    }

    fn callee(&self, v: Value, what: &str) -> Result<Global> {
        match v {
            Value::Obj(id) => match self.objs.get(id as usize) {
                Some(Obj::Global(g)) => Ok(*g),
                _ => self.fail(format!("{what} of something that is not a class or function")),
            },
            _ => self.fail(format!("{what} of something that is not a class or function")),
        }
    }

    /// REDUCE: `callee(*args)`. Calls stay inert, except the few builtins that only build
    /// bytes, which are evaluated here so that protocol 2 pickles read like later ones.
    fn call(&mut self, callee: Global, args_tuple: Value) -> Result<Value> {
        let Some(Obj::Tuple(args)) = get(&self.objs, args_tuple) else {
            return self.fail("REDUCE with arguments that are not a tuple");
        };
        if callee == CODECS_ENCODE || callee == BYTEARRAY || callee == BYTES {
            let bytes = match args.as_slice() {
                [] => Some(Vec::new()),
                [b] => match get(&self.objs, *b) {
                    Some(Obj::Bytes(b)) => Some(b.clone()),
                    _ => None,
                },
                [text, enc] => match (get(&self.objs, *text), get(&self.objs, *enc)) {
                    (Some(Obj::Str(t)), Some(Obj::Str(e))) if e == "latin1" || e == "latin-1" => {
                        t.chars().map(|c| u8::try_from(c as u32).ok()).collect()
                    }
                    _ => None,
                },
                _ => None,
            };
            return match bytes {
                Some(b) if b.len() <= self.copy_budget => {
                    self.copy_budget -= b.len();
                    Ok(self.alloc(Obj::Bytes(b)))
                }
                Some(_) => self.fail("more copies of bytes than the file could hold"),
                None => self.fail(format!("a call of {callee} that does not just build bytes")),
            };
        }
        if callee == RECONSTRUCTOR {
            // copyreg._reconstructor(cls, object, None): an instance of cls.
            let cls = match args.as_slice() {
                [cls, base, Value::None] if self.is_global(*base, OBJECT) => self.callee(*cls, "REDUCE")?,
                _ => return self.fail("a copyreg._reconstructor call this reader does not support"),
            };
            return Ok(self.alloc(Obj::Instance { class: cls, args: Value::None, state: None, raw: None }));
        }
        Ok(self.alloc(Obj::Instance { class: callee, args: args_tuple, state: None, raw: None }))
    }

    fn is_global(&self, v: Value, g: Global) -> bool {
        matches!(get(&self.objs, v), Some(Obj::Global(x)) if *x == g)
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            self.op_pos = self.pos;
            if self.pos >= self.data.len() {
                return err(format!("truncated pickle (ends at byte {} before its STOP opcode)", self.data.len()));
            }
            self.op = self.data[self.pos];
            self.pos += 1;
            if self.values > MAX_VALUES {
                return self.fail(format!(
                    "more than {MAX_VALUES} values, far more than a pickled IsolationForest holds (refusing to read on)"
                ));
            }
            match self.op {
                0x80 => {
                    let v = self.u8()?;
                    if v > 5 {
                        return self.fail(format!("pickle protocol {v} (fad reads protocols 2 to 5)"));
                    }
                }
                0x95 => {
                    // FRAME: a length hint for buffered readers; the opcodes follow as usual.
                    self.le::<8>()?;
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?;
                    self.push(v);
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let bytes = self.len_prefixed(if self.op == 0x8a { 1 } else { 4 })?;
                    if bytes.len() <= 8 {
                        let mut buf = [0u8; 8];
                        buf[..bytes.len()].copy_from_slice(bytes);
                        let shift = 64 - 8 * bytes.len() as u32;
                        let v = if bytes.is_empty() { 0 } else { (i64::from_le_bytes(buf) << shift) >> shift };
                        self.push(Value::Int(v));
                    } else {
                        self.push_obj(Obj::BigInt);
                    }
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.push(Value::Float(v));
                }
                b'X' | 0x8c | 0x8d => {
                    let width = match self.op {
                        0x8c => 1,
                        b'X' => 4,
                        _ => 8,
                    };
                    let bytes = self.len_prefixed(width)?;
                    match std::str::from_utf8(bytes) {
                        Ok(s) => self.push_obj(Obj::Str(s.to_owned())),
                        Err(_) => return self.fail("a string that is not UTF-8"),
                    }
                }
                b'U' | b'T' => {
                    // Python 2 str: Python 3 reads it as text; latin-1 keeps every byte.
                    let bytes = self.len_prefixed(if self.op == b'U' { 1 } else { 4 })?;
                    let s = bytes.iter().map(|&b| b as char).collect();
                    self.push_obj(Obj::Str(s));
                }
                b'C' | b'B' | 0x8e | 0x96 => {
                    let width = match self.op {
                        b'C' => 1,
                        b'B' => 4,
                        _ => 8,
                    };
                    let bytes = self.len_prefixed(width)?.to_vec();
                    self.push_obj(Obj::Bytes(bytes));
                }
                b')' => self.push_obj(Obj::Tuple(Vec::new())),
                0x85..=0x87 => {
                    let n = (self.op - 0x84) as usize;
                    if self.stack.len() < self.floor() + n {
                        return self.fail("stack underflow");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push_obj(Obj::Tuple(items));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_obj(Obj::Tuple(items));
                }
                b']' => self.push_obj(Obj::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push_obj(Obj::List(items));
                }
                b'}' => self.push_obj(Obj::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push_obj(Obj::Dict(pairs));
                }
                0x8f => self.push_obj(Obj::Set(Vec::new())),
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push_obj(Obj::Set(items));
                }
                b'a' | b'e' | 0x90 => {
                    let items = if self.op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                    let target = self.top()?;
                    let want_set = self.op == 0x90;
                    match self.obj_mut(target) {
                        Some(Obj::List(list)) if !want_set => list.extend(items),
                        Some(Obj::Set(set)) if want_set => set.extend(items),
                        _ => {
                            let what = self.describe(target);
                            return self.fail(format!("adding items to {what}"));
                        }
                    }
                }
                b's' | b'u' => {
                    let items = if self.op == b's' {
                        let v = self.pop()?;
                        let k = self.pop()?;
                        vec![k, v]
                    } else {
                        self.pop_mark()?
                    };
                    let pairs = self.pairs(items)?;
                    let target = self.top()?;
                    match self.obj_mut(target) {
                        Some(Obj::Dict(d)) => d.extend(pairs),
                        _ => {
                            let what = self.describe(target);
                            return self.fail(format!("setting items of {what}"));
                        }
                    }
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(Obj::Str(m)), Some(Obj::Str(n))) = (get(&self.objs, module), get(&self.objs, name))
                    else {
                        return self.fail("STACK_GLOBAL with a module or name that is not a string");
                    };
                    let (m, n) = (m.clone(), n.clone());
                    self.global(&m, &n)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let callee = self.callee(f, "a call")?;
                    let v = self.call(callee, args)?;
                    self.push(v);
                }
                0x81 | 0x92 => {
                    if self.op == 0x92 {
                        self.pop()?; // keyword arguments: no class of the allow-list takes any
                    }
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let class = self.callee(cls, "NEWOBJ")?;
                    if !matches!(get(&self.objs, args), Some(Obj::Tuple(_))) {
                        return self.fail("NEWOBJ with arguments that are not a tuple");
                    }
                    self.push_obj(Obj::Instance { class, args, state: None, raw: None });
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    let joblib = match self.obj_mut(target) {
                        Some(Obj::Instance { class, state: s, .. }) => {
                            *s = Some(state);
                            *class == JOBLIB_ARRAY
                        }
                        _ => {
                            let what = self.describe(target);
                            return self.fail(format!("BUILD of {what}"));
                        }
                    };
                    if joblib {
                        self.joblib_array(target, state)?;
                    }
                }
                0x94 => {
                    self.values += 1;
                    let v = self.top()?;
                    let key = self.memo.len() as u32;
                    self.memo.insert(key, v);
                }
                b'q' | b'r' => {
                    self.values += 1;
                    let key = if self.op == b'q' { self.u8()? as u32 } else { u32::from_le_bytes(self.le()?) };
                    let v = self.top()?;
                    self.memo.insert(key, v);
                }
                b'h' | b'j' => {
                    let key = if self.op == b'h' { self.u8()? as u32 } else { u32::from_le_bytes(self.le()?) };
                    match self.memo.get(&key) {
                        Some(&v) => self.push(v),
                        None => return self.fail(format!("memo entry {key} used before it was stored")),
                    }
                }
                0x97 | 0x98 => {
                    return self
                        .fail("an out-of-band buffer (pickles written with a buffer_callback are not supported)");
                }
                b'P' | b'Q' => return self.fail("a persistent id (not supported)"),
                0x82..=0x84 => return self.fail("an extension code (not supported)"),
                b'F' | b'I' | b'L' | b'S' | b'V' | b'g' | b'p' | b'i' | b'o' => {
                    return self.fail("a protocol 0/1 text opcode (fad reads pickle protocols 2 to 5)");
                }
                op => return self.fail(format!("invalid opcode 0x{op:02x}")),
            }
        }
    }

    fn pairs(&self, items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
        if !items.len().is_multiple_of(2) {
            return self.fail("an odd number of dict items");
        }
        Ok(items.chunks(2).map(|p| (p[0], p[1])).collect())
    }

    fn describe(&self, v: Value) -> String {
        describe(&self.objs, v)
    }

    /// joblib writes each numpy array as a `NumpyArrayWrapper` whose BUILD is followed by
    /// the array's bytes (after a length byte and up to 255 bytes of padding in joblib >=
    /// 1.2), or, for object arrays, by a nested pickle. They are read here into the
    /// wrapper's `raw` (bytes) or `args` (a 1-tuple of the nested pickle's value, whose
    /// objects join this tree).
    fn joblib_array(&mut self, target: Value, state: Value) -> Result<()> {
        let p = Pickle::new(std::mem::take(&mut self.objs), state, self.data.len());
        let info = joblib_info(&p, state);
        self.objs = p.objs;
        let Some((n_bytes, is_object, aligned)) = info else {
            return self.fail("a joblib array wrapper this reader does not understand");
        };
        if aligned && !is_object {
            let pad = self.u8()? as usize;
            self.take(pad)?;
        }
        if is_object {
            if self.nested >= MAX_NESTED {
                return self.fail("joblib arrays nested too deeply");
            }
            let mut inner = Machine::new(&self.data[self.pos..], self.nested + 1);
            let v = inner.run().map_err(|e| Error(format!("{e} (in an object array at byte {})", self.pos)))?;
            self.pos += inner.pos;
            self.values += inner.values;
            // Re-home the nested objects after ours.
            let base = self.objs.len() as Id;
            let shift = |v: Value| match v {
                Value::Obj(id) => Value::Obj(id + base),
                other => other,
            };
            for o in inner.objs {
                let o = match o {
                    Obj::Tuple(v) => Obj::Tuple(v.into_iter().map(shift).collect()),
                    Obj::List(v) => Obj::List(v.into_iter().map(shift).collect()),
                    Obj::Set(v) => Obj::Set(v.into_iter().map(shift).collect()),
                    Obj::Dict(v) => Obj::Dict(v.into_iter().map(|(k, x)| (shift(k), shift(x))).collect()),
                    Obj::Instance { class, args, state, raw } => {
                        Obj::Instance { class, args: shift(args), state: state.map(shift), raw }
                    }
                    o => o,
                };
                self.objs.push(o);
            }
            let v = self.alloc(Obj::Tuple(vec![shift(v)]));
            if let Some(Obj::Instance { args, .. }) = self.obj_mut(target) {
                *args = v;
            }
        } else {
            let bytes = self.take(n_bytes)?.to_vec();
            if let Some(Obj::Instance { raw, .. }) = self.obj_mut(target) {
                *raw = Some(bytes);
            }
        }
        Ok(())
    }
}

/// (bytes of array data, is an object array, has an alignment pad) of a joblib wrapper's
/// state, or None when the state is not one.
fn joblib_info(p: &Pickle, state: Value) -> Option<(usize, bool, bool)> {
    let shape = p.items(p.dict_get(state, "shape")?)?;
    let mut count: usize = 1;
    for d in shape {
        let Value::Int(d) = d else { return None };
        count = count.checked_mul(usize::try_from(*d).ok()?)?;
    }
    let dtype = crate::sklearn::dtype(p, p.dict_get(state, "dtype")?).ok()?;
    let aligned = p.dict_get(state, "numpy_array_alignment_bytes").is_some_and(|v| v != Value::None);
    Some((count.checked_mul(dtype.size)?, dtype.kind == b'O', aligned))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(bytes: &[u8]) -> Pickle {
        parse(bytes).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn small_values_and_containers() {
        // pickle.dumps({'a': [1, -2, 3.5, None, True], 'b': (b'xy', 'é')}, protocol=4)
        let bytes = b"\x80\x04\x95/\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01a\x94]\x94(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00N\x88e\x8c\x01b\x94C\x02xy\x94\x8c\x02\xc3\xa9\x94\x86\x94u.";
        let p = parse_ok(bytes);
        let a = p.dict_get(p.root, "a").unwrap();
        assert_eq!(
            p.items(a).unwrap(),
            &[Value::Int(1), Value::Int(-2), Value::Float(3.5), Value::None, Value::Bool(true)]
        );
        let b = p.items(p.dict_get(p.root, "b").unwrap()).unwrap().to_vec();
        assert_eq!(p.obj(b[0]), Some(&Obj::Bytes(b"xy".to_vec())));
        assert_eq!(p.str(b[1]), Some("é"));
    }

    #[test]
    fn memo_shares_objects_as_python_does() {
        // Hand-built: outer = [inner, inner], then 7 is appended to inner through the memo
        // after both references were taken; both must see it.
        let ok = b"\x80\x04]\x94(]\x94h\x01eh\x01K\x07a0.";
        let p = parse_ok(ok);
        let outer = p.items(p.root).unwrap();
        assert_eq!(outer.len(), 2);
        assert_eq!(outer[0], outer[1]);
        assert_eq!(p.items(outer[0]).unwrap(), &[Value::Int(7)]);
    }

    #[test]
    fn longs_are_little_endian_twos_complement() {
        for (bytes, v) in [
            (&b"\x80\x02\x8a\x00."[..], 0i64),
            (b"\x80\x02\x8a\x01\xff.", -1),
            (b"\x80\x02\x8a\x02\x00\x80.", -32768),
            (b"\x80\x02\x8a\x03\x00\x80\x00.", 32768),
            (b"\x80\x02\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f.", i64::MAX),
        ] {
            assert_eq!(parse_ok(bytes).root, Value::Int(v));
        }
        let p = parse_ok(b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01.");
        assert_eq!(p.obj(p.root), Some(&Obj::BigInt));
    }

    #[test]
    fn refuses_globals_off_the_list() {
        // pickle.dumps of an object whose __reduce__ returns (os.system, ('echo hi',))
        let bytes = b"\x80\x04\x95\"\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x07echo hi\x94\x85\x94R\x94.";
        let e = parse(bytes).unwrap_err().0;
        assert!(e.starts_with("refusing global posix.system: "), "{e}");
        let e = parse(b"\x80\x02cos\nsystem\nq\x00.").unwrap_err().0;
        assert!(e.starts_with("refusing global os.system: "), "{e}");
        let e = parse(b"\x80\x02csklearn.ensemble._forest\nRandomForestClassifier\n.").unwrap_err().0;
        assert!(e.contains("sklearn.ensemble._forest.RandomForestClassifier"), "{e}");
        assert!(e.contains("IsolationForest models only"), "{e}");
    }

    #[test]
    fn protocol_2_bytes_and_builtin_names() {
        // _codecs.encode('\xff\x00', 'latin1'), as protocol 2 pickles bytes
        let p = parse_ok(b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00\xc3\xbf\x00q\x01X\x06\x00\x00\x00latin1q\x02\x86q\x03Rq\x04.");
        assert_eq!(p.obj(p.root), Some(&Obj::Bytes(vec![0xff, 0])));
        let p = parse_ok(b"\x80\x02c__builtin__\nbytes\nq\x00)Rq\x01.");
        assert_eq!(p.obj(p.root), Some(&Obj::Bytes(vec![])));
    }

    #[test]
    fn truncation_and_garbage_are_errors() {
        let e = parse(b"\x80\x04X\x10\x00\x00\x00abc").unwrap_err().0;
        assert_eq!(e, "truncated pickle (ends at byte 10 inside a BINUNICODE that starts at byte 2)");
        let e = parse(b"\x80\x04K\x01").unwrap_err().0;
        assert_eq!(e, "truncated pickle (ends at byte 4 before its STOP opcode)");
        assert!(parse(b"").is_err());
        assert!(parse(b"\x80\x09.").unwrap_err().0.contains("protocol 9"));
        assert!(parse(b"\x80\x04.").unwrap_err().0.contains("stack underflow"));
        assert!(parse(b"\x80\x04(t0.").unwrap_err().0.contains("stack underflow"));
        assert!(parse(b"\x80\x04h\x05.").unwrap_err().0.contains("memo entry 5"));
        assert!(parse(b"\x80\x04K\x01K\x02b.").unwrap_err().0.contains("BUILD of an int"));
        assert!(parse(b"\x80\x04\xff.").unwrap_err().0.contains("invalid opcode 0xff"));
        assert!(parse(b"\x80\x04\x97.").unwrap_err().0.contains("out-of-band"));
        // a huge length must not allocate
        assert!(parse(b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\x7f").unwrap_err().0.starts_with("truncated"));
    }

    #[test]
    fn values_are_bounded_whatever_the_input_size() {
        let mut bytes = b"\x80\x04N".to_vec();
        bytes.resize(bytes.len() + MAX_VALUES + 10, b'2'); // DUP
        bytes.push(b'.');
        let e = parse(&bytes).unwrap_err().0;
        assert!(e.starts_with("more than 4194304 values"), "{e}");
    }

    #[test]
    fn cannot_reach_below_a_mark() {
        assert!(parse(b"\x80\x04K\x01(\x85.").unwrap_err().0.contains("stack underflow"));
        assert!(parse(b"\x80\x04]K\x01(a.").unwrap_err().0.contains("stack underflow"));
    }
}
