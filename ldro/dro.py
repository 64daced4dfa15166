"""Worst-case (DRO) task weightings: online group DRO, baselined DRO, avg/max."""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldro import game
from ldro import weighting
from ldro import registry

Array = jax.Array


def group_dro(num_tasks: int, weight_lr: float | Array) -> optax.GradientTransformationExtraArgs:
  """Online group DRO (Sagawa et al., 2020, Algorithm 1; paper section 2.3).

  .. math:: q_i \\leftarrow q_i \\exp(\\eta\\, \\ell_i) / Z,
     \\qquad \\text{update} = \\textstyle\\sum_i q_i g_i

  with the weights updated before the parameter step, as in Sagawa et al.
  ``weight_lr = 0`` keeps uniform weights. Absent tasks (``task_mask``) keep
  their weight.

  Args:
    num_tasks: number of tasks ``N``.
    weight_lr: step size ``eta`` of the exponentiated-gradient ascent.

  Returns:
    A transformation taking ``task_losses`` (and optionally ``task_mask``).
  """
  weighting.check_hparam(weight_lr, "weight_lr", "group_dro", low=0)

  def next_weights(w, losses, mask, key, count):
    return game.exponentiated_step(w, weight_lr * losses, mask)
  return weighting.loss_weighting("group_dro", num_tasks, next_weights)


def baselined_dro(
    baseline_losses: Sequence[float] | Array, weight_lr: float | Array
) -> optax.GradientTransformationExtraArgs:
  """Baselined DRO (Oren et al., 2019; paper section 5.2.1).

  Online group DRO on excess losses ``l_i - b_i``, where ``b_i`` estimates the
  irreducible loss of task ``i`` (e.g. a monolingual model's validation
  loss): ``q_i <- q_i exp(eta (l_i - b_i)) / Z``.

  Args:
    baseline_losses: ``[N]`` baselines ``b``.
    weight_lr: step size ``eta``.

  Returns:
    A transformation taking ``task_losses``.
  """
  weighting.check_hparam(weight_lr, "weight_lr", "baselined_dro", low=0)
  b = np.asarray(baseline_losses, np.float32)
  if b.ndim != 1 or not np.all(np.isfinite(b)):
    raise ValueError(f"baseline_losses must be a finite 1-D sequence, got {b!r}.")

  def next_weights(w, losses, mask, key, count):
    return game.exponentiated_step(w, weight_lr * (losses - jnp.asarray(b)), mask)
  return weighting.loss_weighting("baselined_dro", b.shape[0], next_weights)


def avg_max_interpolation(num_tasks: int, alpha: float | Array = 0.5) -> optax.GradientTransformationExtraArgs:
  """Interpolation of average and worst task loss (paper, Appendix B.2).

  Minimises ``alpha * mean_i l_i + (1 - alpha) * max_i l_i``, whose gradient
  weights are ``w = alpha / N + (1 - alpha) e_{argmax_i l_i}`` (ties: lowest
  index). With ``task_mask``, the mean and max run over present tasks.

  Args:
    num_tasks: number of tasks ``N``.
    alpha: weight of the average loss, in ``[0, 1]``.

  Returns:
    A transformation taking ``task_losses``.
  """
  weighting.check_hparam(alpha, "alpha", "avg_max_interpolation", low=0, high=1)

  def next_weights(w, losses, mask, key, count):
    n = w.shape[0]
    m = jnp.ones((n,), bool) if mask is None else mask
    avg = m / jnp.maximum(jnp.sum(m), 1)
    worst = jax.nn.one_hot(jnp.argmax(jnp.where(m, losses, -jnp.inf)), n)
    return alpha * avg + (1.0 - alpha) * worst
  return weighting.loss_weighting("avg_max_interpolation", num_tasks, next_weights)


registry.register_method(
    "dro", group_dro, "online group DRO (Sagawa et al., ICLR 2020)", label="DRO",
    needs=("losses",), kind="dro", defaults={"weight_lr": 0.01})
registry.register_method(
    "baselined_dro", baselined_dro, "baselined DRO (Oren et al., EMNLP 2019)",
    label="baselined DRO", needs=("losses",), kind="dro", defaults={"weight_lr": 0.01})
registry.register_method(
    "avg_max", avg_max_interpolation, "avg/max loss interpolation (paper App. B.2)",
    label="avg/max", needs=("losses",), kind="dro", defaults={"alpha": 0.5})
