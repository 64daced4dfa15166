"""ldro.combine: a loss weighting followed by a gradient method (RLW paper, Table 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ldro
from experiments.runner import configurables

G = np.array([[1.0, 0.0], [-1.0, 1.0], [0.5, -2.0]])
LOSSES = jnp.array([1.0, 3.0, 2.0])


def pcgrad_numpy(g, perms):
  out = np.zeros(g.shape[1])
  for i in range(len(g)):
    gi = g[i].copy()
    for j in perms[i]:
      if j != i and gi @ g[j] < 0:
        gi -= (gi @ g[j]) / (g[j] @ g[j]) * g[j]
    out += gi
  return out


def test_static_mixing_then_pcgrad_is_pcgrad_on_weighted_gradients():
  sizes, alpha = [1.0, 4.0, 16.0], 0.5
  lam = ldro.mixing_weights(sizes, alpha)
  tx = ldro.combine(ldro.static_mixing(sizes, alpha), ldro.pcgrad(3, reduction="sum"))
  key = jax.random.key(4)
  state = tx.init(None)
  upd, state = jax.jit(lambda s: tx.update({"w": jnp.asarray(G, jnp.float32)}, s, None, key=key,
                                           task_losses=LOSSES))(state)
  # The gradient part draws its projection orders from fold_in(key, 1).
  k = jax.random.fold_in(key, 1)
  perms = np.asarray(jax.vmap(lambda kk: jax.random.permutation(kk, 3))(jax.random.split(k, 3)))
  # The loss weights are rescaled to mean one (N lambda) before the gradient method.
  np.testing.assert_allclose(upd["w"], pcgrad_numpy(3 * lam[:, None] * G, perms), rtol=1e-5)
  # The reported coefficients give the update on the unweighted gradients.
  np.testing.assert_allclose(np.asarray(ldro.task_weights(state)) @ G, upd["w"], rtol=1e-5)
  np.testing.assert_allclose(state.method_state.loss_weights, lam, rtol=1e-6)


def test_rlw_then_ldro_in_lean_mode_matches_jacobian_mode():
  A = jnp.asarray(G, jnp.float32)
  losses_fn = lambda p: 0.5 * (A @ p["w"]) ** 2 + jnp.arange(3.0)
  theta = {"w": jnp.array([0.3, -0.7])}
  tx = ldro.combine(ldro.random_loss_weighting(3), ldro.ldro_weights(3, 0.1, 0.5, update_every=2))
  s_jac, s_lean = tx.init(theta), tx.init(theta)

  # Jitted, compiled once for the three steps: op-by-op (eager) execution compiles every
  # primitive of the updates on its own.
  @jax.jit
  def step(theta, s_jac, s_lean, key):
    J = jax.jacrev(losses_fn)(theta)
    u_jac, s_jac = tx.update(J, s_jac, theta, task_losses=losses_fn(theta), key=key)
    losses, vjp = jax.vjp(losses_fn, theta)
    u_lean, s_lean = tx.update(None, s_lean, theta, task_losses=losses, key=key, task_vjp=vjp,
                               gram_fn=lambda J=J: ldro.task_gram(J))
    return u_jac, s_jac, u_lean, s_lean

  for t in range(3):
    key = jax.random.key(t)
    u_jac, s_jac, u_lean, s_lean = step(theta, s_jac, s_lean, key)
    np.testing.assert_allclose(u_lean["w"], u_jac["w"], rtol=1e-5, atol=1e-7)
    theta = optax.apply_updates(theta, jax.tree.map(lambda u: -0.1 * u, u_jac))
  w = ldro.task_weights(s_jac)
  lam = s_jac.method_state.loss_weights
  np.testing.assert_allclose(w, 3 * lam * s_jac.method_state.gradient_coefficients, rtol=1e-6)


def test_combination_errors_name_the_problem():
  with pytest.raises(ValueError, match="must be a loss weighting"):
    ldro.combine(ldro.pcgrad(3), ldro.pcgrad(3))
  with pytest.raises(ValueError, match="different numbers of tasks"):
    ldro.combine(ldro.random_loss_weighting(2), ldro.pcgrad(3))
  with pytest.raises(TypeError, match="task-weighting transformations"):
    ldro.combine(optax.sgd(0.1), ldro.pcgrad(3))
  tx = ldro.combine(ldro.random_gradient_weighting(3), ldro.equal_weighting(3))
  with pytest.raises(ValueError, match="Jacobian mode"):
    tx.update(None, tx.init(None), None, key=jax.random.key(0), task_vjp=lambda w: w)


def test_one_gin_binding_combines():
  tx = configurables.method(num_tasks=3, name="pcgrad", loss_weighting="rlw")
  state = tx.init(None)
  _, state = tx.update({"w": jnp.asarray(G, jnp.float32)}, state, None, key=jax.random.key(0))
  assert state.method_state.loss_weights.shape == (3,)
  with pytest.raises(ValueError, match=r"unknown method 'rlww' in the config \(method.loss_weighting"):
    configurables.method(num_tasks=3, name="pcgrad", loss_weighting="rlww")


def test_equal_loss_weights_leave_the_gradient_method_alone():
  # combine rescales the loss weights to mean one: with equal weights it is the method itself.
  g = {"w": jnp.asarray(G, jnp.float32)}
  for gm in (lambda: ldro.cagrad(3), lambda: ldro.mgda(3)):
    alone, combined = gm(), ldro.combine(ldro.equal_weighting(3), gm())
    # Jitted: op-by-op (eager) execution compiles every primitive of the update on its own.
    u1, s1 = jax.jit(lambda g, l: alone.update(g, alone.init(None), None, task_losses=l))(
        g, LOSSES)
    u2, s2 = jax.jit(lambda g, l: combined.update(g, combined.init(None), None,
                                                  task_losses=l))(g, LOSSES)
    np.testing.assert_allclose(u2["w"], u1["w"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ldro.task_weights(s2), ldro.task_weights(s1), rtol=1e-5)
