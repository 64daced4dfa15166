"""Static task weightings: equal weighting and static mixing with temperature."""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldro import weighting
from ldro import registry


def equal_weighting(num_tasks: int) -> optax.GradientTransformationExtraArgs:
  """Average task loss, ``w_i = 1/N`` (paper, section 2.1).

  Args:
    num_tasks: number of tasks ``N``.

  Returns:
    A transformation whose output is ``(1/N) sum_i g_i``; ``task_losses`` are
    not needed.
  """
  return weighting.loss_weighting(
      "equal_weighting", num_tasks, lambda w, *_: w, needs_losses=False)


def mixing_weights(task_sizes: Sequence[float], alpha: float) -> np.ndarray:
  """Static mixing weights ``w_i = |D_i|^alpha / sum_j |D_j|^alpha`` (section 2.2).

  Args:
    task_sizes: ``|D_i|`` per task (examples, tokens or bytes), all ``> 0``.
    alpha: inverse temperature; 0 = uniform, 1 = proportional.

  Returns:
    ``[N]`` float32 weights on the simplex.
  """
  sizes = np.asarray(task_sizes, np.float64)
  if sizes.ndim != 1 or sizes.size == 0:
    raise ValueError(f"task_sizes must be a non-empty 1-D sequence, got shape {sizes.shape}.")
  bad = np.flatnonzero(~(sizes > 0) | ~np.isfinite(sizes))
  if bad.size:
    raise ValueError(f"task_sizes must be finite and > 0; task {int(bad[0])} has size "
                     f"{sizes[bad[0]]} (a task with no examples?).")
  logw = alpha * np.log(sizes)
  w = np.exp(logw - logw.max())
  return (w / w.sum()).astype(np.float32)


def static_mixing(task_sizes: Sequence[float], alpha: float) -> optax.GradientTransformationExtraArgs:
  """Static mixing with inverse temperature, ``w_i ~ |D_i|^alpha`` (section 2.2).

  Proportional sampling (Sanh et al., 2019) is ``alpha = 1``; multilingual
  models use ``alpha`` in ``[0.2, 0.3]`` (Conneau et al., 2020; Xue et al.,
  2021). Here the weights multiply the per-task losses of a task-grouped
  batch, which matches sampling with these rates in expectation.

  Args:
    task_sizes: ``|D_i|`` per task.
    alpha: inverse temperature.

  Returns:
    A transformation with constant weights; ``task_losses`` not needed.
  """
  weighting.check_hparam(alpha, "alpha", "static_mixing")
  if weighting.is_static(alpha):
    w = jnp.asarray(mixing_weights(task_sizes, alpha))
  else:  # a traced alpha (optax.inject_hyperparams): the same formula in JAX
    mixing_weights(task_sizes, 0.0)  # validates the sizes
    w = jax.nn.softmax(alpha * jnp.log(jnp.asarray(task_sizes, jnp.float32)))
  return weighting.loss_weighting(
      "static_mixing", len(w), lambda w_, *_: w_, init_weights=lambda n: w,
      needs_losses=False)


registry.register_method(
    "equal", equal_weighting, "average task loss (paper section 2.1)", label="EW",
    kind="static")
registry.register_method(
    "static_mixing", static_mixing, "w_i ~ |D_i|^alpha (paper section 2.2; Conneau et al. 2020)",
    label="static mixing", kind="static", defaults={"alpha": 0.3})
