//! Import of pickled scikit-learn IsolationForest models (`model_if.pkl`).

use crate::forest::ForestSpec;
use anyhow::{Result, bail};
use std::path::Path;

/// Reads the forest of a pickled `sklearn.ensemble.IsolationForest`.
pub fn load_forest_spec(path: &Path) -> Result<ForestSpec> {
    bail!("{}: importing scikit-learn pickles is not supported by this build yet", path.display())
}
