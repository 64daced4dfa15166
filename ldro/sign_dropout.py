"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020), per coordinate."""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from ldro import registry
from ldro import weighting

Array = jax.Array
PyTree = Any


def graddrop_uniforms(key: Array, task_grads: PyTree) -> PyTree:
  """The uniform draws ``U`` of :func:`graddrop_aggregate`, one per coordinate.

  Leaf ``k`` (in ``jax.tree_util`` order) of the per-task gradients, of shape
  ``[N, *s]``, gets ``jax.random.uniform(jax.random.split(key, K)[k], s)``
  (float32), ``K`` the number of leaves.
  """
  leaves, treedef = jax.tree_util.tree_flatten(task_grads)
  keys = jax.random.split(key, max(len(leaves), 1))
  return jax.tree_util.tree_unflatten(
      treedef, [jax.random.uniform(k, g.shape[1:], jnp.float32) for k, g in zip(keys, leaves)])


def graddrop_aggregate(task_grads: PyTree, key: Array, leak: float | Array = 0.0,
                       present: Optional[Array] = None) -> tuple[PyTree, Array]:
  """GradDrop's combined gradient and each task's kept fraction.

  Chen et al. (2020), Algorithm 1 (lines 10-15), at every coordinate:
  the gradient positive sign purity ``P = 1/2 (1 + sum_i g_i / sum_i |g_i|)``
  (``P = 1/2`` where every ``g_i`` is 0), ``U ~ Uniform(0, 1)``, the masks
  ``M_i = (P > U and g_i > 0) or (P < U and g_i < 0)``: one sign is kept, the
  positive one with probability ``P``; the output is
  ``sum_i (l + (1 - l) M_i) g_i`` with the leak ``l``.

  Args:
    task_grads: per-task gradients, every leaf ``[N, ...]``.
    key: PRNG key (the draws are :func:`graddrop_uniforms`).
    leak: ``l`` in ``[0, 1]``: 0 is GradDrop, 1 the plain sum.
    present: optional bool ``[N]``; absent tasks' gradients are treated as 0.

  Returns:
    ``(update, kept)``: the update (each leaf ``[...]``, in the gradients'
    dtype) and ``kept [N]``, the mean multiplier ``l + (1 - l) M_i`` over
    task ``i``'s non-zero gradient coordinates (the fraction of its
    coordinates kept when ``l = 0``; 0 for an all-zero gradient).
  """
  leaves, treedef = jax.tree_util.tree_flatten(task_grads)
  uniforms = jax.tree_util.tree_leaves(graddrop_uniforms(key, task_grads))
  n = leaves[0].shape[0]
  kept = jnp.zeros((n,), jnp.float32)
  nonzero = jnp.zeros((n,), jnp.float32)
  out = []
  for leaf, u in zip(leaves, uniforms):
    g = leaf.astype(jnp.float32)
    if present is not None:
      g = jnp.where(present.reshape((n,) + (1,) * (g.ndim - 1)), g, 0.0)
    total = jnp.sum(g, axis=0)
    mass = jnp.sum(jnp.abs(g), axis=0)
    purity = 0.5 * (1.0 + jnp.where(mass > 0, total / jnp.where(mass > 0, mass, 1.0), 0.0))
    mask = ((purity > u) & (g > 0)) | ((purity < u) & (g < 0))
    mult = leak + (1.0 - leak) * mask.astype(jnp.float32)
    out.append(jnp.sum(mult * g, axis=0).astype(leaf.dtype))
    axes = tuple(range(1, g.ndim))
    nz = g != 0
    kept = kept + jnp.sum(jnp.where(nz, mult, 0.0), axis=axes)
    nonzero = nonzero + jnp.sum(nz, axis=axes).astype(jnp.float32)
  frac = jnp.where(nonzero > 0, kept / jnp.where(nonzero > 0, nonzero, 1.0), 0.0)
  return jax.tree_util.tree_unflatten(treedef, out), frac


def graddrop(num_tasks: int, leak: float | Array = 0.0,
             reduction: str = "mean") -> optax.GradientTransformationExtraArgs:
  """GradDrop (Chen et al., NeurIPS 2020) as a gradient transformation (Jacobian mode).

  At every coordinate, GradDrop keeps the task-gradient components of one
  sign only, the positive sign with probability equal to the positive sign
  purity ``P = 1/2 (1 + sum_i g_i / sum_i |g_i|)``, and drops the others
  (:func:`graddrop_aggregate`): ``update = sum_i (l + (1 - l) M_i) g_i``
  with ``M_i = (P > U and g_i > 0) or (P < U and g_i < 0)``, ``U ~ U(0, 1)``
  per coordinate. Where all tasks agree in sign the update is their sum (their mean with the
  default ``reduction='mean'``, below).

  Per-coordinate masks are not coefficients on the task gradients, so
  GradDrop needs the per-task gradients themselves (Jacobian mode; lean mode
  is refused). It needs a PRNG key (``key=``, one uniform per coordinate).

  The paper applies GradDrop at the activations of a chosen layer (the
  gradient with respect to a shared representation, summed over the batch
  after multiplying by the sign of the inputs, section 3; LibMTL supports
  only that, ``rep_grad=True``); here it acts on the per-task **parameter
  gradients** (every parameter is a coordinate), as torchjd's ``GradDrop``
  aggregator does. Leak: the paper's ``l_i`` (0 for pure GradDrop, the
  default in the paper's experiments, LibMTL and torchjd), one scalar for
  all tasks here; the paper's monotone transform ``f(P)`` is the identity.
  Output: ``reduction='mean'`` (default) divides the paper's sum by ``N``: the
  update is then on the scale of the library's equal weighting (the mean
  loss), as ``pcgrad``, ``gradvac`` and the loss-balancing methods by default,
  so that a learning rate tuned for equal weighting serves it too; ``'sum'``
  is the paper's (and LibMTL's, torchjd's), where equal weighting is the sum
  of the losses. (With ``'sum'`` at the regime study's lr, tuned for the mean,
  GradDrop's step is ``N = 5`` times larger and the narrow CNN collapsed to
  the uniform prediction within 800 steps.)

  Reported ``c`` (``state.task_weights``): task ``i``'s kept fraction, the
  mean multiplier ``l + (1 - l) M_i`` over its non-zero gradient coordinates
  (0 for an all-zero or absent gradient; ``/ N`` with ``'mean'``). It is a
  diagnostic: the update is ``sum_i c_i g_i`` only where the masks are
  constant per task (e.g. all signs agree: ``c = 1``, ``1 / N`` with ``'mean'``). Absent tasks
  (``task_mask``) are treated as zero gradients.

  Args:
    num_tasks: ``N``.
    leak: ``l`` in ``[0, 1]``.
    reduction: ``'sum'`` or ``'mean'``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``leak`` may be wrapped by
    ``optax.inject_hyperparams``.
  """
  name = "graddrop"
  weighting.check_hparam(leak, "leak", name, low=0, high=1)
  weighting.check_choice(reduction, "reduction", name, ("sum", "mean"))

  def aggregate(task_grads, stats: weighting.TaskStats, state):
    n = stats.weights.shape[0]
    update, kept = graddrop_aggregate(task_grads, stats.key, leak, stats.mask)
    if reduction == "mean":
      update = jax.tree_util.tree_map(lambda x: (x / n).astype(x.dtype), update)
      kept = kept / n
    return update, kept, state

  return weighting.task_weighting(
      weighting.Rule(name=name, aggregate=aggregate, needs_key=True, lean=False,
                     lean_hint="GradDrop masks every coordinate of every task gradient, which "
                     "a task_vjp cannot express; use mode='jacobian'."),
      num_tasks)


registry.register_method(
    "graddrop", graddrop,
    "Chen et al., NeurIPS 2020: gradient sign dropout (Just Pick a Sign), on parameter "
    "gradients", label="GradDrop", needs=("task_grads", "key"), modes=("jacobian",),
    defaults={"leak": 0.0, "reduction": "mean"}, kind="gradient")
