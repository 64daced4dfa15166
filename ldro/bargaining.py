"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022).

The update ``d = sum_i alpha_i g_i`` with ``alpha > 0`` solving
``G alpha = 1 / alpha`` (elementwise), ``G`` the task-gradient Gram matrix.
The official code solves it with cvxpy (a sequence of convex problems); here
it is a fixed number of damped Newton steps on ``[N, N]`` arrays, under jit.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from ldro import registry
from ldro import weighting

Array = jax.Array

_HI = jax.lax.Precision.HIGHEST
# A task whose squared gradient norm is below this fraction of the largest one
# is treated as a zero gradient: it gets alpha = 0 and does not enter the
# solver (its equation alpha_i (G alpha)_i = 1 has no solution).
_ZERO_GRADIENT_REL = 1e-20
# Levenberg term added to the Newton Hessian. It keeps the Cholesky factor
# finite when G is singular (e.g. g_1 = -g_2, where no solution exists and
# alpha grows without bound); the fixed point (gradient of the objective) is
# unchanged.
_HESSIAN_RIDGE = 1e-6


class NashSolution(NamedTuple):
  """Result of :func:`nash_mtl_solve`.

  Attributes:
    alpha: ``[N]`` the bargaining weights (0 for excluded tasks).
    residual: ``[]`` ``max_i |alpha_i (G alpha)_i - 1|`` over the solved
      tasks: the residual of ``G alpha = 1/alpha`` relative to ``1/alpha``
      (scale-free; 0 when no task is solved).
    converged: ``[]`` bool, ``residual <= tol``.
  """
  alpha: Array
  residual: Array
  converged: Array


def nash_mtl_solve(gram: Array, present: Optional[Array] = None, init: Optional[Array] = None,
                   num_iters: int = 20, tol: float = 1e-3) -> NashSolution:
  """Solves ``G alpha = 1 / alpha``, ``alpha > 0``, by damped Newton steps.

  The equation is the stationarity condition of the strictly convex,
  self-concordant function ``f(alpha) = 1/2 alpha^T G alpha - sum_i log alpha_i``
  (its gradient is ``G alpha - 1/alpha``), so its solution, when it exists, is
  ``argmin f``. Substituting ``alpha_i = gamma_i / ||g_i||`` turns ``G`` into
  the cosine matrix ``C = D G D`` (unit diagonal; ``gamma = 1`` for orthogonal
  gradients), which keeps the float32 Newton systems well conditioned however
  different the gradient norms are. Each of the ``num_iters`` steps is Nesterov's
  damped Newton step ``gamma <- gamma + Delta / (1 + lambda)`` with
  ``Delta = -H^{-1} grad f``, ``H = C + diag(1/gamma^2)`` and the Newton decrement
  ``lambda = sqrt(-grad f . Delta)``: it stays inside ``gamma > 0`` and converges
  from any start, quadratically once ``lambda < 1/4``. No line search, no
  data-dependent stopping: a fixed number of iterations under ``lax.fori_loop``.

  The start is the better (lower ``f``) of ``gamma = 1`` and the warm start
  ``init`` (the previous solution, as the official code warm-starts from its
  previous alpha), each rescaled by the optimal factor ``s^2 = n / gamma^T C gamma``.

  A solution exists iff no non-negative combination of the solved tasks'
  gradients is zero; when one is (e.g. ``g_1 = -g_2``) ``alpha`` grows every
  step and ``residual`` stays large: reported, not hidden.

  Args:
    gram: ``[N, N]`` Gram matrix ``G_ij = g_i . g_j``.
    present: optional bool ``[N]``; absent tasks get ``alpha_i = 0`` and do
      not enter the solver. Tasks with a zero gradient (``G_ii <= 1e-20 max_j
      G_jj``) are treated the same way.
    init: optional ``[N]`` warm start (previous alpha; non-positive or
      non-finite entries are ignored).
    num_iters: Newton steps (static).
    tol: the residual below which ``converged`` is reported.

  Returns:
    A :class:`NashSolution`.
  """
  gram = jnp.asarray(gram, jnp.float32)
  n = gram.shape[0]
  diag = jnp.diagonal(gram)
  active = jnp.isfinite(diag) & (diag > 0) & (diag > _ZERO_GRADIENT_REL * jnp.max(diag))
  if present is not None:
    active &= present
  norms = jnp.sqrt(jnp.where(active, diag, 1.0))
  both = active[:, None] & active[None, :]
  eye = jnp.eye(n, dtype=jnp.float32)
  # Inactive tasks form an identity block: gamma_i = 1 solves it exactly and
  # the active block is solved on its own.
  C = jnp.where(both, gram / (norms[:, None] * norms[None, :]), eye)
  C = jnp.clip(C, -1.0, 1.0)  # rounding

  def objective(g):
    return 0.5 * g @ jnp.matmul(C, g, precision=_HI) - jnp.sum(jnp.log(g))

  def rescale(g):
    q = g @ jnp.matmul(C, g, precision=_HI)
    return g * jnp.where(q > 0, jnp.sqrt(n / jnp.where(q > 0, q, 1.0)), 1.0)

  g0 = rescale(jnp.ones((n,), jnp.float32))
  if init is not None:
    warm = jnp.asarray(init, jnp.float32) * norms
    warm = jnp.where(active & jnp.isfinite(warm) & (warm > 0), warm, 1.0)
    warm = rescale(warm)
    g0 = jnp.where(objective(warm) < objective(g0), warm, g0)

  def newton(_, g):
    grad = jnp.matmul(C, g, precision=_HI) - 1.0 / g
    H = C + jnp.diag(1.0 / (g * g) + _HESSIAN_RIDGE)
    L = jnp.linalg.cholesky(H)
    step = -jax.scipy.linalg.cho_solve((L, True), grad)
    lam = jnp.sqrt(jnp.maximum(-(grad @ step), 0.0))
    new = g + step / (1.0 + lam)
    # In exact arithmetic the damped step keeps gamma > 0; guard rounding and
    # a failed factorisation (the residual then reports it).
    ok = jnp.all(jnp.isfinite(new)) & jnp.all(new > 0)
    return jnp.where(ok, new, g)

  g = jax.lax.fori_loop(0, num_iters, newton, g0)
  rel = jnp.abs(g * jnp.matmul(C, g, precision=_HI) - 1.0)
  residual = jnp.max(jnp.where(active, rel, 0.0))
  alpha = jnp.where(active, g / norms, 0.0)
  return NashSolution(alpha=alpha, residual=residual, converged=residual <= tol)


def clip_scale(gram: Array, alpha: Array, max_norm: float | Array) -> Array:
  """``min(1, max_norm / ||d||)`` with ``||d||^2 = alpha^T G alpha`` (1 if ``max_norm <= 0``)."""
  sq = alpha @ jnp.matmul(jnp.asarray(gram, jnp.float32), alpha, precision=_HI)
  norm = jnp.sqrt(jnp.maximum(sq, 0.0))
  scale = jnp.minimum(1.0, max_norm / jnp.where(norm > 0, norm, 1.0))
  return jnp.where((max_norm > 0) & (norm > 0), scale, 1.0).astype(jnp.float32)


class NashMTLState(NamedTuple):
  """Nash-MTL's own state (``method_state`` of its :class:`ldro.WeightingState`).

  Attributes:
    alpha: ``[N]`` the solution of the last refresh (used until the next one,
      and the warm start of the next solve).
    clip_scale: ``[]`` the update-norm clipping factor of the last refresh.
    solver_residual: ``[]`` ``max_i |alpha_i (G alpha)_i - 1|`` at the last
      refresh.
    solver_converged: ``[]`` bool, ``solver_residual <= 1e-3``.
  """
  alpha: Array
  clip_scale: Array
  solver_residual: Array
  solver_converged: Array


def nash_mtl(num_tasks: int, update_weights_every: int | Array = 1, optim_niter: int = 20,
             max_norm: float | Array = 1.0) -> optax.GradientTransformationExtraArgs:
  """Nash-MTL (Navon et al., ICML 2022) as a gradient transformation.

  The tasks bargain over the update ``d``; the Nash bargaining solution
  (section 3.1, Theorem 3.2) is ``d = sum_i alpha_i g_i`` with

  .. math::
     G \\alpha = 1 / \\alpha \\quad (\\text{elementwise}),\\qquad \\alpha > 0,

  i.e. ``alpha_i (g_i . d) = 1``: every task's directional derivative along
  ``d`` is inversely proportional to its weight. It is a function of the Gram
  matrix alone (the paper writes ``G^T G alpha = 1/alpha`` with ``G`` the
  matrix of gradients; ``G^T G`` is the Gram matrix here), solved by
  :func:`nash_mtl_solve`: ``optim_niter`` damped Newton steps on the convex
  function whose stationarity condition this is, instead of the paper's
  sequence of cvxpy problems (section 3.3). Properties: for orthogonal
  gradients ``alpha_i = 1/||g_i||``; at the solution ``||d||^2 = alpha^T G
  alpha = N``; scaling one task's loss by ``s`` scales its ``alpha_i`` by
  ``1/s`` (the update is invariant to it).

  Conventions of the official code (``AvivNavon/nash-mtl``,
  ``methods/weight_methods.py``; LibMTL's ``Nash_MTL.py`` is the same) kept
  here: defaults ``update_weights_every=1``, ``optim_niter=20``,
  ``max_norm=1.0``; alpha is recomputed every ``update_weights_every`` steps
  and the stored alpha is used in between; each solve is warm-started from
  the previous alpha (initially ones). The official code then clips the
  gradient norm of the combined update to ``max_norm``
  (``clip_grad_norm_``); here that is a scaling of the coefficients,
  ``c = alpha min(1, max_norm / ||d||)`` with ``||d||^2 = alpha^T G alpha``
  (``max_norm <= 0`` disables it). Differences: the official code clips the
  shared parameters' gradient only and at every step; here the whole update
  is scaled (all parameters' task gradients enter ``G``) with the factor
  computed at refresh steps (the only steps with a fresh ``G``) and kept in
  between. For per-step clipping on the actual update, pass ``max_norm=0``
  and chain ``optax.clip_by_global_norm``. The official solver stops early
  at a residual of 1e-3 (in its Frobenius-normalised ``G``); here all
  ``optim_niter`` Newton steps always run (they converge quadratically, far
  below 1e-3 on well-posed problems) and the residual is reported.

  Policies: absent tasks (``task_mask`` False at a refresh step) and tasks
  with a zero gradient get ``alpha_i = 0`` and do not enter the solver; a
  task absent at an ordinary step gets coefficient 0 at that step. If no
  non-negative combination of the gradients solves ``G alpha = 1/alpha``
  (``0`` is in the gradients' convex cone, e.g. ``g_1 = -g_2``), alpha stays
  finite after ``optim_niter`` steps and ``state.solver_converged`` is False.

  Args:
    num_tasks: ``N``.
    update_weights_every: recompute alpha every this many steps (steps 0, k,
      2k...; the Gram matrix is only needed on those steps).
    optim_niter: damped Newton steps per solve (static int).
    max_norm: clip the update norm to this value (0: no clipping).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``max_norm`` may be
    wrapped by ``optax.inject_hyperparams``. The coefficients ``c`` (``update
    = sum_i c_i g_i``, not on the simplex) are in ``state.task_weights``;
    ``state.method_state`` is a :class:`NashMTLState`.
  """
  name = "nash_mtl"
  weighting.check_hparam(update_weights_every, "update_weights_every", name, low=1,
                         integer=True)
  if not weighting.is_static(optim_niter):
    raise ValueError(f"{name}: optim_niter must be a static int (list it in static_args).")
  weighting.check_hparam(optim_niter, "optim_niter", name, low=1, integer=True)
  weighting.check_hparam(max_norm, "max_norm", name, low=0)
  num_iters = int(optim_niter)
  every_step = weighting.is_static(update_weights_every) and int(update_weights_every) == 1

  def init_state(n):
    return NashMTLState(alpha=jnp.ones((n,), jnp.float32),
                        clip_scale=jnp.ones([], jnp.float32),
                        solver_residual=jnp.zeros([], jnp.float32),
                        solver_converged=jnp.ones([], bool))

  def solve(stats: weighting.TaskStats, state: NashMTLState) -> NashMTLState:
    sol = nash_mtl_solve(stats.gram, stats.mask, state.alpha, num_iters)
    return NashMTLState(alpha=sol.alpha, clip_scale=clip_scale(stats.gram, sol.alpha, max_norm),
                        solver_residual=sol.residual.astype(jnp.float32),
                        solver_converged=sol.converged)

  def coefficients(stats: weighting.TaskStats, state: NashMTLState):
    if every_step:
      new = solve(stats, state)
    else:
      new = jax.lax.cond(stats.refreshed, lambda: solve(stats, state), lambda: state)
    c = jnp.where(stats.present, new.alpha * new.clip_scale, 0.0)
    return c, new

  return weighting.task_weighting(
      weighting.Rule(name=name, coefficients=coefficients, init_state=init_state,
                     needs_gram=True,
                     refresh_every=update_weights_every),
      num_tasks)


registry.register_method(
    "nash_mtl", nash_mtl,
    "Navon et al., ICML 2022: Nash bargaining solution G alpha = 1/alpha (Multi-Task Learning "
    "as a Bargaining Game)", label="Nash-MTL", needs=("gram",), modes=("jacobian", "lean"),
    defaults={"update_weights_every": 1, "optim_niter": 20, "max_norm": 1.0}, kind="gradient")
