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


def test_max_pool_2x2_ties_and_vmap_match_flax_grads():
  # Many ties (ReLU zeros, a few quantised values): the cotangent must go to
  # the first maximal element of each window, as select_and_scatter does.
  x = jnp.round(jax.random.normal(jax.random.key(2), (3, 4, 6, 6, 5)))
  x = jnp.maximum(x, 0.0).at[0, 0].set(1.0)  # a whole image of equal values
  cot = jax.random.normal(jax.random.key(3), (3, 4, 3, 3, 5))

  def grad(pool):
    def one(x, c):
      return jax.grad(lambda x: jnp.sum(pool(x) * c))(x)
    return jax.jit(jax.vmap(one))(x, cot)

  ref = grad(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)))
  np.testing.assert_array_equal(grad(cnn.max_pool_2x2), ref)
  # Each window passes its cotangent exactly once (no tie splitting).
  np.testing.assert_allclose(grad(cnn.max_pool_2x2).reshape(3, 4, 3, 2, 3, 2, 5).sum((3, 5)),
                             cot, rtol=1e-6)


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


@pytest.mark.parametrize("cin,kernel_size", [(3, (3, 3)), (5, (3, 3)), (8, (3, 5))])
def test_same_conv_matches_flax_conv_values_and_gradients_everywhere(cin, kernel_size):
  # cnn.SameConv (custom VJP: im2col for few input channels, canonical
  # convolutions otherwise) == nn.Conv: same init, values, gradients, per-task
  # gradients (vmap), jacrev, and gradients inside lax.cond / fori_loop.
  x = jax.random.normal(jax.random.key(0), (4, 8, 6, cin))
  ref, new = nn.Conv(7, kernel_size, padding="SAME"), cnn.SameConv(7, kernel_size)
  # Jitted: op-by-op (eager) execution compiles every primitive on its own.
  p_ref, p_new = jax.jit(ref.init)(jax.random.key(1), x), jax.jit(new.init)(jax.random.key(1), x)
  for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_new)):
    np.testing.assert_array_equal(a, b)
  p = jax.tree.map(lambda t: t + 0.1, p_ref)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  close = lambda a, b: jax.tree.map(
      lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4), a, b)
  close(jax.jit(ref.apply)(p, x), jax.jit(new.apply)(p, x))
  for m_grad in (lambda m: jax.grad(loss(m), argnums=(0, 1))(p, x),
                 lambda m: jax.vmap(jax.grad(loss(m)), in_axes=(None, 0))(p, x.reshape(2, 2, 8, 6, cin)),
                 lambda m: jax.jacrev(lambda p: jnp.sin(m.apply(p, x)).sum((1, 2, 3)))(p),
                 lambda m: jax.lax.cond(True, lambda: jax.grad(loss(m))(p, x),
                                        lambda: jax.tree.map(jnp.zeros_like, p)),
                 lambda m: jax.lax.fori_loop(0, 1, lambda i, acc: jax.grad(loss(m))(p, x),
                                             jax.tree.map(jnp.zeros_like, p))):
    close(jax.jit(lambda: m_grad(ref))(), jax.jit(lambda: m_grad(new))())


def test_conv_impl_auto_picks_the_cpu_kernels_only_on_cpu():
  assert cnn.resolve_conv_impl("auto", "cpu") == "custom_vjp"
  assert cnn.resolve_conv_impl("auto", "gpu") == "xla"
  assert cnn.resolve_conv_impl("auto", "tpu") == "xla"
  assert cnn.resolve_conv_impl("xla", "cpu") == "xla"
  assert cnn.resolve_conv_impl("auto") == ("custom_vjp" if jax.default_backend() == "cpu"
                                           else "xla")
  with pytest.raises(ValueError, match="conv_impl must be one of"):
    cnn.resolve_conv_impl("cudnn")
  with pytest.raises(ValueError, match="conv_impl must be one of"):
    cnn.ConvNet(num_classes=3, num_conv=1, conv_impl="fast").init(
        jax.random.key(0), jnp.zeros((1, 4, 4, 3)))


def test_conv_impls_share_parameters_values_and_gradients():
  # The XLA path (nn.max_pool, lax.conv) and the custom-VJP path are one model:
  # same parameter tree and initial values, same logits, same (per-task) gradients.
  kw = dict(num_classes=6, features=8, num_conv=2, mlp_width=16, mlp_layers=1)
  xla, custom = cnn.ConvNet(conv_impl="xla", **kw), cnn.ConvNet(conv_impl="custom_vjp", **kw)
  x = jax.random.normal(jax.random.key(0), (4, 3, 8, 8, 3))
  # Jitted: op-by-op (eager) execution compiles every primitive on its own.
  p_xla = jax.jit(xla.init)(jax.random.key(1), x[0])
  p_custom = jax.jit(custom.init)(jax.random.key(1), x[0])
  assert jax.tree.structure(p_xla) == jax.tree.structure(p_custom)
  jax.tree.map(np.testing.assert_array_equal, p_xla, p_custom)
  loss = lambda m: lambda p, xi: jnp.sum(jax.nn.log_softmax(m.apply(p, xi))[:, 0])
  close = lambda a, b: jax.tree.map(
      lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-4, atol=2e-5), a, b)
  close(jax.jit(xla.apply)(p_xla, x[0]), jax.jit(custom.apply)(p_xla, x[0]))
  per_task = lambda m: jax.jit(jax.vmap(jax.grad(loss(m)), in_axes=(None, 0)))(p_xla, x)
  close(per_task(xla), per_task(custom))
