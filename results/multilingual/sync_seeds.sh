#!/bin/bash
# Copies the small files of the 3-seed LM runs (run_seeds.sh) from workdirs/ into results/:
# every finished (DONE) or failed run's metrics, command, config and wall-clock
# (experiments/sync_runs.py) to results/multilingual/seeds/runs/<run>/seed<k>/, the monolingual
# baselines (baselines.json, each language's metrics, config and wall-clock) to
# results/multilingual/seeds/mono/; then Table 1 over the seeds from the copies. Commit with:
#   git add results/multilingual/seeds && git commit -m '...' -- results/multilingual/seeds
set -eu
cd "$(dirname "$0")/../.."
W=${ROOT:-workdirs/multilingual_seeds}
R=results/multilingual/seeds
python -m experiments.sync_runs --src=$W/runs --dst=$R/runs
for lang_dir in $W/mono/*/; do
  [ -d "$lang_dir" ] || continue
  lang=$(basename "$lang_dir")
  mkdir -p $R/mono/$lang
  for f in metrics.jsonl config.gin run_config.json wall_clock.json; do
    [ -f "$lang_dir/$f" ] && cp "$lang_dir/$f" $R/mono/$lang/
  done
done
cp $W/mono/baselines.json $R/mono/baselines.json
python -m experiments.lm_table --root=$R/runs --mono=$R/mono/baselines.json --out=$R
