"""Lookahead-DRO as an optax gradient transformation (Algorithms 1 and 3)."""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from ldro import game
from ldro import lookahead
from ldro import weighting

Array = jax.Array


class LookaheadDROState(NamedTuple):
  """State of :func:`ldro_weights`.

  Attributes:
    count: ``[]`` int32, number of updates taken.
    task_weights: ``[N]`` training weights ``w`` on the simplex.
    interaction: ``[N, N]`` interaction matrix ``A`` (zero at start).
    worst_lookahead_loss: ``[]`` ``max_i (L w)_i`` at the last update.
    solver_converged: ``[]`` bool; the exact variant's last Nash solve
      converged (always ``True`` for the online variant).
  """
  count: Array
  task_weights: Array
  interaction: Array
  worst_lookahead_loss: Array
  solver_converged: Array


def ldro_weights(
    num_tasks: int,
    lookahead_lr: float | Array,
    weight_lr: float | Array = 0.0,
    update_every: int | Array = 100,
    normalize: bool = True,
    exact: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Lookahead-DRO task weighting (online Algorithm 3; exact Algorithm 1).

  Each update (paper, sections 2.5 and 3):

  1. every ``update_every`` steps (steps 0, k, 2k, ...; under ``lax.cond``),
     refresh the interaction matrix ``A_ij = g_i . g_j / ||g_j||`` (or
     ``g_i . g_j`` without ``normalize``);
  2. form the lookahead matrix ``L = l 1^T - lambda A`` with the current task
     losses ``l``;
  3. online: ``w <- update_weights(L, w, eta)`` (Algorithm 2); exact:
     ``w <- maxent_nash(L)`` (Algorithm 1);
  4. output ``sum_i w_i g_i`` for the next transformations in the chain.

  Call convention (Jacobian mode)::

    updates, state = tx.update(task_grads, state, params, task_losses=losses)

  with every leaf of ``task_grads`` of shape ``[N, *param.shape]``. Lean mode
  for models too big to hold ``N`` gradients every step::

    losses, vjp = jax.vjp(losses_fn, params)
    updates, state = tx.update(None, state, params, task_losses=losses,
                               task_vjp=vjp, gram_fn=lambda: gram(params))

  ``gram_fn`` (zero-argument, returns the ``[N, N]`` Gram matrix, e.g. with the
  ``chunked`` or ``pairwise`` strategy of :mod:`ldro.lookahead`) is only
  evaluated on refresh steps (it runs inside ``lax.cond``), and the output is
  the gradient of the ``w``-weighted loss for the freshly updated ``w``, one
  ordinary backward pass. Instead of ``gram_fn`` a precomputed ``gram`` may be
  passed; it is used on refresh steps only.

  Lean mode with gradient reuse: pass ``task_grads_fn`` (zero-argument,
  returns the ``N`` task gradients, e.g. ``vmap(grad)`` over the task-grouped
  batch) instead of ``gram_fn``. On refresh steps the Gram matrix *and* the
  output ``sum_i w_i g_i`` come from those gradients, so the refresh step
  costs one ``vmap(grad)`` and no second backward pass; ordinary steps are
  unchanged (``task_vjp(w)``). Peak memory is that of the ``grouped``
  strategy (``N`` gradients on refresh steps).

  Policies: ``task_mask`` (bool ``[N]``, optional) marks tasks present in the
  batch; an absent task keeps its weight and does not enter the best response
  (its loss is ignored). If the lookahead matrix is not finite (a NaN/Inf loss
  or gradient), ``w`` and ``A`` are left unchanged for that step; the training
  step is responsible for detecting non-finite values (see
  :mod:`ldro.train`). The exact variant reports solver convergence in
  ``state.solver_converged``.

  Args:
    num_tasks: number of tasks ``N`` (static).
    lookahead_lr: lookahead learning rate ``lambda``.
    weight_lr: weight update rate ``eta`` (unused by the exact variant).
    update_every: interaction-matrix update interval ``k`` (``T`` in App. C).
    normalize: renormalise lookahead gradients (section 3.2, App. A.2).
    exact: solve the max-entropy Nash equilibrium every step (Algorithm 1)
      instead of the online update (Algorithms 2-3).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; rates may be wrapped by
    ``optax.inject_hyperparams``.
  """
  name = "ldro_weights"

  def init_fn(params):
    del params
    n = weighting.check_num_tasks(num_tasks, name)
    return LookaheadDROState(
        count=jnp.zeros([], jnp.int32),
        task_weights=weighting.uniform(n),
        interaction=jnp.zeros((n, n), jnp.float32),
        worst_lookahead_loss=jnp.zeros([], jnp.float32),
        solver_converged=jnp.ones([], bool),
    )

  def update_fn(updates, state, params=None, *, task_losses=None, task_mask=None,
                task_vjp: Optional[Callable[[Array], Any]] = None,
                gram_fn: Optional[Callable[[], Array]] = None,
                gram: Optional[Array] = None,
                task_grads_fn: Optional[Callable[[], Any]] = None, **extra_args):
    del params, extra_args
    n = state.task_weights.shape[0]
    losses = weighting.check_task_losses(task_losses, n, name).astype(jnp.float32)
    mask = weighting.check_task_mask(task_mask, n, name)
    due = (state.count % update_every) == 0
    if mask is not None:
      losses = jnp.where(mask, losses, 0.0)

    def interaction_from(g):
      if g.shape != (n, n):
        raise ValueError(f"{name}: the Gram matrix must be [{n}, {n}], got {g.shape}.")
      return lookahead.interaction_matrix(g.astype(jnp.float32), normalize)

    def choose(a):
      """(w, A, worst lookahead loss, converged) for interaction matrix ``a``."""
      L = losses[:, None] - lookahead_lr * a
      if exact:
        L_game = L
        if mask is not None:  # absent tasks' rows never bind
          L_game = jnp.where(mask[:, None], L, jnp.min(L) - 1.0)
        info = game.maxent_nash_with_info(L_game)
        new_w, converged = info.w, info.converged
      else:
        new_w = game.update_weights(L, state.task_weights, weight_lr, mask)
        converged = jnp.ones([], bool)
      finite = jnp.all(jnp.isfinite(L)) & jnp.all(jnp.isfinite(new_w))
      new_w = jnp.where(finite, new_w, state.task_weights)
      worst = jnp.max(jnp.where(mask, L @ new_w, -jnp.inf) if mask is not None else L @ new_w)
      return (new_w, jnp.where(finite, a, state.interaction),
              jnp.where(finite, worst, state.worst_lookahead_loss), converged)

    if task_grads_fn is not None:
      if task_vjp is None or gram_fn is not None or gram is not None:
        raise ValueError(
            f"{name}: task_grads_fn=... is for lean mode (with task_vjp=...) and replaces "
            "gram_fn/gram; pass task_vjp and task_grads_fn only.")

      def refresh_step():
        grads = task_grads_fn()
        weighting.check_task_grads(grads, n, name)
        new_w, new_a, worst, converged = choose(interaction_from(lookahead.task_gram(grads)))
        return weighting.weighted_sum(grads, new_w), new_w, new_a, worst, converged

      def ordinary_step():
        new_w, new_a, worst, converged = choose(state.interaction)
        return weighting.combine(None, new_w, n, name, task_vjp), new_w, new_a, worst, converged

      out, new_w, new_a, worst, converged = jax.lax.cond(due, refresh_step, ordinary_step)
    else:
      if task_vjp is None:
        weighting.check_task_grads(updates, n, name)
        compute = lambda: lookahead.task_gram(updates)
      elif gram_fn is not None:
        compute = gram_fn
      elif gram is not None:
        compute = lambda: jnp.asarray(gram)
      else:
        raise ValueError(
            f"{name}: lean mode (task_vjp given) needs gram_fn=... (or gram=..., or "
            "task_grads_fn=...) to refresh the interaction matrix.")
      a = jax.lax.cond(due, lambda: interaction_from(compute()), lambda: state.interaction)
      new_w, new_a, worst, converged = choose(a)
      out = weighting.combine(updates, new_w, n, name, task_vjp)
    new_state = LookaheadDROState(
        count=optax.safe_increment(state.count),
        task_weights=new_w,
        interaction=new_a,
        worst_lookahead_loss=worst,
        solver_converged=converged,
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
