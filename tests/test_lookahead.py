"""Gram strategies and the lookahead matrix."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldro


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(3)(x)


def setup_problem(n_tasks=5, b=4):
  model = MLP()
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(n_tasks, b, 6)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 3, size=(n_tasks, b)))}
  # Jitted (here and below): op-by-op (eager) execution compiles every primitive on its own.
  params = jax.jit(model.init)(jax.random.key(0), batch["x"][0])["params"]

  def task_loss(p, tb):
    logits = model.apply({"params": p}, tb["x"])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tb["y"][:, None], 1))

  def losses_fn(p, bt):
    return jax.vmap(task_loss, in_axes=(None, 0))(p, bt)

  return params, batch, task_loss, losses_fn


def test_all_gram_strategies_agree():
  params, batch, task_loss, losses_fn = setup_problem()
  ref = np.asarray(jax.jit(lambda p, b: ldro.compute_gram("jacrev", losses_fn, p, b))(params,
                                                                                        batch))
  assert ref.shape == (5, 5)
  np.testing.assert_allclose(ref, ref.T, rtol=1e-6)
  for strategy, kw in [("grouped", {}), ("pairwise", {}), ("chunked", {"chunk_size": 2}),
                       ("chunked", {"chunk_size": 5}), ("chunked", {"chunk_size": 3})]:
    got = jax.jit(lambda p, b: ldro.compute_gram(strategy, task_loss, p, b, **kw))(params, batch)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=f"{strategy} {kw}")


def test_gram_matches_explicit_dot_products():
  params, batch, task_loss, _ = setup_problem(3)
  grad = jax.jit(jax.grad(task_loss))  # one compilation for the three tasks
  grads = [grad(params, jax.tree.map(lambda x: x[i], batch)) for i in range(3)]
  flat = [np.concatenate([np.ravel(g) for g in jax.tree.leaves(t)]) for t in grads]
  expected = np.array([[float(a @ b) for b in flat] for a in flat])
  np.testing.assert_allclose(
      jax.jit(lambda p, b: ldro.grouped_gram(task_loss, p, b))(params, batch), expected,
      rtol=1e-5)


def test_lookahead_matrix_formula_and_zero_gradient():
  l = jnp.array([1.0, 2.0, 3.0])
  G = jnp.array([[4.0, 2.0, 0.0], [2.0, 9.0, 0.0], [0.0, 0.0, 0.0]])  # task 2: zero grad
  L = ldro.lookahead_matrix(l, G, 0.5)
  expected = np.array([[1 - 0.5 * 4 / 2, 1 - 0.5 * 2 / 3, 1.0],
                       [2 - 0.5 * 2 / 2, 2 - 0.5 * 9 / 3, 2.0],
                       [3.0, 3.0, 3.0]])
  np.testing.assert_allclose(L, expected, rtol=1e-6)
  L_raw = ldro.lookahead_matrix(l, G, 0.5, normalize=False)
  np.testing.assert_allclose(L_raw, l[:, None] - 0.5 * G)


def test_bad_inputs():
  with pytest.raises(ValueError, match="task_losses must be"):
    ldro.lookahead_matrix(jnp.ones(3), jnp.ones((2, 2)), 0.1)
  with pytest.raises(ValueError, match="unknown Gram strategy"):
    ldro.compute_gram("nope", None, None, None)
  with pytest.raises(ValueError, match="leading task axis"):
    ldro.task_gram({"a": jnp.ones((3, 2)), "b": jnp.ones((4, 2))})
