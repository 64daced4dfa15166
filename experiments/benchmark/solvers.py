"""Solver timings: each Gram method's coefficient computation, and L-DRO's game solvers.

* **Gram methods** (every registered method that needs the Gram matrix,
  read from the registry): the method's transformation, built with its paper
  defaults for ``N`` tasks, updates a tiny parameter vector (``P`` entries)
  from ``N`` gradient rows under ``jax.jit``, at a refresh step (count 0): the
  time is the Gram matrix of the rows (``N^2 P`` flops, negligible at
  ``P = 32``), the method's coefficient solver and ``sum_i c_i g_i``. The
  gradient rows share a common direction plus independent noise, so that
  some pairs conflict (negative ``g_i . g_j``) and the solvers iterate.
  The method state's scalar fields (e.g. a solver's ``converged``,
  ``iterations``) after the call are reported beside the time.
* ``maxent_nash`` (exact L-DRO) on an L-DRO lookahead game and a
  standard-normal random game; ``update_weights`` (online L-DRO).
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import ldro
from ldro import game
from experiments.benchmark import harness
from experiments.benchmark import workloads


def gram_method_names() -> list[str]:
  """Registered methods whose coefficients are computed from the Gram matrix."""
  return [n for n in ldro.method_names() if "gram" in ldro.method_info(n).needs]


def gradient_rows(n: int, p: int, seed: int = 0, shared: float = 0.5) -> np.ndarray:
  """``[n, p]`` rows ``shared * m + z_i`` (unit-variance entries), some pairs conflicting."""
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(1, p))
  return (shared * m + rng.normal(size=(n, p))).astype(np.float32)


def _scalars(tree) -> dict:
  out = {}
  if hasattr(tree, "_asdict"):
    for k, v in tree._asdict().items():
      a = np.asarray(v) if isinstance(v, (jax.Array, np.ndarray, np.generic)) else None
      if a is not None and a.ndim == 0:
        out[k] = a.item()
  return out


def bench_gram_method(name: str, n: int, p: int, min_time: float) -> dict:
  """Times one Gram method's jitted update at a refresh step (see the module docstring)."""
  info = ldro.method_info(name)
  tx = ldro.get_method(name, **workloads.factory_kwargs(name, n))
  params = jnp.zeros((p,), jnp.float32)
  state = tx.init(params)
  rows = jnp.asarray(gradient_rows(n, p))
  losses = jnp.asarray(np.random.default_rng(1).uniform(0.5, 3.0, n), jnp.float32)
  key = jax.random.PRNGKey(0)
  if "jacobian" in info.modes:
    def update(rows, state, losses, key):
      return tx.update(rows, state, params, task_losses=losses, key=key)
    mode = "jacobian"
  else:  # lean only: the Gram matrix given, the update pulled back through J^T
    def update(rows, state, losses, key):
      return tx.update(None, state, params, task_losses=losses, key=key,
                       task_vjp=lambda c: (c @ rows,), gram=rows @ rows.T)
    mode = "lean"
  fn = jax.jit(update)
  r = harness.time_fn(fn, (rows, state, losses, key), min_time)
  _, new_state = fn(rows, state, losses, key)
  ws = [s for s in jax.tree_util.tree_leaves(new_state, is_leaf=harness._is_weighting)  # pylint: disable=protected-access
        if isinstance(s, ldro.WeightingState)][0]
  c = np.asarray(ws.task_weights)
  r.update(method=name, label=info.label, n=n, p=p, mode=mode,
           finite=bool(np.all(np.isfinite(c))), coefficient_sum=float(c.sum()),
           state=_scalars(ws.method_state))
  return r


def bench_solvers(n_nash: int, n_update: int, log, min_time: float = 0.5,
                  n_gram: int = 20, p_gram: int = 32,
                  methods: Optional[list[str]] = None) -> dict:
  """Gram methods' coefficient solvers at ``N = n_gram``, ``maxent_nash`` at ``N = n_nash``,
  ``update_weights`` at ``N = n_update``."""
  out = {"gram_methods": [], "gram_methods_failed": {}}
  for name in (gram_method_names() if methods is None else methods):
    try:
      r = bench_gram_method(name, n_gram, p_gram, min_time)
    except Exception as e:  # pylint: disable=broad-except  (reported, not fatal)
      out["gram_methods_failed"][name] = f"{type(e).__name__}: {str(e).strip()[:300]}"
      log(f"    {name}: not timed ({out['gram_methods_failed'][name]})")
      continue
    out["gram_methods"].append(r)
    log(f"    {r['label']} coefficients N={n_gram}: {r['median_ms']:.3f} ms "
        f"(min {r['min_ms']:.3f}; state {r['state']})")
  solve = jax.jit(game.maxent_nash_with_info)  # maxent_nash is this minus the flags
  out["maxent_nash"] = []
  for kind, L in solver_games(n_nash).items():
    info = solve(L)
    r = harness.time_fn(solve, (L,), min_time)
    r.update(n=n_nash, game=kind, lp_iterations=int(info.lp_iterations),
             newton_iterations=int(info.newton_iterations), converged=bool(info.converged))
    out["maxent_nash"].append(r)
    log(f"    maxent_nash N={n_nash} ({kind}): {r['median_ms']:.2f} ms "
        f"(LP {r['lp_iterations']} pivots, Newton {r['newton_iterations']} its)")
  rng = np.random.default_rng(1)
  L = jnp.asarray(rng.normal(size=(n_update, n_update)), jnp.float32)
  w = jnp.full((n_update,), 1.0 / n_update, jnp.float32)
  r = harness.time_fn(jax.jit(game.update_weights), (L, w, jnp.float32(0.01)), min_time)
  r.update(n=n_update)
  out["update_weights"] = r
  log(f"    update_weights N={n_update}: {r['median_ms']:.3f} ms")
  return out


def solver_games(n: int, seed: int = 0) -> dict:
  """Test games: an L-DRO lookahead matrix and a standard-normal random game."""
  rng = np.random.default_rng(seed)
  losses = rng.uniform(0.5, 3.0, n)
  g = rng.normal(size=(n, max(2, n // 2)))
  lookahead_game = ldro.lookahead_matrix(jnp.asarray(losses, jnp.float32),
                                         jnp.asarray(g @ g.T, jnp.float32), 0.1)
  normal_game = jnp.asarray(rng.normal(size=(n, n)), jnp.float32)
  return {"lookahead": lookahead_game, "normal": normal_game}
