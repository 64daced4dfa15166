#!/bin/bash
# Spurious-CIFAR (issue 14): the auxiliary task's pre-training (once), then every method of the
# worst-group paper at its default configuration, pre-trained and from scratch: variant A seed
# 0, variant B's ERM and MTL at seed 0, variant A seeds 1-4, then variant B. Niced; resumable
# (finished runs are skipped, unfinished ones resume from their last checkpoint).
#   bash results/worst_group/image/run.sh start   # in the background (log: workdirs/worst_group_image/lane.log)
#   bash results/worst_group/image/run.sh stop
#   bash results/worst_group/image/sync.sh        # copy finished runs into results/, regenerate the tables
set -u
cd "$(dirname "$0")/../../.."
W=workdirs/worst_group_image
mkdir -p $W

lane() {
  nice -n 19 python -m experiments.train --gin_file=gin_configs/worst_group_image/pretrain.gin \
      --workdir=$W/pretrain || exit 1
  S="nice -n 19 python -m experiments.sweep --sweep=worst_group_image_methods"
  $S --root=$W/A/methods --seeds=0
  # variant B (the high-variance cue, claim 10), pre-trained ERM and regularized MTL, seed 0
  $S --root=$W/B/methods --seeds=0 --only='^pre-(erm|mtl)$' --bindings="VARIANT = 'B'"
  $S --root=$W/A/methods --seeds=1,2,3,4
  $S --root=$W/B/methods --seeds=0,1,2,3,4 --bindings="VARIANT = 'B'"
}

case "${1:-start}" in
  start)
    if [ -f $W/lane.pid ] && kill -0 -- -"$(cat $W/lane.pid)" 2>/dev/null; then
      echo "already running (process group $(cat $W/lane.pid))"; exit 0
    fi
    setsid nohup bash "$0" _lane >> $W/lane.log 2>&1 < /dev/null &
    echo $! > $W/lane.pid
    echo "started (process group $!, log $W/lane.log)" ;;
  _lane) lane ;;
  stop)  # SIGTERM: the running training saves a checkpoint and exits
    if [ -f $W/lane.pid ]; then
      pg=$(cat $W/lane.pid)
      kill -TERM -- -"$pg" 2>/dev/null && echo "stopping (process group $pg)"
      for _ in $(seq 300); do kill -0 -- -"$pg" 2>/dev/null || break; sleep 1; done
      rm -f $W/lane.pid
    fi ;;
  *) echo "usage: $0 start|stop"; exit 2 ;;
esac
