"""Property tests: the solvers stay finite and on the simplex on degenerate input.

Degenerate input: zero gradients (zero Gram matrix), identical tasks, huge
(1e30) and tiny (1e-30) losses, ties, a single task (N = 1). Hypothesis draws
the cases; example counts are small (the suite must stay fast) and ``N`` comes
from a small set because the jitted solvers compile once per shape.
"""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldro

SETTINGS = hypothesis.settings(max_examples=25, deadline=None, derandomize=True,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow])
SIZES = (1, 2, 3, 5)
SPECIAL = (0.0, 1e-30, 1e-12, 1.0, 1e12, 1e30)


def assert_simplex(w, what="weights"):
  w = np.asarray(w, np.float64)
  assert np.all(np.isfinite(w)), f"{what} not finite: {w}"
  assert np.all(w >= 0.0), f"{what} negative: {w}"
  assert abs(w.sum() - 1.0) < 1e-5, f"{what} sum to {w.sum()}: {w}"


@st.composite
def losses_st(draw, n):
  kind = draw(st.sampled_from(["special", "tie", "random", "mixed"]))
  if kind == "tie":
    return np.full((n,), draw(st.sampled_from(SPECIAL)), np.float32)
  if kind == "special":
    return np.asarray([draw(st.sampled_from(SPECIAL)) for _ in range(n)], np.float32)
  if kind == "random":
    return np.asarray(draw(st.lists(st.floats(0.0, 100.0, width=32), min_size=n, max_size=n)),
                      np.float32)
  return np.asarray([draw(st.one_of(st.sampled_from(SPECIAL), st.floats(0.0, 10.0, width=32)))
                     for _ in range(n)], np.float32)


@st.composite
def grads_st(draw, n, dim=3):
  """Per-task gradients ``[n, dim]``: zero, identical, random, scaled (huge/tiny)."""
  kind = draw(st.sampled_from(["zero", "identical", "random", "scaled", "some_zero"]))
  seed = draw(st.integers(0, 2**16))
  g = np.random.default_rng(seed).normal(size=(n, dim))
  if kind == "zero":
    g = np.zeros((n, dim))
  elif kind == "identical":
    g = np.repeat(g[:1], n, axis=0)
  elif kind == "scaled":
    g = g * draw(st.sampled_from((1e-30, 1e-15, 1e15)))
  elif kind == "some_zero":
    g[: max(1, n // 2)] = 0.0
  return g.astype(np.float32)


def problem(draw_n=st.sampled_from(SIZES)):
  @st.composite
  def make(draw):
    n = draw(draw_n)
    losses = draw(losses_st(n))
    grads = draw(grads_st(n))
    lr = draw(st.sampled_from((0.0, 1e-3, 0.1, 1.0)))
    return n, losses, grads, lr
  return make()


@functools.lru_cache(maxsize=None)
def _jit_nash():
  return jax.jit(ldro.maxent_nash)


@functools.lru_cache(maxsize=None)
def _ldro_tx(n, exact, update_every):
  tx = ldro.ldro_weights(num_tasks=n, lookahead_lr=0.1, weight_lr=0.5,
                         update_every=update_every, exact=exact)
  return tx, jax.jit(lambda g, s, l: tx.update(g, s, None, task_losses=l))


@SETTINGS
@hypothesis.given(problem())
def test_lookahead_matrix_finite(p):
  n, losses, grads, lr = p
  gram = ldro.task_gram(jnp.asarray(grads))
  for normalize in (True, False):
    L = ldro.lookahead_matrix(losses, gram, lr, normalize=normalize)
    assert L.shape == (n, n)
    assert np.all(np.isfinite(np.asarray(L))), (losses, grads, lr, L)


@SETTINGS
@hypothesis.given(problem(), st.sampled_from((1e-3, 0.05, 1.0, 10.0)),
                  st.sampled_from(("uniform", "random", "vertex")))
def test_update_weights_on_simplex(p, weight_lr, start):
  n, losses, grads, lr = p
  L = ldro.lookahead_matrix(losses, ldro.task_gram(jnp.asarray(grads)), lr)
  if start == "uniform":
    w = jnp.full((n,), 1.0 / n)
  elif start == "random":
    w = jax.nn.softmax(jnp.arange(n, dtype=jnp.float32))
  else:  # a vertex: all mass on the last task (zeros elsewhere)
    w = jax.nn.one_hot(n - 1, n)
  for _ in range(3):
    w = ldro.update_weights(L, w, weight_lr)
    assert_simplex(w)
  mask = jnp.arange(n) % 2 == 0
  assert_simplex(ldro.update_weights(L, w, weight_lr, task_mask=mask), "masked weights")


@SETTINGS
@hypothesis.given(problem(), st.sampled_from(("lookahead", "raw_huge", "raw_tiny", "tie")))
def test_maxent_nash_on_simplex(p, source):
  n, losses, grads, lr = p
  if source == "lookahead":
    L = ldro.lookahead_matrix(losses, ldro.task_gram(jnp.asarray(grads)), lr)
  elif source == "raw_huge":  # e.g. +-1e30 payoffs
    L = jnp.asarray(np.sign(grads[:, :1] @ grads[:, :1].T + 0.5) * 1e30
                    + np.outer(losses, np.ones(n)), jnp.float32)
  elif source == "raw_tiny":
    L = jnp.asarray((grads[:, :1] @ np.ones((1, n))) * 1e-30, jnp.float32)
  else:
    L = jnp.full((n, n), float(losses[0]), jnp.float32)
  w, v = _jit_nash()(L)
  assert_simplex(w, "w")
  assert_simplex(v, "v")


@SETTINGS
@hypothesis.given(problem(), st.booleans())
def test_ldro_weights_updates(p, exact):
  n, losses, grads, _ = p
  # Refresh every second step: steps 0 and 2 refresh the interaction matrix, step 1 reuses
  # it (both branches of the update, one compile per shape).
  tx, update = _ldro_tx(n, exact, 2)
  params = {"a": jnp.zeros((3,))}
  state = tx.init(params)
  task_grads = {"a": jnp.asarray(grads)}
  for step in range(3):
    scaled = losses * (1.0 + step)  # changing losses, same degeneracy
    out, state = update(task_grads, state, jnp.asarray(scaled, jnp.float32))
    assert_simplex(state.task_weights)
    assert np.all(np.isfinite(np.asarray(ldro.lookahead_dro.interaction(state))))
    assert np.all(np.isfinite(np.asarray(out["a"])))


@pytest.mark.parametrize("n", SIZES)
def test_named_degenerate_cases(n):
  """The cases of the issue, each spelled out once (not left to chance)."""
  zeros = jnp.zeros((n, 4))
  same = jnp.ones((n, 4))
  for losses in (np.zeros(n), np.full(n, 1e30), np.full(n, 1e-30), np.arange(n) * 1e30):
    for g in (zeros, same, same * 1e15, same * 1e-30):
      L = ldro.lookahead_matrix(jnp.asarray(losses, jnp.float32), ldro.task_gram(g), 0.1)
      assert np.all(np.isfinite(np.asarray(L)))
      assert_simplex(ldro.update_weights(L, jnp.full((n,), 1.0 / n), 0.05))
      w, v = _jit_nash()(L)
      assert_simplex(w)
      assert_simplex(v)
