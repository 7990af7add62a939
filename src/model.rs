//! Model artifacts (SPEC section 4): `meta.json` plus checksummed forest files, written
//! atomically and checked at load; and the detector that turns a feature row into a score
//! and per-signal flags.

use crate::features::{FeatureConfig, FeatureKind, SIGNALS};
use crate::forest::{Forest, ForestSpec};
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};

pub const META_FILE: &str = "meta.json";
pub const PICKLE_FILE: &str = "model_if.pkl";

/// What a model file is for: the joint forest gives `anomaly_score`; the per-signal
/// forests, each grown on one signal's feature columns only, give the signal flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Joint,
    Bpm,
    Uterus,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelFile {
    pub name: String,
    pub role: Role,
    pub sha256: String,
}

/// meta.json. `config` is kept as free-form JSON so that the prototype's keys survive a
/// round trip; the feature settings are read out of it by [`feature_config_from`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Meta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fad_version: Option<String>,
    pub config: Value,
    pub feature_cols: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lag: Option<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub model_files: Vec<ModelFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<Value>,
}

/// Reads the feature settings of a model's config. Without `feature_set`, the config is
/// the prototype's window features; keys the prototype did not have (`bpm_valid_range`,
/// `uterus_valid_min`, `uterus_valid_max`, `zero_is_loss`, `max_gap_s`) mean "no limit"
/// when absent.
pub fn feature_config_from(config: &Value) -> Result<FeatureConfig> {
    fn list(config: &Value, key: &str, default: &[usize]) -> Result<Vec<usize>> {
        match config.get(key) {
            None | Some(Value::Null) => Ok(default.to_vec()),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| anyhow!("config.{key} must be a list of positive integers ({e})")),
        }
    }
    fn opt<T: serde::de::DeserializeOwned>(config: &Value, key: &str) -> Result<Option<T>> {
        match config.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_path_to_error::deserialize(v.clone()).map(Some).map_err(|e| {
                // The path names the field inside (config.filters.uterus_flag[0]), not
                // just the setting that holds it.
                let at = e.path().to_string();
                let at = if at == "." { String::new() } else { format!(".{at}") };
                anyhow!("config.{key}{at} is malformed ({})", e.inner())
            }),
        }
    }
    let feature_set = match config.get("feature_set") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(other) => bail!("config.feature_set must be \"window\" or \"filters\", not {other}"),
    };
    let kind = match feature_set {
        None | Some("window") => FeatureKind::Window {
            lags: list(config, "lags", &[1, 2, 3, 6, 12, 24])?,
            roll_windows: list(config, "roll_windows", &[3, 6, 12])?,
        },
        Some("filters") => {
            if config.get("filters").is_some_and(|f| !f.is_object()) {
                bail!("config.filters must be an object of filter settings");
            }
            FeatureKind::Filters(opt(config, "filters")?.ok_or_else(|| anyhow!("config.filters is missing"))?)
        }
        Some(other) => bail!("config.feature_set {other:?} is not one fad knows (window, filters)"),
    };
    let fc = FeatureConfig {
        kind,
        bpm_valid_range: opt(config, "bpm_valid_range")?,
        uterus_valid_min: opt(config, "uterus_valid_min")?,
        uterus_valid_max: opt(config, "uterus_valid_max")?,
        zero_is_loss: opt(config, "zero_is_loss")?.unwrap_or(false),
        max_gap_s: opt(config, "max_gap_s")?,
    };
    fc.validate().map_err(|e| anyhow!("config: {e}"))?;
    Ok(fc)
}

/// The config keys that describe `fc`, as [`feature_config_from`] reads them back.
pub fn feature_config_json(fc: &FeatureConfig) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    match &fc.kind {
        FeatureKind::Window { lags, roll_windows } => {
            m.insert("feature_set".into(), "window".into());
            m.insert("lags".into(), serde_json::json!(lags));
            m.insert("roll_windows".into(), serde_json::json!(roll_windows));
        }
        FeatureKind::Filters(p) => {
            m.insert("feature_set".into(), "filters".into());
            let mut filters = serde_json::to_value(p).expect("filter settings serialise");
            // None (all of the signal's columns) is written as null, so that the key is
            // known to --feature-config and meta.json says it.
            for key in ["bpm_flag", "uterus_flag"] {
                filters.as_object_mut().expect("an object").entry(key).or_insert(Value::Null);
            }
            m.insert("filters".into(), filters);
        }
    }
    m.insert("bpm_valid_range".into(), serde_json::json!(fc.bpm_valid_range));
    m.insert("uterus_valid_min".into(), serde_json::json!(fc.uterus_valid_min));
    m.insert("uterus_valid_max".into(), serde_json::json!(fc.uterus_valid_max));
    m.insert("zero_is_loss".into(), fc.zero_is_loss.into());
    m.insert("max_gap_s".into(), serde_json::json!(fc.max_gap_s));
    m
}

/// Score and per-signal flags of one scored sample.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Detection {
    pub score: f64,
    pub bpm_anomaly: bool,
    pub uterus_anomaly: bool,
}

/// Writes `x` as `{}` (Display) does: the shortest digits that read back as `x`, never
/// an exponent. Scores are written millions of times a run, so where ryu writes in the
/// same notation (fractions from 1e-5 up) it does the work, several times faster. The
/// one difference: where two shortest texts are equally close (rare for scores, which
/// use all 53 bits), ryu rounds half to even and Display half up; both read back as `x`.
pub fn write_f64(out: &mut impl std::io::Write, x: f64) -> std::io::Result<()> {
    write_shortest(out, x, x)
}

/// [`write_f64`] for an `f32` (feature values of `fad score --with-features`): the text
/// of `{}` for an `f32`, by ryu where that is the same.
pub fn write_f32(out: &mut impl std::io::Write, x: f32) -> std::io::Result<()> {
    write_shortest(out, x, x as f64)
}

/// Writes `x` (whose value is `wide`) by ryu in its plain-notation range, else by Display.
fn write_shortest<T: ryu::Float + std::fmt::Display>(
    out: &mut impl std::io::Write,
    x: T,
    wide: f64,
) -> std::io::Result<()> {
    if (1e-5..1e15).contains(&wide.abs()) && wide.fract() != 0.0 {
        out.write_all(ryu::Buffer::new().format_finite(x).as_bytes())
    } else {
        write!(out, "{x}")
    }
}

/// A loaded model: feature settings plus forests.
#[derive(Debug)]
pub struct Model {
    pub features: FeatureConfig,
    pub meta: Meta,
    pub joint: Forest,
    /// Per-signal forests (bpm, uterus); absent for imported scikit-learn models.
    pub per_signal: Option<[Forest; 2]>,
    pub dir: PathBuf,
}

impl Model {
    /// Scores feature rows (row-major) into `out`.
    pub fn detect_batch(&self, rows: &[f32], out: &mut [Detection]) {
        let n = out.len();
        let mut joint = vec![0.0; n];
        self.joint.score_samples_batch(rows, &mut joint);
        let mut sig = [vec![0.0; n], vec![0.0; n]];
        if let Some(fs) = &self.per_signal {
            for (f, s) in fs.iter().zip(sig.iter_mut()) {
                f.score_samples_batch(rows, s);
            }
        }
        for i in 0..n {
            let score = joint[i] - self.joint.offset();
            let (b, u) = match &self.per_signal {
                Some([fb, fu]) => (sig[0][i] - fb.offset() < 0.0, sig[1][i] - fu.offset() < 0.0),
                None => (score < 0.0, score < 0.0),
            };
            out[i] = Detection { score, bpm_anomaly: b, uterus_anomaly: u };
        }
    }

    pub fn n_features(&self) -> usize {
        self.features.n_features()
    }

    /// Loads `dir`: fad's own artifacts when meta.json lists model files, else a
    /// scikit-learn `model_if.pkl` beside the prototype's meta.json.
    pub fn load(dir: &Path) -> Result<Model> {
        let meta_path = dir.join(META_FILE);
        let text = fs::read_to_string(&meta_path)
            .with_context(|| format!("cannot read model metadata {}", meta_path.display()))?;
        let meta: Meta = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid model metadata", meta_path.display()))?;
        let features = feature_config_from(&meta.config).with_context(|| format!("in {}", meta_path.display()))?;
        let expected = features.feature_cols();
        if meta.feature_cols != expected {
            bail!(
                "{}: feature_cols ({} columns) do not match the features its config defines ({} columns: {} ...)",
                meta_path.display(),
                meta.feature_cols.len(),
                expected.len(),
                expected.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
            );
        }
        let mut joint = None;
        let mut per = [None, None];
        if meta.model_files.is_empty() {
            let pkl = dir.join(PICKLE_FILE);
            if !pkl.exists() {
                bail!("{} lists no model files and {} has no {PICKLE_FILE}", meta_path.display(), dir.display());
            }
            joint = Some(load_pickled_forest(&pkl, &meta.feature_cols)?);
        }
        for mf in &meta.model_files {
            let forest = load_forest_file(dir, mf)?;
            match mf.role {
                Role::Joint => joint = Some(forest),
                Role::Bpm => per[0] = Some(forest),
                Role::Uterus => per[1] = Some(forest),
            }
        }
        let joint = joint.ok_or_else(|| anyhow!("{} lists no joint forest", meta_path.display()))?;
        let per_signal = match per {
            [Some(b), Some(u)] => Some([b, u]),
            [None, None] => None,
            _ => bail!("{} lists a forest for one signal but not the other", meta_path.display()),
        };
        for f in std::iter::once(&joint).chain(per_signal.iter().flatten()) {
            if f.n_features() != expected.len() {
                bail!(
                    "model in {} expects {} features but its meta.json lists {}",
                    dir.display(),
                    f.n_features(),
                    expected.len()
                );
            }
        }
        Ok(Model { features, meta, joint, per_signal, dir: dir.to_path_buf() })
    }
}

fn load_forest_file(dir: &Path, mf: &ModelFile) -> Result<Forest> {
    if mf.name.contains('/') || mf.name.contains('\\') || mf.name.starts_with('.') {
        bail!("model file name {:?} in meta.json is not a plain file name", mf.name);
    }
    let path = dir.join(&mf.name);
    let bytes = fs::read(&path).with_context(|| format!("cannot read model file {}", path.display()))?;
    let sum = sha256_hex(&bytes);
    if sum != mf.sha256 {
        bail!("{} has SHA-256 {sum}, but meta.json expects {} (file changed or truncated)", path.display(), mf.sha256);
    }
    let spec: ForestSpec =
        serde_json::from_slice(&bytes).with_context(|| format!("{} is not a valid forest file", path.display()))?;
    Forest::new(&spec).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Imports a pickled scikit-learn IsolationForest. A forest fitted on a DataFrame knows
/// its column names: they must be meta.json's `feature_cols`, in that order (scikit-learn
/// itself refuses other columns).
pub fn load_pickled_forest(path: &Path, feature_cols: &[String]) -> Result<Forest> {
    let imported = crate::sklearn::import(path)?;
    if let Some(names) = &imported.feature_names
        && names.len() == feature_cols.len()
        && let Some(i) = names.iter().zip(feature_cols).position(|(a, b)| a != b)
    {
        bail!(
            "{}: the forest was fitted on columns other than those in meta.json (column {} is {} in the model, {} in meta.json)",
            path.display(),
            i + 1,
            names[i],
            feature_cols[i]
        );
    }
    Forest::new(&imported.spec).map_err(|e| anyhow!("{}: {e}", path.display()))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Refuses an `out_dir` that is not a directory, or that is not empty unless `force`.
/// `fad train` calls it before reading any data, so that a long training is not lost to
/// it, and [`write_artifacts`] again at the end.
pub fn check_out_dir(out_dir: &Path, force: bool) -> Result<()> {
    if out_dir.exists() && !out_dir.is_dir() {
        bail!("--out-dir {} exists and is not a directory", out_dir.display());
    }
    let nonempty = out_dir.is_dir() && fs::read_dir(out_dir).map(|mut d| d.next().is_some()).unwrap_or(false);
    if nonempty && !force {
        bail!("--out-dir {} is not empty; use --force to replace it", out_dir.display());
    }
    Ok(())
}

/// Writes meta.json and the forests into `out_dir` atomically: everything goes to a
/// temporary directory beside it, which is renamed into place at the end. A non-empty
/// `out_dir` is an error unless `force`.
pub fn write_artifacts(out_dir: &Path, mut meta: Meta, forests: &[(Role, &ForestSpec)], force: bool) -> Result<()> {
    // Checked again here, not only before training: the directory may have filled meanwhile.
    check_out_dir(out_dir, force)?;
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let base = out_dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "artifacts".into());
    let tmp = parent.join(format!(".{base}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| -> Result<()> {
        meta.model_files.clear();
        for (role, spec) in forests {
            let name = match role {
                Role::Joint => "forest.json".to_string(),
                r => format!("forest_{}.json", SIGNALS[(*r == Role::Uterus) as usize]),
            };
            let bytes = serde_json::to_vec(spec)?;
            write_synced(&tmp.join(&name), &bytes)?;
            meta.model_files.push(ModelFile { name, role: *role, sha256: sha256_hex(&bytes) });
        }
        let mut text = serde_json::to_vec_pretty(&meta)?;
        text.push(b'\n');
        write_synced(&tmp.join(META_FILE), &text)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out_dir.exists() {
        // rename() cannot replace a non-empty directory. Swap the two atomically where the
        // system can (a reader sees the old model or the new one, never none); otherwise
        // move the old one aside first.
        if exchange_dirs(&tmp, out_dir).is_ok() {
            let _ = fs::remove_dir_all(&tmp);
            return Ok(());
        }
        let old = parent.join(format!(".{base}.old-{}", std::process::id()));
        fs::rename(out_dir, &old).with_context(|| format!("cannot move old {} aside", out_dir.display()))?;
        fs::rename(&tmp, out_dir)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), out_dir.display()))?;
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(&tmp, out_dir)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), out_dir.display()))?;
    }
    Ok(())
}

/// Atomically exchanges two paths (Linux `renameat2(RENAME_EXCHANGE)`).
#[cfg(target_os = "linux")]
fn exchange_dirs(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both pointers are valid NUL-terminated paths for the duration of the call.
    let rc =
        unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(not(target_os = "linux"))]
fn exchange_dirs(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all().with_context(|| format!("cannot sync {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    /// `ours` is Display's text for the value `x` up to a tie: the same notation (no
    /// exponent), the same length (both are the shortest digits), and it reads back as
    /// `x`; where the digits differ, both read back as `x` (a tie between two shortest).
    fn same_as_display<T>(ours: &[u8], x: T) -> Result<(), String>
    where
        T: std::fmt::Display + std::str::FromStr + Copy + Into<f64>,
    {
        let ours = std::str::from_utf8(ours).unwrap();
        let display = x.to_string();
        if ours == display {
            return Ok(());
        }
        let back: f64 = ours.parse::<T>().map_err(|_| format!("{ours:?} does not parse"))?.into();
        let want: f64 = x.into();
        if ours.len() != display.len() || ours.contains('e') || back.to_bits() != want.to_bits() {
            return Err(format!("{ours:?} for {display:?}"));
        }
        Ok(())
    }

    proptest::proptest! {
        #[test]
        fn write_f64_and_f32_write_what_display_writes(bits in proptest::num::u64::ANY, score in -0.75f64..0.75) {
            // Edges of the ryu range, integers, non-finite values, and exact ties between
            // two shortest texts (ryu rounds those half to even, Display half up).
            let edges = [0.0, -0.0, 1.0, -3.0, 1e-5, 9.99e-6, 1e15, 1e15 - 0.5, 1e16, 123456789.0, f64::NAN,
                f64::INFINITY, 6e14 + 0.25, 15729.0 / 262144.0, 5.33203125];
            let drawn = [f64::from_bits(bits), score, score * 1e-4, score * 1e-6, (score * 1e4).round() / 1e4];
            for x in drawn.into_iter().chain(edges) {
                let mut ours = Vec::new();
                super::write_f64(&mut ours, x).unwrap();
                proptest::prop_assert!(x.is_nan() || same_as_display(&ours, x).is_ok(), "{:?}", same_as_display(&ours, x));
                let narrow = x as f32;
                let mut ours = Vec::new();
                super::write_f32(&mut ours, narrow).unwrap();
                proptest::prop_assert!(narrow.is_nan() || same_as_display(&ours, narrow).is_ok(), "{:?}", same_as_display(&ours, narrow));
            }
            let narrow = f32::from_bits(bits as u32);
            let mut ours = Vec::new();
            super::write_f32(&mut ours, narrow).unwrap();
            proptest::prop_assert!(narrow.is_nan() || same_as_display(&ours, narrow).is_ok(), "{:?}", same_as_display(&ours, narrow));
        }
    }

    #[test]
    fn non_finite_values_are_written_as_display_writes_them() {
        for x in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut ours = Vec::new();
            write_f64(&mut ours, x).unwrap();
            assert_eq!(String::from_utf8(ours).unwrap(), x.to_string());
        }
    }

    use super::*;

    #[test]
    fn write_artifacts_still_refuses_a_dir_that_filled_after_the_early_check() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m");
        check_out_dir(&out, false).unwrap();
        fs::create_dir(&out).unwrap();
        check_out_dir(&out, false).unwrap(); // empty is fine
        fs::write(out.join("other.txt"), "x").unwrap(); // someone writes meanwhile
        let meta = Meta {
            fad_version: None,
            config: serde_json::json!({}),
            feature_cols: vec![],
            max_lag: None,
            model_files: vec![],
            report: None,
        };
        let e = write_artifacts(&out, meta, &[], false).unwrap_err();
        assert!(format!("{e}").contains("is not empty; use --force"), "{e}");
        assert_eq!(fs::read_to_string(out.join("other.txt")).unwrap(), "x");
        let file = dir.path().join("f");
        fs::write(&file, "").unwrap();
        assert!(format!("{}", check_out_dir(&file, true).unwrap_err()).contains("is not a directory"));
    }
}
