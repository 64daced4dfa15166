#!/bin/bash
# Spurious-CIFAR (issue 14): the auxiliary task's pre-training (once), then every method of the
# worst-group paper at its default configuration, pre-trained and from scratch: variant A seed
# 0, variant B's ERM and MTL at seed 0, the ERM lr check, variant A seeds 1-2 of the runs the
# claims read (and seeds 3-4 of JTT and +aux only), the one-seed (alpha_aux, alpha_reg) MTL grid,
# variant B's ERM and MTL seeds 1-4, the rest of the grid, seeds 3-4 of the other claim runs,
# the rest of variant A's from-scratch controls, then the rest of variant B. Niced (process and
# session); resumable
# (finished runs are skipped, unfinished ones resume from their last checkpoint).
#   bash results/worst_group/image/run.sh start   # in the background (log: workdirs/worst_group_image/lane.log)
#   bash results/worst_group/image/run.sh start w2 w3  # more lanes through the same list, side by
#                                                  # side (each run is claimed by one: experiments/sweep.py)
#   bash results/worst_group/image/run.sh stop     # every lane
#   bash results/worst_group/image/sync.sh        # copy finished runs into results/, regenerate the tables
set -u
SELF=$(realpath "$0")  # the lanes re-run this script after the cd below
cd "$(dirname "$SELF")/../../.."
W=workdirs/worst_group_image
mkdir -p $W

lane() {  # $1: the lane's name; lane w pre-trains, the others need its finished checkpoint
  if [ "$1" = w ]; then
    nice -n 19 python -m experiments.train --gin_file=gin_configs/worst_group_image/pretrain.gin \
        --workdir=$W/pretrain || exit 1
  fi
  S="nice -n 19 python -m experiments.sweep --sweep=worst_group_image_methods"
  $S --root=$W/A/methods --seeds=0
  # variant B (the high-variance cue, claim 10), pre-trained ERM and regularized MTL, seed 0
  $S --root=$W/B/methods --seeds=0 --only='^pre-(erm|mtl)$' --bindings="VARIANT = 'B'"
  G="nice -n 19 python -m experiments.sweep --sweep=worst_group_image --root=$W/A/grid --seeds=0"
  $G --only='^erm-lr'  # the lr check: ERM at 0.003 / 0.01 / 0.03, pre-trained
  # seeds 1-4 of the runs the claims read (4-8: every pre-trained method; 7: scratch ERM, MTL,
  # JTT), seeds 1-2 first
  K='^(pre-.*|scratch-(erm|mtl|jtt_stage1|jtt))$'
  $S --root=$W/A/methods --seeds=1,2 --only="$K"
  # seeds 3-4: JTT and +aux only first (claims 4 and 6), the rest after the grid and variant B
  $S --root=$W/A/methods --seeds=3,4 --only='^pre-(jtt_stage1|jtt|aux_only)$'
  $G --only='^mtl-'  # the one-seed (alpha_aux, alpha_reg) MTL grid (claim 9)
  # claim 10's variant B: pre-trained ERM and MTL, seeds 1-4
  $S --root=$W/B/methods --seeds=1,2,3,4 --only='^pre-(erm|mtl)$' --bindings="VARIANT = 'B'"
  $G  # the rest of the grid: +l1 only and +aux only at each value, group DRO eta 0.01
  $S --root=$W/A/methods --seeds=3,4 --only="$K"
  $S --root=$W/A/methods --seeds=1,2,3,4  # the rest of the from-scratch controls
  $S --root=$W/B/methods --seeds=0,1,2,3,4 --bindings="VARIANT = 'B'"
}

case "${1:-start}" in
  start)  # lanes to start: w (the default) and/or others named w2, w3, ...
    shift; lanes=${*:-w}
    for name in $lanes; do
      pidf=$W/lane.pid; log=$W/lane.log
      [ "$name" = w ] || { pidf=$W/lane_$name.pid; log=$W/lane_$name.log; }
      if [ -f $pidf ] && kill -0 -- -"$(cat $pidf)" 2>/dev/null; then
        echo "lane $name already running (process group $(cat $pidf))"; continue
      fi
      setsid nohup bash "$SELF" _lane $name >> $log 2>&1 < /dev/null &
      echo $! > $pidf
      echo "lane $name started (process group $!, log $log)"
    done ;;
  _lane)
    # nice ranks processes within one session only (autogroup scheduling, Linux's default):
    # lower the whole lane session's priority too, or each lane takes a fair share of the CPU.
    echo 19 > /proc/self/autogroup 2>/dev/null
    lane "$2" ;;
  stop)  # SIGTERM: the running trainings save a checkpoint and exit
    for pidf in $W/lane.pid $W/lane_*.pid; do
      [ -f $pidf ] || continue
      pg=$(cat $pidf)
      kill -TERM -- -"$pg" 2>/dev/null && echo "stopping (process group $pg)"
      for _ in $(seq 300); do kill -0 -- -"$pg" 2>/dev/null || break; sleep 1; done
      rm -f $pidf
    done ;;
  *) echo "usage: $0 start [lanes]|stop"; exit 2 ;;
esac
