#!/bin/bash
# Copies the small files of the pre-training run and of every finished (DONE) or failed
# (FAILED: e.g. diverged) run of the Spurious-CIFAR methods sweep and of the one-seed grid,
# from workdirs/ into results/worst_group/image/ (no checkpoints, logs or TensorBoard events:
# experiments/sync_runs.py), then regenerates the methods and grid reports. Commit with:
#   git add results/worst_group/image && git commit -m '...' -- results/worst_group/image
set -eu
cd "$(dirname "$0")/../../.."
W=workdirs/worst_group_image
R=results/worst_group/image
FILES="metrics.jsonl run.json command.txt config.gin run_config.json wall_clock.json"
if [ -f $W/pretrain/metrics.jsonl ]; then
  mkdir -p $R/pretrain
  for f in $FILES; do [ -f $W/pretrain/$f ] && cp $W/pretrain/$f $R/pretrain/; done
fi
for variant in A B; do
  [ -d $W/$variant/methods ] || continue
  python -m experiments.sync_runs --src=$W/$variant/methods --dst=$R/$variant/methods
  python -m experiments.worst_group_image_report --methods_root=$R/$variant/methods \
      --out=$R/$variant > /dev/null
done
# claim 10 across the cue variants (the flip-rate reduction, A against B)
[ -d $R/B/methods ] && python -m experiments.worst_group_image_report \
    --claim10=A=$R/A/methods,B=$R/B/methods --out=$R > /dev/null
# the one-seed grid (lr check, alpha_aux x alpha_reg: claim 9)
if [ -d $W/A/grid ]; then
  python -m experiments.sync_runs --src=$W/A/grid --dst=$R/A/grid
  python -m experiments.worst_group_image_report --grid_root=$R/A/grid --out=$R/A > /dev/null
fi
