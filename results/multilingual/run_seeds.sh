#!/usr/bin/env bash
# Table 1 with 3 seeds (issue 15 part 3): the CPU set-up of run.sh with 2 rows per language per
# step and 1,800 steps (gin_configs/multilingual/cpu_seeds.gin). Run from the repository root:
#
#   bash results/multilingual/run_seeds.sh       # ~3 h on 2 CPU cores (5 runs x 3 seeds + 8 monolingual)
#
# Resumable: the monolingual models and the sweep skip finished runs and resume the others.
# Writes results/multilingual/seeds/table1_seeds.md (experiments/lm_table.py, several seeds).
set -euo pipefail
ROOT=${ROOT:-workdirs/multilingual_seeds}
G=gin_configs/multilingual
HEAVY=${HEAVY:-nice -n 19}

# 1. Monolingual baselines of this set-up (Baselined-DRO's baselines, relative perplexity).
$HEAVY python -m experiments.monolingual --root="$ROOT" --gin_file=$G/monolingual.gin \
    --gin_file=$G/cpu.gin --gin_file=$G/cpu_seeds.gin --gin_file=$G/cpu_mono_seeds.gin
# 2. The main rows, seeds 0, 1, 2 (seed 0 of every run first).
for seeds in 0 1,2; do
  $HEAVY python -m experiments.sweep --sweep=multilingual_seeds --root="$ROOT/runs" \
      --seeds=$seeds --bindings="BASELINES = '$ROOT/mono/baselines.json'"
done
# 3. Table 1 over the seeds: mean ± std per run, the paper's claims as paired verdicts.
python -m experiments.lm_table --root="$ROOT/runs" --mono="$ROOT/mono/baselines.json" \
    --out=results/multilingual/seeds
