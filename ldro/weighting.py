"""Shared machinery of the task-weighting gradient transformations.

Every method in ``ldro`` is an ``optax.GradientTransformationExtraArgs`` that
maps per-task gradients to one update. Two call conventions are supported:

* **Jacobian mode** (default): ``updates`` are the per-task gradients, every
  leaf with a leading task axis ``N`` (e.g. ``vmap(grad)`` over a
  task-grouped batch). The output is ``sum_i w_i g_i``.
* **Lean mode** (big models, loss-weighting methods only): pass
  ``task_vjp=vjp_fn`` where ``task_losses, vjp_fn = jax.vjp(losses_fn,
  params)``; ``updates`` are ignored (pass ``None``) and the output is
  ``vjp_fn(w)``, the gradient of the ``w``-weighted loss, computed with the
  weights chosen *at this step*, at the cost of one ordinary backward pass.

Per-task inputs (``task_losses``, ``task_mask``, ``key``...) are keyword extra
args, as optax does for ``value`` and friends. Every method's state is a
``NamedTuple`` with a ``task_weights`` field, so :func:`task_weights` finds the
current weights anywhere inside an ``optax.chain``.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

Array = jax.Array
PyTree = Any


def check_task_losses(task_losses: Optional[Array], num_tasks: int, method: str) -> Array:
  """Validates ``task_losses`` (shape ``[N]``) at trace time."""
  if task_losses is None:
    raise ValueError(f"{method}: the 'task_losses' extra argument ([{num_tasks}]) is required.")
  task_losses = jnp.asarray(task_losses)
  if task_losses.shape != (num_tasks,):
    raise ValueError(
        f"{method}: task_losses must have shape ({num_tasks},) (one loss per task), "
        f"got {task_losses.shape}.")
  return task_losses


def check_task_mask(task_mask: Optional[Array], num_tasks: int, method: str) -> Optional[Array]:
  """Validates an optional bool ``task_mask`` of shape ``[N]``."""
  if task_mask is None:
    return None
  task_mask = jnp.asarray(task_mask)
  if task_mask.shape != (num_tasks,):
    raise ValueError(f"{method}: task_mask must have shape ({num_tasks},), got {task_mask.shape}.")
  return task_mask.astype(bool)


def check_task_grads(updates: PyTree, num_tasks: int, method: str) -> None:
  """Checks that every leaf of ``updates`` has a leading task axis ``N``."""
  leaves = jax.tree_util.tree_leaves(updates)
  if not leaves:
    raise ValueError(
        f"{method}: no per-task gradients given; pass gradients with a leading task axis "
        f"of size {num_tasks}, or task_vjp=... (lean mode).")
  for path, leaf in jax.tree_util.tree_leaves_with_path(updates):
    if leaf.ndim == 0 or leaf.shape[0] != num_tasks:
      raise ValueError(
          f"{method}: every leaf of the per-task gradients needs a leading task axis of size "
          f"{num_tasks}; leaf {jax.tree_util.keystr(path)} has shape {leaf.shape}.")


def weighted_sum(task_grads: PyTree, weights: Array) -> PyTree:
  """``sum_i w_i g_i`` over the leading task axis of every leaf."""
  return jax.tree_util.tree_map(
      lambda g: jnp.tensordot(weights.astype(g.dtype), g, axes=1), task_grads)


def combine(
    updates: PyTree,
    weights: Array,
    num_tasks: int,
    method: str,
    task_vjp: Optional[Callable[[Array], Any]] = None,
) -> PyTree:
  """Weighted update in Jacobian mode, or ``task_vjp(w)`` in lean mode."""
  if task_vjp is not None:
    out = task_vjp(weights)
    # jax.vjp returns a tuple of cotangents, one per primal input.
    if isinstance(out, tuple) and len(out) == 1:
      out = out[0]
    return out
  check_task_grads(updates, num_tasks, method)
  return weighted_sum(updates, weights)


def task_weights(opt_state: Any) -> Array:
  """The current task weights ``w`` ``[N]``, found anywhere in an optimizer state.

  Works for a bare method state, an ``optax.chain`` state, and states wrapped
  by ``optax.inject_hyperparams``.

  Args:
    opt_state: optimizer state containing exactly one task-weighting method.

  Returns:
    The ``task_weights`` field of that method's state.
  """
  try:
    return otu.tree_get(opt_state, "task_weights")
  except KeyError as e:  # raised when zero or several matches are found
    raise ValueError(
        "task_weights: the optimizer state must contain exactly one ldro task-weighting "
        f"method state (a NamedTuple with a 'task_weights' field): {e}") from None


def uniform(num_tasks: int) -> Array:
  return jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32)


def check_num_tasks(num_tasks: Any, method: str) -> int:
  try:
    n = int(num_tasks)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise ValueError(
        f"{method}: num_tasks must be a static Python int (with optax.inject_hyperparams, "
        "list it in static_args).") from None
  if n < 1:
    raise ValueError(f"{method}: num_tasks must be >= 1, got {num_tasks}.")
  return n


GradientTransformationExtraArgs = optax.GradientTransformationExtraArgs


class TaskWeightingState(NamedTuple):
  """State of the loss-weighting baselines.

  Attributes:
    count: ``[]`` int32, number of updates taken.
    task_weights: ``[N]`` current task weights (on the simplex).
  """
  count: Array
  task_weights: Array


def loss_weighting(
    name: str,
    num_tasks: int,
    next_weights: Callable[..., Array],
    init_weights: Optional[Callable[[int], Array]] = None,
    needs_losses: bool = True,
    needs_key: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Builds a task-weighting transformation from a weight rule.

  ``next_weights(w, losses, mask, key, count) -> w_new`` gives this step's
  weights; the output is ``sum_i w_new_i g_i`` (Jacobian mode) or
  ``task_vjp(w_new)`` (lean mode).
  """

  def init_fn(params):
    del params
    n = check_num_tasks(num_tasks, name)
    w0 = uniform(n) if init_weights is None else jnp.asarray(init_weights(n), jnp.float32)
    if w0.shape != (n,):
      raise ValueError(f"{name}: initial weights must have shape ({n},), got {w0.shape}.")
    return TaskWeightingState(count=jnp.zeros([], jnp.int32), task_weights=w0)

  def update_fn(updates, state, params=None, *, task_losses=None, task_mask=None, key=None,
                task_vjp=None, **extra_args):
    del params, extra_args
    n = state.task_weights.shape[0]
    losses = check_task_losses(task_losses, n, name) if needs_losses else None
    if losses is not None:
      losses = losses.astype(jnp.float32)
    mask = check_task_mask(task_mask, n, name)
    if needs_key and key is None:
      raise ValueError(f"{name}: a PRNG key is required: pass key=jax.random.key(...) as an "
                       "extra argument to update().")
    if mask is not None and losses is not None:
      losses = jnp.where(mask, losses, 0.0)
    new_w = next_weights(state.task_weights, losses, mask, key, state.count)
    if losses is not None:  # a non-finite loss leaves the weights unchanged
      new_w = jnp.where(jnp.all(jnp.isfinite(new_w)), new_w, state.task_weights)
    out = combine(updates, new_w, n, name, task_vjp)
    return out, TaskWeightingState(count=optax.safe_increment(state.count), task_weights=new_w)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

