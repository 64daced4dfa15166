r"""Average/worst-task accuracy Pareto frontiers per method (paper Figure 3, section 5.1).

    python -m experiments.pareto --root=workdirs/cifar10_mtl --out=results/cifar10_mtl

Reads every ``metrics.jsonl`` under ``--root``. Every evaluation record (every
evaluated step, including step 0, of every hyper-parameter configuration and
every seed) is one point (average accuracy, worst-task accuracy), as in the
paper, which takes "the Pareto frontier of all checkpoints (across epochs and
hyper-parameter configurations) of each method". Runs are grouped by method:
the ``method`` of the run's ``run.json`` (written by :mod:`experiments.sweep`),
else the run directory name up to its first ``-`` (``ldro-eta1e-2-lam1e-3``
-> ``ldro``). The run directory is the parent of ``metrics.jsonl``, or its
grandparent when the parent is named ``seed<k>``.

Outputs in ``--out``:

* ``pareto.png``: average accuracy (x) vs worst-task accuracy (y), the
  frontier of each method as a line, all points as a faint scatter; one panel
  for all seeds pooled and, with several seeds, one panel per seed (Figure 6).
* ``pareto.md`` / ``pareto.json``: per method (all seeds pooled) the number of
  runs and points, the hypervolume of the frontier above ``--reference``, the
  best worst-case accuracy, the best average accuracy, and the best worst-case
  accuracy at matched average accuracy: ``max worst`` over the points with
  ``avg >= A*``, where ``A*`` is the lowest of the methods' best average
  accuracies (so every method has at least one eligible point). With several
  seeds the json also holds the per-seed hypervolumes.
"""

import json
import os
import re
import sys
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
import numpy as np

from experiments.runner import metrics_io
from ldro import metrics as ldro_metrics
from ldro.data import fileio

METHOD_LABELS = {
    "static": "Static mixing", "equal": "Static mixing", "dro": "DRO", "ldro": "L-DRO",
    "pcgrad": "PCGrad", "avg_max": "avg/max (alpha=0.5)", "rlw": "RLW", "rgw": "RGW",
}
METHOD_COLORS = {
    "ldro": "tab:blue", "static": "tab:green", "equal": "tab:green", "dro": "tab:red",
    "pcgrad": "tab:orange", "avg_max": "tab:purple", "rlw": "tab:brown", "rgw": "tab:gray",
}


def collect_points(root: str, metric: str = "accuracy") -> list[dict]:
  """One entry per evaluation record of every run under ``root``.

  Args:
    root: directory searched recursively for ``metrics.jsonl``.
    metric: per-task metric name; records need ``avg_<metric>`` and
      ``worst_<metric>``.

  Returns:
    Dicts with ``method``, ``run``, ``seed`` (int, or None), ``step``,
    ``avg``, ``worst``.

  Raises:
    FileNotFoundError: ``root`` does not exist or holds no metrics.jsonl.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f"sweep root not found: {root!r}")
  points = []
  found = False
  for dirpath, _, filenames in sorted(os.walk(root)):
    if "metrics.jsonl" not in filenames:
      continue
    found = True
    run_dir, seed = dirpath, None
    m = re.fullmatch(r"seed(\d+)", os.path.basename(dirpath))
    if m:
      run_dir, seed = os.path.dirname(dirpath), int(m.group(1))
    run = os.path.relpath(run_dir, root)
    method = None
    info_path = os.path.join(dirpath, "run.json")
    if os.path.exists(info_path):
      with open(info_path, encoding="utf-8") as f:
        info = json.load(f)
      method = info.get("method")
      if seed is None and info.get("seed") is not None:
        seed = int(info["seed"])
    if not method:
      method = os.path.basename(run_dir).split("-", 1)[0]
    for rec in metrics_io.read_metrics(os.path.join(dirpath, "metrics.jsonl")):
      if f"avg_{metric}" not in rec or f"worst_{metric}" not in rec:
        continue
      points.append({"method": method, "run": run, "seed": seed, "step": int(rec["step"]),
                     "avg": float(rec[f"avg_{metric}"]), "worst": float(rec[f"worst_{metric}"])})
  if not found:
    raise FileNotFoundError(f"no metrics.jsonl under {root!r}")
  if not points:
    raise ValueError(f"no record with avg_{metric} and worst_{metric} under {root!r}")
  return points


def _method_order(methods: Sequence[str]) -> list[str]:
  known = list(METHOD_LABELS)
  return sorted(methods, key=lambda m: (known.index(m) if m in known else len(known), m))


def summarize(points: Sequence[dict], reference: Sequence[float] = (0.0, 0.0)) -> dict:
  """Per-method frontier statistics (all seeds pooled).

  Args:
    points: entries of :func:`collect_points`.
    reference: hypervolume reference point (avg, worst).

  Returns:
    ``{'matched_average': A*, 'reference': [...], 'methods': {method: {...}}}``
    with per method ``runs``, ``seeds``, ``points``, ``hypervolume``,
    ``best_worst``, ``best_average``, ``worst_at_matched_average``,
    ``frontier`` (``[[avg, worst], ...]``) and ``hypervolume_per_seed``.
  """
  methods = _method_order(sorted({p["method"] for p in points}))
  arr = {m: np.array([[p["avg"], p["worst"]] for p in points if p["method"] == m])
         for m in methods}
  matched = min(float(a[:, 0].max()) for a in arr.values())
  out = {"matched_average": matched, "reference": list(map(float, reference)), "methods": {}}
  for m in methods:
    pts = [p for p in points if p["method"] == m]
    a = arr[m]
    seeds = sorted({p["seed"] for p in pts if p["seed"] is not None})
    per_seed = {}
    for s in seeds:
      sa = np.array([[p["avg"], p["worst"]] for p in pts if p["seed"] == s])
      per_seed[str(s)] = ldro_metrics.hypervolume(sa, reference)
    out["methods"][m] = {
        "label": METHOD_LABELS.get(m, m),
        "runs": len({p["run"] for p in pts}),
        "seeds": seeds,
        "points": int(len(a)),
        "hypervolume": ldro_metrics.hypervolume(a, reference),
        "best_worst": float(a[:, 1].max()),
        "best_average": float(a[:, 0].max()),
        "worst_at_matched_average": ldro_metrics.best_worst_at_average(a, matched),
        "frontier": ldro_metrics.pareto_frontier(a).tolist(),
        "hypervolume_per_seed": per_seed,
    }
  return out


def markdown_table(summary: dict) -> str:
  """The summary as a markdown table.

  Args:
    summary: output of :func:`summarize`.

  Returns:
    Markdown text; accuracies in percent, hypervolume in accuracy units squared
    (accuracies as fractions in [0, 1], so at most 1).
  """
  ref = summary["reference"]
  lines = [
      f"| method | runs | points | hypervolume (ref {ref[0]:g},{ref[1]:g}) | best worst acc | "
      f"best avg acc | worst acc at avg >= {100 * summary['matched_average']:.2f} |",
      "|---|---|---|---|---|---|---|",
  ]
  for m, s in summary["methods"].items():
    lines.append(
        f"| {s['label']} | {s['runs']} | {s['points']} | {s['hypervolume']:.4f} | "
        f"{100 * s['best_worst']:.2f} | {100 * s['best_average']:.2f} | "
        f"{100 * s['worst_at_matched_average']:.2f} |")
  return "\n".join(lines) + "\n"


def plot(points: Sequence[dict], summary: dict, path: str, title: Optional[str] = None) -> None:
  """Writes the Figure-3-style plot: frontiers per method over faint scatters.

  Args:
    points: entries of :func:`collect_points`.
    summary: output of :func:`summarize` (method order and labels).
    path: output image path.
    title: figure title.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  methods = list(summary["methods"])
  seeds = sorted({p["seed"] for p in points if p["seed"] is not None})
  panels = [("all seeds pooled" if len(seeds) > 1 else None, None)]
  if len(seeds) > 1:
    panels += [(f"seed {s}", s) for s in seeds]
  fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 6), squeeze=False)
  # Zoom on the frontiers (with the upper 70% of all points as context).
  front = np.concatenate([np.array(summary["methods"][m]["frontier"]) for m in methods])
  allp = np.array([[p["avg"], p["worst"]] for p in points])
  lo = np.minimum(front.min(axis=0), np.percentile(allp, 30, axis=0))
  hi = front.max(axis=0)
  span = np.maximum(hi - lo, 0.02)
  lo, hi = lo - 0.15 * span, hi + 0.1 * span
  for ax, (panel_title, seed) in zip(axes[0], panels):
    for k, m in enumerate(methods):
      color = METHOD_COLORS.get(m, f"C{k % 10}")
      a = np.array([[p["avg"], p["worst"]] for p in points
                    if p["method"] == m and (seed is None or p["seed"] == seed)])
      if a.size == 0:
        continue
      f = ldro_metrics.pareto_frontier(a)
      ax.scatter(a[:, 0], a[:, 1], s=12, color=color, alpha=0.25, linewidths=0)
      ax.plot(f[:, 0], f[:, 1], "-o", color=color, lw=2, ms=4,
              label=f"{summary['methods'][m]['label']} ({len(a)} pts)")
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_xlabel("average task accuracy")
    ax.set_ylabel("worst task accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    if panel_title:
      ax.set_title(panel_title)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_outputs(root: str, out: str, metric: str = "accuracy",
                  reference: Sequence[float] = (0.0, 0.0), title: Optional[str] = None,
                  keep: Optional[Callable[[dict], bool]] = None) -> dict:
  """Collects the points under ``root`` and writes pareto.{png,md,json} to ``out``.

  Args:
    root, out, metric, reference, title: as the command line's flags.
    keep: optional predicate on a point (:func:`collect_points`' dicts): only those it keeps
      are drawn and summarised (e.g. the regime report's configurations finished at every
      seed).

  Returns:
    The summary (see :func:`summarize`).
  """
  points = collect_points(root, metric)
  if keep is not None:
    points = [p for p in points if keep(p)]
  summary = summarize(points, reference)
  summary["metric"] = metric
  summary["root"] = root
  os.makedirs(out, exist_ok=True)
  plot(points, summary, os.path.join(out, "pareto.png"), title)
  fileio.atomic_write_text(os.path.join(out, "pareto.md"), markdown_table(summary))
  fileio.atomic_write_json(os.path.join(out, "pareto.json"), summary, indent=2)
  return summary


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program; see :mod:`experiments.sweep`)."""
  flags.DEFINE_string("root", None, "Directory searched for metrics.jsonl files.")
  flags.DEFINE_string("out", None, "Output directory (pareto.png, pareto.md, pareto.json).")
  flags.DEFINE_string("metric", "accuracy",
                      "Per-task metric (higher is better): uses avg_<m> and worst_<m>.")
  flags.DEFINE_string("reference", "0,0", "Hypervolume reference point 'avg,worst'.")
  flags.DEFINE_string("title", None, "Figure title.")


def main(argv: Sequence[str]) -> None:
  """Writes pareto.{png,md,json} for --root into --out and prints the table."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  try:
    if not f.root or not f.out:
      raise ValueError("--root and --out are required.")
    try:
      reference = [float(x) for x in f.reference.split(",")]
    except ValueError:
      reference = []
    if len(reference) != 2:
      raise ValueError(f"--reference must be 'avg,worst', got {f.reference!r}.")
    summary = write_outputs(f.root, f.out, f.metric, reference, f.title)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {type(e).__name__}: {str(e).strip().splitlines()[0]}", file=sys.stderr)
    sys.exit(1)
  sys.stdout.write(markdown_table(summary))
  print(f"wrote {f.out}/pareto.png, pareto.md, pareto.json")


if __name__ == "__main__":
  define_flags()
  app.run(main)
