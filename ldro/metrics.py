"""Multitask evaluation metrics: average/worst, perplexity, Pareto frontiers.

Pure numpy/JAX helpers used by the experiments (paper sections 5.1-5.2).
"""

from typing import Sequence

import numpy as np


def average_and_worst(values: Sequence[float], higher_is_better: bool = True) -> tuple[float, float]:
  """Average and worst task value (min if higher is better, else max).

  Args:
    values: per-task metric values.
    higher_is_better: accuracy-like (True) or loss-like (False).

  Returns:
    ``(average, worst)``.
  """
  v = np.asarray(values, np.float64)
  if v.ndim != 1 or v.size == 0:
    raise ValueError(f"expected a non-empty 1-D sequence of per-task values, got shape {v.shape}.")
  return float(v.mean()), float(v.min() if higher_is_better else v.max())


def perplexity(mean_token_loss: float | np.ndarray) -> np.ndarray:
  """Perplexity ``exp(cross-entropy)`` of a mean token loss (nats)."""
  return np.exp(np.asarray(mean_token_loss, np.float64))


def relative_perplexity(ppl: np.ndarray, mono_ppl: np.ndarray) -> np.ndarray:
  """Relative perplexity (paper Eq. 3): ``(PPL - PPL_mono) / PPL_mono``.

  Args:
    ppl: ``[N]`` perplexities of the multilingual model.
    mono_ppl: ``[N]`` perplexities of the monolingual models.

  Returns:
    ``[N]`` relative perplexities (0 = as good as monolingual). Multiply by 100
    for the percentages of Table 1.
  """
  ppl, mono = np.asarray(ppl, np.float64), np.asarray(mono_ppl, np.float64)
  if ppl.shape != mono.shape:
    raise ValueError(f"ppl {ppl.shape} and mono_ppl {mono.shape} must have the same shape.")
  return (ppl - mono) / mono


def pareto_frontier(points: np.ndarray) -> np.ndarray:
  """Pareto-optimal points when both coordinates are to be maximised.

  Args:
    points: ``[M, 2]`` e.g. (average accuracy, worst accuracy) per checkpoint.

  Returns:
    ``[K, 2]`` non-dominated points sorted by the first coordinate ascending
    (second coordinate then descending).
  """
  p = np.asarray(points, np.float64)
  if p.ndim != 2 or p.shape[1] != 2:
    raise ValueError(f"points must be [M, 2], got {p.shape}.")
  if p.shape[0] == 0:
    return p
  order = np.lexsort((-p[:, 1], -p[:, 0]))  # by x desc, then y desc
  front, best_y = [], -np.inf
  for i in order:
    if p[i, 1] > best_y:
      front.append(p[i])
      best_y = p[i, 1]
  return np.array(front[::-1])


def hypervolume(points: np.ndarray, reference: Sequence[float] = (0.0, 0.0)) -> float:
  """Area dominated by a 2-D point set (maximisation) above ``reference``.

  Args:
    points: ``[M, 2]`` points (need not be a frontier).
    reference: the reference (worst) point.

  Returns:
    The dominated area.
  """
  front = pareto_frontier(points)
  rx, ry = reference
  front = front[(front[:, 0] > rx) & (front[:, 1] > ry)]
  area, prev_x = 0.0, rx
  # front sorted by x ascending, y descending: each point owns the strip
  # between the previous x and its own x at its height y.
  for x, y in front:
    area += (x - prev_x) * (y - ry)
    prev_x = x
  return float(area)


def best_worst_at_average(points: np.ndarray, min_average: float) -> float:
  """Best worst-case value among points whose average is ``>= min_average``.

  Args:
    points: ``[M, 2]`` (average, worst) pairs, e.g. every evaluation of a method.
    min_average: the average-accuracy level to reach.

  Returns:
    The largest worst-case value of the qualifying points; NaN if none reaches
    ``min_average``.
  """
  p = np.asarray(points, np.float64)
  sel = p[p[:, 0] >= min_average]
  return float(sel[:, 1].max()) if sel.size else float("nan")
