"""Gram-matrix gradient-balancing methods: MGDA, IMTL-G, CAGrad, UPGrad, Aligned-MTL.

Each method combines the task gradients as ``d = sum_i c_i g_i`` with
coefficients ``c [N]`` computed from the task Gram matrix ``G = J J^T``
(``G_ij = g_i . g_j``) alone, so it runs on the core
(:func:`ldro.weighting.task_weighting`) in Jacobian and lean mode alike. Every
method has a pure, jittable coefficient function on ``(gram, ...)``
(``mgda_coefficients``, ``imtl_g_coefficients``, ``cagrad_coefficients``,
``upgrad_coefficients``, ``aligned_mtl_coefficients``) that can be timed and
tested on its own, and a factory that returns the optax transformation.

Conventions shared by all five:

* **Absent tasks** (``task_mask`` ``False``; their gradient is zero) get
  coefficient 0 and do not enter the solver (they are not vertices of MGDA's or
  CAGrad's simplex, not constraints of UPGrad's cone, and carry no preference
  weight); the default preference vector is the mean over *present* tasks.
* **Scale**: all five are invariant (MGDA with ``'l2'`` or ``'none'``,
  IMTL-G, CAGrad, Aligned-MTL) or defined (UPGrad's ``norm_eps``) under a
  rescaling of ``G``; the solvers work on ``G / trace(G)`` so that float32
  stays well inside its range for tiny or huge gradients.
* **Iterative solvers** (MGDA, CAGrad, UPGrad) run a fixed number of
  iterations under ``jit`` and report, in the method state
  (:class:`SolverInfo`), whether they met their stopping test and the
  optimality residual; there is no silent fallback.
* **Degenerate inputs** (a zero gradient, identical tasks, ``N = 1``, an
  all-zero Gram matrix, one gradient 1e3 times larger) give finite
  coefficients: every division is guarded.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldro import registry
from ldro import weighting

Array = jax.Array

_HI = jax.lax.Precision.HIGHEST


class SolverInfo(NamedTuple):
  """An iterative coefficient solver's report (the method state of MGDA, CAGrad, UPGrad).

  Attributes:
    converged: ``[]`` bool, the solver met its stopping test within its
      fixed iteration budget at the last update.
    residual: ``[]`` float32, the optimality residual of the returned
      solution (method-specific, documented per method; 0 at the optimum).
    iterations: ``[]`` int32, iterations that changed the iterate.
  """
  converged: Array
  residual: Array
  iterations: Array


def _init_solver_info(n: int) -> SolverInfo:
  del n
  return SolverInfo(converged=jnp.ones([], bool), residual=jnp.zeros([], jnp.float32),
                    iterations=jnp.zeros([], jnp.int32))


# ----------------------------------------------------------------------------
# Shared helpers.
# ----------------------------------------------------------------------------


def _present(mask: Optional[Array], n: int) -> Array:
  return jnp.ones((n,), bool) if mask is None else jnp.asarray(mask, bool)


def _safe_div(a: Array, b: Array) -> Array:
  """``a / b`` where ``b > 0``, else 0 (no NaN from either branch under jit)."""
  ok = b > 0
  return jnp.where(ok, a / jnp.where(ok, b, 1.0), 0.0)


def _masked_gram(gram: Array, present: Array) -> Array:
  """``G`` with absent tasks' rows and columns zeroed (their gradients are zero anyway)."""
  gram = jnp.asarray(gram, jnp.float32)
  gram = 0.5 * (gram + gram.T)  # exact symmetry for eigh / pivoting
  return jnp.where(present[:, None] & present[None, :], gram, 0.0)


def _trace_normalized(gram: Array) -> Array:
  """``G / trace(G)`` (zeros for an all-zero ``G``): the solvers' scale-free input."""
  return _safe_div(gram, jnp.trace(gram))


def _pref_weights(pref_vector: Optional[Array], present: Array) -> Array:
  """The preference vector ``p`` [N]: the mean over present tasks, or the given one masked."""
  if pref_vector is None:
    return _safe_div(present.astype(jnp.float32), jnp.sum(present).astype(jnp.float32))
  return jnp.where(present, jnp.asarray(pref_vector, jnp.float32), 0.0)


def _check_pref_vector(pref_vector: Any, num_tasks: int, method: str) -> Optional[Any]:
  if pref_vector is None or isinstance(pref_vector, jax.core.Tracer):
    return pref_vector
  p = np.asarray(pref_vector, np.float64)
  if p.shape != (num_tasks,) or not np.all(np.isfinite(p)):
    raise ValueError(f"{method}: pref_vector must be None or {num_tasks} finite numbers, "
                     f"got {pref_vector!r}.")
  return p.astype(np.float32)


# ----------------------------------------------------------------------------
# MGDA (Sener & Koltun, NeurIPS 2018).
# ----------------------------------------------------------------------------

MGDA_NORMALIZATIONS = ("none", "l2", "loss", "loss+")
#: Where MGDA's ``alpha`` is applied: the normalised gradients (LibMTL) or the raw ones
#: (the authors' training script, which weights the raw losses).
MGDA_APPLY_TO = ("normalized", "raw")


def _min_norm_2(v11: Array, v12: Array, v22: Array) -> tuple[Array, Array]:
  """``argmin_{gamma in [0, 1]} ||gamma x1 + (1 - gamma) x2||^2`` and its value.

  Sener & Koltun's Algorithm 1 (their ``_min_norm_element_from2``) from the
  inner products ``v11 = x1.x1``, ``v12 = x1.x2``, ``v22 = x2.x2``. Their code
  returns ``gamma = 0.999`` / ``0.001`` in the two vertex cases; the exact
  minimiser is ``1`` / ``0``, used here (so two tasks give the closed form).
  """
  at_1 = v12 >= v11
  at_2 = (v12 >= v22) & ~at_1
  denom = v11 + v22 - 2.0 * v12  # > 0 in the interior case
  inner = _safe_div(v22 - v12, denom)
  gamma = jnp.where(at_1, 1.0, jnp.where(at_2, 0.0, inner))
  cost = jnp.where(at_1, v11, jnp.where(at_2, v22, v22 + inner * (v12 - v22)))
  return gamma, cost


def mgda_coefficients(gram: Array, losses: Optional[Array] = None,
                      mask: Optional[Array] = None, *, normalization: str = "none",
                      max_iter: int = 250, tol: float = 1e-5,
                      apply_to: str = "normalized") -> tuple[Array, SolverInfo]:
  """MGDA's coefficients: the min-norm point of the (normalised) task gradients' hull.

  Normalised gradients ``h_i = g_i / n_i`` (``n_i`` from ``normalization``,
  Sener & Koltun's ``gradient_normalizers``: ``'none'`` 1, ``'l2'``
  ``||g_i||``, ``'loss'`` ``l_i``, ``'loss+'`` ``l_i ||g_i||``); their Gram
  matrix is ``H = D G D`` with ``D = diag(1 / n_i)``. Solve
  ``alpha = argmin_{alpha in simplex} alpha^T H alpha`` with the paper's
  Algorithm 2: start from the best pair (closed form of Algorithm 1 over all
  pairs), then Frank-Wolfe steps towards ``e_t``, ``t = argmin_i (H alpha)_i``,
  with the exact two-point line search; stop when ``sum |alpha_new - alpha|
  < tol`` (their ``STOP_CRIT``). Under ``jit`` the loop always runs
  ``max_iter`` steps (their ``MAX_ITER = 250``) and freezes the iterate once
  the stopping test holds. The update ``d = sum_i alpha_i h_i`` is returned
  as coefficients on the raw gradients, ``c_i = alpha_i / n_i``; with
  ``apply_to='raw'`` the update is ``sum_i alpha_i g_i`` (``c = alpha``).

  A task whose normaliser is not positive (a zero gradient with ``'l2'``, a
  zero loss with ``'loss'``) gets ``h_i = 0``, so the min-norm point is 0:
  the zero update MGDA prescribes at a Pareto-stationary point. ``'loss'``
  normalisations assume positive losses.

  Args:
    gram: ``[N, N]`` Gram matrix of the raw task gradients.
    losses: ``[N]`` task losses (only for ``'loss'`` and ``'loss+'``).
    mask: optional ``[N]`` bool, tasks present.
    normalization: ``'none'`` (this function's default: ``losses`` is
      optional here; the ``mgda`` transformation defaults to ``'loss+'``),
      ``'l2'``, ``'loss'`` or ``'loss+'``.
    max_iter: Frank-Wolfe iterations (static).
    tol: stopping tolerance on the L1 change of ``alpha``.
    apply_to: ``'normalized'`` (``c = alpha / n``) or ``'raw'`` (``c = alpha``).

  Returns:
    ``(c [N], SolverInfo)``; ``residual`` is the Frank-Wolfe gap
    ``alpha^T H alpha - min_i (H alpha)_i`` on ``H / trace(H)`` (0 at the
    min-norm point; ``d . h_i >= ||d||^2 - gap`` for every task).
  """
  gram = jnp.asarray(gram, jnp.float32)
  n = gram.shape[0]
  present = _present(mask, n)
  G = _masked_gram(gram, present)
  sq_norms = jnp.maximum(jnp.diagonal(G), 0.0)
  if normalization == "none":
    norms = jnp.ones((n,), jnp.float32)
  elif normalization == "l2":
    norms = jnp.sqrt(sq_norms)
  elif normalization in ("loss", "loss+"):
    if losses is None:
      raise ValueError(f"mgda: normalization={normalization!r} needs the task losses.")
    norms = jnp.asarray(losses, jnp.float32)
    if normalization == "loss+":
      norms = norms * jnp.sqrt(sq_norms)
  else:
    raise ValueError(f"mgda: unknown normalization {normalization!r}; known: "
                     f"{', '.join(map(repr, MGDA_NORMALIZATIONS))}.")
  inv = jnp.where(present, _safe_div(jnp.ones_like(norms), norms), 0.0)
  H = _trace_normalized(G * inv[:, None] * inv[None, :])

  # Initialisation: the best pair (i, j), i <= j (i == j: a single vertex, the
  # only candidate when one task is present).
  diag = jnp.diagonal(H)
  gamma, cost = _min_norm_2(diag[:, None], H, diag[None, :])
  upper = jnp.triu(jnp.ones((n, n), bool)) & present[:, None] & present[None, :]
  best = jnp.argmin(jnp.where(upper, cost, jnp.inf))
  i, j = best // n, best % n
  g = gamma[i, j]
  alpha = g * jax.nn.one_hot(i, n) + (1.0 - g) * jax.nn.one_hot(j, n)

  def fw_step(_, carry):
    alpha, done, iters = carry
    h_alpha = jnp.dot(H, alpha, precision=_HI)
    t = jnp.argmin(jnp.where(present, h_alpha, jnp.inf))
    v11 = jnp.dot(alpha, h_alpha, precision=_HI)
    gamma, _ = _min_norm_2(v11, h_alpha[t], H[t, t])
    new = gamma * alpha + (1.0 - gamma) * jax.nn.one_hot(t, n)
    stop = jnp.sum(jnp.abs(new - alpha)) < tol
    keep = done | stop
    return (jnp.where(keep, alpha, new), keep, iters + (~keep).astype(jnp.int32))

  done = jnp.ones([], bool) if n < 3 else jnp.zeros([], bool)  # two tasks: init is exact
  iters = jnp.zeros([], jnp.int32)
  if n >= 3:
    alpha, done, iters = jax.lax.fori_loop(0, max_iter, fw_step, (alpha, done, iters))
  h_alpha = jnp.dot(H, alpha, precision=_HI)
  gap = jnp.dot(alpha, h_alpha, precision=_HI) - jnp.min(jnp.where(present, h_alpha, jnp.inf))
  gap = jnp.where(jnp.any(present), jnp.maximum(gap, 0.0), 0.0)
  c = jnp.where(present, alpha * inv if apply_to == "normalized" else alpha, 0.0)
  return c, SolverInfo(converged=done, residual=gap, iterations=iters)


def mgda(num_tasks: int, normalization: str = "loss+", max_iter: int = 250,
         tol: float = 1e-5, apply_to: str = "normalized") -> optax.GradientTransformationExtraArgs:
  """MGDA (Sener & Koltun, NeurIPS 2018): the min-norm element of the gradients' convex hull.

  Maths (paper, section 3.2, eq. 3 and Algorithm 2)::

    alpha* = argmin_{alpha in simplex} || sum_i alpha_i h_i ||^2,   d = sum_i alpha_i h_i,

  with ``h_i = g_i / n_i`` the normalised task gradients (see
  :func:`mgda_coefficients`). ``d`` has ``d . h_i >= ||d||^2 >= 0`` for every
  task (a common descent direction), and ``d = 0`` exactly at a
  Pareto-stationary point. On the Gram matrix: ``||sum_i alpha_i h_i||^2 =
  alpha^T D G D alpha``, and Frank-Wolfe needs only ``H alpha`` and ``H_tt``,
  so the solver never touches a full gradient.

  Here the gradients are with respect to all (shared and task) parameters,
  i.e. the paper's exact MGDA, not its MGDA-UB upper bound (gradients of the
  shared representation), hence the label ``'MGDA'``.

  Conventions (checked against the authors' ``min_norm_solvers.py`` and
  LibMTL's ``MGDA.py``): Frank-Wolfe as in the authors'
  ``find_min_norm_element_FW`` with ``MAX_ITER = 250``, ``STOP_CRIT = 1e-5``
  (their training script uses the projected-gradient variant
  ``find_min_norm_element``; both solve the same problem); exact vertex
  weights (1/0) where their line search returns 0.999/0.001. By default the
  update is ``sum_i alpha_i h_i`` on the *normalised* gradients, as LibMTL
  applies it; ``apply_to='raw'`` gives the authors' script instead, which
  weights the raw losses by ``alpha`` (``sum_i alpha_i g_i``: the same for
  ``'none'``; otherwise its size follows the gradients' scale, and the
  common-descent property holds for the normalised gradients only).
  Default ``'loss+'``, the authors' own configuration (their ``sample.json``),
  which needs ``task_losses``; ``'none'`` (LibMTL's default, the bare
  Algorithm 2) and ``'l2'`` do not. The registry lists ``'losses'`` among
  MGDA's needs because its default uses them. ``state.task_weights`` holds
  ``c_i = alpha_i / n_i``: on the simplex for ``'none'`` only.

  Args:
    num_tasks: ``N``.
    normalization: ``'loss+'`` (default), ``'loss'`` (both need
      ``task_losses``), ``'l2'`` or ``'none'``.
    max_iter: Frank-Wolfe iterations (fixed under ``jit``).
    tol: stopping tolerance (L1 change of ``alpha``); whether it was met
      and the Frank-Wolfe gap are in the method state (:class:`SolverInfo`).
    apply_to: ``'normalized'`` (default, LibMTL) or ``'raw'`` (the authors' script).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (Jacobian and lean mode).
  """
  name = "mgda"
  weighting.check_choice(normalization, "normalization", name, MGDA_NORMALIZATIONS)
  weighting.check_choice(apply_to, "apply_to", name, MGDA_APPLY_TO)
  weighting.check_hparam(max_iter, "max_iter", name, low=0, integer=True)
  weighting.check_hparam(tol, "tol", name, low=0)
  needs_losses = normalization in ("loss", "loss+")

  def coefficients(stats: weighting.TaskStats, state):
    del state
    return mgda_coefficients(stats.gram, stats.losses, stats.mask, normalization=normalization,
                             max_iter=max_iter, tol=tol, apply_to=apply_to)

  return weighting.task_weighting(
      weighting.Rule(name=name, coefficients=coefficients, init_state=_init_solver_info,
                     needs_losses=needs_losses, needs_gram=True), num_tasks)


# ----------------------------------------------------------------------------
# IMTL-G (Liu et al., ICLR 2021).
# ----------------------------------------------------------------------------


def imtl_g_coefficients(gram: Array, mask: Optional[Array] = None) -> Array:
  """IMTL-G's coefficients ``alpha = G^+ n / (1^T G^+ n)``, ``n_i = ||g_i||``.

  The paper's closed form (section 3.2) with task 1 as reference,
  ``alpha_{2:N} = g_1 U^T (D U^T)^{-1}``, ``alpha_1 = 1 - sum alpha_{2:N}``,
  ``D = [g_1 - g_i]``, ``U = [u_1 - u_i]``, solves ``d . u_i = d . u_1`` for
  ``d = sum_i alpha_i g_i`` with ``sum_i alpha_i = 1``. In Gram terms
  ``d . u_i = (G alpha)_i / n_i``, so equal projections mean ``G alpha = k n``,
  i.e. ``alpha = G^{-1} n / (1^T G^{-1} n)``: the same solution when the
  gradients are linearly independent, symmetric in the tasks, and defined
  with the pseudo-inverse otherwise (torchjd's ``IMTLGWeighting``). If
  ``1^T G^+ n`` vanishes (no direction with equal projections, e.g. an
  all-zero ``G``), the coefficients are 0, as in torchjd.

  Args:
    gram: ``[N, N]`` Gram matrix.
    mask: optional ``[N]`` bool, tasks present (absent tasks get 0).

  Returns:
    ``c [N]`` (sums to 1 unless degenerate; entries may be negative).
  """
  gram = jnp.asarray(gram, jnp.float32)
  n = gram.shape[0]
  present = _present(mask, n)
  G = _trace_normalized(_masked_gram(gram, present))  # alpha is scale-invariant
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(G), 0.0))
  v = jnp.dot(jnp.linalg.pinv(G, hermitian=True), norms, precision=_HI)
  v = jnp.where(present, v, 0.0)
  s = jnp.sum(v)
  ok = jnp.abs(s) > 1e-6 * jnp.sum(jnp.abs(v))
  return jnp.where(ok, v / jnp.where(ok, s, 1.0), 0.0)


def imtl_g(num_tasks: int) -> optax.GradientTransformationExtraArgs:
  """IMTL-G (Liu et al., ICLR 2021): the update with equal projections on all unit task gradients.

  Maths (paper, section 3.2, "gradient balance")::

    find alpha, sum_i alpha_i = 1, such that d = sum_i alpha_i g_i has
    d . u_1 = d . u_2 = ... = d . u_N,   u_i = g_i / ||g_i||,

  closed form ``alpha_{2:N} = g_1 U^T (D U^T)^{-1}`` with
  ``D = [g_1 - g_i]_{i>=2}``, ``U = [u_1 - u_i]_{i>=2}``. On the Gram matrix
  this is ``alpha = G^+ n / (1^T G^+ n)`` (:func:`imtl_g_coefficients`); the
  coefficients scale the raw gradients, as in LibMTL's ``IMTL.py`` (which
  also learns IMTL-L's loss scales; only the gradient part is here).

  Args:
    num_tasks: ``N``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (Jacobian and lean mode).
  """
  name = "imtl_g"

  def coefficients(stats: weighting.TaskStats, state):
    return imtl_g_coefficients(stats.gram, stats.mask), state

  return weighting.task_weighting(
      weighting.Rule(name=name, coefficients=coefficients, needs_gram=True), num_tasks)


# ----------------------------------------------------------------------------
# CAGrad (Liu et al., NeurIPS 2021).
# ----------------------------------------------------------------------------

CAGRAD_RESCALES = (0, 1, 2)


def cagrad_coefficients(gram: Array, mask: Optional[Array] = None, *, c: float | Array = 0.5,
                        rescale: int | Array = 1, max_iter: int = 200,
                        tol: float = 1e-6) -> tuple[Array, SolverInfo]:
  """CAGrad's coefficients from the dual over the simplex.

  With ``b`` the uniform weights (``g_0 = J^T b`` the mean gradient),
  ``a = G b``, ``r = c ||g_0|| = c sqrt(b^T G b)``, solve::

    w* = argmin_{w in simplex} f(w) = w . a + r sqrt(w^T G w)

  (``= g_w . g_0 + sqrt(phi) ||g_w||``) and return
  ``(b + (r / ||g_w*||) w*) / s`` with ``s = 1, 1 + c^2, 1 + c`` for
  ``rescale = 0, 1, 2``.

  Solver: pairwise Frank-Wolfe (move weight from the away vertex
  ``argmax_{w_s > 0} grad_s`` to ``argmin_t grad_t``) with the *exact* line
  search along ``e_t - e_s``, which has a closed form here
  (``phi(gamma) = al gamma + r sqrt(A gamma^2 + 2 B gamma + C)`` is minimised
  where ``A gamma + B = -al sqrt(D / (r^2 A - al^2))``,
  ``D = A C - B^2``), on ``G / trace(G)`` (``w*`` is scale-invariant).
  ``max_iter`` steps always run; the Frank-Wolfe gap
  ``grad . w - min_t grad_t >= f(w) - f*`` certifies the result.

  Args:
    gram: ``[N, N]`` Gram matrix.
    mask: optional ``[N]`` bool, tasks present.
    c: the radius factor ``c >= 0`` (``c = 0``: exactly the mean gradient).
    rescale: 0, 1 or 2 (the official code's final division).
    max_iter: pairwise Frank-Wolfe iterations.
    tol: the gap below which the solve counts as converged.

  Returns:
    ``(c [N], SolverInfo)``; ``residual`` is the Frank-Wolfe gap on the
    trace-normalised problem.
  """
  gram = jnp.asarray(gram, jnp.float32)
  n = gram.shape[0]
  present = _present(mask, n)
  G = _trace_normalized(_masked_gram(gram, present))
  b = _pref_weights(None, present)
  a = jnp.dot(G, b, precision=_HI)
  c = jnp.asarray(c, jnp.float32)
  r = c * jnp.sqrt(jnp.maximum(jnp.dot(b, a, precision=_HI), 0.0))

  def grad(w, gw):
    norm = jnp.sqrt(jnp.maximum(jnp.dot(w, gw, precision=_HI), 0.0))
    return a + _safe_div(r, norm) * gw

  def step(_, carry):
    w, gw, moved = carry
    g = grad(w, gw)
    t = jnp.argmin(jnp.where(present, g, jnp.inf))
    s = jnp.argmax(jnp.where(present & (w > 0), g, -jnp.inf))
    gmax = w[s]
    gd = G[:, t] - G[:, s]
    al = a[t] - a[s]
    A = gd[t] - gd[s]
    B = jnp.dot(w, gd, precision=_HI)
    C = jnp.maximum(jnp.dot(w, gw, precision=_HI), 0.0)
    curved = r * r * A > al * al  # else phi is monotone with the sign of al
    D = jnp.maximum(A * C - B * B, 0.0)
    x = -al * jnp.sqrt(_safe_div(D, r * r * A - al * al))
    interior = _safe_div(x - B, A)
    gamma = jnp.where(curved, interior, jnp.where(al < 0, gmax, 0.0))
    gamma = jnp.where(t == s, 0.0, jnp.clip(gamma, 0.0, gmax))
    w = w + gamma * (jax.nn.one_hot(t, n) - jax.nn.one_hot(s, n))
    w = jnp.maximum(w, 0.0)  # the away vertex may reach 0 up to rounding
    return w, gw + gamma * gd, moved + (gamma > 0).astype(jnp.int32)

  w, gw, moved = jax.lax.fori_loop(0, max_iter, step,
                                   (b, jnp.dot(G, b, precision=_HI), jnp.zeros([], jnp.int32)))
  gw = jnp.dot(G, w, precision=_HI)  # fresh, without the accumulated rank-1 updates
  g = grad(w, gw)
  gap = jnp.dot(g, w, precision=_HI) - jnp.min(jnp.where(present, g, jnp.inf))
  gap = jnp.where(jnp.any(present), jnp.maximum(gap, 0.0), 0.0)
  norm = jnp.sqrt(jnp.maximum(jnp.dot(w, gw, precision=_HI), 0.0))
  # ||g_w|| = 0 (0 in the hull and optimal): d = g_0, as the official code's
  # lambda = c / (||g_w|| + 1e-8) times g_w = 0 gives.
  coef = b + _safe_div(r, norm) * w
  rescale = jnp.asarray(rescale)
  denom = jnp.where(rescale == 0, 1.0, jnp.where(rescale == 1, 1.0 + c * c, 1.0 + c))
  coef = jnp.where(present, coef / denom, 0.0)
  return coef, SolverInfo(converged=gap <= tol, residual=gap, iterations=moved)


def cagrad(num_tasks: int, c: float | Array = 0.5, rescale: int = 1, max_iter: int = 200,
           tol: float = 1e-6) -> optax.GradientTransformationExtraArgs:
  """CAGrad (Liu et al., NeurIPS 2021): the best worst-task improvement near the mean gradient.

  Maths (paper, section 3.1, eq. 2 and its dual, Algorithm 1)::

    max_d min_i g_i . d   s.t.  ||d - g_0|| <= c ||g_0||,
    dual: w* = argmin_{w in simplex} g_w . g_0 + sqrt(phi) ||g_w||,  phi = c^2 ||g_0||^2,
    d = g_0 + (sqrt(phi) / ||g_w*||) g_w*,

  with ``g_0`` the mean gradient and ``g_w = sum_i w_i g_i``. On the Gram
  matrix ``g_w . g_0 = w^T G b`` and ``||g_w||^2 = w^T G w`` (``b = 1/N``), so
  the dual is solved on ``G`` (:func:`cagrad_coefficients`).

  Conventions (checked against the official code, Cranial-XIX/CAGrad, and
  LibMTL's ``CAGrad.py``): ``c = 0.5`` and ``rescale = 1`` (divide by
  ``1 + c^2``; 0: none, 2: ``1 + c``) as there; the official code solves the
  dual with scipy's SLSQP and adds 1e-8 inside the square roots; here a
  jittable pairwise Frank-Wolfe with exact line search on the exact
  objective, ``max_iter`` iterations (default 200: on 150 random N = 20 Gram
  matrices the gap was below 1e-6 in all, 1.6e-8 at most; 100 left one at
  3.6e-6), with its Frank-Wolfe gap reported in the method state
  (:class:`SolverInfo`). ``c = 0`` gives the mean gradient exactly (divided
  by the rescale factor, which is 1 then). With one task, ``d = (1 + c) g /
  (1 + c^2)`` as in the official formula.

  Args:
    num_tasks: ``N``.
    c: radius factor ``c >= 0`` (may be traced, e.g. by
      ``optax.inject_hyperparams``).
    rescale: 0, 1 or 2.
    max_iter: solver iterations (fixed under ``jit``).
    tol: Frank-Wolfe gap (trace-normalised problem) counted as converged.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (Jacobian and lean mode).
  """
  name = "cagrad"
  weighting.check_hparam(c, "c", name, low=0)
  if weighting.is_static(rescale):
    weighting.check_hparam(rescale, "rescale", name, low=0, high=2, integer=True)
  weighting.check_hparam(max_iter, "max_iter", name, low=0, integer=True)
  weighting.check_hparam(tol, "tol", name, low=0)

  def coefficients(stats: weighting.TaskStats, state):
    del state
    return cagrad_coefficients(stats.gram, stats.mask, c=c, rescale=rescale,
                               max_iter=max_iter, tol=tol)

  return weighting.task_weighting(
      weighting.Rule(name=name, coefficients=coefficients, init_state=_init_solver_info,
                     needs_gram=True), num_tasks)


# ----------------------------------------------------------------------------
# UPGrad (Quinton & Rey, 2024).
# ----------------------------------------------------------------------------


def _dual_cone_weights(gram: Array, U: Array, max_iter: int,
                       rtol: float = 1e-6) -> tuple[Array, Array, Array]:
  """Solves ``min_v v^T G v  s.t.  v >= u`` for every row ``u`` of ``U``, on ``G`` only.

  With ``v = u + z``: the linear complementarity problem ``z >= 0``,
  ``w = G z + G u >= 0``, ``z . w = 0`` (the QP's KKT conditions; ``w/2`` are
  the multipliers). Solved by Murty's least-index principal pivoting: keep
  the tableau ``w_B = M z_N + q`` of the current complementary basis and
  pivot on the first index with ``q_j < 0``. For a positive definite ``G``
  (a P-matrix) this terminates at the solution in finitely many pivots; on
  random and rank-deficient Gram matrices up to ``N = 40`` it took at most
  ``1.9 N``. All problems pivot in one batched ``[N, N, N]`` tableau.

  Returns:
    ``(V [R, N], converged [], pivots [])``: ``V`` the solutions (rows),
    ``converged`` that no ``q_j < -tol`` remains.
  """
  n = gram.shape[0]
  rows = U.shape[0]
  scale = jnp.max(jnp.abs(U)) * jnp.max(jnp.diagonal(gram))
  tol = rtol * scale
  M0 = jnp.broadcast_to(gram, (rows, n, n))
  q0 = jnp.dot(U, gram, precision=_HI)  # row r: G u_r (G symmetric)

  def pivot(_, carry):
    M, q, basic_z, pivots = carry
    neg = q < -tol
    has = jnp.any(neg, axis=1)
    j = jnp.argmax(neg, axis=1)  # least index with q_j < 0
    e = jax.nn.one_hot(j, n, dtype=bool)
    row = jnp.take_along_axis(M, j[:, None, None], 1)[:, 0, :]
    col = jnp.take_along_axis(M, j[:, None, None], 2)[:, :, 0]
    p = jnp.sum(jnp.where(e, row, 0.0), axis=1)
    p = jnp.where(has & (p > 0), p, 1.0)  # > 0 for a P-matrix
    qj = jnp.sum(jnp.where(e, q, 0.0), axis=1)
    Mn = M - col[:, :, None] * row[:, None, :] / p[:, None, None]
    qn = q - col * (qj / p)[:, None]
    er, ec = e[:, :, None], e[:, None, :]
    Mn = jnp.where(er, (-row / p[:, None])[:, None, :], Mn)
    Mn = jnp.where(ec, (col / p[:, None])[:, :, None], Mn)
    Mn = jnp.where(er & ec, (1.0 / p)[:, None, None], Mn)
    qn = jnp.where(e, (-qj / p)[:, None], qn)
    M = jnp.where(has[:, None, None], Mn, M)
    q = jnp.where(has[:, None], qn, q)
    basic_z = jnp.where(has[:, None], basic_z ^ e, basic_z)
    return M, q, basic_z, pivots + has.astype(jnp.int32)

  _, q, basic_z, pivots = jax.lax.fori_loop(
      0, max_iter, pivot, (M0, q0, jnp.zeros((rows, n), bool), jnp.zeros((rows,), jnp.int32)))
  V = U + jnp.where(basic_z, jnp.maximum(q, 0.0), 0.0)
  return V, ~jnp.any(q < -tol), jnp.max(pivots)


def upgrad_coefficients(gram: Array, mask: Optional[Array] = None, *,
                        pref_vector: Optional[Array] = None, norm_eps: float = 1e-4,
                        reg_eps: float = 1e-4,
                        max_iter: Optional[int] = None) -> tuple[Array, SolverInfo]:
  """UPGrad's coefficients: the projections of ``p_i g_i`` onto the dual cone, summed.

  torchjd's ``UPGradWeighting`` on the Gram matrix: ``Gn = G / trace(G)``
  (zeros when ``trace(G) < norm_eps``) ``+ reg_eps I``; for each task
  ``v_i = argmin_v v^T Gn v  s.t.  v >= p_i e_i`` (Proposition 1 of the
  paper: ``J^T v_i`` is the projection of ``p_i g_i`` onto the dual cone
  ``{x : J x >= 0}``); ``c = sum_i v_i``. The QPs are solved exactly by
  principal pivoting (:func:`_dual_cone_weights`), ``max_iter`` pivots
  (default ``3 N``).

  Args:
    gram: ``[N, N]`` Gram matrix.
    mask: optional ``[N]`` bool, tasks present.
    pref_vector: ``[N]`` preference weights ``p`` (default the mean over the
      present tasks; absent tasks' entries are zeroed).
    norm_eps: trace below which the Gram matrix is not normalised (torchjd:
      then ``Gn = reg_eps I`` and the result is ``p``).
    reg_eps: ridge added to the normalised Gram matrix.
    max_iter: pivots (static; default ``3 N``).

  Returns:
    ``(c [N], SolverInfo)``; ``residual`` is ``max(0, -min_j (Gn c)_j) /
    max_j Gn_jj``, the relative violation of ``d . g_j >= 0`` (0 at the
    solution, up to the ridge).
  """
  gram = jnp.asarray(gram, jnp.float32)
  n = gram.shape[0]
  present = _present(mask, n)
  G = _masked_gram(gram, present)
  tr = jnp.trace(G)
  Gn = jnp.where(tr < norm_eps, 0.0, _safe_div(G, tr)) + reg_eps * jnp.eye(n, dtype=jnp.float32)
  p = _pref_weights(pref_vector, present)
  V, converged, pivots = _dual_cone_weights(Gn, jnp.diag(p), 3 * n if max_iter is None
                                            else max_iter)
  coef = jnp.where(present, jnp.sum(V, axis=0), 0.0)
  lam = jnp.dot(Gn, coef, precision=_HI)
  residual = _safe_div(jnp.maximum(-jnp.min(jnp.where(present, lam, jnp.inf)), 0.0),
                       jnp.max(jnp.diagonal(Gn)))
  residual = jnp.where(jnp.any(present), residual, 0.0)
  return coef, SolverInfo(converged=converged, residual=residual, iterations=pivots)


def upgrad(num_tasks: int, pref_vector: Optional[Any] = None, norm_eps: float = 1e-4,
           reg_eps: float = 1e-4,
           max_iter: Optional[int] = None) -> optax.GradientTransformationExtraArgs:
  """UPGrad (Quinton & Rey, 2024): average of the task gradients projected onto the dual cone.

  Maths (paper, "Jacobian Descent for Multi-Objective Optimization",
  section 3 and Proposition 1)::

    d = sum_i pi_J(p_i g_i),   pi_J(x) = argmin_{y : J y >= 0} ||y - x||,
    pi_J(J^T u) = J^T v,  v = argmin_{v >= u} v^T G v,

  so ``d`` has ``g_j . d >= 0`` for every task (non-conflicting) and equals
  the ``p``-weighted sum when no two gradients conflict. Only ``G`` enters the
  dual QPs (:func:`upgrad_coefficients`).

  Conventions (checked against torchjd's ``_upgrad.py``, ``_utils/dual_cone.py``
  and ``_linalg/_gramian.py``): default preference vector the mean (so the
  non-conflicting case gives the mean gradient); ``Gn = G / trace(G) +
  reg_eps I``, with ``G`` replaced by 0 when ``trace(G) < norm_eps``
  (``norm_eps = reg_eps = 1e-4``). Note torchjd's ``norm_eps`` is an
  absolute threshold: when all gradients are tiny (``sum_i ||g_i||^2 <
  1e-4``), UPGrad reduces to the ``p``-weighted sum; pass a smaller
  ``norm_eps`` to keep the projection at that scale. torchjd solves each QP
  with quadprog; here exactly, by batched principal pivoting with a fixed
  budget of ``3 N`` pivots (``max_iter``), reporting whether pivoting
  finished and the residual cone violation in the method state
  (:class:`SolverInfo`).

  Args:
    num_tasks: ``N``.
    pref_vector: ``[N]`` preference weights (``None``: the mean).
    norm_eps: see above.
    reg_eps: ridge on the normalised Gram matrix.
    max_iter: pivot budget (``None``: ``3 N``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (Jacobian and lean mode).
  """
  name = "upgrad"
  pref_vector = _check_pref_vector(pref_vector, num_tasks, name) if not isinstance(
      num_tasks, jax.core.Tracer) else pref_vector
  weighting.check_hparam(norm_eps, "norm_eps", name, low=0)
  weighting.check_hparam(reg_eps, "reg_eps", name, low=0)
  if max_iter is not None:
    weighting.check_hparam(max_iter, "max_iter", name, low=0, integer=True)

  def coefficients(stats: weighting.TaskStats, state):
    del state
    return upgrad_coefficients(stats.gram, stats.mask, pref_vector=pref_vector,
                               norm_eps=norm_eps, reg_eps=reg_eps, max_iter=max_iter)

  return weighting.task_weighting(
      weighting.Rule(name=name, coefficients=coefficients, init_state=_init_solver_info,
                     needs_gram=True), num_tasks)


# ----------------------------------------------------------------------------
# Aligned-MTL (Senushkin et al., CVPR 2023).
# ----------------------------------------------------------------------------

ALIGNED_MTL_SCALE_MODES = ("min", "median", "rmse")


def aligned_mtl_coefficients(gram: Array, mask: Optional[Array] = None, *,
                             pref_vector: Optional[Array] = None,
                             scale_mode: str = "min") -> Array:
  """Aligned-MTL's coefficients ``c = B p``, ``B = sqrt(s) V_r S_r^{-1/2} V_r^T``.

  ``G = V S V^T`` (eigendecomposition); ``r`` the eigenvalues above
  ``max(S) N eps_float32`` (the numerical rank); ``s`` the smallest
  (``'min'``), lower-median (``'median'``) or mean (``'rmse'``) of those.
  No eigenvalue above the threshold (all-zero ``G``): ``B = I``, ``c = p``.
  ``B`` is scale-invariant, so it is computed on ``G / trace(G)``.

  Args:
    gram: ``[N, N]`` Gram matrix.
    mask: optional ``[N]`` bool, tasks present.
    pref_vector: ``[N]`` preference weights (default the mean over present
      tasks).
    scale_mode: ``'min'``, ``'median'`` or ``'rmse'``.

  Returns:
    ``c [N]``.
  """
  if scale_mode not in ALIGNED_MTL_SCALE_MODES:
    raise ValueError(f"aligned_mtl: unknown scale_mode {scale_mode!r}; known: "
                     f"{', '.join(map(repr, ALIGNED_MTL_SCALE_MODES))}.")
  gram = jnp.asarray(gram, jnp.float32)
  n = gram.shape[0]
  present = _present(mask, n)
  G = _trace_normalized(_masked_gram(gram, present))
  lam, V = jnp.linalg.eigh(G)  # ascending
  tol = jnp.max(lam) * n * jnp.finfo(jnp.float32).eps
  keep = lam > tol  # a suffix of the ascending eigenvalues
  rank = jnp.sum(keep)
  inv_sqrt = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)
  if scale_mode == "min":
    scale = jnp.min(jnp.where(keep, lam, jnp.inf))
  elif scale_mode == "median":  # torch.median: the lower of the two middle values
    scale = lam[jnp.clip(n - rank + (rank - 1) // 2, 0, n - 1)]
  else:
    scale = _safe_div(jnp.sum(jnp.where(keep, lam, 0.0)), rank.astype(jnp.float32))
  scale = jnp.where(rank > 0, scale, 1.0)
  B = jnp.sqrt(scale) * jnp.dot(V * inv_sqrt[None, :], V.T, precision=_HI)
  B = jnp.where(rank > 0, B, jnp.eye(n, dtype=jnp.float32))
  p = _pref_weights(pref_vector, present)
  return jnp.where(present, jnp.dot(B, p, precision=_HI), 0.0)


def aligned_mtl(num_tasks: int, pref_vector: Optional[Any] = None,
                scale_mode: str = "min") -> optax.GradientTransformationExtraArgs:
  """Aligned-MTL (Senushkin et al., CVPR 2023): align the gradient system's principal components.

  Maths (paper, section 4, Algorithm 1): with ``J = U Sigma V^T`` the task
  gradients' SVD (``G = J J^T = U Sigma^2 U^T``), replace the gradient
  matrix by its aligned version ``J_hat = sigma U V^T`` (all singular values
  set to ``sigma``, the smallest by default), i.e. ``J_hat = B J`` with
  ``B = sigma U Sigma^{-1} U^T``; the update is ``d = J_hat^T p = J^T (B p)``.
  ``U`` and ``Sigma^2`` are the eigendecomposition of ``G``, so
  ``c = B p`` needs only ``G`` (:func:`aligned_mtl_coefficients`).

  Conventions (checked against torchjd's ``_aligned_mtl.py``, adapted from
  the official SamsungLabs/MTL code, and LibMTL's ``Aligned_MTL.py``):
  numerical rank ``lambda > max(lambda) N eps``; ``scale_mode`` ``'min'``
  (default; ``sigma^2`` the smallest kept eigenvalue), ``'median'``,
  ``'rmse'`` (mean eigenvalue, "as in the original implementation");
  preference vector the mean (torchjd); LibMTL sums instead
  (``alpha = B 1``, ``N`` times larger).

  Args:
    num_tasks: ``N``.
    pref_vector: ``[N]`` preference weights (``None``: the mean).
    scale_mode: ``'min'``, ``'median'`` or ``'rmse'``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (Jacobian and lean mode).
  """
  name = "aligned_mtl"
  weighting.check_choice(scale_mode, "scale_mode", name, ALIGNED_MTL_SCALE_MODES)
  pref_vector = _check_pref_vector(pref_vector, num_tasks, name) if not isinstance(
      num_tasks, jax.core.Tracer) else pref_vector

  def coefficients(stats: weighting.TaskStats, state):
    return aligned_mtl_coefficients(stats.gram, stats.mask, pref_vector=pref_vector,
                                    scale_mode=scale_mode), state

  return weighting.task_weighting(
      weighting.Rule(name=name, coefficients=coefficients, needs_gram=True), num_tasks)


registry.register_method(
    "mgda", mgda,
    "Sener & Koltun, NeurIPS 2018: min-norm point of the task gradients' convex hull "
    "(Frank-Wolfe on G; gradients w.r.t. all parameters, not MGDA-UB)",
    label="MGDA", needs=("gram", "losses"),  # 'losses' for normalization='loss'/'loss+' only
    defaults={"normalization": "loss+", "max_iter": 250, "tol": 1e-5})
registry.register_method(
    "imtl_g", imtl_g,
    "Liu et al., ICLR 2021: IMTL-G, equal projections of the update on all unit task gradients",
    label="IMTL-G", needs=("gram",), defaults={})
registry.register_method(
    "cagrad", cagrad,
    "Liu et al., NeurIPS 2021: CAGrad, best worst-task improvement in a ball around the mean "
    "gradient", label="CAGrad", needs=("gram",),
    defaults={"c": 0.5, "rescale": 1, "max_iter": 200, "tol": 1e-6})
registry.register_method(
    "upgrad", upgrad,
    "Quinton & Rey, 2024: UPGrad, task gradients projected onto the dual cone of the Jacobian, "
    "averaged", label="UPGrad", needs=("gram",),
    defaults={"pref_vector": None, "norm_eps": 1e-4, "reg_eps": 1e-4, "max_iter": None})
registry.register_method(
    "aligned_mtl", aligned_mtl,
    "Senushkin et al., CVPR 2023: Aligned-MTL, the gradient system's singular values aligned "
    "to the smallest", label="Aligned-MTL", needs=("gram",),
    defaults={"pref_vector": None, "scale_mode": "min"})
