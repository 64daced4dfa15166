"""Tests of the matrix-game solvers (paper sections 2.5 and 3.1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

import ldro

# Jitted once per shape: called op by op, the solver's loops compile afresh on every call.
SOLVE = jax.jit(ldro.maxent_nash_with_info)
NASH = jax.jit(ldro.maxent_nash)


def lp_game_value(L):
  """min_w max_i (L w)_i by scipy's HiGHS (float64), an independent reference."""
  n = L.shape[0]
  c = np.r_[np.zeros(n), 1.0]
  res = linprog(c, A_ub=np.c_[L, -np.ones(n)], b_ub=np.zeros(n),
                A_eq=np.r_[np.ones(n), 0.0][None], b_eq=[1.0],
                bounds=[(0, None)] * n + [(None, None)], method="highs")
  assert res.status == 0
  return res.fun


def entropy(w):
  w = np.asarray(w, np.float64)
  return -np.sum(np.where(w > 0, w * np.log(np.maximum(w, 1e-300)), 0.0))


def random_game(rng, n, kind):
  if kind == "normal":
    return rng.normal(size=(n, n))
  losses = rng.uniform(0.5, 3.0, n)
  g = rng.normal(size=(n, max(2, n // 2)))
  return np.asarray(ldro.lookahead_matrix(jnp.asarray(losses), jnp.asarray(g @ g.T), 0.1))


@pytest.mark.parametrize("n", [2, 3, 20, 100])  # one compile per size
@pytest.mark.parametrize("kind", ["normal", "lookahead"])
def test_maxent_nash_matches_lp_value(n, kind):
  rng = np.random.default_rng(n)
  for _ in range(2):
    L = random_game(rng, n, kind).astype(np.float32)
    info = SOLVE(jnp.asarray(L))
    ref = lp_game_value(L.astype(np.float64))
    assert bool(info.lp_converged)
    assert abs(float(info.payoff) - ref) < 1e-5
    # Equilibrium conditions checked directly: w, v on the simplex, and
    # max_i (Lw)_i ~= V ~= min_j (v^T L)_j (no profitable deviation).
    w, v = np.asarray(info.w, np.float64), np.asarray(info.v, np.float64)
    for p in (w, v):
      assert np.all(p >= 0) and abs(p.sum() - 1) < 1e-5
    L64 = L.astype(np.float64)
    assert abs((L64 @ w).max() - ref) < 1e-5
    assert abs((v @ L64).min() - ref) < 1e-4


def test_maxent_nash_value_is_bitwise_stable_under_jit_and_no_nan():
  L = jnp.zeros((5, 5))
  w, v = NASH(L)
  np.testing.assert_allclose(w, np.full(5, 0.2), atol=1e-6)  # all w optimal -> uniform
  assert np.all(np.isfinite(v))


def test_redundant_tasks_give_uniform_weights():
  # G all ones (perfectly aligned gradients): the payoff does not depend on w.
  l = jnp.array([1.0, 2.0, 0.5, 1.5])
  L = ldro.lookahead_matrix(l, jnp.ones((4, 4)), 0.1)
  w, _ = NASH(L)
  np.testing.assert_allclose(w, np.full(4, 0.25), atol=1e-4)


def test_independent_tasks_reduce_to_dro():
  # G = I, small lambda: train on the worst task only.
  l = jnp.array([1.0, 3.0, 2.0])
  L = ldro.lookahead_matrix(l, jnp.eye(3), 0.01)
  info = SOLVE(L)
  assert float(info.w[1]) > 0.999
  assert float(info.payoff) == pytest.approx(3.0 - 0.01, abs=1e-5)


def test_converged_worst_task_gives_uniform_weights():
  # Task 0 has the highest loss and a zero gradient: L's row 0 is constant,
  # so every w is optimal and max-entropy picks uniform weights; training
  # goes on for the other tasks (section 2.5).
  rng = np.random.default_rng(0)
  g = rng.normal(size=(4, 10))
  g[0] = 0.0
  l = jnp.array([5.0, 1.0, 2.0, 1.5])
  L = ldro.lookahead_matrix(l, jnp.asarray(g @ g.T), 0.01)
  assert np.all(np.isfinite(np.asarray(L)))
  w, _ = NASH(L)
  np.testing.assert_allclose(w, np.full(4, 0.25), atol=1e-4)


def test_maxent_picks_highest_entropy_among_optimal():
  # Tasks 0 and 1 are clones; task 2 is independent and easy. Optimal w must
  # keep both clones' lookahead losses down; entropy splits the clones' mass.
  rng = np.random.default_rng(3)
  for _ in range(5):
    n = 5
    L = rng.normal(size=(n, n)).astype(np.float32)
    info = SOLVE(jnp.asarray(L))
    w = np.asarray(info.w, np.float64)
    V = float(info.payoff)
    # Random optimal points: mixtures of w with LP vertices are no better in entropy.
    assert bool(info.entropy_converged)
    for _ in range(20):
      d = rng.normal(size=n)
      d -= d.mean()
      for t in (1e-3, 1e-2):
        w2 = w + t * d
        if np.all(w2 >= 0) and (L.astype(np.float64) @ w2).max() <= V + 1e-7:
          assert entropy(w2) <= entropy(w) + 1e-6


@pytest.mark.parametrize("n", [20, 60])
def test_maxent_stage_converges_on_ldro_games(n):
  # L-DRO lookahead games (low-rank Gram, as from real task gradients): the
  # float32 Newton stage must converge, not hand back the guard's mixture.
  # (Before the change-based line search and the gradient safeguard, 11 of
  # these 20 games stopped after one iteration with entropy_converged=False.)
  for seed in range(10):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(n, max(2, n // 2)))
    L = ldro.lookahead_matrix(jnp.asarray(rng.uniform(0.5, 3.0, n), jnp.float32),
                              jnp.asarray(g @ g.T, jnp.float32), 0.1)
    info = SOLVE(L)
    assert bool(info.lp_converged) and bool(info.entropy_converged), seed
    # Optimal to the slack (1e-6 relative) plus float32 round-off of the payoff.
    assert float(info.payoff) <= float(info.value) + 1e-5


def test_update_weights_is_algorithm_2():
  rng = np.random.default_rng(1)
  L = rng.normal(size=(4, 4)).astype(np.float32)
  w = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
  eta = 0.5
  i = np.argmax(L @ w)
  expected = w * np.exp(-eta * L[i])
  expected /= expected.sum()
  np.testing.assert_allclose(ldro.update_weights(jnp.asarray(L), jnp.asarray(w), eta), expected,
                             rtol=1e-5)


def test_update_weights_stable_for_huge_losses():
  L = jnp.array([[1e30, -1e30], [0.0, 5e29]])
  w = ldro.update_weights(L, jnp.array([0.5, 0.5]), 10.0)
  assert np.all(np.isfinite(np.asarray(w))) and abs(float(w.sum()) - 1) < 1e-6


def test_update_weights_identity_gram_moves_to_worst_task():
  l = jnp.array([1.0, 3.0, 2.0])
  L = ldro.lookahead_matrix(l, jnp.eye(3), 0.1)
  w = jnp.full(3, 1 / 3)
  for _ in range(200):  # each step multiplies w_1 / w_j by exp(eta * lambda)
    w = ldro.update_weights(L, w, 0.5)
  assert int(jnp.argmax(w)) == 1 and float(w[1]) > 0.9


def test_update_weights_lambda_zero_does_not_move():
  # With lambda = 0 all columns of L are equal: v*^T L is constant, so the
  # exponentiated step leaves w unchanged.
  l = jnp.array([1.0, 3.0, 2.0])
  w0 = jnp.array([0.2, 0.3, 0.5])
  L = ldro.lookahead_matrix(l, jnp.eye(3) * 7.0, 0.0)
  np.testing.assert_allclose(ldro.update_weights(L, w0, 1.0), w0, rtol=1e-6)


def test_update_weights_permutation_equivariant():
  rng = np.random.default_rng(2)
  L = jnp.asarray(rng.normal(size=(5, 5)), jnp.float32)
  w = jax.nn.softmax(jnp.asarray(rng.normal(size=5), jnp.float32))
  p = rng.permutation(5)
  out = ldro.update_weights(L, w, 0.3)
  out_p = ldro.update_weights(L[p][:, p], w[p], 0.3)
  np.testing.assert_allclose(out[p], out_p, rtol=1e-5)
  wn, _ = NASH(L)
  wn_p, _ = NASH(L[p][:, p])
  np.testing.assert_allclose(wn[p], wn_p, atol=1e-4)


def test_update_weights_mask_keeps_absent_weight():
  L = jnp.array([[5.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
  w = jnp.array([0.5, 0.25, 0.25])
  mask = jnp.array([False, True, True])
  out = ldro.update_weights(L, w, 1.0, task_mask=mask)
  assert float(out[0]) == pytest.approx(0.5)
  assert float(out.sum()) == pytest.approx(1.0)
  # the best response ignores task 0 (highest row) and picks task 2
  np.testing.assert_allclose(ldro.best_response(L, w, mask), [0, 0, 1])


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="square"):
    ldro.maxent_nash(jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="w must have shape"):
    ldro.update_weights(jnp.ones((3, 3)), jnp.ones(2) / 2, 0.1)
