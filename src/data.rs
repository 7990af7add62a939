//! Reading the recordings tree (SPEC section 1):
//! `DATA_DIR/<class>/<folder>/bpm/<stem>_1.csv` pairs with `.../uterus/<stem>_2.csv`
//! (`_3` with `_4`), and each pair is joined on `time_sec`.

use crate::cli::Join;
use anyhow::{Context, Result, bail};
use std::cmp::Ordering;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use walkdir::WalkDir;

/// One bpm file and its uterus partner.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    pub class: String,
    pub folder: String,
    /// The bpm file's stem, e.g. `20250908-07500001_1`: the sequence id.
    pub stem: String,
    pub bpm: PathBuf,
    pub uterus: PathBuf,
}

impl Pair {
    pub fn group_id(&self) -> String {
        format!("{}-{}", self.class, self.folder)
    }
}

/// The pairs found under a data directory, and the files left without a partner.
#[derive(Debug, Default)]
pub struct Discovery {
    pub pairs: Vec<Pair>,
    pub unpaired: Vec<PathBuf>,
}

/// Compares strings with runs of digits in numeric order ("2" < "10").
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let ord = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb)).then_with(|| da.cmp(&db));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let z = d.iter().take_while(|&&c| c == b'0').count();
    &d[z.min(d.len().saturating_sub(1))..]
}

/// The partner suffix of a bpm stem suffix: `_1` -> `_2`, `_3` -> `_4`.
fn uterus_stem(bpm_stem: &str) -> Option<String> {
    let (base, suffix) = bpm_stem.rsplit_once('_')?;
    let partner = match suffix {
        "1" => "2",
        "3" => "4",
        _ => return None,
    };
    Some(format!("{base}_{partner}"))
}

/// Finds every bpm/uterus pair under `dir`, in output order (class, group numeric-aware,
/// sequence).
pub fn discover(dir: &Path) -> Result<Discovery> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    // (class, folder) -> (bpm stems -> path, uterus stems -> path)
    type Files = HashMap<String, PathBuf>;
    let mut found: HashMap<(String, String), (Files, Files)> = HashMap::new();
    let mut unpaired = Vec::new();
    for entry in WalkDir::new(dir).min_depth(4).max_depth(4).follow_links(true) {
        let entry = entry.with_context(|| format!("cannot read directory tree {}", dir.display()))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let path = entry.path();
        if !path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
            continue;
        }
        let comps: Vec<String> = path
            .strip_prefix(dir)
            .expect("walkdir yields paths below its root")
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        let [class, folder, kind, _file] = &comps[..] else { continue };
        let stem = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let slot = found.entry((class.clone(), folder.clone())).or_default();
        match kind.as_str() {
            "bpm" => slot.0.insert(stem, path.to_path_buf()),
            "uterus" => slot.1.insert(stem, path.to_path_buf()),
            _ => continue,
        };
    }
    let mut pairs = Vec::new();
    for ((class, folder), (mut bpm, mut uterus)) in found {
        let mut stems: Vec<String> = bpm.keys().cloned().collect();
        stems.sort();
        for stem in stems {
            let partner = uterus_stem(&stem).and_then(|u| uterus.remove(&u));
            let bpm_path = bpm.remove(&stem).expect("stem taken from the map");
            match partner {
                Some(u) => {
                    pairs.push(Pair { class: class.clone(), folder: folder.clone(), stem, bpm: bpm_path, uterus: u })
                }
                None => unpaired.push(bpm_path),
            }
        }
        unpaired.extend(uterus.into_values());
    }
    pairs.sort_by(|a, b| {
        a.class
            .cmp(&b.class)
            .then_with(|| natural_cmp(&a.folder, &b.folder))
            .then_with(|| a.folder.cmp(&b.folder))
            .then_with(|| natural_cmp(&a.stem, &b.stem))
            .then_with(|| a.stem.cmp(&b.stem))
    });
    unpaired.sort();
    Ok(Discovery { pairs, unpaired })
}

/// One `time_sec,value` file: its text, and for each data row its time in microseconds
/// (for the join), its time in seconds, and where the time and value texts are (echoed to
/// the output as written).
#[derive(Debug, Default)]
pub struct SignalFile {
    text: String,
    rows: Vec<SignalRow>,
}

#[derive(Clone, Copy, Debug)]
struct SignalRow {
    key: i64,
    time: f64,
    time_text: (u32, u32),
    value_text: (u32, u32),
}

impl SignalFile {
    pub fn len(&self) -> usize {
        self.rows.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    fn slice(&self, (start, end): (u32, u32)) -> &str {
        &self.text[start as usize..end as usize]
    }
    pub fn time_text(&self, i: usize) -> &str {
        self.slice(self.rows[i].time_text)
    }
    pub fn value_text(&self, i: usize) -> &str {
        self.slice(self.rows[i].value_text)
    }
}

/// Reads a `time_sec,value` file. Errors name the file, line and field.
pub fn read_signal_file(path: &Path) -> Result<SignalFile> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let bytes = e.as_bytes();
        let valid = e.utf8_error().valid_up_to();
        let line = 1 + bytes[..valid].iter().filter(|&&b| b == b'\n').count();
        anyhow::anyhow!("{} line {line}: not UTF-8 text", path.display())
    })?;
    if text.len() > u32::MAX as usize {
        bail!("{}: a signal file of 4 GiB or more is not supported", path.display());
    }
    let body = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut rows = Vec::new();
    // Lines as `str::lines` cuts them (a trailing empty line aside, which is blank anyway).
    let mut lines = body.split('\n').enumerate();
    match lines.next() {
        Some((_, h)) if h.trim().split(',').next().is_some_and(|c| c.trim().eq_ignore_ascii_case("time_sec")) => {}
        Some((_, h)) => bail!("{} line 1: expected the header time_sec,value, found {:?}", path.display(), truncate(h)),
        None => bail!("{}: empty file (no header)", path.display()),
    }
    let at = |s: &str| {
        let start = s.as_ptr() as usize - text.as_ptr() as usize;
        (start as u32, (start + s.len()) as u32)
    };
    for (i, line) in lines {
        let line = line.trim_end_matches('\r');
        if trim(line).is_empty() {
            continue;
        }
        let lineno = i + 1;
        let fields = match memchr::memchr(b',', line.as_bytes()) {
            Some(c) if memchr::memchr(b',', &line.as_bytes()[c + 1..]).is_none() => Some((&line[..c], &line[c + 1..])),
            _ => None,
        };
        let Some((t, v)) = fields else {
            bail!("{} line {lineno}: expected 2 fields time_sec,value, found {:?}", path.display(), truncate(line));
        };
        let (t, v) = (trim(t), trim(v));
        let time: f64 = match t.parse::<f64>() {
            Ok(x) if x.is_finite() => x,
            _ => bail!("{} line {lineno}, field time_sec: {:?} is not a number", path.display(), truncate(t)),
        };
        if !v.is_empty() && v.parse::<f64>().is_err() {
            bail!("{} line {lineno}, field value: {:?} is not a number", path.display(), truncate(v));
        }
        rows.push(SignalRow { key: (time * 1e6).round() as i64, time, time_text: at(t), value_text: at(v) });
    }
    Ok(SignalFile { text, rows })
}

/// `str::trim`, skipped when the text neither starts nor ends with a space of any kind.
fn trim(s: &str) -> &str {
    match (s.as_bytes().first(), s.as_bytes().last()) {
        (Some(&a), Some(&b)) if a.is_ascii_graphic() && b.is_ascii_graphic() => s,
        _ => s.trim(),
    }
}

fn truncate(s: &str) -> String {
    if s.len() <= 40 {
        return s.to_owned();
    }
    let mut end = 40;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// A pair's two files joined on time: rows in time order, each taken from the bpm file,
/// the uterus file, or both.
#[derive(Debug, Default)]
pub struct Merged {
    bpm: SignalFile,
    uterus: SignalFile,
    /// (bpm row, uterus row); [`NONE`] where a side is missing (outer join).
    rows: Vec<(u32, u32)>,
}

const NONE: u32 = u32::MAX;

impl Merged {
    pub fn len(&self) -> usize {
        self.rows.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    /// Row `i` as (timestamp text, bpm text, uterus text); a missing side is empty. The
    /// timestamp is the bpm file's, or the uterus file's for a uterus-only row.
    pub fn row(&self, i: usize) -> (&str, &str, &str) {
        let (b, u) = self.rows[i];
        fn value(f: &SignalFile, j: u32) -> &str {
            if j == NONE { "" } else { f.value_text(j as usize) }
        }
        let time = if b != NONE { self.bpm.time_text(b as usize) } else { self.uterus.time_text(u as usize) };
        (time, value(&self.bpm, b), value(&self.uterus, u))
    }
    /// The timestamp of row `i` in seconds.
    /// Rows whose time repeats the row before (a file with a time twice): the engine
    /// scores only the first of them (`timestamp_not_after_previous`).
    pub fn repeated_times(&self) -> usize {
        (1..self.len()).filter(|&i| self.time(i) == self.time(i - 1)).count()
    }

    pub fn time(&self, i: usize) -> f64 {
        let (b, u) = self.rows[i];
        if b != NONE { self.bpm.rows[b as usize].time } else { self.uterus.rows[u as usize].time }
    }
}

/// Joins a pair's two files on time, ordered by time.
pub fn merge_pair(pair: &Pair, join: Join) -> Result<Merged> {
    let b = read_signal_file(&pair.bpm)?;
    let u = read_signal_file(&pair.uterus)?;
    // Uterus rows by time: where a time repeats, the last row of that time is the partner.
    let mut by_time: Vec<(i64, u32)> = u.rows.iter().enumerate().map(|(j, r)| (r.key, j as u32)).collect();
    by_time.sort_unstable();
    let mut rows: Vec<(i64, (u32, u32))> = Vec::with_capacity(b.len());
    let mut used = vec![false; u.len()];
    for (i, r) in b.rows.iter().enumerate() {
        let end = by_time.partition_point(|&(k, _)| k <= r.key);
        match by_time[..end].last() {
            Some(&(k, j)) if k == r.key => {
                used[j as usize] = true;
                rows.push((r.key, (i as u32, j)));
            }
            _ if join == Join::Outer => rows.push((r.key, (i as u32, NONE))),
            _ => {}
        }
    }
    if join == Join::Outer {
        for j in (0..u.len()).filter(|&j| !used[j]) {
            rows.push((u.rows[j].key, (NONE, j as u32)));
        }
    }
    rows.sort_by_key(|r| r.0);
    Ok(Merged { bpm: b, uterus: u, rows: rows.into_iter().map(|r| r.1).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut v = vec!["10", "2", "1", "100", "02", "a10", "a9"];
        v.sort_by(|a, b| natural_cmp(a, b).then_with(|| a.cmp(b)));
        assert_eq!(v, ["1", "2", "02", "10", "100", "a9", "a10"]);
    }

    #[test]
    fn pairs_by_suffix_not_substring() {
        assert_eq!(uterus_stem("20250908-07500001_1").as_deref(), Some("20250908-07500001_2"));
        assert_eq!(uterus_stem("x_3").as_deref(), Some("x_4"));
        assert_eq!(uterus_stem("x_13"), None);
        assert_eq!(uterus_stem("x_2"), None);
        assert_eq!(uterus_stem("x1"), None);
    }
}
