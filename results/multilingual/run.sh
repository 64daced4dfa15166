#!/usr/bin/env bash
# CPU-scale reproduction of Table 1 of the paper (multilingual LM, section 5.2); see README.md
# in this folder. Run from the repository root:
#
#   bash results/multilingual/run.sh            # ~30 min on 2 CPU cores
#
# Every step resumes or skips finished work (the runner resumes from checkpoints; monolingual
# models that finished are not retrained), so the script can be re-run after an interruption.
# ROOT (default workdirs/multilingual, git-ignored) holds the runs; the packed-row cache is
# workdirs/lm_cache (CACHE_DIR of base.gin), filled by the first run.
set -euo pipefail
ROOT=${ROOT:-workdirs/multilingual}
OUT=${OUT:-results/multilingual}
G=gin_configs/multilingual
HEAVY=${HEAVY:-}   # optional prefix of every training command (e.g. a lock or `nice`)
export TF_CPP_MIN_LOG_LEVEL=3

timed() {  # name, command...: runs the command and logs its wall time
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  $HEAVY "$@"
  echo "=== $name: done in $((SECONDS - t0)) s"
}

# One multilingual run: method file (+ bindings), then the CPU size file.
run() {
  local name=$1 method=$2; shift 2
  timed "$name" python -m experiments.train --gin_file=$G/$method.gin --gin_file=$G/cpu.gin \
      "$@" --workdir="$ROOT/$name"
}

# 1. Monolingual models (baselines of Baselined-DRO and of the relative perplexity, Eq. 3):
#    one per language, 8 rows of that language per step (cpu_mono.gin).
timed mono python -m experiments.monolingual --root="$ROOT" \
    --gin_file=$G/monolingual.gin --gin_file=$G/cpu.gin --gin_file=$G/cpu_mono.gin

# 2. Static mixing, alpha in {0, 0.3, 1}.
run static_alpha0 static_alpha0
run static_alpha0.3 static_alpha0.3
run static_alpha1 static_alpha1

# 3. Online DRO, weight learning rate in {1e-2, 1e-3, 1e-4}.
run dro_lr1e-2 dro_lr1e-2
run dro_lr1e-3 dro_lr1e-3
run dro_lr1e-4 dro_lr1e-4

# 4. Baselined-DRO (baselines: $ROOT/mono/baselines.json), same weight learning rates.
for lr in 1e-2 1e-3 1e-4; do
  run baselined_dro_lr$lr baselined_dro --gin_bindings="WEIGHT_LR = $lr" \
      --gin_bindings="BASELINES = '$ROOT/mono/baselines.json'"
done

# 5. Lookahead-DRO, online, lean mode with the pairwise Gram strategy (Appendix C);
#    lookahead rate lambda in {1, 0.1} (eta = 0.01), interaction matrix every 100 steps.
run ldro ldro
run ldro_lam0.1 ldro --gin_bindings="LOOKAHEAD_LR = 0.1"

# 6. Table 1, per-language figure.
timed table python -m experiments.lm_table --root="$ROOT" --out="$OUT"
