"""Tests for ldro.models.cnn."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ldro.models import cnn


def _num_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (3, 8, 6, 5), (1, 7, 9, 2)])
def test_max_pool_2x2_matches_flax_values_and_grads(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  cot = jax.random.normal(jax.random.key(1),
                          (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))

  def ref(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))

  @jax.jit
  def values_and_grads(x):
    grad = jax.grad(lambda x: jnp.sum(cnn.max_pool_2x2(x) * cot))(x)
    grad_ref = jax.grad(lambda x: jnp.sum(ref(x) * cot))(x)
    return cnn.max_pool_2x2(x), ref(x), grad, grad_ref

  out, out_ref, grad, grad_ref = values_and_grads(x)
  assert out.shape == out_ref.shape
  np.testing.assert_array_equal(out, out_ref)
  np.testing.assert_array_equal(grad, grad_ref)


def test_max_pool_2x2_rejects_non_nhwc():
  with pytest.raises(ValueError):
    cnn.max_pool_2x2(jnp.zeros((4, 4, 3)))


@pytest.mark.parametrize("cls,expected_params", [
    # conv: 3*3*3*32+32 + 3*(3*3*32*32+32); mlp: 32*128+128 + 2*(128*128+128);
    # head: 128*100+100.
    (cnn.SmallCNN, 896 + 3 * 9248 + 4224 + 2 * 16512 + 12900),
    # conv: 3*3*3*160+160 + 2*(3*3*160*160+160); mlp: 160*320+320 + 320*320+320;
    # head: 320*100+100.
    (cnn.LargeCNN, 4480 + 2 * 230560 + 51520 + 102720 + 32100),
])
def test_shapes_and_param_counts(cls, expected_params):
  model = cls(num_classes=100)
  x = jnp.zeros((5, 32, 32, 3))
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  assert _num_params(params) == expected_params
  logits = jax.eval_shape(model.apply, params, x)
  assert logits.shape == (5, 100)
  assert logits.dtype == jnp.float32
  names = set(params["params"])
  assert {"head", "conv_0", "dense_0"} <= names
  assert len([n for n in names if n.startswith("conv_")]) == model.num_conv
  assert len([n for n in names if n.startswith("dense_")]) == model.mlp_layers


def test_small_and_large_defaults():
  small, large = cnn.SmallCNN(10), cnn.LargeCNN(10)
  assert (small.features, small.num_conv, small.mlp_width,
          small.mlp_layers) == (32, 4, 128, 3)
  assert (large.features, large.num_conv, large.mlp_width,
          large.mlp_layers) == (160, 3, 320, 2)
  assert isinstance(small, nn.Module) and isinstance(large, cnn.ConvNet)


def test_configurable_and_bfloat16():
  model = cnn.ConvNet(num_classes=7, features=8, num_conv=2, mlp_width=16,
                      mlp_layers=1, dtype=jnp.bfloat16)
  x = jnp.ones((2, 16, 16, 3))
  # Shapes/dtypes only: bfloat16 convolutions are slow on CPU.
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  out = jax.eval_shape(model.apply, params, x)
  assert out.shape == (2, 7) and out.dtype == jnp.bfloat16


def test_jitted_train_step_decreases_loss_and_vmaps_over_tasks():
  model = cnn.SmallCNN(num_classes=10)
  x = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
  y = jnp.arange(16) % 10
  params = jax.jit(model.init)(jax.random.key(1), x[:1])
  tx = optax.sgd(0.05, momentum=0.9)
  opt_state = tx.init(params)

  def loss_fn(p):
    logits = model.apply(p, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  losses = []
  for _ in range(10):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  assert losses[-1] < losses[0]

  # Callers vmap over a leading task axis: [N, b, H, W, C] -> [N, b, classes].
  xt = x.reshape(4, 4, 32, 32, 3)
  out = jax.jit(jax.vmap(lambda xi: model.apply(params, xi)))(xt)
  np.testing.assert_allclose(out.reshape(16, 10),
                             jax.jit(model.apply)(params, x),
                             rtol=1e-5, atol=1e-5)
