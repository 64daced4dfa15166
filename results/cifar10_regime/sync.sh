#!/bin/bash
# Copies the small files of every finished (DONE) or failed (FAILED: e.g. diverged) run of the
# regime study from workdirs/ into results/cifar10_regime/runs/<sweep>/<run>/seed<k>/ (no
# checkpoints, logs or TensorBoard events: experiments/sync_runs.py). Commit with:
#   git add results/cifar10_regime && git commit -m '...' -- results/cifar10_regime
set -eu
cd "$(dirname "$0")/../.."
W=workdirs/cifar10_regime
R=results/cifar10_regime/runs
for src in $W/*/; do  # one folder per sweep (regime, hard_task, ablations, ...), as run.sh makes
  [ -d "$src" ] || continue  # no sweep folder yet: the pattern stays unexpanded
  python -m experiments.sync_runs --src="${src%/}" --dst=$R/$(basename "$src")
done
