//! The `fad stream --state FILE` file: every series' window, so that a restart does not
//! cost every patient the warm-up again.
//!
//! A compact binary file, little-endian:
//!
//! ```text
//! magic "FADSTATE" | version u32 | feature fingerprint [32] | warm-up u32 | clock f64 | count u64
//! count x ( group len u32, group | sequence len u32, sequence | used_at f64
//!           | last_time f64 (NaN = none) | head u32 | len u32 | values u32 | values x f64 )
//! SHA-256 of everything before it [32]
//! ```
//!
//! The fingerprint is the SHA-256 of the feature settings, so windows are only restored
//! into a model that computes the same features. Files are written to a temporary file
//! beside the target, synced and renamed into place: a reader (or a restart after
//! `kill -9`) sees the old file or the new one, never half of one.

use crate::engine::{Engine, SavedSeries};
use crate::features::FeatureConfig;
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FADSTATE";
/// 2: raw series state (window ring or filter state); 1 held window samples only.
const VERSION: u32 = 2;
/// Longest state vector accepted when reading.
const MAX_VALUES: u32 = 1 << 17;
/// Longest group or sequence id accepted when reading (the stream rejects longer ones).
const MAX_ID: u32 = 1 << 16;

/// SHA-256 of the settings that shape a series' state: equal fingerprints mean
/// interchangeable windows.
pub fn fingerprint(fc: &FeatureConfig) -> [u8; 32] {
    let text = serde_json::to_vec(&fc.state_settings()).expect("feature settings always serialise");
    Sha256::digest(&text).into()
}

/// What a restore found.
#[derive(Debug, Default, PartialEq)]
pub struct Restored {
    pub series: u64,
}

/// Writes `w` while hashing it.
struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads while hashing what was read.
struct HashingReader<R: Read> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> HashingReader<R> {
    fn exact<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.inner.read_exact(&mut b)?;
        self.hash.update(b);
        Ok(b)
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.exact()?))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.exact()?))
    }
    fn f64(&mut self) -> io::Result<f64> {
        Ok(f64::from_le_bytes(self.exact()?))
    }
    fn text(&mut self, len: u32) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; len as usize];
        self.inner.read_exact(&mut b)?;
        self.hash.update(&b);
        Ok(b)
    }
}

/// Saves every series of `engine` into `path` atomically (temporary file, fsync, rename,
/// fsync of the directory).
pub fn save(engine: &Engine, path: &Path) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| -> Result<()> {
        let file = fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = HashingWriter { inner: BufWriter::with_capacity(1 << 16, file), hash: Sha256::new() };
        write_body(engine, &mut w).with_context(|| format!("cannot write {}", tmp.display()))?;
        let digest: [u8; 32] = w.hash.finalize().into();
        let mut inner = w.inner;
        inner.write_all(&digest).with_context(|| format!("cannot write {}", tmp.display()))?;
        let file = inner
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        file.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        // The rename itself must reach the disk for the file to survive a crash.
        if let Ok(dir) = fs::File::open(parent_dir(path)) {
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot save the stream state to {}", path.display()))
}

fn write_body<W: Write>(engine: &Engine, w: &mut W) -> io::Result<()> {
    let fc = &engine.model().features;
    w.write_all(MAGIC)?;
    w.write_all(&VERSION.to_le_bytes())?;
    w.write_all(&fingerprint(fc))?;
    w.write_all(&(fc.warmup() as u32).to_le_bytes())?;
    w.write_all(&engine.clock().to_le_bytes())?;
    w.write_all(&(engine.series_count() as u64).to_le_bytes())?;
    for s in engine.saved_series() {
        for id in [&s.group_id, &s.sequence_id] {
            w.write_all(&(id.len() as u32).to_le_bytes())?;
            w.write_all(id.as_bytes())?;
        }
        w.write_all(&s.used_at.to_le_bytes())?;
        w.write_all(&s.series.last_time().unwrap_or(f64::NAN).to_le_bytes())?;
        let (values, head, len) = s.series.raw();
        for n in [head, len, values.len() as u32] {
            w.write_all(&n.to_le_bytes())?;
        }
        for v in values {
            w.write_all(&v.to_le_bytes())?;
        }
    }
    Ok(())
}

/// Fails now, not after hours of input, when the state could never be saved there.
pub fn check_writable(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!("--state {} is a directory; give a file name", path.display());
    }
    let tmp = temp_path(path);
    fs::File::create(&tmp).with_context(|| {
        format!("cannot save the stream state to {}: cannot create {}", path.display(), tmp.display())
    })?;
    let _ = fs::remove_file(&tmp);
    Ok(())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "state".into());
    parent_dir(path).join(format!(".{name}.tmp-{}", std::process::id()))
}

/// Restores the series saved in `path` into `engine` (which must be fresh). A missing file
/// is a first start and restores nothing; a file that is corrupt, truncated or written for
/// other feature settings is an error that says which.
pub fn load(engine: &mut Engine, path: &Path) -> Result<Restored> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Restored::default()),
        Err(e) => return Err(e).with_context(|| format!("cannot open state file {}", path.display())),
    };
    let mut r = HashingReader { inner: BufReader::with_capacity(1 << 16, file), hash: Sha256::new() };
    read_body(engine, &mut r).map_err(|e| {
        let e = match e.downcast::<io::Error>() {
            Ok(io) if io.kind() == io::ErrorKind::UnexpectedEof => anyhow::anyhow!("it is truncated"),
            Ok(io) => anyhow::Error::new(io),
            Err(other) => other,
        };
        e.context(format!("state file {} cannot be used (--state-reset starts afresh)", path.display()))
    })
}

fn read_body<R: Read>(engine: &mut Engine, r: &mut HashingReader<R>) -> Result<Restored> {
    let fc = engine.model().features.clone();
    let warmup = fc.warmup();
    if &r.exact::<8>()? != MAGIC {
        bail!("it is not a fad state file (bad magic bytes)");
    }
    let version = r.u32()?;
    if version != VERSION {
        bail!("it has format version {version}; this fad reads version {VERSION}");
    }
    if r.exact::<32>()? != fingerprint(&fc) {
        bail!("it was written for a model with other feature settings (lags, windows or limits)");
    }
    let saved_warmup = r.u32()?;
    if saved_warmup as usize != warmup {
        bail!("its series warm up over {saved_warmup} samples, the model's over {warmup}");
    }
    let clock = r.f64()?;
    let count = r.u64()?;
    for n in 0..count {
        let mut ids = [String::new(), String::new()];
        for id in ids.iter_mut() {
            let len = r.u32()?;
            if len > MAX_ID {
                bail!("series {n}: an id of {len} bytes (corrupt)");
            }
            *id = String::from_utf8(r.text(len)?)
                .map_err(|_| anyhow::anyhow!("series {n}: an id is not UTF-8 (corrupt)"))?;
        }
        let used_at = r.f64()?;
        let last = r.f64()?;
        let (head, len, k) = (r.u32()?, r.u32()?, r.u32()?);
        if k > MAX_VALUES {
            bail!("series {n}: a state of {k} values (corrupt)");
        }
        let values = (0..k).map(|_| r.f64()).collect::<io::Result<Vec<f64>>>()?;
        let series = fc
            .series_from_raw(values, head, len, (!last.is_nan()).then_some(last))
            .ok_or_else(|| anyhow::anyhow!("series {n}: its state does not fit the model's features (corrupt)"))?;
        let [group_id, sequence_id] = ids;
        engine.restore(SavedSeries { group_id, sequence_id, used_at, series }, clock);
    }
    let expected: [u8; 32] = r.hash.clone().finalize().into();
    let mut stored = [0u8; 32];
    r.inner.read_exact(&mut stored)?;
    if stored != expected {
        bail!("its checksum does not match its contents (corrupt)");
    }
    let mut extra = [0u8; 1];
    if r.inner.read(&mut extra)? != 0 {
        bail!("it has bytes after its checksum (corrupt)");
    }
    Ok(Restored { series: count })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{FeatureKind, Filter};

    fn with(f: impl FnOnce(&mut crate::features::FilterParams)) -> FeatureConfig {
        let mut fc = FeatureConfig::default();
        let FeatureKind::Filters(p) = &mut fc.kind else { unreachable!("the default is filters") };
        f(p);
        fc
    }

    #[test]
    fn the_flag_columns_do_not_change_the_fingerprint_but_the_features_do() {
        let default = fingerprint(&FeatureConfig::default());
        assert_eq!(default, fingerprint(&with(|p| p.uterus_flag = None)));
        assert_eq!(default, fingerprint(&with(|p| p.bpm_flag = Some(vec![Filter::Level]))));
        assert_ne!(default, fingerprint(&with(|p| p.uterus.pop().map(drop).unwrap_or(()))));
        assert_ne!(default, fingerprint(&with(|p| p.sd_s = 30.0)));
        // Unset flag settings are not written, so models made before they existed keep
        // the fingerprint their state files were written with.
        let unset = serde_json::to_string(&with(|p| (p.bpm_flag, p.uterus_flag) = (None, None))).unwrap();
        assert!(!unset.contains("_flag"), "{unset}");
    }
}
