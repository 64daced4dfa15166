r"""The synthetic proof of concept (paper section 4, Figure 2), all methods.

    python -m experiments.synthetic --out=results/synthetic

Trains average loss, DRO, exact L-DRO (Algorithm 1) and online L-DRO
(Algorithm 3) through the same runner as every experiment
(:func:`experiments.runner.loop.train_and_evaluate`), noiseless and with Gaussian
noise on losses and gradients, then writes ``figure2.png`` (trajectories
over the plane) and ``summary.json`` (final losses, weight instability).
"""

if __name__ == "__main__":  # before JAX starts: see experiments/runner/cpu_runtime.py
  from experiments.runner import cpu_runtime as _cpu_runtime  # pylint: disable=g-import-not-at-top
  _cpu_runtime.configure_process("experiments.synthetic")

import os
import shutil
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import gin
import numpy as np

from experiments import train as train_lib
from experiments.families import synthetic as synthetic_family
from experiments.runner import loop
from ldro.data import fileio

_OUT = flags.DEFINE_string("out", "results/synthetic", "Output directory.")
_STEPS = flags.DEFINE_integer("num_steps", 1000, "Training steps per run.")
_NOISE = flags.DEFINE_float("noise", 0.1, "Std of the loss and gradient noise of noisy runs.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed (noise draws).")

CONFIG_DIR = "gin_configs/synthetic"

# name -> (gin file, extra bindings, label, panel)
RUNS = {
    "avg": ("avg.gin", [], "average loss", 0),
    "dro": ("dro.gin", [], "DRO (online, Sagawa et al.)", 0),
    "dro_max": ("avg.gin", ["METHOD = 'avg_max'", "method.hparams = {'alpha': 0.0}"],
                "DRO (max loss)", 0),
    "ldro_exact": ("ldro_exact.gin", [], "L-DRO exact (Alg. 1)", 1),
    "ldro": ("ldro.gin", [], "L-DRO online (Alg. 3)", 1),
    "ldro_exact_noisy": ("ldro_exact.gin", ["include 'gin_configs/synthetic/noisy.gin'"],
                         "L-DRO exact, noisy", 2),
    "ldro_noisy": ("ldro.gin", ["include 'gin_configs/synthetic/noisy.gin'"],
                   "L-DRO online, noisy", 2),
}


def run_all(out: str, num_steps: int, noise: float, seed: int,
            names: Sequence[str] = tuple(RUNS)) -> dict:
  """Runs the synthetic methods; returns ``{name: list of metrics records}``."""
  histories = {}
  for name in names:
    cfg, extra, _, _ = RUNS[name]
    workdir = os.path.join(out, "runs", name)
    shutil.rmtree(workdir, ignore_errors=True)  # every run starts fresh
    bindings = list(extra) + [
        f"train_and_evaluate.num_steps = {num_steps}",
        "train_and_evaluate.eval_every = 1",
        f"train_and_evaluate.checkpoint_every = {num_steps}",
        f"train_and_evaluate.seed = {seed}",
        f"SyntheticExperiment.loss_noise = {noise if 'noisy' in name else 0.0}",
        f"SyntheticExperiment.grad_noise = {noise if 'noisy' in name else 0.0}",
    ]
    gin.clear_config()
    train_lib.parse_gin([f"{CONFIG_DIR}/{cfg}"], bindings)
    histories[name] = loop.train_and_evaluate(workdir, quiet=True)
    shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
    last = histories[name][-1]
    print(f"{name:18s} avg loss {last['avg_loss']:.4f}  worst loss {last['worst_loss']:.4f}",
          flush=True)
  return histories


def summarize(histories: dict) -> dict:
  """Per method: final outlier/cluster/max/mean loss and weight instability."""
  summary = {}
  for name, recs in histories.items():
    last = recs[-1]
    losses = np.asarray(last["task_loss"])
    w = np.asarray([r["task_weights"] for r in recs])
    dw = np.abs(np.diff(w, axis=0)).sum(axis=1)  # L1 change of w per step
    summary[name] = {
        "label": RUNS[name][2],
        "steps": last["step"],
        "outlier_loss": float(losses[-1]),
        "mean_cluster_loss": float(losses[:-1].mean()),
        "max_loss": float(losses.max()),
        "mean_loss": float(losses.mean()),
        "final_prediction": last["prediction"],
        "final_outlier_weight": float(w[-1, -1]),
        "weight_change_per_step": float(dw.mean()),
        "weight_change_per_step_last_half": float(dw[len(dw) // 2:].mean()),
    }
  return summary


def plot(histories: dict, points: np.ndarray, radius: float, path: str) -> None:
  """Three panels like Figure 2: trajectories, the forbidden disc, the tasks."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  titles = ["(a) average loss vs DRO", "(b) L-DRO: exact vs online",
            "(c) with loss/gradient noise"]
  colors = {"avg": "tab:green", "dro": "tab:purple", "dro_max": "tab:gray",
            "ldro_exact": "tab:orange", "ldro": "tab:blue", "ldro_exact_noisy": "tab:orange",
            "ldro_noisy": "tab:blue"}
  fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
  outlier = points[-1]
  for k, ax in enumerate(axes):
    ax.add_patch(plt.Circle(outlier, radius, color="0.85", zorder=0))
    ax.scatter(points[:-1, 0], points[:-1, 1], c="gold", edgecolors="k", s=40, zorder=3,
               label="cluster tasks")
    ax.scatter([outlier[0]], [outlier[1]], c="red", edgecolors="k", s=80, zorder=3,
               label="outlier task")
    for name, recs in histories.items():
      if RUNS[name][3] != k:
        continue
      traj = np.asarray([r["prediction"] for r in recs])
      ax.plot(traj[:, 0], traj[:, 1], "-", color=colors[name], lw=1.6, label=RUNS[name][2])
      ax.plot(traj[-1, 0], traj[-1, 1], "o", color=colors[name], ms=7, mec="k")
      ax.plot(traj[0, 0], traj[0, 1], "x", color="k", ms=8)
    ax.set_title(titles[k])
    ax.set_aspect("equal")
    ax.set_xlim(-2.6, 2.6)
    ax.set_ylim(-1.6, 2.3)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
  fig.suptitle("Synthetic multitask problem (gray: region the model cannot reach; x: start)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  histories = run_all(out, _STEPS.value, _NOISE.value, _SEED.value)
  summary = summarize(histories)
  gin.clear_config()
  exp = synthetic_family.SyntheticExperiment()
  plot(histories, exp.tasks.points, exp.tasks.radius, os.path.join(out, "figure2.png"))
  summary["_meta"] = {"command": "python -m experiments.synthetic " + " ".join(sys.argv[1:]),
                      "num_steps": _STEPS.value, "noise": _NOISE.value,
                      "radius": exp.tasks.radius, "R_squared": exp.tasks.radius ** 2}
  fileio.atomic_write_json(os.path.join(out, "summary.json"), summary, indent=2)
  shutil.rmtree(os.path.join(out, "runs"), ignore_errors=True)
  print(f"wrote {out}/figure2.png and {out}/summary.json")


if __name__ == "__main__":
  app.run(main)
