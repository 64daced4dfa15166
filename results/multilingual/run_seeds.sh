#!/usr/bin/env bash
# Table 1 with 3 seeds (issue 15 part 3): the CPU set-up of run.sh with 2 rows per language per
# step and 1,800 steps (gin_configs/multilingual/cpu_seeds.gin): 8 monolingual baselines, then
# 6 runs x 3 seeds (Table 1's main rows and equal weights on the stratified batches), ~2 h 15 min
# of 2 CPU cores in all (measured 2026-12-02, two lanes). Run from anywhere:
#
#   bash results/multilingual/run_seeds.sh start         # one lane in the background, niced
#   bash results/multilingual/run_seeds.sh start k k2    # lanes side by side: they share the
#                                                        # monolingual models and the sweep's runs
#   bash results/multilingual/run_seeds.sh stop          # every lane (runs resume at the next start)
#   bash results/multilingual/run_seeds.sh run           # the same work in the foreground
#   bash results/multilingual/run_seeds.sh table         # Table 1 over the seeds finished so far
#
# Resumable: finished runs are skipped, the others resume from their last checkpoint. Each lane
# ends by writing results/multilingual/seeds/table1_seeds.md (experiments/lm_table.py: mean ± std
# per run, the paper's claims as paired verdicts); the last lane to end writes the full table.
set -u
SELF=$(realpath "$0")  # the lanes re-run this script after the cd below
cd "$(dirname "$SELF")/../.."
ROOT=${ROOT:-workdirs/multilingual_seeds}
G=gin_configs/multilingual
HEAVY=${HEAVY:-nice -n 19}
mkdir -p "$ROOT"

table() {
  python -m experiments.lm_table --root="$ROOT/runs" --mono="$ROOT/mono/baselines.json" \
      --out=results/multilingual/seeds
}

work() {
  # 1. Monolingual baselines of this set-up (Baselined-DRO's baselines, relative perplexity);
  #    side-by-side lanes each train the languages no other has claimed, then wait for the rest.
  $HEAVY python -m experiments.monolingual --root="$ROOT" --gin_file=$G/monolingual.gin \
      --gin_file=$G/cpu.gin --gin_file=$G/cpu_seeds.gin --gin_file=$G/cpu_mono_seeds.gin || exit 1
  # 2. The main rows, seeds 0, 1, 2 (seed 0 of every run first; each run claimed by one lane).
  for seeds in 0 1,2; do
    $HEAVY python -m experiments.sweep --sweep=multilingual_seeds --root="$ROOT/runs" \
        --seeds=$seeds --bindings="BASELINES = '$ROOT/mono/baselines.json'"
  done
  # 3. Table 1 over the seeds.
  table
}

case "${1:-run}" in
  run) work ;;
  table) table ;;
  start)  # lanes to start: k (the default) and/or others named k2, k3, ...
    shift; lanes=${*:-k}
    for name in $lanes; do
      pidf=$ROOT/lane_$name.pid; log=$ROOT/lane_$name.log
      if [ -f "$pidf" ] && kill -0 -- -"$(cat "$pidf")" 2>/dev/null; then
        echo "lane $name already running (process group $(cat "$pidf"))"; continue
      fi
      setsid nohup bash "$SELF" _lane >> "$log" 2>&1 < /dev/null &
      echo $! > "$pidf"
      echo "lane $name started (process group $!, log $log)"
    done ;;
  _lane)
    # nice ranks processes within one session only (autogroup scheduling, Linux's default):
    # lower the whole lane session's priority too, or each lane takes a fair share of the CPU.
    echo 19 > /proc/self/autogroup 2>/dev/null
    work ;;
  stop)  # SIGTERM: the running trainings save a checkpoint and exit
    for pidf in "$ROOT"/lane_*.pid; do
      [ -f "$pidf" ] || continue
      pg=$(cat "$pidf")
      kill -TERM -- -"$pg" 2>/dev/null && echo "stopping (process group $pg)"
      for _ in $(seq 300); do kill -0 -- -"$pg" 2>/dev/null || break; sleep 1; done
      rm -f "$pidf"
    done ;;
  *) echo "usage: $0 run|start [lanes]|stop|table"; exit 2 ;;
esac
