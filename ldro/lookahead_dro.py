"""Lookahead-DRO as an optax gradient transformation (Algorithms 1 and 3)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ldro import game
from ldro import lookahead
from ldro import weighting
from ldro import registry

Array = jax.Array


class LookaheadDROState(NamedTuple):
  """L-DRO's own state (``method_state`` of its :class:`ldro.WeightingState`).

  The weights ``w`` are the state's ``task_weights`` and the Gram matrix of
  the last refresh its ``gram``; the interaction matrix is
  ``ldro.interaction_matrix(state.gram, normalize)`` (:func:`interaction`).

  Attributes:
    worst_lookahead_loss: ``[]`` ``max_i (L w)_i`` at the last update.
    solver_converged: ``[]`` bool; the exact variant's last Nash solve
      converged (always ``True`` for the online variant).
  """
  worst_lookahead_loss: Array
  solver_converged: Array


def interaction(state: weighting.WeightingState, normalize: bool = True) -> Array:
  """The interaction matrix ``A`` ``[N, N]`` of an L-DRO state (zero before the first refresh)."""
  return lookahead.interaction_matrix(state.gram, normalize)


def ldro_weights(
    num_tasks: int,
    lookahead_lr: float | Array,
    weight_lr: float | Array = 0.001,
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
  batch; online, an absent task keeps its weight and does not enter the best
  response (its loss is ignored); exact, the game is the present tasks' game
  and an absent task gets weight 0 (its gradient is zero in the batch). If the lookahead matrix is not finite (a NaN/Inf loss
  or gradient), ``w`` and ``A`` are left unchanged for that step; the training
  step is responsible for detecting non-finite values (see
  :mod:`ldro.train`). The exact variant reports solver convergence in
  ``state.solver_converged``.

  Args:
    num_tasks: number of tasks ``N`` (static).
    lookahead_lr: lookahead learning rate ``lambda``.
    weight_lr: weight update rate ``eta`` (unused by the exact variant); the default,
      as in the registry, is the middle of the paper's CIFAR sweep {1e-2, 1e-3, 1e-4}
      (section 5.1; the paper fixes no single value). ``0`` freezes the weights at uniform.
    update_every: interaction-matrix update interval ``k`` (``T`` in App. C).
    normalize: renormalise lookahead gradients (section 3.2, App. A.2).
    exact: solve the max-entropy Nash equilibrium every step (Algorithm 1)
      instead of the online update (Algorithms 2-3).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; rates may be wrapped by
    ``optax.inject_hyperparams``.
  """
  name = "ldro_weights"
  weighting.check_hparam(lookahead_lr, "lookahead_lr", name, low=0)
  weighting.check_hparam(weight_lr, "weight_lr", name, low=0)
  weighting.check_hparam(update_every, "update_every", name, low=1, integer=True)

  def init_state(n):
    del n
    return LookaheadDROState(worst_lookahead_loss=jnp.zeros([], jnp.float32),
                             solver_converged=jnp.ones([], bool))

  def coefficients(stats: weighting.TaskStats, state: LookaheadDROState):
    mask = stats.mask
    L = stats.losses[:, None] - lookahead_lr * lookahead.interaction_matrix(stats.gram, normalize)
    if exact:
      L_game = L
      if mask is not None:
        # The present tasks' game. An absent task's row never binds (its loss is not in this
        # batch) and its column is strictly dominated for the learner: its gradient is zero
        # in this batch, while its column of A may come from an older refresh and promise a
        # descent that the step would not take. The equilibrium's round-off weight on those
        # columns (within the solver's slack) is then set to zero.
        lo, hi = jnp.min(L), jnp.max(L)
        L_game = jnp.where(mask[:, None], L, lo - 1.0)
        L_game = jnp.where(mask[None, :], L_game, hi + (hi - lo) + 1.0)
      info = game.maxent_nash_with_info(L_game)
      new_w, converged = info.w, info.converged
      if mask is not None:
        new_w = jnp.where(mask, new_w, 0.0)
        total = jnp.sum(new_w)
        new_w = jnp.where(total > 0, new_w / jnp.where(total > 0, total, 1.0), stats.weights)
    else:
      new_w = game.update_weights(L, stats.weights, weight_lr, mask)
      converged = jnp.ones([], bool)
    # A non-finite L (weights inf * 0...) must not pass the core's guard as finite w.
    new_w = jnp.where(jnp.all(jnp.isfinite(L)), new_w, jnp.nan)
    payoff = L @ new_w
    worst = jnp.max(jnp.where(mask, payoff, -jnp.inf) if mask is not None else payoff)
    return new_w, LookaheadDROState(worst_lookahead_loss=worst, solver_converged=converged)

  return weighting.task_weighting(
      weighting.Rule(name=name, coefficients=coefficients, init_state=init_state,
                     needs_losses=True, needs_gram=True, refresh_every=update_every),
      num_tasks)


def ldro_exact_weights(num_tasks: int, lookahead_lr: float | Array,
                       weight_lr: float | Array = 0.0, update_every: int | Array = 1,
                       normalize: bool = True) -> optax.GradientTransformationExtraArgs:
  """Exact Lookahead-DRO (paper Algorithm 1, section 2.5): ``ldro_weights(..., exact=True)``.

  Every step the weights are the max-entropy Nash equilibrium of the
  lookahead game,

      w = argmin_w max_v v^T L w,   L = l 1^T - lambda A,

  (:func:`ldro.game.maxent_nash`; the most uniform of the optimal ``w``), with
  the interaction matrix ``A`` refreshed every ``update_every`` steps (every
  step by default, unlike the online variant's 100).

  Args:
    num_tasks: ``N``.
    lookahead_lr: ``lambda``.
    weight_lr: unused (the weights are the game's equilibrium); accepted so a
      config can switch between the variants (default 0).
    update_every: interaction-matrix update interval (default 1).
    normalize: renormalise lookahead gradients (section 3.2, App. A.2).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` taking ``task_losses``.
  """
  return ldro_weights(num_tasks, lookahead_lr, weight_lr, update_every=update_every,
                      normalize=normalize, exact=True)


# The middle values of the paper's CIFAR sweeps (eta, lambda; section 5.1), its CIFAR interval
# T = 100 (App. C) and renormalisation (section 3.2).
_PAPER_DEFAULTS = {"lookahead_lr": 0.01, "weight_lr": 0.001, "update_every": 100,
                   "normalize": True}
registry.register_method(
    "ldro", ldro_weights, "online Lookahead-DRO (paper Alg. 2-3)", label="L-DRO",
    needs=("losses", "gram"), kind="dro", defaults=_PAPER_DEFAULTS)
registry.register_method(
    "ldro_exact", ldro_exact_weights,
    "exact Lookahead-DRO, max-entropy Nash every step (paper Alg. 1)", label="L-DRO (exact)",
    needs=("losses", "gram"), kind="dro",
    defaults={"lookahead_lr": 0.01, "update_every": 1, "normalize": True})
