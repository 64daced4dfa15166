"""PCGrad: projecting conflicting gradients (Yu et al., 2020)."""

import jax
import jax.numpy as jnp
import optax

from ldro import weighting
from ldro import registry

Array = jax.Array


def pcgrad_coefficients(gram: Array, key: Array) -> Array:
  """PCGrad's projected gradients as combinations of the task gradients.

  Yu et al. (2020), Algorithm 1: for each task ``i``, visiting the other
  tasks ``j`` in a random order, if ``g_i^PC . g_j < 0`` then
  ``g_i^PC <- g_i^PC - (g_i^PC . g_j / ||g_j||^2) g_j``. Every ``g_i^PC`` stays
  in the span of the original gradients, ``g_i^PC = sum_k C_ik g_k``, and all
  dot products follow from the Gram matrix ``G``:
  ``g_i^PC . g_j = (C G)_ij``. So PCGrad costs one Gram matrix plus an
  ``O(N^3)`` loop on ``[N, N]`` arrays, instead of ``N^2`` dot products of
  full-size gradients.

  Args:
    gram: ``[N, N]`` task-gradient Gram matrix.
    key: PRNG key for the projection orders (one permutation per task).

  Returns:
    ``C`` ``[N, N]`` with ``g_i^PC = sum_k C_ik g_k``.
  """
  n = gram.shape[0]
  perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, n))
  sq = jnp.diagonal(gram)

  def project_one(i, perm):
    def step(c, j):
      dot = c @ gram[:, j]
      conflict = (j != i) & (dot < 0) & (sq[j] > 0)
      c = c - jnp.where(conflict, dot / jnp.where(sq[j] > 0, sq[j], 1.0), 0.0) * jax.nn.one_hot(j, n)
      return c, None
    c, _ = jax.lax.scan(step, jax.nn.one_hot(i, n, dtype=gram.dtype), perm)
    return c

  return jax.vmap(project_one)(jnp.arange(n), perms)


def pcgrad(num_tasks: int, reduction: str = "mean") -> optax.GradientTransformationExtraArgs:
  """PCGrad (Yu et al., NeurIPS 2020, Algorithm 1) as a gradient transformation.

  Each task gradient is projected, in a random order of the others, onto the
  normal plane of every task gradient it conflicts with,

      g_i^PC <- g_i^PC - (g_i^PC . g_j / ||g_j||^2) g_j    if g_i^PC . g_j < 0,

  which on the Gram matrix is a matrix ``C`` of coefficients, ``g_i^PC =
  sum_k C_ik g_k`` (:func:`pcgrad_coefficients`). Output ``sum_i g_i^PC`` (``reduction='sum'``, Yu et al.'s formula) or its
  mean (``'mean'``, the default: PCGrad applied to the mean task loss, on the
  same scale as the simplex-weighted methods; projections are scale-free so
  only the step size differs). Needs ``key=`` (projection orders). The
  effective weights ``u = sum_i C_i / N`` (``update = sum_k u_k g_k``) are kept
  in ``state.task_weights``; they need not lie on the simplex.

  Jacobian mode uses the per-task gradients; lean mode takes ``task_vjp`` and
  a ``gram_fn``, ``gram`` or ``task_grads_fn``, evaluated every step.

  Args:
    num_tasks: ``N``.
    reduction: ``'mean'`` or ``'sum'``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  name = "pcgrad"
  weighting.check_choice(reduction, "reduction", name, ("mean", "sum"))

  def coefficients(stats: weighting.TaskStats, state):
    n = stats.weights.shape[0]
    u = jnp.sum(pcgrad_coefficients(stats.gram, stats.key), axis=0)
    return (u / n if reduction == "mean" else u), state

  return weighting.task_weighting(
      weighting.Rule(name=name, coefficients=coefficients, needs_gram=True, needs_key=True),
      num_tasks)


registry.register_method(
    "pcgrad", pcgrad, "PCGrad (Yu et al., NeurIPS 2020)", label="PCGrad",
    needs=("gram", "key"), defaults={"reduction": "mean"})
