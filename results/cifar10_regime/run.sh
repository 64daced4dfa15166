#!/bin/bash
# The CIFAR-10 regime study (issue 15), most informative runs first, in three lanes that run
# side by side, niced (19, process and session) so that other work keeps the CPU (a niced
# process only takes what the others leave, so a third lane adds throughput on a loaded
# machine). Resumable: re-running this script skips finished runs (DONE) and resumes
# unfinished ones from their last checkpoint.
#
#   bash results/cifar10_regime/run.sh start    # start the lanes in the background (running ones are left alone)
#   bash results/cifar10_regime/run.sh start a l  # only lanes a and l (l: the litmus test, issue 13)
#   bash results/cifar10_regime/run.sh start d    # the stronger failure case (hard_task_any.gin);
#                                               # 'start d d2 d3' runs three lanes through its list
#   bash results/cifar10_regime/run.sh start l l2 l3  # three lanes through the same list (l*): each
#                                               # run is claimed by one (experiments/sweep.py, .claim)
#   bash results/cifar10_regime/run.sh status   # what each run is doing (dry run)
#   bash results/cifar10_regime/run.sh stop     # stop all lanes (runs resume next start)
#   START_BEFORE=<start + 10 min> bash results/cifar10_regime/run.sh start g g2 g3  # the large
#                                               # CNN (Figure 8): three runs in ~2 h 15 min
#   bash results/cifar10_regime/run.sh restore  # the committed runs back into workdirs/, so that
#                                               # 'start' skips them ('start' does it itself
#                                               # when workdirs/ has no regime runs yet)
#   bash results/cifar10_regime/sync.sh         # copy finished runs into results/ (then commit)
set -u
SELF=$(realpath "$0")  # the lanes re-run this script after the cd below
cd "$(dirname "$SELF")/../.."
W=workdirs/cifar10_regime
mkdir -p $W
# START_BEFORE (a UTC time, e.g. START_BEFORE=2026-12-02T09:00 run.sh start g): no lane starts
# or resumes a run after it (experiments/sweep.py --start_before), e.g. so that no run starts
# that cannot finish before the session ends (unfinished runs do not outlive workdirs/)
S="nice -n 19 python -m experiments.sweep${START_BEFORE:+ --start_before=$START_BEFORE}"

lane_a() {  # the clean regime: core seeds 0 and 2; narrow-CNN ablations (T, renormalisation)
  # seed 0; the failure case's seeds 1-2; the rest of the grid; the ablations' seeds 1-2; the
  # paper's small CNN (4x wider, ~3x a narrow step); the rest of the failure case's grid; the
  # large CNN (~11x the small CNN's step) last
  $S --sweep=cifar10_regime_core --root=$W/regime --seeds=0
  $S --sweep=cifar10_regime_core --root=$W/regime --seeds=2
  $S --sweep=cifar10_regime_ablations --root=$W/ablations --seeds=0 --only='^ldro_'
  $S --sweep=cifar10_hard_task_core --root=$W/hard_task --seeds=1
  $S --sweep=cifar10_hard_task_core --root=$W/hard_task --seeds=2
  $S --sweep=cifar10_regime --root=$W/regime --seeds=0,1,2
  $S --sweep=cifar10_regime_ablations --root=$W/ablations --seeds=1,2 --only='^ldro_'
  $S --sweep=cifar10_regime_ablations --root=$W/ablations --seeds=0,1,2 --only='^paper_small'
  # the rest of the 40%-flip grid: first the seeds that complete a method's three, then DRO's
  # and L-DRO's grids; DRO at eta 0 (the same training as static mixing) last
  $S --sweep=cifar10_hard_task --root=$W/hard_task --seeds=0 --only='^(avg_max|ldro-eta1e-2-lam1e-2)$'
  $S --sweep=cifar10_hard_task --root=$W/hard_task --seeds=0,1,2 --only='^(dro-eta1e-[34]|ldro-)'
  $S --sweep=cifar10_hard_task --root=$W/hard_task --seeds=0,1,2
  # the large CNN (~40 min a run on 2 idle cores, 12 runs): last, for a session that can give
  # it the cores (a run unfinished at a session's end is lost with workdirs/ on a fresh
  # checkout; only finished runs are committed)
  $S --sweep=cifar10_regime_ablations --root=$W/ablations --seeds=0,1,2 --only='^large'
}
lane_b() {  # DRO's failure case: one task with 40% flipped labels
  $S --sweep=cifar10_hard_task_core --root=$W/hard_task --seeds=0
  $S --sweep=cifar10_hard_task_core --root=$W/hard_task --seeds=2
  $S --sweep=cifar10_hard_task --root=$W/hard_task --seeds=0,1,2
}
lane_l() {  # the random-weighting litmus test (issue 13): every method on this setting, seed 0
  # first; equal weights, L-DRO, DRO 1e-2 and PCGrad are the regime grid's runs (linked).
  mkdir -p $W/litmus
  for r in static ldro-eta1e-3-lam1e-2 dro-eta1e-2 pcgrad; do
    mkdir -p $W/regime/$r
    [ -e $W/litmus/$r ] || ln -s ../regime/$r $W/litmus/$r
  done
  $S --sweep=litmus_core --root=$W/litmus --seeds=0
  $S --sweep=litmus --root=$W/litmus --seeds=0
  $S --sweep=litmus --root=$W/litmus --seeds=1,2
  lane_a  # then the regime study's list
}
lane_d() {  # the stronger failure case (hard_task_any.gin: half of cat/dog's labels flipped to
  # any other class, a loss floor above the clean tasks'): the core grid, seed 0 first
  $S --sweep=cifar10_hard_task_any_core --root=$W/hard_task_any --seeds=0
  $S --sweep=cifar10_hard_task_any_core --root=$W/hard_task_any --seeds=1,2
}
lane_g() {  # the large CNN (Figure 8, App. B.3): seed 0 of its four runs first, then seeds 1-2.
  # Three lanes side by side on 2 cores make 2.4 steps/s together, ~2 h 10 min a run; a fourth
  # would need ~2.8 h for all four. A run unfinished when the session ends resumes from its
  # checkpoint only if workdirs/ survives (a fresh checkout trains it again)
  $S --sweep=cifar10_regime_ablations --root=$W/ablations --seeds=0 --only='^large'
  $S --sweep=cifar10_regime_ablations --root=$W/ablations --seeds=1,2 --only='^large'
}
lane_c() {  # seed 1 of both core grids (lanes a and b take seeds 0 and 2)
  $S --sweep=cifar10_regime_core --root=$W/regime --seeds=1
  $S --sweep=cifar10_hard_task_core --root=$W/hard_task --seeds=1
}

case "${1:-start}" in
  start)  # lanes to start: a b c l (the default) or those named, e.g. 'run.sh start a d'
    shift; lanes=${*:-a b c l}
    # a fresh checkout has no workdirs/: bring the committed finished runs back first, or the
    # lanes would train them again ('restore' below; an existing workdirs/ is left as it is)
    [ -d $W/regime ] || bash "$SELF" restore
    for lane in $lanes; do
      if [ -f $W/lane_$lane.pid ] && kill -0 -- -"$(cat $W/lane_$lane.pid)" 2>/dev/null; then
        echo "lane $lane already running (process group $(cat $W/lane_$lane.pid))"; continue
      fi
      # setsid: each lane is its own process group, so 'stop' ends the sweep and its run.
      setsid nohup bash "$SELF" _lane_$lane >> $W/lane_$lane.log 2>&1 < /dev/null &
      echo $! > $W/lane_$lane.pid
      echo "lane $lane started (process group $!, log $W/lane_$lane.log)"
    done ;;
  _lane_*)
    # nice ranks processes within one session only (autogroup scheduling, Linux's default):
    # lower the whole lane session's priority too, or each lane takes a fair share of the CPU.
    echo 19 > /proc/self/autogroup 2>/dev/null
    case "$1" in
      _lane_a) lane_a ;;
      _lane_b) lane_b ;;
      _lane_c) lane_c ;;
      _lane_d*) lane_d ;;  # d, d2, ...: side by side on lane d's list
      _lane_g*) lane_g ;;  # g, g2, ...: side by side on the large CNN's list
      _lane_l*) lane_l ;;  # l, l2, l3, ...: side by side on lane l's list (a run trains in one of them)
    esac ;;
  stop)  # SIGTERM to each lane's process group: the running training saves a checkpoint and
         # exits, the sweep records the attempt's wall-clock; waits until they are gone.
    for pidf in $W/lane_*.pid; do
      lane=${pidf#$W/lane_}; lane=${lane%.pid}
      if [ -f $W/lane_$lane.pid ]; then
        pg=$(cat $W/lane_$lane.pid)
        kill -TERM -- -"$pg" 2>/dev/null && echo "lane $lane: stopping (process group $pg)"
        for _ in $(seq 300); do kill -0 -- -"$pg" 2>/dev/null || break; sleep 1; done
        kill -0 -- -"$pg" 2>/dev/null && echo "lane $lane: still running after 300 s" || echo "lane $lane stopped"
        rm -f $W/lane_$lane.pid
      fi
    done ;;
  restore)  # a fresh checkout has no workdirs/: copy the committed finished runs back (their
             # DONE files), so that 'start' skips them instead of training them again
    for src in results/cifar10_regime/runs/*/; do  # one folder per sweep, as sync.sh copies them
      [ -d "$src" ] || continue  # nothing committed yet: the pattern stays unexpanded
      mkdir -p $W/$(basename "$src") && cp -rn "$src". $W/$(basename "$src")/
    done
    echo "restored the committed runs into $W" ;;
  status)
    for spec in "cifar10_regime regime" "cifar10_hard_task hard_task" "cifar10_hard_task_any hard_task_any" "cifar10_regime_ablations ablations" "litmus litmus"; do
      set -- $spec
      python -m experiments.sweep --sweep=$1 --root=$W/$2 --seeds=0,1,2 --dry_run | grep '^\['
    done ;;
  *) echo "usage: $0 start|stop|status|restore"; exit 2 ;;
esac
