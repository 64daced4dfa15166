r"""Runs a named grid of gin configs (methods x hyper-parameters x seeds), resumably.

    python -m experiments.sweep --sweep=cifar10_mtl --root=workdirs/cifar10_mtl
    python -m experiments.sweep --sweep=cifar100 --root=workdirs/cifar100 --seeds=0,1,2
    python -m experiments.sweep --sweep=cifar10_mtl --root=... --only='^ldro' --dry_run
    python -m experiments.sweep --sweep=synthetic --root=/tmp/s --bindings='train_and_evaluate.num_steps = 10'

Each run trains in ``<root>/<run name>/seed<k>/`` through the runner
(:func:`experiments.train.train_and_evaluate`), by default as a subprocess
``python -m experiments.train ...`` started in the repository root (a crash or
an out-of-memory kill then only ends that run). Per run directory:

* ``command.txt``: the exact command (also when run in-process, as the
  equivalent command line);
* ``run.json``: run name, method label (used by :mod:`experiments.pareto` to
  group runs), seed, gin file and bindings;
* ``train.log``: the runner's output (subprocess mode);
* ``wall_clock.json``: the run's wall-clock seconds, summed over attempts;
* ``DONE``: written after success, holding the command. Runs with ``DONE``
  are skipped; runs without it are (re)started with the same command and
  the runner resumes from its last checkpoint (``keep_checkpoints=1``);
* ``FAILED``: written when the run fails (e.g. the runner's non-finite guard:
  the method diverged), holding the error line. The failure is a result: the
  run is skipped with its error from then on, and the reports list it;
  ``--retry_failed`` resumes it instead (e.g. after an out-of-memory kill);
* ``.claim``: an exclusive ``flock`` the sweep process holds while its run
  trains (the training process itself locks ``.lock``, see
  :mod:`experiments.runner.workdir`). Several sweep processes may work through
  the same sweep side by side (e.g. one per core): each skips the runs another
  has claimed and takes the next free one. The kernel drops the lock when its
  holder exits, so a crashed lane blocks nothing.

``--in_process`` trains in the sweep's own process instead (``gin.clear_config``
between runs; relative paths in the configs, such as the CIFAR-10 ``DATA_DIR``,
are then relative to the current directory: run from the repository root).
``--bindings`` appends gin bindings to every run (e.g. a smaller budget).
``--start_before`` (a UTC time) starts no run, new or partial, after that time: the runs
left are reported as deferred, for a later sweep (e.g. a session that ends before a long
run could finish, when unfinished runs do not outlive it).

The sweeps (paper section 5.1, Appendices A-B) are defined in :data:`SWEEPS`.
"""

if __name__ == "__main__":  # before JAX starts: see experiments/runner/cpu_runtime.py
  from experiments.runner import cpu_runtime as _cpu_runtime  # pylint: disable=g-import-not-at-top
  _cpu_runtime.configure_process("experiments.sweep")

import dataclasses
import datetime
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags

from experiments.runner import metrics_io
from experiments.runner import paths
from experiments.runner import workdir as workdir_lib
from ldro.data import fileio


# The paper's grids (section 5.1).
DRO_WEIGHT_LRS = ("0", "1e-4", "1e-3", "1e-2", "1e-1")
LDRO_WEIGHT_LRS = ("1e-2", "1e-3", "1e-4")
LDRO_LOOKAHEAD_LRS = ("1e-3", "1e-2", "1e-1")


@dataclasses.dataclass(frozen=True)
class Run:
  """One configuration of a sweep.

  Attributes:
    name: run directory name, ``<method>`` or ``<method>-<hparams>``.
    gin_files: gin files in order (``gin_configs/...``: an experiment's
      ``base.gin`` and a ``gin_configs/methods/`` file).
    bindings: gin bindings applied after the files; ``{root}`` and ``{seed}`` in them stand
      for the sweep's root and the run's seed (e.g. JTT's stage 2 names its stage-1 run
      ``'{root}/jtt_stage1/seed{seed}'``).
    method: method label for grouping in the Pareto analysis.
    after: runs of the same sweep whose run at the same seed must be finished (``DONE``)
      before this one starts (e.g. JTT's stage 2 after its stage 1); until then the sweep
      skips it as ``'waiting'`` (one lane reaches them in order; side-by-side lanes may not).
  """
  name: str
  gin_files: tuple[str, ...]
  bindings: tuple[str, ...] = ()
  method: str = ""
  after: tuple[str, ...] = ()

  @property
  def label(self) -> str:
    """The method label (``method`` or the name up to the first ``-``)."""
    return self.method or self.name.split("-", 1)[0]


def method_file(name: str) -> str:
  """The gin file of a registered method (``gin_configs/methods/<name>.gin``)."""
  return f"gin_configs/methods/{name}.gin"


def ldro_grid(config_dir: str, prefix: str = "ldro", extra: Sequence[str] = ()) -> list[Run]:
  """L-DRO runs over the paper's eta x lambda grid (section 5.1).

  Args:
    config_dir: experiment's gin directory (its ``base.gin``), e.g. ``'gin_configs/cifar100'``.
    prefix: run-name prefix and method label.
    extra: bindings added to every run (e.g. ``UPDATE_EVERY = 10``).

  Returns:
    Nine runs ``<prefix>-eta<eta>-lam<lambda>``.
  """
  files = (f"{config_dir}/base.gin", method_file("ldro"))
  return [Run(f"{prefix}-eta{eta}-lam{lam}", files,
              (f"WEIGHT_LR = {eta}", f"LOOKAHEAD_LR = {lam}") + tuple(extra), prefix)
          for eta in LDRO_WEIGHT_LRS for lam in LDRO_LOOKAHEAD_LRS]


def method_grid(config_dir: str, extra: Sequence[str] = ()) -> list[Run]:
  """All methods with the paper's sweeps: 19 runs, each ``base.gin`` + a method file.

  Static mixing (equal weights); DRO with weight lr in {0, 1e-4, 1e-3, 1e-2,
  1e-1}; L-DRO with eta in {1e-2, 1e-3, 1e-4} x lambda in {1e-3, 1e-2, 1e-1}
  (T = 100); PCGrad; avg/max interpolation (alpha 0.5, App. B.2); RLW; RGW.

  Args:
    config_dir: the experiment's gin directory (its ``base.gin``).
    extra: bindings added to every run (e.g. an ``include`` of large_cnn.gin).

  Returns:
    The runs.
  """
  extra = tuple(extra)
  base = f"{config_dir}/base.gin"
  runs = [Run("static", (base, method_file("equal")), extra)]
  runs += [Run(f"dro-eta{eta}", (base, method_file("dro")), (f"WEIGHT_LR = {eta}",) + extra)
           for eta in DRO_WEIGHT_LRS]
  runs += ldro_grid(config_dir, extra=extra)
  # The committed grids ran PCGrad on the per-task gradients, not its preferred lean mode.
  runs += [Run("pcgrad", (base, method_file("pcgrad")), ("MODE = 'jacobian'",) + extra)]
  runs += [Run(m, (base, method_file(m)), extra) for m in ("avg_max", "rlw", "rgw")]
  return runs


def _interval_sweep() -> list[Run]:
  runs = []
  for t in (10, 100, 1000):
    runs += ldro_grid("gin_configs/cifar100", f"ldro_T{t}", [f"UPDATE_EVERY = {t}"])
  return runs


def _renorm_sweep() -> list[Run]:
  runs = []
  for t in (100, 1000):
    runs += ldro_grid("gin_configs/cifar100", f"ldro_T{t}", [f"UPDATE_EVERY = {t}"])
    runs += ldro_grid("gin_configs/cifar100", f"ldro_norenorm_T{t}",
                      [f"UPDATE_EVERY = {t}", "NORMALIZE = False"])
  return runs


# ---------------------------------------------------------------- CIFAR-10 regime study
# (results/cifar10_regime, issue 15): a narrow CNN trained until the equal-weights model's
# per-task training losses plateau (gin_configs/cifar10_regime/base.gin). Runs are listed
# most informative first, so that a sweep cut short has the runs that matter most.
REGIME_DIR = "gin_configs/cifar10_regime"
HARD_TASK_FILE = f"{REGIME_DIR}/hard_task.gin"
HARD_TASK_ANY_FILE = f"{REGIME_DIR}/hard_task_any.gin"
#: The first runs of every regime grid: equal weights, DRO at two rates, L-DRO at the
#: method file's default (eta 1e-3, lambda 1e-2) and at the grid's most active setting
#: (eta 1e-2, lambda 1e-1: Algorithm 2's update w_i <- w_i exp(eta lambda A_ki) / Z moves w
#: by eta * lambda = 1e-3 times the interaction per step, against 1e-5 at the default, whose
#: weights stay within 0.2 +- 0.004 over the first 1,200 steps here), PCGrad, avg/max.
REGIME_CORE = ("static", "dro-eta1e-2", "ldro-eta1e-3-lam1e-2", "ldro-eta1e-2-lam1e-1", "pcgrad",
               "dro-eta1e-1", "ldro-eta1e-2-lam1e-2", "avg_max")


def regime_grid(extra_files: Sequence[str] = (), extra: Sequence[str] = (),
                core_only: bool = False) -> list[Run]:
  """The paper's grid (static, DRO x5, L-DRO 3x3, PCGrad, avg/max; no RLW/RGW) on the
  regime base, core runs first (:data:`REGIME_CORE`).

  Args:
    extra_files: gin files after the method file (e.g. the hard-task variant).
    extra: bindings added to every run.
    core_only: only the :data:`REGIME_CORE` runs.
  """
  runs = [r for r in method_grid(REGIME_DIR, extra) if r.name not in ("rlw", "rgw")]
  runs = [dataclasses.replace(r, gin_files=r.gin_files + tuple(extra_files)) for r in runs]
  by_name = {r.name: r for r in runs}
  core = [by_name[n] for n in REGIME_CORE]
  return core if core_only else core + [r for r in runs if r.name not in REGIME_CORE]


def _regime_ablations() -> list[Run]:
  """App. A.1 (T in 10/100/1000) and A.2 (no renormalisation at T = 1000), each at two
  L-DRO settings, and B.3 (the paper's small CNN, i.e. 4x wider than the regime's, and the
  large CNN): equal weights, DRO, PCGrad and L-DRO at the grid's active setting (eta 1e-2,
  lambda 1e-1), where the narrow CNN shows the methods apart (at the default, eta 1e-3 /
  lambda 1e-2, L-DRO's weights stay near equal in this setting)."""
  base, ldro_file = f"{REGIME_DIR}/base.gin", method_file("ldro")
  settings = (("1e-3", "1e-2"), ("1e-2", "1e-2"))
  runs = []
  for t in (10, 1000):  # T = 100 is the main grid
    runs += [Run(f"ldro_T{t}-eta{e}-lam{l}", (base, ldro_file),
                 (f"WEIGHT_LR = {e}", f"LOOKAHEAD_LR = {l}", f"UPDATE_EVERY = {t}"), f"ldro_T{t}")
             for e, l in settings]
  runs += [Run(f"ldro_norenorm_T1000-eta{e}-lam{l}", (base, ldro_file),
               (f"WEIGHT_LR = {e}", f"LOOKAHEAD_LR = {l}", "UPDATE_EVERY = 1000",
                "NORMALIZE = False"), "ldro_norenorm_T1000") for e, l in settings]
  for size, file in (("paper_small", f"{REGIME_DIR}/paper_small_cnn.gin"),
                     ("large", f"{REGIME_DIR}/large_cnn.gin")):
    runs += [Run(f"{size}-{r.name}", r.gin_files + (file,), r.bindings, f"{size}_{r.label}")
             for r in regime_grid(core_only=True)
             if r.name in ("static", "dro-eta1e-2", "ldro-eta1e-2-lam1e-1", "pcgrad")]
  return runs


# ---------------------------------------------------------------- The random-weighting litmus
# test (issue 13; random_weighting.md, sections 5-6) on the regime study's setting: every
# method at its registry defaults (the original papers'), and the Table-4 grid of gradient
# methods with RLW. Runs shared with the regime grid (equal weights, L-DRO at its default,
# DRO 1e-2, PCGrad) have the same names and configs: with the same --root they are reused.
LITMUS_LOSS = ("rlw", "uw", "dwa", "imtl_l", "moml", "famo")
LITMUS_GRADIENT = ("rgw", "mgda", "gradnorm", "graddrop", "imtl_g", "gradvac", "cagrad",
                   "rotograd")
#: Gradient methods of the RLW paper's Table 4 (each alone = its EW column, and with RLW).
LITMUS_TABLE4 = ("mgda", "gradnorm", "pcgrad", "graddrop", "imtl_g", "gradvac", "cagrad")
#: MOML's validation split: held-out training examples of each task (5% of 10,000).
LITMUS_VAL_PER_TASK = 500


def _litmus_run(method: str, extra: Sequence[str] = (), name: Optional[str] = None) -> Run:
  base = f"{REGIME_DIR}/base.gin"
  bindings = tuple(extra)
  if method == "moml":
    bindings += (f"ImageClassificationExperiment.val_per_task = {LITMUS_VAL_PER_TASK}",)
  return Run(name or method, (base, method_file(method)), bindings, method)


def litmus_grid(core_only: bool = False) -> list[Run]:
  """EW, RLW, RGW, L-DRO, DRO and the RLW paper's twelve methods (+ FAMO) on the regime
  setting; then (unless ``core_only``) the Table-4 gradient methods with RLW."""
  by_name = {r.name: r for r in regime_grid(core_only=True)}
  runs = [by_name["static"], by_name["ldro-eta1e-3-lam1e-2"], by_name["dro-eta1e-2"],
          by_name["pcgrad"]]
  runs += [_litmus_run(m) for m in LITMUS_LOSS + LITMUS_GRADIENT]
  # MGDA's loss+ normalisation divides each gradient by its loss and norm: its coefficients
  # then sum to ~0.05 here (equal weighting: 1), a 20x smaller step under SGD. Without the
  # normalisation its coefficients are on the simplex, the step on equal weighting's scale.
  runs.append(_litmus_run("mgda", ("MGDA_NORMALIZATION = 'none'",), "mgda-norm_none"))
  if core_only:
    return runs
  runs += [_litmus_run(m, ("method.loss_weighting = 'rlw'",), f"rlw+{m}") for m in LITMUS_TABLE4]
  return runs


# ---------------------------------------------------------------- Multilingual LM, 3 seeds
# (issue 15 part 3; results/multilingual/run_seeds.sh): Table 1's main rows on the CPU set-up
# with 2 rows per language per step and 1,800 steps (gin_configs/multilingual/cpu_seeds.gin).
# The rates are those the 600-step Table 1 selected (best average validation loss).
LM_DIR = "gin_configs/multilingual"


def multilingual_seeds_grid() -> list[Run]:
  """Static mixing alpha 0 and 0.3, DRO (eta 1e-4), Baselined-DRO (eta 1e-3), L-DRO
  (lambda 0.1), and equal weights on the stratified batches (the control that separates the
  batch format from the method): 6 runs; Baselined-DRO reads ``BASELINES`` (bind it to the
  monolingual runs' baselines.json of the same set-up)."""
  size = (f"{LM_DIR}/cpu.gin", f"{LM_DIR}/cpu_seeds.gin")
  return [Run("static_alpha0", (f"{LM_DIR}/static_alpha0.gin",) + size, (), "static_alpha0"),
          Run("static_alpha0.3", (f"{LM_DIR}/static_alpha0.3.gin",) + size, (), "static_alpha0.3"),
          Run("dro_lr1e-4", (f"{LM_DIR}/dro_lr1e-4.gin",) + size, (), "dro"),
          Run("baselined_dro_lr1e-3", (f"{LM_DIR}/baselined_dro.gin",) + size,
              ("WEIGHT_LR = 1e-3",), "baselined_dro"),
          Run("ldro_lam0.1", (f"{LM_DIR}/ldro.gin",) + size, ("LOOKAHEAD_LR = 0.1",), "ldro"),
          Run("equal_stratified", (f"{LM_DIR}/equal_stratified.gin",) + size, (), "equal")]


def _synthetic_sweep() -> list[Run]:
  return [Run(m, (f"gin_configs/synthetic/{m}.gin",)) for m in ("avg", "dro", "ldro")]


def worst_group_image_grid() -> list[Run]:
  """Spurious-CIFAR (issue 14), 1 seed, every run fine-tuning the pre-trained encoder (as the
  methods sweep's ``pre-*`` runs): regularized MTL over the paper's alpha_aux x alpha_reg grid
  {e^-1, e^0, e^1}^2 (its Waterbirds choice e^-1, e^-1 first; claim 9), the ablations +l1 only
  and +aux only at each value, group DRO at eta = 0.01 (0.1 is group_dro.gin); first ERM at
  lr 0.003 / 0.01 / 0.03 (the spec's practice: lr tuned on ERM, then reused): 19 runs."""
  d = "gin_configs/worst_group_image"
  pre = (f"{d}/pretrained.gin",)
  pre_b = (f"PRETRAINED_WORKDIR = '{WORST_GROUP_PRETRAINED}'",)
  exps = (-1, 0, 1)
  val = lambda k: f"{math.exp(k)!r}"  # pylint: disable=unnecessary-lambda-assignment
  grid = sorted(((a, r) for a in exps for r in exps), key=lambda p: p != (-1, -1))
  runs = [Run(f"erm-lr{lr}", (f"{d}/erm.gin",) + pre, pre_b + (f"LR = {lr}",), "erm")
          for lr in ("0.003", "0.01", "0.03")]
  runs += [Run(f"mtl-aux{a}-reg{r}", (f"{d}/mtl.gin",) + pre,
               pre_b + (f"ALPHA_AUX = {val(a)}", f"ALPHA_REG = {val(r)}"), "mtl") for a, r in grid]
  runs += [Run(f"l1_only-reg{r}", (f"{d}/l1_only.gin",) + pre, pre_b + (f"ALPHA_REG = {val(r)}",),
               "l1_only") for r in exps]
  runs += [Run(f"aux_only-aux{a}", (f"{d}/aux_only.gin",) + pre,
               pre_b + (f"ALPHA_AUX = {val(a)}",), "aux_only") for a in exps]
  runs += [Run("group_dro-eta0.01", (f"{d}/group_dro.gin",) + pre, pre_b + ("WEIGHT_LR = 0.01",),
               "group_dro")]
  return runs


#: Where ``worst_group_image_methods`` finds the pre-training run (pretrain.gin).
WORST_GROUP_PRETRAINED = "workdirs/worst_group_image/pretrain"


def worst_group_methods_grid(pretrained: bool = True) -> list[Run]:
  """Spurious-CIFAR (issue 14), every method of the paper at its default configuration, from
  the pre-trained encoder (``pre-*``, pretrained.gin with :data:`WORST_GROUP_PRETRAINED`) or
  from scratch (``scratch-*``, the Tables 5/6 control): ERM, regularized MTL (alpha_aux =
  alpha_reg = e^-1, the paper's Waterbirds choice), its +l1 and +aux ablations, group DRO
  (eta 0.1), JTT (stage 1: T = 2 epochs of ERM; stage 2: lambda_up = 20, after it in the
  order); beyond the paper, L-DRO over groups (its defaults) and regularized MTL + L-DRO (the
  MTL terms in every group's loss): 9 runs."""
  d = "gin_configs/worst_group_image"
  prefix = "pre" if pretrained else "scratch"
  extra = (f"{d}/pretrained.gin",) if pretrained else ()
  pre = (f"PRETRAINED_WORKDIR = '{WORST_GROUP_PRETRAINED}'",) if pretrained else ()
  runs = [Run(f"{prefix}-{m}", (f"{d}/{m}.gin",) + extra, pre, m)
          for m in ("erm", "mtl", "l1_only", "aux_only", "group_dro", "jtt_stage1")]
  runs.append(Run(f"{prefix}-jtt", (f"{d}/jtt.gin",) + extra,
                  pre + (f"JTT_STAGE1_WORKDIR = '{{root}}/{prefix}-jtt_stage1/seed{{seed}}'",),
                  "jtt", after=(f"{prefix}-jtt_stage1",)))
  mtl = ("ALPHA_AUX = 0.36787944117144233", "ALPHA_REG = 0.36787944117144233")
  runs.append(Run(f"{prefix}-ldro", (f"{d}/ldro.gin",) + extra, pre, "ldro"))
  runs.append(Run(f"{prefix}-mtl_ldro", (f"{d}/ldro.gin",) + extra, pre + mtl, "mtl_ldro"))
  return runs


SWEEPS: dict[str, Callable[[], list[Run]]] = {
    # Offline multitask CIFAR-10 (5 pair tasks), CPU budget: 19 runs.
    "cifar10_mtl": lambda: method_grid("gin_configs/cifar10_mtl"),
    # Paper section 5.1 / Figure 3 (and B.1 with --seeds=0,1,2, B.2 includes avg_max): 19 runs.
    "cifar100": lambda: method_grid("gin_configs/cifar100"),
    # App. A.1: L-DRO grid x interaction-matrix interval {10, 100, 1000}: 27 runs.
    "cifar100_interval": _interval_sweep,
    # App. A.2: L-DRO grid with / without renormalisation at T in {100, 1000}: 36 runs.
    "cifar100_renorm": _renorm_sweep,
    # App. B.3: all methods with the larger CNN: 19 runs.
    "cifar100_large": lambda: method_grid(
        "gin_configs/cifar100", ["include 'gin_configs/cifar100/large_cnn.gin'"]),
    # CIFAR-10 regime study (results/cifar10_regime): 8 core runs, then the rest: 17 runs.
    "cifar10_regime_core": lambda: regime_grid(core_only=True),
    "cifar10_regime": regime_grid,
    # The same with one task made much harder (40% of cat/dog's labels flipped; section 2.3).
    "cifar10_hard_task_core": lambda: regime_grid([HARD_TASK_FILE], core_only=True),
    "cifar10_hard_task": lambda: regime_grid([HARD_TASK_FILE]),
    # The stronger failure case: half of cat/dog's labels flipped to any other class, so its
    # loss floor (1.79 nats) lies above the clean tasks' losses (section 2.3's condition).
    "cifar10_hard_task_any_core": lambda: regime_grid([HARD_TASK_ANY_FILE], core_only=True),
    "cifar10_hard_task_any": lambda: regime_grid([HARD_TASK_ANY_FILE]),
    # Ablations in the regime: T = 10 / 1000, no renormalisation at 1000, larger CNNs: 14 runs.
    "cifar10_regime_ablations": _regime_ablations,
    # The random-weighting litmus test (issue 13) on the regime setting: 19 runs, then with
    # the Table-4 grid (gradient methods + RLW): 26 runs.
    "litmus_core": lambda: litmus_grid(core_only=True),
    "litmus": litmus_grid,
    # Multilingual LM, Table 1's main rows with 2 rows per language and 1,800 steps (issue 15).
    "multilingual_seeds": multilingual_seeds_grid,
    # Spurious-CIFAR (issue 14), pre-trained: regularized MTL grid, ERM lr, ablations, group
    # DRO eta: 19 runs (run pretrain.gin first).
    "worst_group_image": worst_group_image_grid,
    # Spurious-CIFAR, the paper's methods at their defaults, pre-trained then from scratch
    # (run pretrain.gin first): 18 runs per seed.
    "worst_group_image_methods": lambda: (worst_group_methods_grid(True)
                                          + worst_group_methods_grid(False)),
    # The 2-D proof of concept (section 4), handy for smoke tests: 3 runs.
    "synthetic": _synthetic_sweep,
}


def sweep_runs(name: str) -> list[Run]:
  """The runs of the named sweep.

  Raises:
    ValueError: unknown sweep name (the message lists the known ones).
  """
  if name not in SWEEPS:
    raise ValueError(f"unknown sweep {name!r}; known sweeps: {', '.join(sorted(SWEEPS))}.")
  runs = SWEEPS[name]()
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f"sweep {name!r} has duplicate run names.")
  return runs


def run_bindings(run: Run, seed: int, extra: Sequence[str] = (), root: str = "") -> list[str]:
  """All gin bindings of ``run`` at ``seed`` (seed macros, one checkpoint kept), with
  ``{root}`` and ``{seed}`` filled in."""
  own = [b.replace("{root}", root).replace("{seed}", str(seed)) for b in run.bindings]
  return own + [f"SEED = {seed}", f"train_and_evaluate.seed = {seed}",
                "train_and_evaluate.keep_checkpoints = 1"] + list(extra)


def _root_of(workdir: str) -> str:
  """The sweep root of a run directory ``<root>/<name>/seed<k>``."""
  return os.path.dirname(os.path.dirname(workdir))


def run_command(run: Run, seed: int, workdir: str, extra: Sequence[str] = ()) -> list[str]:
  """The ``python -m experiments.train`` command line of ``run`` at ``seed``."""
  return _command(run.gin_files, run_bindings(run, seed, extra, _root_of(workdir)), workdir)


def _command(gin_files: Sequence[str], bindings: Sequence[str], workdir: str) -> list[str]:
  return ([sys.executable, "-m", "experiments.train"] + [f"--gin_file={f}" for f in gin_files] +
          [f"--gin_bindings={b}" for b in bindings] + [f"--workdir={workdir}"])


def _status(workdir: str) -> str:
  if os.path.exists(os.path.join(workdir, "DONE")):
    return "done"
  if os.path.exists(os.path.join(workdir, "FAILED")):
    return "failed"
  if os.path.isdir(os.path.join(workdir, "checkpoints")) or os.path.exists(
      os.path.join(workdir, "metrics.jsonl")):
    return "partial"
  return "pending"


def failed_error(workdir: str) -> Optional[str]:
  """The error line a failed run recorded in ``<workdir>/FAILED``, or None if it has none."""
  try:
    with open(os.path.join(workdir, "FAILED"), encoding="utf-8") as f:
      return f.read().strip() or "failed"
  except FileNotFoundError:
    return None


def _claim(workdir: str):
  """The run's claim (:func:`experiments.runner.workdir.claim`), or None if another sweep
  process holds it (the run is training in that sweep)."""
  return workdir_lib.claim(workdir)


def _held_elsewhere(workdir: str) -> bool:
  """Whether another sweep process holds the run's claim (checked without creating it)."""
  if not os.path.exists(os.path.join(workdir, ".claim")):
    return False
  claim = _claim(workdir)
  if claim is None:
    return True
  claim.close()
  return False


def _ended(head: str, workdir: str, cmd_str: str, retry_failed: bool,
           say: Callable[[str], None]) -> Optional[str]:
  """``'skipped'`` for a finished run, ``'failed'`` for a failed one not to be retried (each
  said in one line); None for a run to train."""
  status = _status(workdir)
  if status == "done":
    with open(os.path.join(workdir, "DONE"), encoding="utf-8") as f:
      same = f.read().strip() == cmd_str
    say(f"{head}: skipped (DONE)"
        f"{'' if same else ' [DONE holds a different command; delete DONE to rerun]'}"
        f"{_summary(_last_record(workdir))}")
    return "skipped"
  if status == "failed" and not retry_failed:
    say(f"{head}: failed before, skipped ({failed_error(workdir)}; --retry_failed resumes it)")
    return "failed"
  return None


def _last_record(workdir: str) -> Optional[dict]:
  records = metrics_io.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return records[-1] if records else None


def _summary(rec: Optional[dict]) -> str:
  """`` | step S avg M x worst M y`` for the first metric ``M`` the record has both
  ``avg_M`` and ``worst_M`` of (the LM logs ``avg_loss`` without ``worst_loss``); else ''."""
  if not rec:
    return ""
  both = [k[4:] for k in sorted(rec) if k.startswith("avg_") and f"worst_{k[4:]}" in rec]
  if not both:
    return ""
  m = both[0]
  return f" | step {rec['step']} avg {m} {rec[f'avg_{m}']:.4f} worst {m} {rec[f'worst_{m}']:.4f}"


def _train_in_process(run: Run, workdir: str, bindings: Sequence[str]) -> None:
  import gin  # pylint: disable=g-import-not-at-top
  from experiments import train as train_lib  # pylint: disable=g-import-not-at-top
  from experiments.runner import loop  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    train_lib.parse_gin(run.gin_files, bindings)
    loop.train_and_evaluate(workdir, quiet=True)
  finally:
    gin.clear_config()


def run_sweep(runs: Sequence[Run], root: str, seeds: Sequence[int] = (0,),
              only: Optional[str] = None, dry_run: bool = False, in_process: bool = False,
              extra_bindings: Sequence[str] = (), retry_failed: bool = False,
              say: Callable[[str], None] = lambda s: print(s, flush=True),
              start_before: Optional[float] = None) -> dict:
  """Runs (or lists) every run x seed not finished yet.

  Args:
    runs: the configurations.
    root: directory of the run directories ``<root>/<name>/seed<k>``.
    seeds: seeds to run.
    only: regex; keep only runs whose name matches (``re.search``).
    dry_run: only report each run's status and command.
    in_process: train in this process instead of a subprocess per run.
    extra_bindings: gin bindings appended to every run.
    retry_failed: resume runs that failed before (``FAILED``) instead of skipping them.
    say: progress printer (one line per run).
    start_before: a time (seconds since the epoch): no run is started or resumed at or after
      it; ``None``: no limit.

  Returns:
    ``{'<name>/seed<k>': status}`` with status ``'done'`` (finished now),
    ``'skipped'`` (finished before), ``'failed'`` (now, or before and not
    retried), ``'running'`` (held by another sweep process, see ``.claim``
    above), ``'waiting'`` (a run of its ``Run.after`` is not finished),
    ``'deferred'`` (not started: past ``start_before``), or in a
    dry run the current
    ``'done'``/``'failed'``/``'partial'``/``'pending'``/``'running'`` (a dry run creates
    nothing).
  """
  selected = [r for r in runs if only is None or re.search(only, r.name)]
  if not selected:
    raise ValueError(f"--only={only!r} matches none of the runs: "
                     f"{', '.join(r.name for r in runs)}.")
  jobs = [(r, s) for r in selected for s in seeds]
  results = {}
  for i, (run, seed) in enumerate(jobs, 1):
    key = f"{run.name}/seed{seed}"
    workdir = os.path.join(root, run.name, f"seed{seed}")
    bindings = run_bindings(run, seed, extra_bindings, root=os.path.abspath(root))
    cmd_str = shlex.join(_command(run.gin_files, bindings, os.path.abspath(workdir)))
    head = f"[{i}/{len(jobs)}] {key}"
    status = _status(workdir)
    if dry_run:
      if status != "done" and _held_elsewhere(workdir):
        status = "running"
      say(f"{head}: {status}{_summary(_last_record(workdir))}\n    {cmd_str}")
      results[key] = status
      continue
    ended = _ended(head, workdir, cmd_str, retry_failed, say)
    if ended:
      results[key] = ended
      continue
    if start_before is not None and time.time() >= start_before:
      say(f"{head}: not started: past --start_before; deferred (re-run the sweep)")
      results[key] = "deferred"
      continue
    waiting = [f"{a}/seed{seed}" for a in run.after
               if _status(os.path.join(root, a, f"seed{seed}")) != "done"]
    if waiting:
      say(f"{head}: waiting for {', '.join(waiting)} to finish; skipped (re-run the sweep)")
      results[key] = "waiting"
      continue
    os.makedirs(workdir, exist_ok=True)
    claim = _claim(workdir)
    if claim is None:
      say(f"{head}: running in another sweep process; skipped{_summary(_last_record(workdir))}")
      results[key] = "running"
      continue
    try:
      # Another sweep process may have ended the run before we claimed it.
      ended = _ended(head, workdir, cmd_str, retry_failed, say)
      if ended:
        results[key] = ended
        continue
      results[key] = _run_one(run, seed, workdir, bindings, cmd_str, head, in_process, say)
    finally:
      claim.close()  # releases the flock
  return results


def _run_one(run: Run, seed: int, workdir: str, bindings: Sequence[str], cmd_str: str, head: str,
             in_process: bool, say: Callable[[str], None]) -> str:
  """Trains one run (claimed by the caller); returns ``'done'`` or ``'failed'``."""
  fileio.atomic_write_text(os.path.join(workdir, "command.txt"), cmd_str + "\n")
  fileio.atomic_write_json(os.path.join(workdir, "run.json"),
                           {"run": run.name, "method": run.label, "seed": seed,
                            "gin_files": list(run.gin_files), "bindings": list(bindings)}
                           | _code_version(), indent=2)
  status = _status(workdir)
  say(f"{head}: {'starting' if status == 'pending' else 'resuming'}")
  if status == "failed":  # --retry_failed
    os.remove(os.path.join(workdir, "FAILED"))
  t0 = time.time()
  error = None
  if in_process:
    try:
      _train_in_process(run, workdir, bindings)
    except Exception as e:  # pylint: disable=broad-except
      error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
  else:
    with open(os.path.join(workdir, "train.log"), "a", encoding="utf-8") as log:
      log.write(f"$ {cmd_str}\n")
      log.flush()
      proc = subprocess.Popen(shlex.split(cmd_str), cwd=paths.repo_root(), stdout=log,
                              stderr=subprocess.STDOUT)
      try:
        proc.wait()
      except KeyboardInterrupt:  # SIGINT, or SIGTERM (main's handler): let the run save its
        # checkpoint and exit (it got the signal too when the whole process group was
        # signalled; a second SIGTERM would make it skip the checkpoint), count this
        # attempt's wall-clock, then stop. A run that did not get the signal gets it later.
        try:
          proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
          proc.send_signal(signal.SIGTERM)
          try:
            proc.wait(timeout=120)
          except subprocess.TimeoutExpired:
            proc.kill()
        workdir_lib.add_wall_clock(workdir, time.time() - t0, False)
        say(f"{head}: interrupted after {time.time() - t0:.0f}s")
        raise
    if proc.returncode != 0:
      error = f"exit status {proc.returncode}; " + _last_error_line(
          os.path.join(workdir, "train.log"))
  took = time.time() - t0
  workdir_lib.add_wall_clock(workdir, took, error is None)
  if error is not None:
    with open(os.path.join(workdir, "FAILED"), "w", encoding="utf-8") as f:
      f.write(error + "\n")
    say(f"{head}: FAILED after {took:.0f}s: {error}")
    return "failed"
  with open(os.path.join(workdir, "DONE"), "w", encoding="utf-8") as f:
    f.write(cmd_str + "\n")
  say(f"{head}: done in {took:.0f}s{_summary(_last_record(workdir))}")
  return "done"


def _code_version() -> dict:
  """``{'git_commit': HEAD, 'git_modified': [uncommitted tracked .py/.gin files]}`` of the
  checkout the run starts from ({} outside a git checkout): the code a run used is HEAD plus
  those files' working-tree state."""
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=paths.repo_root(), check=True,
                          capture_output=True, text=True, timeout=30).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                            cwd=paths.repo_root(), check=True, capture_output=True, text=True,
                            timeout=30).stdout.splitlines()
  except (OSError, subprocess.SubprocessError):
    return {}
  modified = sorted(l[3:] for l in status if l[3:].endswith((".py", ".gin")))
  return {"git_commit": head, "git_modified": modified}


def _last_error_line(log_path: str) -> str:
  try:
    with open(log_path, encoding="utf-8", errors="replace") as f:
      lines = [l.strip() for l in f if l.strip()]
  except OSError:
    return "(no log)"
  for line in reversed(lines):
    if line.startswith("error:") or "Error" in line:
      return line[:300]
  return lines[-1][:300] if lines else "(empty log)"


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program, so that the module can be
  imported next to other absl programs, e.g. :mod:`experiments.pareto`, in one process)."""
  flags.DEFINE_string("sweep", None, "Name of the sweep (see SWEEPS).")
  flags.DEFINE_string("root", None, "Root directory of the sweep's run directories.")
  flags.DEFINE_string("only", None, "Regex: run only the runs whose name matches.")
  flags.DEFINE_string("seeds", "0", "Comma-separated seeds, e.g. 0,1,2.")
  flags.DEFINE_bool("dry_run", False, "Print the runs and their status; run nothing.")
  flags.DEFINE_bool("in_process", False, "Run in this process (gin.clear_config between runs) "
                    "instead of one subprocess per run.")
  flags.DEFINE_multi_string("bindings", [], "Extra gin bindings appended to every run "
                            "(repeatable), e.g. 'NUM_STEPS = 100'.")
  flags.DEFINE_bool("retry_failed", False, "Resume runs that failed before (their FAILED file) "
                    "instead of skipping them.")
  flags.DEFINE_string("start_before", None, "UTC time, e.g. 2026-12-02T09:00: start (or "
                      "resume) no run at or after it; the rest are reported as deferred.")


def parse_utc(text: Optional[str]) -> Optional[float]:
  """``--start_before``'s time (ISO 8601; UTC unless it names a zone) as seconds since the
  epoch; ``None`` for ``None``.

  Raises:
    ValueError: not an ISO 8601 time.
  """
  if text is None:
    return None
  try:
    t = datetime.datetime.fromisoformat(text)
  except ValueError:
    raise ValueError(f"--start_before must be an ISO 8601 time such as 2026-12-02T09:00 "
                     f"(UTC), got {text!r}.") from None
  if t.tzinfo is None:
    t = t.replace(tzinfo=datetime.timezone.utc)
  return t.timestamp()


def _raise_interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def main(argv: Sequence[str]) -> None:
  """Runs the sweep named by --sweep (see the module docstring)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # SIGTERM (e.g. results/cifar10_regime/run.sh stop) ends the sweep like Ctrl-C: the current
  # run is let finish its checkpoint and its wall-clock is recorded.
  signal.signal(signal.SIGTERM, _raise_interrupt)
  f = flags.FLAGS
  try:
    if not f.sweep or not f.root:
      raise ValueError("--sweep and --root are required; sweeps: " + ", ".join(sorted(SWEEPS)))
    try:
      seeds = [int(s) for s in f.seeds.split(",") if s.strip()]
    except ValueError:
      raise ValueError(f"--seeds must be comma-separated integers, got {f.seeds!r}.") from None
    runs = sweep_runs(f.sweep)
    if f.only:
      re.compile(f.only)
    results = run_sweep(runs, f.root, seeds, f.only, f.dry_run, f.in_process, f.bindings,
                        f.retry_failed, start_before=parse_utc(f.start_before))
  except KeyboardInterrupt:
    print(f"sweep {f.sweep}: interrupted; re-run the same command to resume.", flush=True)
    sys.exit(130)
  except (ValueError, re.error) as e:
    print(f"error: {type(e).__name__}: {str(e).strip().splitlines()[0]}", file=sys.stderr)
    sys.exit(1)
  counts = {}
  for s in results.values():
    counts[s] = counts.get(s, 0) + 1
  print("sweep " + f.sweep + ": " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
        flush=True)
  if counts.get("failed"):
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
