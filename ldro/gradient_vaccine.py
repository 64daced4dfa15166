"""GradVac: Gradient Vaccine (Wang et al., ICLR 2021), from the Gram matrix."""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from ldro import registry
from ldro import weighting

Array = jax.Array

_HI = jax.lax.Precision.HIGHEST
# The correction divides by sqrt(1 - phi_hat^2): a target of exactly +-1 (an
# EMA of identical tasks' similarity 1 reaches 1.0 in float32) would give an
# infinite step, so the target enters the formula clipped to 1 - 1e-6 in
# absolute value (the EMA itself is not clipped).
_TARGET_CLIP = 1.0 - 1e-6


def visiting_orders(key: Array, n: int) -> Array:
  """``[N, N]`` int: row ``i`` is the random order in which task ``i`` visits the others.

  The same draw as :func:`ldro.pcgrad_coefficients` (one permutation of
  ``0..N-1`` per task, from ``jax.random.split(key, N)``; ``j == i`` is skipped),
  so GradVac and PCGrad with the same key visit the tasks in the same order.
  """
  return jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, n))


def gradvac_coefficients(gram: Array, targets: Array, key: Array, beta: float | Array,
                         present: Optional[Array] = None) -> tuple[Array, Array]:
  """GradVac's vaccinated gradients as combinations of the task gradients.

  Wang et al. (2021), section 3.2 and Algorithm 1: for each task ``i``,
  starting from ``g_i' = g_i`` and visiting the other tasks ``j`` in a random
  order, with ``phi_ij = cos(g_i', g_j)`` and the target ``phi_hat_ij``:

  * if ``phi_ij < phi_hat_ij``:
    ``g_i' <- g_i' + ||g_i'|| (phi_hat_ij sqrt(1 - phi_ij^2) - phi_ij sqrt(1 -
    phi_hat_ij^2)) / (||g_j|| sqrt(1 - phi_hat_ij^2)) g_j`` (Eq. 2: the
    smallest change along ``g_j`` that makes ``cos(g_i', g_j) = phi_hat_ij``);
  * then ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi_ij`` (Eq. 3).

  As in PCGrad, every ``g_i'`` stays in the span of the task gradients,
  ``g_i' = sum_k C_ik g_k``, and ``g_i' . g_j = (C G)_ij``,
  ``||g_i'||^2 = (C G C^T)_ii``: the whole procedure runs on ``[N, N]`` arrays.
  With all targets 0 one pass is PCGrad's projection exactly.

  Args:
    gram: ``[N, N]`` Gram matrix ``G_ij = g_i . g_j``.
    targets: ``[N, N]`` the EMA targets ``phi_hat`` (diagonal unused).
    key: PRNG key for the visiting orders (:func:`visiting_orders`).
    beta: EMA rate.
    present: optional bool ``[N]``; pairs with an absent task are neither
      corrected nor averaged, and an absent task's row of ``C`` is zero.

  Returns:
    ``(C [N, N], new_targets [N, N])``.
  """
  gram = jnp.asarray(gram, jnp.float32)
  n = gram.shape[0]
  present = jnp.ones((n,), bool) if present is None else present
  sq = jnp.diagonal(gram)
  norms = jnp.sqrt(jnp.maximum(sq, 0.0))
  orders = visiting_orders(key, n)

  def vaccinate(i, order, row):
    def step(carry, j):
      c, row = carry
      gc = jnp.matmul(c, gram, precision=_HI)  # g_i' . g_k for every k
      norm_i = jnp.sqrt(jnp.maximum(gc @ c, 0.0))
      denom = norm_i * norms[j]
      # A zero gradient has no direction: similarity 0 (the reference
      # implementations' eps in the denominator gives the same).
      phi = jnp.clip(jnp.where(denom > 0, gc[j] / jnp.where(denom > 0, denom, 1.0), 0.0),
                     -1.0, 1.0)
      target = row[j]
      t = jnp.clip(target, -_TARGET_CLIP, _TARGET_CLIP)
      sin_t = jnp.sqrt(1.0 - t * t)
      w = norm_i * (t * jnp.sqrt(1.0 - phi * phi) - phi * sin_t) / (
          jnp.where(norms[j] > 0, norms[j], 1.0) * sin_t)
      pair = (j != i) & present[i] & present[j]
      fix = pair & (phi < target) & (denom > 0)
      c = c + jnp.where(fix, w, 0.0) * jax.nn.one_hot(j, n, dtype=c.dtype)
      row = row.at[j].set(jnp.where(pair, (1.0 - beta) * target + beta * phi, target))
      return (c, row), None

    (c, row), _ = jax.lax.scan(step, (jax.nn.one_hot(i, n, dtype=gram.dtype), row), order)
    return c, row

  C, new_targets = jax.vmap(vaccinate)(jnp.arange(n), orders, jnp.asarray(targets, jnp.float32))
  C = jnp.where(present[:, None], C, 0.0)
  return C, new_targets


class GradVacState(NamedTuple):
  """GradVac's own state (``method_state`` of its :class:`ldro.WeightingState`).

  Attributes:
    targets: ``[N, N]`` the EMA targets ``phi_hat_ij`` of ``cos(g_i', g_j)``
      (zeros initially, as in the paper; row ``i`` is task ``i``'s, the
      diagonal is unused).
  """
  targets: Array


def gradvac(num_tasks: int, beta: float | Array = 0.01,
            reduction: str = "mean") -> optax.GradientTransformationExtraArgs:
  """GradVac (Wang et al., ICLR 2021) as a gradient transformation, whole-model.

  PCGrad (Yu et al., 2020) only acts when two gradients conflict
  (``cos < 0``) and then removes the conflict; GradVac sets an adaptive
  target similarity per task pair, the EMA ``phi_hat_ij`` of the observed
  ``phi_ij`` (Eq. 3, rate ``beta``), and whenever ``phi_ij < phi_hat_ij``
  moves ``g_i'`` along ``g_j`` just enough to reach it (Eq. 2; see
  :func:`gradvac_coefficients`). The update is ``sum_i g_i'``
  (``reduction='sum'``, the paper's) or its mean (``'mean'``, the default,
  the same convention as :func:`ldro.pcgrad` here: the same scale as the
  simplex-weighted methods; the direction is the same). Reported
  coefficients ``u = sum_i C_i`` (``/ N`` for ``'mean'``), ``update = sum_k
  u_k g_k``; they need not lie on the simplex.

  Granularity: the paper applies the vaccine per parameter group (the whole
  model, per layer or per matrix, section 3.2 and Table 4; LibMTL's
  ``GradVac_group_type``); this is the **whole-model** version (one group),
  the only one that the Gram matrix of the whole task gradients determines.

  Conventions checked against LibMTL ``LibMTL/weighting/GradVac.py`` and
  torchjd ``aggregation/gradvac.py``: targets start at 0, so the first step
  is PCGrad's projection (the same visiting orders for the same key, see
  :func:`visiting_orders`); ``phi_ij`` is the similarity of the partially
  vaccinated ``g_i'`` with the original ``g_j``. The EMA is updated for every
  visited pair, after the comparison, as in the paper's Algorithm 1 (GradVac
  ports differ here: some update the target before the comparison, LibMTL
  only for pairs that were corrected, so that its targets can only decrease
  from 0). ``beta = 0.01`` is the paper's
  (LibMTL's default is 0.5).

  Needs ``key=`` (the visiting orders). Absent tasks (``task_mask``) are
  neither corrected nor averaged and get coefficient 0.

  Args:
    num_tasks: ``N``.
    beta: EMA rate of the targets, in ``[0, 1]``.
    reduction: ``'mean'`` or ``'sum'``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``beta`` may be wrapped by
    ``optax.inject_hyperparams``. ``state.method_state`` is a
    :class:`GradVacState`.
  """
  name = "gradvac"
  weighting.check_hparam(beta, "beta", name, low=0, high=1)
  weighting.check_choice(reduction, "reduction", name, ("mean", "sum"))

  def init_state(n):
    return GradVacState(targets=jnp.zeros((n, n), jnp.float32))

  def coefficients(stats: weighting.TaskStats, state: GradVacState):
    n = stats.weights.shape[0]
    C, targets = gradvac_coefficients(stats.gram, state.targets, stats.key, beta, stats.mask)
    u = jnp.sum(C, axis=0)
    return (u / n if reduction == "mean" else u), GradVacState(targets=targets)

  return weighting.task_weighting(
      weighting.Rule(name=name, coefficients=coefficients, init_state=init_state,
                     needs_gram=True, needs_key=True),
      num_tasks)


registry.register_method(
    "gradvac", gradvac,
    "Wang et al., ICLR 2021: Gradient Vaccine, EMA targets of pairwise gradient similarity "
    "(whole-model)", label="GradVac", needs=("gram", "key"), modes=("jacobian", "lean"),
    defaults={"beta": 0.01, "reduction": "mean"}, kind="gradient")
