#!/bin/bash
# Copies the small files of the pre-training run and of every finished (DONE) or failed
# (FAILED: e.g. diverged) run of the Spurious-CIFAR methods sweep, and of every finished run of
# the one-seed grid, from workdirs/ into results/worst_group/image/ (no checkpoints, logs or
# TensorBoard events), then regenerates the methods and grid reports. Commit with:
#   git add results/worst_group/image && git commit -m '...' -- results/worst_group/image
set -eu
cd "$(dirname "$0")/../../.."
W=workdirs/worst_group_image
R=results/worst_group/image
FILES="metrics.jsonl run.json command.txt config.gin run_config.json wall_clock.json DONE FAILED"
if [ -f $W/pretrain/metrics.jsonl ]; then
  mkdir -p $R/pretrain
  for f in $FILES; do [ -f $W/pretrain/$f ] && cp $W/pretrain/$f $R/pretrain/; done
fi
n=0
for variant in A B; do
  for done in $W/$variant/methods/*/seed*/DONE $W/$variant/methods/*/seed*/FAILED; do
    [ -f "$done" ] || continue
    d=$(dirname "$done"); rel=${d#$W/$variant/methods/}
    mkdir -p $R/$variant/methods/$rel
    rm -f $R/$variant/methods/$rel/FAILED  # a failed run retried since (--retry_failed)
    for f in $FILES; do [ -f $d/$f ] && cp $d/$f $R/$variant/methods/$rel/; done
    n=$((n + 1))
  done
  [ -d $R/$variant/methods ] && python -m experiments.worst_group_image_report \
      --methods_root=$R/$variant/methods --out=$R/$variant > /dev/null
done
echo "$n finished runs in $R/*/methods"
# the one-seed grid (lr check, alpha_aux x alpha_reg: claim 9)
g=0
for done in $W/A/grid/*/seed*/DONE; do
  [ -f "$done" ] || continue
  d=$(dirname "$done"); rel=${d#$W/A/grid/}
  mkdir -p $R/A/grid/$rel
  for f in $FILES; do [ -f $d/$f ] && cp $d/$f $R/A/grid/$rel/; done
  g=$((g + 1))
done
[ -d $R/A/grid ] && python -m experiments.worst_group_image_report --grid_root=$R/A/grid \
    --out=$R/A > /dev/null
echo "$g finished runs in $R/A/grid"
