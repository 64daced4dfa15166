"""Matrix-game solvers for the lookahead game ``min_w max_v v^T L w``.

The column player ``w`` (training weights) minimises and the row player ``v``
(evaluation weights) maximises the payoff ``v^T L w`` over the probability
simplex (paper, section 2.5, Eq. 2). This module holds

* :func:`best_response`: the row player's pure best response to ``w``;
* :func:`update_weights`: the online exponentiated-gradient step of
  Algorithm 2 (section 3.1);
* :func:`maxent_nash`: an exact Nash equilibrium, choosing among the optimal
  ``w`` the one of highest entropy (Algorithm 1, section 2.5).

Everything is pure JAX and jittable.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def _check_square(L: Array, name: str = "L") -> None:
  if L.ndim != 2 or L.shape[0] != L.shape[1]:
    raise ValueError(f"{name} must be a square [N, N] matrix, got shape {L.shape}.")


def best_response(L: Array, w: Array, task_mask: Optional[Array] = None) -> Array:
  """Row player's best response ``v* = argmax_v v^T L w`` as a one-hot vector.

  ``v^T L w`` is linear in ``v``, so a vertex of the simplex is optimal: the
  task ``i* = argmax_i (L w)_i`` with the highest lookahead loss (ties go to
  the lowest index).

  Args:
    L: lookahead matrix ``[N, N]``.
    w: training weights ``[N]`` on the simplex.
    task_mask: optional bool ``[N]``; tasks with ``False`` (absent from the
      batch) are never chosen.

  Returns:
    One-hot ``[N]`` float vector ``v*``.
  """
  _check_square(L)
  payoff = L @ w
  if task_mask is not None:
    payoff = jnp.where(task_mask, payoff, -jnp.inf)
  return jax.nn.one_hot(jnp.argmax(payoff), L.shape[0], dtype=L.dtype)


def update_weights(
    L: Array,
    w: Array,
    weight_lr: float | Array,
    task_mask: Optional[Array] = None,
) -> Array:
  """One online L-DRO weight update: Algorithm 2 of the paper (section 3.1).

  .. math::
     v^* = \\arg\\max_v v^T L w,\\qquad
     \\tilde w_i = w_i \\exp(-\\eta [v^{*T} L]_i),\\qquad
     w_i \\leftarrow \\tilde w_i / \\textstyle\\sum_j \\tilde w_j .

  Computed in log space (a softmax of ``log w - eta [v*^T L]``), so huge
  losses or rates cannot overflow.

  Policy for absent tasks: with ``task_mask``, a task whose mask is ``False``
  keeps its weight exactly and does not enter the best response; the present
  tasks share the remaining mass ``sum_{i present} w_i`` by the update above.
  If no task is present, ``w`` is returned unchanged.

  Args:
    L: lookahead matrix ``[N, N]``.
    w: current weights ``[N]`` on the simplex.
    weight_lr: the weight update rate ``eta`` (scalar, may be traced).
    task_mask: optional bool ``[N]``.

  Returns:
    The new weights ``[N]``, on the simplex.
  """
  _check_square(L)
  if w.shape != (L.shape[0],):
    raise ValueError(f"w must have shape ({L.shape[0]},) to match L {L.shape}, got {w.shape}.")
  v = best_response(L, w, task_mask)
  return exponentiated_step(w, -weight_lr * (v @ L), task_mask)


def exponentiated_step(w: Array, delta: Array, task_mask: Optional[Array] = None) -> Array:
  """Multiplicative-weights step ``w_i <- w_i exp(delta_i) / Z`` in log space.

  A mirror-descent step with the KL divergence (Kivinen & Warmuth, 1997), as
  used by Algorithm 2 and online group DRO. With ``task_mask`` the absent
  tasks keep their weight exactly and the present ones share the rest.

  Args:
    w: weights ``[N]`` on the simplex.
    delta: log-weight increments ``[N]``.
    task_mask: optional bool ``[N]``.

  Returns:
    New weights ``[N]`` on the simplex.
  """
  logits = jnp.log(w) + delta
  if task_mask is None:
    return jax.nn.softmax(logits)
  mask = jnp.asarray(task_mask, bool)
  present_mass = jnp.sum(jnp.where(mask, w, 0.0))
  new_present = present_mass * jax.nn.softmax(jnp.where(mask, logits, -jnp.inf))
  return jnp.where(jnp.any(mask), jnp.where(mask, new_present, w), w)


# ----------------------------------------------------------------------------
# Exact solver: simplex LP for the value, then max-entropy among optimal w.
# ----------------------------------------------------------------------------


class NashInfo(NamedTuple):
  """Diagnostics of :func:`maxent_nash_with_info`.

  Attributes:
    w: column player (training weights) ``[N]``.
    v: row player (evaluation weights) ``[N]``.
    value: game value ``min_w max_v v^T L w`` found by the LP ``[]``.
    payoff: ``max_i (L w)_i`` of the returned ``w`` ``[]`` (at most ``value + slack *
      max(1, max |L|)``, :func:`maxent_nash_with_info`'s ``slack``).
    lp_converged: the simplex method reached optimality ``[]`` bool.
    entropy_converged: the max-entropy Newton solve converged ``[]`` bool.
    lp_iterations: simplex pivots ``[]`` int.
    newton_iterations: Newton iterations ``[]`` int.
  """
  w: Array
  v: Array
  value: Array
  payoff: Array
  lp_converged: Array
  entropy_converged: Array
  lp_iterations: Array
  newton_iterations: Array

  @property
  def converged(self) -> Array:
    """Both solves converged (``lp_converged & entropy_converged``) ``[]`` bool."""
    return self.lp_converged & self.entropy_converged


def _simplex_game(L: Array, max_iters: int, tol: float):
  """Solves the matrix game with the simplex method (Dantzig pivoting).

  With ``M = L - min(L) + 1 > 0`` the column player's problem
  ``min_w max_i (M w)_i`` is the LP ``max 1^T x s.t. M x <= 1, x >= 0`` with
  ``w = x / 1^T x`` and value ``1 / 1^T x - min(L) + 1``; its dual gives ``v``.
  The origin is a feasible basis, so no phase one is needed.
  """
  n = L.shape[0]
  shift = jnp.min(L) - 1.0
  M = L - shift
  # Tableau rows 0..n-1: [M | I | 1]; last row (objective): [-1 | 0 | 0].
  top = jnp.concatenate([M, jnp.eye(n, dtype=L.dtype), jnp.ones((n, 1), L.dtype)], axis=1)
  obj = jnp.concatenate([-jnp.ones((1, n), L.dtype), jnp.zeros((1, n + 1), L.dtype)], axis=1)
  tableau = jnp.concatenate([top, obj], axis=0)
  basis = jnp.arange(n, 2 * n)  # slack variables are basic at start

  def cond(carry):
    tab, _, it, done = carry
    return (~done) & (it < max_iters)

  def body(carry):
    tab, basis, it, _ = carry
    reduced = tab[-1, :-1]
    col = jnp.argmin(reduced)
    optimal = reduced[col] >= -tol
    column = tab[:-1, col]
    rhs = tab[:-1, -1]
    ratios = jnp.where(column > tol, rhs / jnp.where(column > tol, column, 1.0), jnp.inf)
    row = jnp.argmin(ratios)
    unbounded = ~jnp.isfinite(ratios[row])  # cannot happen for M > 0; guard anyway
    pivot_row = tab[row] / tab[row, col]
    new_tab = tab - jnp.outer(tab[:, col], pivot_row)
    new_tab = new_tab.at[row].set(pivot_row)
    stop = optimal | unbounded
    tab = jnp.where(stop, tab, new_tab)
    basis = jnp.where(stop, basis, basis.at[row].set(col))
    return tab, basis, it + jnp.where(stop, 0, 1), stop

  tableau, basis, iters, done = jax.lax.while_loop(
      cond, body, (tableau, basis, jnp.array(0), jnp.array(False)))

  # Polish: re-solve the optimal basis directly (more accurate than the
  # accumulated pivots). Columns of [M | I] for the basic variables.
  full = jnp.concatenate([M, jnp.eye(n, dtype=L.dtype)], axis=1)
  B = full[:, basis]  # [n, n]
  ones = jnp.ones((n,), L.dtype)
  x_b = jnp.linalg.solve(B, ones)
  y = jnp.linalg.solve(B.T, (basis < n).astype(L.dtype))  # c_B = 1 for x, 0 for slacks
  x = jnp.zeros((2 * n,), L.dtype).at[basis].set(x_b)[:n]
  x = jnp.clip(x, 0.0, None)
  y = jnp.clip(y, 0.0, None)
  w = x / jnp.sum(x)
  v = y / jnp.sum(y)
  return w, v, iters, done


_WARM_MAX_LOG2 = 40


def _maxent_dual_newton(L: Array, cap: Array, max_iters: int, tol: float,
                        direction: Optional[Array] = None):
  """Max-entropy ``w`` on ``{w in simplex : L w <= cap}`` by projected Newton.

  The dual of ``max H(w) s.t. L w <= cap`` is
  ``min_{mu >= 0} logsumexp(-L^T mu) + cap * sum(mu)`` with
  ``w(mu) = softmax(-L^T mu)``; gradient ``cap - L w``, Hessian
  ``L (diag w - w w^T) L^T``. Bound constraints are handled by a projected
  Newton method (Bertsekas 1982) with a vectorised Armijo line search on the
  dual's change (computed from the step, free of float32 cancellation) and
  the scaled projected gradient as a fallback direction. The damped
  free-variable Hessian is positive definite, so the Newton system is solved
  by Cholesky. Callers should centre the game (``L - V`` and
  ``cap - V``, the same set since ``sum(w) = 1``): in float32 the constraint
  values ``(L w)_i - cap`` are then computed without cancellation against the
  game value ``V``, which is what lets Newton converge in tens of iterations
  rather than stalling at the iteration limit.
  """
  n = L.shape[0]
  hp = jax.lax.Precision.HIGHEST

  def dual(mu):
    z = -jnp.matmul(L.T, mu, precision=hp)
    return jax.nn.logsumexp(z) + cap * jnp.sum(mu)

  alphas = 0.5 ** jnp.arange(30, dtype=L.dtype)
  scale = jnp.maximum(1.0, jnp.max(jnp.abs(L)))

  def kkt(mu, g):
    return jnp.max(jnp.abs(jnp.minimum(mu, g)))  # projected-gradient residual

  def cond(carry):
    it, done = carry[-2:]
    return (~done) & (it < max_iters)

  def body(carry):
    # Carried: mu, the logits z = -L^T mu, w = softmax(z) and the gradient g.
    mu, z, w, g, it, _ = carry
    # H = L (diag w - w w^T) L^T with one N^3 matmul; on the centred game
    # L w ~ cap ~ 0 near the solution, so the rank-one term cancels nothing.
    lw = cap - g
    H = jnp.matmul(L * w[None, :], L.T, precision=hp) - jnp.outer(lw, lw)
    active = (mu <= 1e-12) & (g > 0)
    free = ~active
    damping = 1e-9 * scale * scale + 1e-6 * jnp.max(jnp.abs(jnp.diag(H)))
    Hf = jnp.where(free[:, None] & free[None, :], H, 0.0)
    Hf = Hf + jnp.diag(jnp.where(free, damping, 1.0))
    rhs = jnp.where(free, -g, 0.0)
    d = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(Hf, lower=True), rhs)
    # Safeguard: the scaled projected gradient as a second search direction.
    # A Hessian that is positive definite only up to float32 round-off can
    # fail the Cholesky (NaNs) or give a useless Newton direction (huge, with
    # no decrease at any step length); the line search then falls back to it.
    diag_max = jnp.max(jnp.abs(jnp.diag(H)))
    d_grad = rhs / jnp.where(diag_max > 0, diag_max, 1.0)
    d = jnp.where(jnp.all(jnp.isfinite(d)), d, d_grad)
    # Armijo line search on the dual's *change*, computed from the step
    # itself: f(mu + s) - f(mu) = log sum_j w_j exp(dz_j) + cap 1^T s with
    # dz = -L^T s. (Differencing two large dual values loses the decrease to
    # float32 round-off once mu is large, and the search then stalls.)
    # Candidates: Newton steps first (largest first), then gradient steps.
    dirs = jnp.concatenate([alphas[:, None] * d[None, :], alphas[:, None] * d_grad[None, :]])
    steps = jnp.maximum(mu[None, :] + dirs, 0.0) - mu[None, :]
    dzs = -jnp.matmul(steps, L, precision=hp)  # row k: -L^T steps[k]
    change = (jax.nn.logsumexp(dzs, axis=1, b=w[None, :]) + cap * jnp.sum(steps, axis=1))
    sufficient = -change >= -1e-4 * jnp.sum(g[None, :] * steps, axis=1)
    ok = sufficient & jnp.isfinite(change) & (change < 0)
    k = jnp.argmax(ok)  # first (largest) acceptable step
    moved = jnp.any(ok)
    new_mu = jnp.where(moved, mu + steps[k], mu)
    new_z = jnp.where(moved, z + dzs[k], z)
    new_w = jax.nn.softmax(new_z)
    new_g = cap - jnp.matmul(L, new_w, precision=hp)
    done = (kkt(new_mu, new_g) <= tol * scale) | ~moved
    return new_mu, new_z, new_w, new_g, it + 1, done

  mu0 = jnp.zeros((n,), L.dtype)
  if direction is not None:
    # Warm start on the ray mu = t * direction (e.g. the LP's optimal row
    # strategy v: by complementary slackness softmax(-t L^T v) concentrates on
    # the equilibrium support as t grows). The dual is convex, so the best
    # point of the ray from a geometric grid of t is a sound start; t = 0
    # (the cold start) is among the candidates.
    ts = jnp.concatenate([jnp.zeros((1,), L.dtype),
                          2.0 ** jnp.arange(-4, _WARM_MAX_LOG2 + 1, dtype=L.dtype)])
    cands = ts[:, None] * jnp.maximum(direction, 0.0)[None, :]
    fs = jax.vmap(dual)(cands)
    fs = jnp.where(jnp.isfinite(fs), fs, jnp.inf)
    mu0 = cands[jnp.argmin(fs)]
  z0 = -jnp.matmul(L.T, mu0, precision=hp)
  w0 = jax.nn.softmax(z0)
  g0 = cap - jnp.matmul(L, w0, precision=hp)
  done0 = kkt(mu0, g0) <= tol * scale
  mu, _, w, g, iters, _ = jax.lax.while_loop(
      cond, body, (mu0, z0, w0, g0, jnp.array(0), done0))
  converged = kkt(mu, g) <= tol * scale * 10
  return w, iters, converged


def maxent_nash_with_info(
    L: Array,
    *,
    slack: float = 1e-6,
    max_lp_iters: Optional[int] = None,
    max_newton_iters: int = 100,
) -> NashInfo:
  """Max-entropy Nash equilibrium of ``min_w max_v v^T L w``, with diagnostics.

  Algorithm (jittable; ``jax.lax.while_loop`` throughout):

  1. The game value ``V`` and an equilibrium ``(w_lp, v)`` by the simplex
     method on the LP ``max 1^T x s.t. (L - min L + 1) x <= 1, x >= 0``, then
     a re-solve of the optimal basis for accuracy.
  2. Among the (near-)optimal training weights
     ``W* = {w in simplex : max_i (L w)_i <= V + slack * max(1, |L|)}``, the one
     of highest entropy (section 2.5's maximum-entropy principle), by projected
     Newton on the smooth dual ``min_{mu>=0} logsumexp(-L^T mu) + cap 1^T mu``
     of the centred game ``L - V``, aiming at half the slack so that float
     round-off does not push the point out of ``W*``.
  3. A guard: if the Newton point exceeds the cap (not converged), it is mixed
     with ``w_lp`` by the smallest amount that restores ``payoff <= cap``, so
     the returned ``w`` is always optimal to ``slack``; the flags in the
     result say whether each stage converged (no silent fallback).

  Args:
    L: lookahead matrix ``[N, N]``, finite.
    slack: relative tolerance on the game value defining the optimal set.
    max_lp_iters: pivot limit (default ``20 N + 50``).
    max_newton_iters: Newton iteration limit.

  Returns:
    A :class:`NashInfo`.
  """
  _check_square(L)
  L = jnp.asarray(L)
  if not jnp.issubdtype(L.dtype, jnp.floating):
    L = L.astype(jnp.float32)
  n = L.shape[0]
  if max_lp_iters is None:
    max_lp_iters = 20 * n + 50
  tol = 1e-12 if L.dtype == jnp.float64 else 1e-7
  hp = jax.lax.Precision.HIGHEST
  # The equilibria are invariant to positive scaling of L: solve on L / scale
  # with entries in [-1, 1] (bitwise the same game when max|L| <= 1), so huge
  # payoffs (e.g. 1e30) neither lose the LP's ``+1`` shift to round-off nor
  # overflow the dual's exponentials.
  scale = jnp.maximum(1.0, jnp.max(jnp.abs(L)))
  L_full, L = L, L / scale
  w_lp, v, lp_iters, lp_ok = _simplex_game(L, max_lp_iters, tol)
  value = jnp.max(jnp.matmul(L, w_lp, precision=hp))
  cap = value + slack
  # Newton on the centred game L - V (the same feasible set; no float32
  # cancellation against V), aiming at half the slack: the other half is a
  # margin for round-off, so the guard below rarely has to mix in w_lp.
  w_ent, newton_iters, ent_ok = _maxent_dual_newton(
      L - value, 0.5 * slack, max_newton_iters, 1e-9 if L.dtype == jnp.float64 else 1e-6,
      direction=v)
  # Guard: smallest t in [0, 1] with max_i (L((1-t) w_ent + t w_lp))_i <= cap.
  p_ent = jnp.matmul(L, w_ent, precision=hp)
  p_lp = jnp.matmul(L, w_lp, precision=hp)
  over = p_ent - cap  # > 0 where violated
  room = p_ent - p_lp  # > 0 where mixing helps
  t_i = jnp.where(over > 0, over / jnp.where(room > 0, room, 1.0), 0.0)
  t = jnp.clip(jnp.max(t_i), 0.0, 1.0)
  w = (1.0 - t) * w_ent + t * w_lp
  w = jnp.clip(w, 0.0, None)
  w = w / jnp.sum(w)
  payoff = jnp.max(jnp.matmul(L_full, w, precision=hp))
  return NashInfo(w=w, v=v, value=value * scale, payoff=payoff, lp_converged=lp_ok,
                  entropy_converged=ent_ok, lp_iterations=lp_iters,
                  newton_iterations=newton_iters)


def maxent_nash(L: Array, **kwargs) -> tuple[Array, Array]:
  """Max-entropy Nash equilibrium ``(w, v)`` of ``min_w max_v v^T L w``.

  The exact L-DRO weights of Algorithm 1 (section 2.5): ``w`` minimises the
  worst lookahead loss ``max_i (L w)_i`` (to a relative slack of ``1e-6``) and,
  among such minimisers, has maximal entropy; ``v`` is an optimal row
  strategy. Jittable. See :func:`maxent_nash_with_info` for the algorithm and
  for convergence flags; this wrapper drops them, so callers that must know
  whether the solve converged (e.g. training loops) should use the ``_info``
  variant, as :func:`ldro.ldro_weights` does.

  Args:
    L: lookahead matrix ``[N, N]``.
    **kwargs: forwarded to :func:`maxent_nash_with_info`.

  Returns:
    ``(w, v)``, each ``[N]`` on the simplex.
  """
  info = maxent_nash_with_info(L, **kwargs)
  return info.w, info.v
