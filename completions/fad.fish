# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_fad_global_optspecs
    string join \n h/help V/version
end

function __fish_fad_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_fad_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_fad_using_subcommand
    set -l cmd (__fish_fad_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c fad -n "__fish_fad_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c fad -n "__fish_fad_needs_command" -s V -l version -d 'Print version'
complete -c fad -n "__fish_fad_needs_command" -f -a "convert" -d 'Turn a folder tree of CTG recordings into one table (or a live feed)'
complete -c fad -n "__fish_fad_needs_command" -f -a "train" -d 'Fit joint and per-signal isolation forests; write the model artifacts'
complete -c fad -n "__fish_fad_needs_command" -f -a "score" -d 'Score a merged table with a trained model (batch)'
complete -c fad -n "__fish_fad_needs_command" -f -a "stream" -d 'Answer a live feed: one reply per input line, in order'
complete -c fad -n "__fish_fad_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c fad -n "__fish_fad_using_subcommand convert" -l join -d 'How bpm and uterus rows are matched on time_sec' -r -f -a "inner\t'Only timestamps present in both the bpm and the uterus file'
outer\t'Every timestamp of either file; the missing value is left empty'"
complete -c fad -n "__fish_fad_using_subcommand convert" -l as -d 'Output: the merged table, or stream messages for `fad stream`' -r -f -a "table\t'The merged table: timestamp,group_id,sequence_id,bpm,uterus,target'
feed\t'Stream messages (timestamp,bpm,uterus,group_id,sequence_id) in timestamp order'"
complete -c fad -n "__fish_fad_using_subcommand convert" -l realtime -d 'With --as feed: pace messages by their timestamps (1 = real time, 10 = ten times faster)' -r
complete -c fad -n "__fish_fad_using_subcommand convert" -l skip-bad -d 'Skip malformed files of a data directory (named on stderr) instead of stopping with an error'
complete -c fad -n "__fish_fad_using_subcommand convert" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c fad -n "__fish_fad_using_subcommand train" -l input-csv -d 'The prototype\'s spelling of INPUT' -r -F
complete -c fad -n "__fish_fad_using_subcommand train" -l from-pickle -d 'Convert the scikit-learn model in DIR (model_if.pkl + the prototype\'s meta.json) into fad\'s artifacts instead of training' -r -F
complete -c fad -n "__fish_fad_using_subcommand train" -l out-dir -d 'Directory that receives meta.json and the forest files' -r -F
complete -c fad -n "__fish_fad_using_subcommand train" -l n-estimators -d 'Number of trees' -r
complete -c fad -n "__fish_fad_using_subcommand train" -l max-samples -d 'Rows per tree: auto (= min(256, n)), a count, or a fraction in (0, 1]' -r
complete -c fad -n "__fish_fad_using_subcommand train" -l contamination -d 'Expected share of anomalies: auto (offset -0.5) or a fraction in (0, 0.5]' -r
complete -c fad -n "__fish_fad_using_subcommand train" -l max-features -d 'Features per tree: a count (at most the number of feature columns), or a fraction in (0, 1]. A per-signal forest takes at most its own signal\'s columns' -r
complete -c fad -n "__fish_fad_using_subcommand train" -l val-size -d 'Share of patients (groups) held out for validation' -r
complete -c fad -n "__fish_fad_using_subcommand train" -l random-state -d 'Seed of every random choice; the same seed gives byte-identical artifacts' -r
complete -c fad -n "__fish_fad_using_subcommand train" -l n-jobs -d 'Worker threads (default: all cores). Results do not depend on it' -r
complete -c fad -n "__fish_fad_using_subcommand train" -l join -d 'With a data directory as INPUT: how bpm and uterus rows are matched' -r -f -a "inner\t'Only timestamps present in both the bpm and the uterus file'
outer\t'Every timestamp of either file; the missing value is left empty'"
complete -c fad -n "__fish_fad_using_subcommand train" -l features -d 'Feature set: fad\'s time-based filters, or the prototype\'s lag/rolling window' -r -f -a "filters\t'Exponentially weighted level, baseline, variability, burden, jump and flat time per signal, with time constants in seconds (one model for any sampling rate)'
window\t'Lags 1,2,3,6,12,24 and rolling mean/std over 3,6,12 samples (SPEC section 2)'"
complete -c fad -n "__fish_fad_using_subcommand train" -l feature-config -d 'JSON object of feature settings (meta.json `config` keys, e.g. {"max_gap_s": 30, "filters": {"baseline_s": 600}}) laid over the defaults of --features' -r -F
complete -c fad -n "__fish_fad_using_subcommand train" -l flag-rate -d 'Share of training samples each per-signal forest flags: its offset is that percentile of its training scores (bpm_anomaly, uterus_anomaly)' -r
complete -c fad -n "__fish_fad_using_subcommand train" -l train-class -d 'Fit the forests on training groups of this class only (e.g. regular); the validation report still covers every class' -r
complete -c fad -n "__fish_fad_using_subcommand train" -l force -d 'Replace a non-empty --out-dir'
complete -c fad -n "__fish_fad_using_subcommand train" -l skip-bad -d 'Skip malformed files of a data directory (named on stderr) instead of stopping with an error'
complete -c fad -n "__fish_fad_using_subcommand train" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c fad -n "__fish_fad_using_subcommand score" -l model -d 'Artifacts directory (meta.json plus forest files, or a scikit-learn model_if.pkl)' -r -F
complete -c fad -n "__fish_fad_using_subcommand score" -l n-jobs -d 'Worker threads (default: all cores)' -r
complete -c fad -n "__fish_fad_using_subcommand score" -l join -d 'With a data directory as INPUT: how bpm and uterus rows are matched' -r -f -a "inner\t'Only timestamps present in both the bpm and the uterus file'
outer\t'Every timestamp of either file; the missing value is left empty'"
complete -c fad -n "__fish_fad_using_subcommand score" -l all -d 'Also write rows that were not scored (warm-up, signal loss), with empty result fields'
complete -c fad -n "__fish_fad_using_subcommand score" -l with-features -d 'Also write the model\'s feature columns (meta.json feature_cols) after the result'
complete -c fad -n "__fish_fad_using_subcommand score" -l skip-bad -d 'Skip malformed files of a data directory (named on stderr) instead of stopping with an error'
complete -c fad -n "__fish_fad_using_subcommand score" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c fad -n "__fish_fad_using_subcommand stream" -l model -d 'Artifacts directory (meta.json plus forest files, or a scikit-learn model_if.pkl)' -r -F
complete -c fad -n "__fish_fad_using_subcommand stream" -l format -d 'Reply format' -r -f -a "text\t'ready:...,detection:...,needed:N'
json\t'One JSON object per line'"
complete -c fad -n "__fish_fad_using_subcommand stream" -l input -d 'Input file instead of stdin' -r -F
complete -c fad -n "__fish_fad_using_subcommand stream" -l state -d 'Keep every series\' window in FILE: restored at start, saved atomically at exit (end of input, SIGINT, SIGTERM) and at each checkpoint' -r -F
complete -c fad -n "__fish_fad_using_subcommand stream" -l checkpoint-every -d 'Also save the --state file every N input lines (at the next chunk boundary)' -r
complete -c fad -n "__fish_fad_using_subcommand stream" -l max-series -d 'Keep at most N series in memory; the least recently used one is forgotten (and named on stderr). The default bounds memory near 60 MiB whatever the ids, far above the monitors of any ward; raise it for more' -r
complete -c fad -n "__fish_fad_using_subcommand stream" -l idle-timeout -d 'Forget a series that got no valid sample for SECONDS of stream time: the feed\'s timestamps, not the wall clock. A time more than SECONDS ahead of stream time moves it only by that series\' own step, so one monitor with a wrong clock makes nobody idle' -r
complete -c fad -n "__fish_fad_using_subcommand stream" -l horizon -d 'Also score K future points after each scored message: its last values held, or what --forecaster predicts. They follow `needed:0` as `forecast:` points `t/bpm/uterus/bpm_anomaly/uterus_anomaly/score`, separated by `;`' -r
complete -c fad -n "__fish_fad_using_subcommand stream" -l forecaster -d 'Co-process (run with `sh -c`) that forecasts the --horizon points: it reads one JSON line per scored message, {"id", "group_id", "sequence_id", "k", "history": {"timestamp", "bpm", "uterus"}}, and answers one JSON line {"id": the request\'s id (a number), "bpm": [K values], "uterus": [K values]} (optionally "timestamp": [K times]; null for a value it cannot give). The next line after a request is its answer: one that cannot be read gives forecast_error:forecaster_bad_answer for that message; another request\'s id, or a line already waiting when fad asks, stops the co-process (forecast_error:forecaster_out_of_step)' -r
complete -c fad -n "__fish_fad_using_subcommand stream" -l forecast-history -d 'Valid samples of history per series sent to the --forecaster' -r
complete -c fad -n "__fish_fad_using_subcommand stream" -l forecaster-timeout -d 'Seconds to wait for the --forecaster\'s answer; past it the co-process is stopped and every later reply says forecast_error:forecaster_timeout' -r
complete -c fad -n "__fish_fad_using_subcommand stream" -l state-reset -d 'Start afresh when the --state file is corrupt or was written for other features'
complete -c fad -n "__fish_fad_using_subcommand stream" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c fad -n "__fish_fad_using_subcommand help; and not __fish_seen_subcommand_from convert train score stream help" -f -a "convert" -d 'Turn a folder tree of CTG recordings into one table (or a live feed)'
complete -c fad -n "__fish_fad_using_subcommand help; and not __fish_seen_subcommand_from convert train score stream help" -f -a "train" -d 'Fit joint and per-signal isolation forests; write the model artifacts'
complete -c fad -n "__fish_fad_using_subcommand help; and not __fish_seen_subcommand_from convert train score stream help" -f -a "score" -d 'Score a merged table with a trained model (batch)'
complete -c fad -n "__fish_fad_using_subcommand help; and not __fish_seen_subcommand_from convert train score stream help" -f -a "stream" -d 'Answer a live feed: one reply per input line, in order'
complete -c fad -n "__fish_fad_using_subcommand help; and not __fish_seen_subcommand_from convert train score stream help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
