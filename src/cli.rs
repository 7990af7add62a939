//! Every command-line flag, defined once: the binary parses these, and the man pages and
//! shell completions in `man/` and `completions/` are generated from them.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "fad",
    version,
    about = "Fetal anomaly detector: isolation-forest anomaly detection for CTG streams",
    long_about = "fad finds anomalies in cardiotocography (CTG) recordings: fetal heart rate (bpm) \
and uterine activity (uterus), per patient and recording session. Every subcommand reads \
files or stdin and writes stdout, one line at a time.",
    after_help = "Examples:\n  fad convert data/ > merged.csv\n  fad train merged.csv --out-dir artifacts\n  \
fad score merged.csv --model artifacts > scored.csv\n  tail -f feed.csv | fad stream --model artifacts\n\n\
Exit status: 0 success, 1 data or I/O error, 2 usage error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    Convert(ConvertArgs),
    Train(TrainArgs),
    Score(ScoreArgs),
    Stream(StreamArgs),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Join {
    /// Only timestamps present in both the bpm and the uterus file.
    Inner,
    /// Every timestamp of either file; the missing value is left empty.
    Outer,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ConvertOutput {
    /// The merged table: timestamp,group_id,sequence_id,bpm,uterus,target.
    Table,
    /// Stream messages (timestamp,bpm,uterus,group_id,sequence_id) in timestamp order.
    Feed,
}

/// Turn a folder tree of CTG recordings into one table (or a live feed).
#[derive(Args, Debug)]
#[command(
    long_about = "Reads DATA_DIR/<class>/<folder>/bpm/<stem>_1.csv (or _3) and the matching \
uterus/<stem>_2.csv (or _4), joins each pair on time_sec and writes one CSV with header \
timestamp,group_id,sequence_id,bpm,uterus,target. group_id is <class>-<folder>, so that \
patients whose folder names repeat across classes stay apart. Rows are ordered by class, \
group (numbers in numeric order), sequence and timestamp.",
    after_help = "Examples:\n  fad convert data/ > merged.csv\n  fad convert data/ --join outer > merged.csv\n  \
fad convert data/ --as feed --realtime 1 | fad stream --model artifacts"
)]
pub struct ConvertArgs {
    /// Folder holding <class>/<folder>/{bpm,uterus}/*.csv
    pub data_dir: PathBuf,
    /// How bpm and uterus rows are matched on time_sec.
    #[arg(long, value_enum, default_value_t = Join::Inner)]
    pub join: Join,
    /// Output: the merged table, or stream messages for `fad stream`.
    #[arg(long = "as", value_enum, default_value_t = ConvertOutput::Table, value_name = "KIND")]
    pub output: ConvertOutput,
    /// With --as feed: pace messages by their timestamps (1 = real time, 10 = ten times faster).
    #[arg(long, value_name = "FACTOR")]
    pub realtime: Option<f64>,
    #[command(flatten)]
    pub bad_files: BadFiles,
}

/// What to do with a malformed file of a data directory; convert, and train and score
/// given a directory, take it.
#[derive(Args, Debug)]
pub struct BadFiles {
    /// Skip malformed files of a data directory (named on stderr) instead of stopping with
    /// an error.
    #[arg(long)]
    pub skip_bad: bool,
}

/// Fit joint and per-signal isolation forests; write the model artifacts.
#[derive(Args, Debug)]
#[command(
    long_about = "Computes a feature row for every scorable sample of every recording: with \
--features filters (the default), exponentially weighted statistics of each signal with time \
constants in seconds (level, jump, deviation from a robust baseline, baseline, variability, \
burden, flat time); with --features window, the prototype's lags and rolling means and \
standard deviations (SPEC section 2). It splits the patients (unique target and group_id) \
into training and validation groups with the seeded RNG and fits three isolation forests on \
the training rows: a joint forest over all columns, which gives anomaly_score, and one forest \
per signal over that signal's columns only (for the uterus, by default, only those relative to \
the series' own spread, since toco amplitude is uncalibrated), which give bpm_anomaly and \
uterus_anomaly (each flags --flag-rate of its training samples). meta.json and the three forest files are written \
into --out-dir atomically. A report (groups, sequences and rows per side, anomaly rates \
overall and per signal, score quantiles, and on validation the hypoxia-vs-regular ROC AUC) \
goes to stderr and into meta.json.\n\n\
With --from-pickle DIR it trains nothing: it converts the Python prototype's artifacts \
(a scikit-learn IsolationForest pickled as DIR/model_if.pkl, beside the prototype's \
meta.json) into fad's own artifacts in --out-dir, with the same trees and the same \
scores. `fad score` and `fad stream` also read such a DIR directly; converting it once \
means later loads need no pickle.",
    after_help = "Examples:\n  fad train merged.csv --out-dir artifacts\n  fad train data/ --out-dir artifacts --n-estimators 100 --contamination 0.01\n  \
fad convert data/ | fad train - --out-dir artifacts --force\n  \
fad train data/ --features window --out-dir artifacts   # as the prototype\n  \
fad train --from-pickle prototype/ --out-dir artifacts   # import model_if.pkl"
)]
pub struct TrainArgs {
    /// Merged CSV (from `fad convert`), a data directory, or - for stdin.
    #[arg(value_name = "INPUT", required_unless_present_any = ["input_csv", "from_pickle"])]
    pub input: Option<PathBuf>,
    /// The prototype's spelling of INPUT.
    #[arg(long = "input-csv", alias = "input_csv", value_name = "PATH", conflicts_with = "input", hide = true)]
    pub input_csv: Option<PathBuf>,
    /// Convert the scikit-learn model in DIR (model_if.pkl + the prototype's meta.json)
    /// into fad's artifacts instead of training.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = [
            "input", "input_csv", "n_estimators", "max_samples", "contamination", "max_features", "val_size",
            "random_state", "join", "skip_bad", "features", "feature_config", "flag_rate", "train_class",
        ]
    )]
    pub from_pickle: Option<PathBuf>,
    /// Directory that receives meta.json and the forest files.
    #[arg(long, alias = "out_dir", value_name = "DIR")]
    pub out_dir: PathBuf,
    /// Replace a non-empty --out-dir.
    #[arg(long)]
    pub force: bool,
    /// Number of trees.
    #[arg(long, alias = "n_estimators", default_value_t = 300, value_name = "N")]
    pub n_estimators: usize,
    /// Rows per tree: auto (= min(256, n)), a count, or a fraction in (0, 1].
    #[arg(long, alias = "max_samples", default_value = "auto", value_name = "auto|N|F")]
    pub max_samples: String,
    /// Expected share of anomalies: auto (offset -0.5) or a fraction in (0, 0.5].
    #[arg(long, default_value = "auto", value_name = "auto|F")]
    pub contamination: String,
    /// Features per tree: a count (at most the number of feature columns), or a fraction
    /// in (0, 1]. A per-signal forest takes at most its own signal's columns.
    #[arg(long, alias = "max_features", default_value = "1.0", value_name = "N|F")]
    pub max_features: String,
    /// Share of patients (groups) held out for validation.
    #[arg(long, alias = "val_size", default_value_t = 0.2, value_name = "F")]
    pub val_size: f64,
    /// Seed of every random choice; the same seed gives byte-identical artifacts.
    #[arg(long, alias = "random_state", default_value_t = 42, value_name = "SEED")]
    pub random_state: u64,
    /// Worker threads (default: all cores). Results do not depend on it.
    #[arg(long, alias = "n_jobs", value_name = "N")]
    pub n_jobs: Option<usize>,
    /// With a data directory as INPUT: how bpm and uterus rows are matched.
    #[arg(long, value_enum, default_value_t = Join::Inner)]
    pub join: Join,
    #[command(flatten)]
    pub bad_files: BadFiles,
    /// Feature set: fad's time-based filters, or the prototype's lag/rolling window.
    #[arg(long, value_enum, default_value_t = FeatureSet::Filters, value_name = "SET")]
    pub features: FeatureSet,
    /// JSON object of feature settings (meta.json `config` keys, e.g. {"max_gap_s": 30,
    /// "filters": {"baseline_s": 600}}) laid over the defaults of --features.
    #[arg(long, value_name = "FILE")]
    pub feature_config: Option<PathBuf>,
    /// Share of training samples each per-signal forest flags: its offset is that
    /// percentile of its training scores (bpm_anomaly, uterus_anomaly).
    #[arg(long, default_value_t = 0.005, value_name = "F")]
    pub flag_rate: f64,
    /// Fit the forests on training groups of this class only (e.g. regular); the
    /// validation report still covers every class.
    #[arg(long, value_name = "CLASS")]
    pub train_class: Option<String>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum FeatureSet {
    /// Exponentially weighted level, baseline, variability, burden, jump and flat time per
    /// signal, with time constants in seconds (one model for any sampling rate).
    Filters,
    /// Lags 1,2,3,6,12,24 and rolling mean/std over 3,6,12 samples (SPEC section 2).
    Window,
}

/// Score a merged table with a trained model (batch).
#[derive(Args, Debug)]
#[command(
    long_about = "Reads a merged table (or a data directory), computes features per \
(group_id, sequence_id) in row order and writes one row per scored sample: \
timestamp,group_id,sequence_id,bpm,uterus,bpm_anomaly,uterus_anomaly,anomaly_score. \
anomaly_score is scikit-learn's decision_function (lower is more anomalous, < 0 is \
flagged). The rows equal the detections `fad stream` gives for the same input.",
    after_help = "Examples:\n  fad score merged.csv --model artifacts > scored.csv\n  fad score data/ --model artifacts --all | xsv stats"
)]
pub struct ScoreArgs {
    /// Merged CSV, a data directory, or - for stdin.
    #[arg(value_name = "INPUT", default_value = "-")]
    pub input: PathBuf,
    /// Artifacts directory (meta.json plus forest files, or a scikit-learn model_if.pkl).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Also write rows that were not scored (warm-up, signal loss), with empty result fields.
    #[arg(long)]
    pub all: bool,
    /// Also write the model's feature columns (meta.json feature_cols) after the result.
    #[arg(long)]
    pub with_features: bool,
    /// Worker threads (default: all cores).
    #[arg(long, alias = "n_jobs", value_name = "N")]
    pub n_jobs: Option<usize>,
    /// With a data directory as INPUT: how bpm and uterus rows are matched.
    #[arg(long, value_enum, default_value_t = Join::Inner)]
    pub join: Join,
    #[command(flatten)]
    pub bad_files: BadFiles,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReplyFormat {
    /// ready:...,detection:...,needed:N
    Text,
    /// One JSON object per line.
    Json,
}

/// Answer a live feed: one reply per input line, in order.
#[derive(Args, Debug)]
#[command(
    long_about = "Reads messages timestamp,bpm,uterus,group_id,sequence_id, one per line, and \
answers each with exactly one line: `ready:false,detection:,needed:N` while a series warms \
up, `ready:true,detection:TS,GID,SID,BPM,UTERUS,BPM_ANOMALY,UTERUS_ANOMALY,SCORE,needed:0` \
once it is scored, and `ready:false,detection:,needed:N,error:REASON` for a line that cannot \
be scored. Ids are at most 256 bytes, without commas or control characters. Replies are \
flushed whenever fad would wait for input, so `tail -f` gets its \
answers at once. A summary of rejected lines goes to stderr at the end.",
    after_help = "Examples:\n  tail -f feed.csv | fad stream --model artifacts\n  \
fad convert data/ --as feed | fad stream --model artifacts | grep ready:true\n  \
fad stream --model artifacts --format json < feed.csv | jq .detection\n  \
fad stream --model current --state fad.state --checkpoint-every 10000\n  \
fad stream --model artifacts --max-series 50000 --idle-timeout 3600\n  \
fad stream --model artifacts --horizon 8 --forecaster './my_forecaster.py'\n  \
ln -sfn artifacts_v2 current && kill -HUP \"$FAD_PID\"  # swap models live\n\n\
Signals: SIGHUP reloads the model (the old one stays if the new one is broken); SIGINT \
and SIGTERM save --state and end. Exit status: 0 success, 1 data or I/O error, 2 usage error."
)]
pub struct StreamArgs {
    /// Artifacts directory (meta.json plus forest files, or a scikit-learn model_if.pkl).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Reply format.
    #[arg(long, value_enum, default_value_t = ReplyFormat::Text)]
    pub format: ReplyFormat,
    /// Input file instead of stdin.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Keep every series' window in FILE: restored at start, saved atomically at exit
    /// (end of input, SIGINT, SIGTERM) and at each checkpoint.
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Start afresh when the --state file is corrupt or was written for other features.
    #[arg(long, requires = "state")]
    pub state_reset: bool,
    /// Also save the --state file every N input lines (at the next chunk boundary).
    #[arg(long, value_name = "N", requires = "state", value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every: Option<u64>,
    /// Keep at most N series in memory; the least recently used one is forgotten (and
    /// named on stderr). The default bounds memory near 60 MiB whatever the ids, far above
    /// the monitors of any ward; raise it for more.
    #[arg(long, value_name = "N", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_series: u64,
    /// Forget a series that got no valid sample for SECONDS of stream time: the feed's
    /// timestamps, not the wall clock. A time more than SECONDS ahead of stream time moves
    /// it only by that series' own step, so one monitor with a wrong clock makes nobody idle.
    #[arg(long, value_name = "SECONDS", value_parser = positive_seconds)]
    pub idle_timeout: Option<f64>,
    /// Also score K future points after each scored message: its last values held, or
    /// what --forecaster predicts. They follow `needed:0` as `forecast:` points
    /// `t/bpm/uterus/bpm_anomaly/uterus_anomaly/score`, separated by `;`.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub horizon: Option<u64>,
    /// Co-process (run with `sh -c`) that forecasts the --horizon points: it reads one JSON
    /// line per scored message, {"id", "group_id", "sequence_id", "k", "history":
    /// {"timestamp", "bpm", "uterus"}}, and answers one JSON line {"id": the request's id
    /// (a number), "bpm": [K values], "uterus": [K values]} (optionally "timestamp": [K
    /// times]; null for a value it cannot give). The next line after a request is its
    /// answer: one that cannot be read gives forecast_error:forecaster_bad_answer for that
    /// message; another request's id, or a line already waiting when fad asks, stops the
    /// co-process (forecast_error:forecaster_out_of_step).
    #[arg(long, value_name = "CMD", requires = "horizon")]
    pub forecaster: Option<String>,
    /// Valid samples of history per series sent to the --forecaster.
    #[arg(long, value_name = "N", default_value_t = 240, requires = "forecaster",
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub forecast_history: u64,
    /// Seconds to wait for the --forecaster's answer; past it the co-process is stopped and
    /// every later reply says forecast_error:forecaster_timeout.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0, requires = "forecaster",
          value_parser = positive_seconds)]
    pub forecaster_timeout: f64,
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{text:?} is not a positive number of seconds")),
    }
}
