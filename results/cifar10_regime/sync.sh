#!/bin/bash
# Copies the small files of every finished (DONE) or failed (FAILED: e.g. diverged) run of the
# regime study from workdirs/ into results/cifar10_regime/runs/<sweep>/<run>/seed<k>/ (no
# checkpoints, logs or TensorBoard events), then regenerates the reports. Commit with:
#   git add results/cifar10_regime && git commit -m '...' -- results/cifar10_regime
set -eu
cd "$(dirname "$0")/../.."
W=workdirs/cifar10_regime
R=results/cifar10_regime/runs
n=0
for sweep in regime hard_task ablations litmus; do
  [ -d $W/$sweep ] || continue
  for done in $W/$sweep/*/seed*/DONE $W/$sweep/*/seed*/FAILED; do  # FAILED: a result too
    [ -f "$done" ] || continue
    d=$(dirname "$done"); rel=${d#$W/$sweep/}
    mkdir -p $R/$sweep/$rel
    rm -f $R/$sweep/$rel/FAILED  # a failed run retried since (--retry_failed)
    for f in metrics.jsonl run.json command.txt config.gin wall_clock.json DONE FAILED; do
      [ -f $d/$f ] && cp $d/$f $R/$sweep/$rel/
    done
    n=$((n + 1))
  done
done
echo "$n finished runs in $R"
