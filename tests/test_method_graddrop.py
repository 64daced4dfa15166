"""GradDrop (Chen et al., NeurIPS 2020): per-coordinate sign dropout, Jacobian mode only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldro
from ldro import sign_dropout


def graddrop_numpy(leaves, uniforms, leak):
  """Algorithm 1 (lines 10-15) per coordinate, float64, on explicit arrays."""
  outs, kept, nonzero = [], 0.0, 0.0
  for g, u in zip(leaves, uniforms):
    g = np.asarray(g, np.float64)
    mass = np.abs(g).sum(0)
    P = 0.5 * (1 + np.divide(g.sum(0), mass, out=np.zeros_like(mass), where=mass > 0))
    M = ((P > u) & (g > 0)) | ((P < u) & (g < 0))
    mult = leak + (1 - leak) * M
    outs.append((mult * g).sum(0))
    axes = tuple(range(1, g.ndim))
    kept = kept + np.where(g != 0, mult, 0).sum(axes)
    nonzero = nonzero + (g != 0).sum(axes)
  return outs, kept / nonzero


@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_matches_numpy_with_the_same_uniform_draws(leak):
  rng = np.random.default_rng(0)
  n = 3
  grads = {"a": jnp.asarray(rng.normal(size=(n, 4, 5)), jnp.float32),
           "b": jnp.asarray(rng.normal(size=(n, 7)), jnp.float32)}
  key = jax.random.key(4)
  tx = ldro.graddrop(n, leak=leak, reduction="sum")
  params = jax.tree.map(lambda g: g[0], grads)
  out, state = jax.jit(lambda g, s: tx.update(g, s, params, key=key))(grads, tx.init(params))
  uniforms = ldro.sign_dropout.graddrop_uniforms(key, grads)
  want, kept = graddrop_numpy([grads["a"], grads["b"]],
                              [np.asarray(uniforms["a"]), np.asarray(uniforms["b"])], leak)
  np.testing.assert_allclose(out["a"], want[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out["b"], want[1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ldro.task_weights(state), kept, rtol=1e-6)


def test_agreeing_signs_give_the_sum():
  rng = np.random.default_rng(1)
  sign = np.where(rng.normal(size=(10,)) > 0, 1.0, -1.0)
  g = np.abs(rng.normal(size=(4, 10))) * sign  # same sign per coordinate in every task
  g[2, 3] = 0.0
  grads = {"w": jnp.asarray(g, jnp.float32)}
  params = {"w": jnp.zeros(10)}
  step = jax.jit(lambda g, s, k: ldro.graddrop(4, reduction="sum").update(g, s, params, key=k))
  for t in range(3):
    out, state = step(grads, ldro.graddrop(4).init(params), jax.random.key(t))
    np.testing.assert_allclose(out["w"], g.sum(0), rtol=1e-6)
    np.testing.assert_allclose(ldro.task_weights(state), np.ones(4))


def test_positive_sign_kept_with_probability_purity():
  # g_1 = +1, g_2 = -3 at every coordinate: P = 0.5 (1 - 2/4) = 0.25.
  d = 20000
  g = np.stack([np.ones(d), -3.0 * np.ones(d)])
  out, kept = jax.jit(sign_dropout.graddrop_aggregate)({"w": jnp.asarray(g, jnp.float32)},
                                                       jax.random.key(0))
  assert abs(float(kept[0]) - 0.25) < 0.015 and abs(float(kept[1]) - 0.75) < 0.015
  np.testing.assert_allclose(float(kept[0]) + float(kept[1]), 1.0, rtol=1e-6)  # one sign kept
  assert set(np.unique(np.asarray(out["w"]))) <= {1.0, -3.0}


def test_lean_mode_is_refused_with_a_clear_error():
  tx = ldro.graddrop(2, reduction="sum")
  params = {"w": jnp.ones(3)}
  losses_fn = lambda p: jnp.stack([jnp.sum(p["w"]), jnp.sum(p["w"] ** 2)])
  losses, vjp = jax.vjp(losses_fn, params)
  with pytest.raises(ValueError, match="graddrop needs the per-task gradients.*lean mode is not "
                     "supported.*GradDrop masks every coordinate"):
    tx.update(None, tx.init(params), params, task_losses=losses, task_vjp=vjp,
              key=jax.random.key(0))
  info = ldro.method_info("graddrop")
  assert info.modes == ("jacobian",) and info.needs == {"task_grads", "key"}
  assert info.preferred_mode == "jacobian"


def test_mean_reduction_mask_and_validation():
  rng = np.random.default_rng(2)
  g = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
  params = {"w": jnp.zeros(8)}
  key = jax.random.key(1)
  s_sum, s_mean = ldro.graddrop(3, reduction="sum"), ldro.graddrop(3)  # default: mean
  u_sum, st_sum = s_sum.update({"w": g}, s_sum.init(params), params, key=key)
  u_mean, st_mean = s_mean.update({"w": g}, s_mean.init(params), params, key=key)
  np.testing.assert_allclose(u_mean["w"], u_sum["w"] / 3, rtol=1e-6)
  np.testing.assert_allclose(ldro.task_weights(st_mean), ldro.task_weights(st_sum) / 3,
                             rtol=1e-6)
  # An absent task is a zero gradient: it gets 0 and does not change the others' purity.
  mask = jnp.array([True, False, True])
  u_m, st_m = s_sum.update({"w": g}, s_sum.init(params), params, key=key, task_mask=mask)
  u_z, st_z = s_sum.update({"w": g.at[1].set(0.0)}, s_sum.init(params), params, key=key)
  np.testing.assert_allclose(u_m["w"], u_z["w"])
  assert float(ldro.task_weights(st_m)[1]) == 0.0
  with pytest.raises(ValueError, match="leak must be in"):
    ldro.graddrop(3, leak=2.0)
  with pytest.raises(ValueError, match="unknown reduction"):
    ldro.graddrop(3, reduction="max")
