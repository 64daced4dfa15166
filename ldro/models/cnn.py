"""Convolutional networks for the multitask CIFAR experiments.

Two architectures from the paper (Lookahead-DRO, Section 5.1 and Appendix B.3):

* `SmallCNN` (Section 5.1): 4 x [Conv(32, 3x3) -> ReLU -> MaxPool(2x2)],
  spatial average, 3 x [Dense(128) -> ReLU], shared Dense(num_classes) head.
* `LargeCNN` (Appendix B.3): 3 x [Conv(160, 3x3) -> ReLU -> MaxPool(2x2)],
  spatial average, 2 x [Dense(320) -> ReLU], shared Dense(num_classes) head.

Both are instances of the configurable `ConvNet`. The output layer is a single
softmax over *all* classes shared by every task; per-task restriction of the
logits (if any) is the caller's business.

With ``rotograd=True`` the ConvNet runs its trunk (convolutions and MLP, up to
the shared ``head``), then RotoGrad's per-task rotations
(:class:`ldro.rotograd.TaskRotations`, Javaloy & Valera, ICLR 2022), then the
head: task ``k``'s examples reach the head as ``R_k z``.

Parameter tree (names are stable and may be relied upon)::

    {'conv_0': {'kernel', 'bias'}, ..., 'conv_{num_conv-1}': ...,
     'dense_0': {'kernel', 'bias'}, ..., 'dense_{mlp_layers-1}': ...,
     'head': {'kernel', 'bias'}}

plus, with ``rotograd=True``, ``'rotograd': {'rotograd_generators' [N, d, d],
'rotograd_reference_norms' [N]}`` (``d = mlp_width``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldro import rotograd as rotograd_lib

__all__ = ["max_pool_2x2", "conv_same", "SameConv", "ConvNet", "SmallCNN", "LargeCNN",
           "CONV_IMPLS", "resolve_conv_impl", "fast_backward_under_cond"]

#: ``conv_impl`` values of :class:`SameConv` / :class:`ConvNet`.
CONV_IMPLS = ("auto", "custom_vjp", "xla")


def resolve_conv_impl(conv_impl: str, backend: str | None = None) -> str:
  """The convolution/pooling implementation ``conv_impl`` stands for.

  ``'custom_vjp'``: :func:`conv_same` and :func:`max_pool_2x2`, whose
  gradients were written and measured for XLA:CPU (``results/benchmark``).
  ``'xla'``: ``lax.conv_general_dilated`` and ``nn.max_pool`` with XLA's own
  gradients (cuDNN / the TPU compiler's kernels). ``'auto'``: ``'custom_vjp'``
  on the CPU backend, ``'xla'`` on GPU and TPU, where the CPU workarounds were
  never measured. All three give the same parameters and, up to float
  round-off, the same values and gradients.

  Args:
    conv_impl: one of :data:`CONV_IMPLS`.
    backend: the JAX backend (default ``jax.default_backend()``).

  Returns:
    ``'custom_vjp'`` or ``'xla'``.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}.")
  if conv_impl != "auto":
    return conv_impl
  return "custom_vjp" if (backend or jax.default_backend()) == "cpu" else "xla"


def fast_backward_under_cond(conv_impl: str, backend: str | None = None) -> bool:
  """Whether the CNN's backward pass keeps its speed inside ``lax.cond`` on CPU.

  True for the custom VJPs (:func:`conv_same`, :func:`max_pool_2x2`), whose
  gradients are convolutions XLA:CPU runs with its fast kernels in every
  context; False for XLA's own convolution gradients, which XLA:CPU runs with
  its naive emitter inside ``lax.cond`` (an L-DRO step x30 slower,
  ``results/benchmark``). What ``ldro.train.make_train_step``'s
  ``reuse_refresh_grads`` needs to know on CPU.

  Args:
    conv_impl: one of :data:`CONV_IMPLS`.
    backend: the JAX backend (default ``jax.default_backend()``).
  """
  return resolve_conv_impl(conv_impl, backend) == "custom_vjp"

_DN = ("NHWC", "HWIO", "NHWC")


def _canonical_conv(x: jax.Array, k: jax.Array, padding) -> jax.Array:
  return jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=_DN)


#: Below this many kernel taps ``kh * kw * C`` (e.g. the first layer, C = 3) the
#: kernel gradient is one matmul on im2col patches rather than a convolution.
_IM2COL_MAX_TAPS = 64
_IM2COL_FWD_MAX_TAPS = 64


def _patches(x: jax.Array, kh: int, kw: int) -> jax.Array:
  """``[B, H, W, kh * kw * C]`` SAME-padded patches, ordered ``(i, j, c)``."""
  h, w = x.shape[1], x.shape[2]
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  return jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)],
                         axis=-1)


def _patches_t(x: jax.Array, kh: int, kw: int) -> jax.Array:
  """Patches laid out ``[..., kh * kw * C, B * H * W]`` for ``x [..., B, H, W, C]``.

  Built from the (small, channel-first) transposed input, so that the kernel
  gradient ``patches_t @ g`` is a plain matmul with no large transpose.
  """
  lead, (b, h, w, c) = x.shape[:-4], x.shape[-4:]
  xt = jnp.moveaxis(x, -1, -4)  # [..., C, B, H, W]
  pad = [(0, 0)] * (xt.ndim - 2) + [(kh // 2, kh // 2), (kw // 2, kw // 2)]
  xt = jnp.pad(xt, pad)
  planes = [xt[..., i:i + h, j:j + w] for i in range(kh) for j in range(kw)]
  return jnp.stack(planes, axis=-5).reshape(lead + (kh * kw * c, b * h * w))


@functools.lru_cache(maxsize=None)
def _kernel_grad_fn(kh: int, kw: int):
  """``dk[i, j, c, o] = sum_{b,y,x} xpad[b, y+i, x+j, c] g[b, y, x, o]`` for a SAME conv.

  Unbatched, it is one convolution already in XLA:CPU's canonical (Eigen)
  form: batch = input channels, features = examples, window = the image.
  (XLA's own kernel-gradient convolution only gets this form from a
  canonicalisation pass that does not reach convolutions nested inside
  ``lax.cond`` / ``while`` bodies, where the naive emitter is ~100x slower.)
  Batched by ``vmap`` over tasks (per-task gradients), it is one batched
  matmul over shifted copies of x and g (no transposes), instead of the
  grouped convolution ``vmap`` would make.
  With few input channels (the first layer) it is a matmul on im2col patches.
  """
  ph, pw = kh // 2, kw // 2

  @jax.custom_batching.custom_vmap
  def kernel_grad(x, g):
    c, o = x.shape[-1], g.shape[-1]
    if kh * kw * c <= _IM2COL_MAX_TAPS:
      return (_patches_t(x, kh, kw) @ g.reshape(-1, o)).reshape(kh, kw, c, o)
    lhs = jnp.transpose(x, (3, 1, 2, 0))  # [c, H, W, b]
    rhs = jnp.transpose(g, (1, 2, 0, 3))  # [H, W, b, o]
    out = _canonical_conv(lhs, rhs, ((ph, ph), (pw, pw)))  # [c, kh, kw, o]
    return jnp.transpose(out, (1, 2, 0, 3))

  @kernel_grad.def_vmap
  def kernel_grad_vmap(axis_size, in_batched, x, g):
    x_batched, g_batched = in_batched
    n, c, o = axis_size, x.shape[-1], g.shape[-1]
    small = kh * kw * c <= _IM2COL_MAX_TAPS
    if not x_batched:  # e.g. jacrev: one forward, many cotangents
      if small:
        out = jnp.einsum("kp,npo->nko", _patches_t(x, kh, kw), g.reshape(n, -1, o))
        return out.reshape(n, kh, kw, c, o), True
      b, h, w = g.shape[1:4]  # one wider canonical conv: features (n, o)
      rhs = jnp.transpose(g, (2, 3, 1, 0, 4)).reshape(h, w, b, n * o)
      out = _canonical_conv(jnp.transpose(x, (3, 1, 2, 0)), rhs, ((ph, ph), (pw, pw)))
      return jnp.transpose(out.reshape(c, kh, kw, n, o), (3, 1, 2, 0, 4)), True
    if not g_batched:
      g = jnp.broadcast_to(g, (axis_size,) + g.shape)
    if small:
      out = jnp.matmul(_patches_t(x, kh, kw), g.reshape(n, -1, o))
      return out.reshape(n, kh, kw, c, o), True
    # One batched matmul for all taps, with no transposes: the kw column
    # shifts of x stacked on the channel axis, the kh row shifts of g stacked
    # on its channel axis, contracted over (b, rows, columns):
    # out[n, (j, c), (i, o)] = sum xpad[n, b, y, x + j, c] gpad_i[n, b, y, x, o]
    # with gpad_i[y] = g[y - i] (zero outside), i.e. dk[n, i, j, c, o].
    b, h, w = x.shape[1:4]
    xp = jnp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw), (0, 0)))  # [n, b, h+2ph, w+2pw, c]
    xs = jnp.concatenate([xp[:, :, :, j:j + w] for j in range(kw)], axis=-1)
    gs = jnp.concatenate([jnp.pad(g, ((0, 0), (0, 0), (i, kh - 1 - i), (0, 0), (0, 0)))
                          for i in range(kh)], axis=-1)  # [n, b, h+2ph, w, kh * o]
    out = jax.lax.dot_general(xs.reshape(n, -1, kw * c), gs.reshape(n, -1, kh * o),
                              (((1,), (1,)), ((0,), (0,))))  # [n, kw * c, kh * o]
    out = jnp.transpose(out.reshape(n, kw, c, kh, o), (0, 3, 1, 2, 4))
    return out, True  # [n, kh, kw, c, o]

  return kernel_grad


@jax.custom_vjp
def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 ``'SAME'`` convolution (NHWC, HWIO, odd kernel) with a CPU-friendly VJP.

  Forward: ``lax.conv_general_dilated`` (as ``flax.linen.Conv``), or, with
  few input channels (``kh * kw * C <= 64``, the first layer on RGB images),
  one matmul on im2col patches (equal up to float round-off; XLA:CPU's
  convolution is slow for 3 input channels).
  Backward: the input gradient as a forward-form convolution with the
  flipped kernel, the kernel gradient as in :func:`_kernel_grad_fn`. Both are
  convolutions XLA:CPU runs with its fast kernels in every context (top
  level, ``lax.cond`` branches, loop bodies) and the per-task kernel gradients
  of ``vmap(grad)`` become batched matmuls. Gradients equal XLA's up to float
  round-off. (First-order only: no JVP of the VJP.)

  Args:
    x: ``[B, H, W, C]``.
    kernel: ``[kh, kw, C, O]`` with odd ``kh``, ``kw``.

  Returns:
    ``[B, H, W, O]``.
  """
  kh, kw, c, o = kernel.shape
  if kh * kw * c <= _IM2COL_FWD_MAX_TAPS:  # few input channels: one matmul on patches
    return jnp.dot(_patches(x, kh, kw), kernel.reshape(kh * kw * c, o))
  return _canonical_conv(x, kernel, ((kh // 2, kh // 2), (kw // 2, kw // 2)))


def _conv_same_fwd(x, kernel):
  return conv_same(x, kernel), (x, kernel)


def _conv_same_bwd(res, g):
  x, kernel = res
  kh, kw = kernel.shape[:2]
  flipped = jnp.swapaxes(jnp.flip(kernel, (0, 1)), 2, 3)  # [kh, kw, O, C]
  dx = _canonical_conv(g, flipped, ((kh // 2, kh // 2), (kw // 2, kw // 2)))
  dk = _kernel_grad_fn(kh, kw)(x, g)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


class SameConv(nn.Module):
  """``flax.linen.Conv(features, kernel_size, padding='SAME')`` on :func:`conv_same`.

  Same parameters (``kernel [kh, kw, C, features]`` with LeCun-normal init,
  ``bias`` zeros), so the same initial values as ``nn.Conv`` under the same
  name, and the same forward values; a faster backward pass on CPU.

  With ``pool_2x2`` the output is ``max_pool_2x2(conv(x)) + bias``, which is
  exactly ``max_pool_2x2(conv(x) + bias)`` (adding a per-channel constant
  commutes with the max), with the bias add on the 4x smaller tensor.

  Attributes:
    features: output channels.
    kernel_size: odd ``(kh, kw)``.
    dtype: computation dtype (parameters are float32).
    pool_2x2: apply :func:`max_pool_2x2` before the bias.
    conv_impl: ``'auto'`` (default: the custom VJPs on CPU, XLA's own
      convolution and ``nn.max_pool`` on GPU/TPU), ``'custom_vjp'`` or
      ``'xla'``; see :func:`resolve_conv_impl`.
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  dtype: Any = jnp.float32
  pool_2x2: bool = False
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
      raise ValueError(f"SameConv needs an odd kernel size, got {self.kernel_size}.")
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (kh, kw, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if resolve_conv_impl(self.conv_impl) == "xla":
      y = _canonical_conv(x, kernel, ((kh // 2, kh // 2), (kw // 2, kw // 2)))
      if self.pool_2x2:
        y = nn.max_pool(y, (2, 2), strides=(2, 2))
      return y + bias
    y = conv_same(x, kernel)
    if self.pool_2x2:
      y = max_pool_2x2(y)
    return y + bias


def _pool_windows(x: jax.Array) -> jax.Array:
  """``[B, H, W, C]`` -> ``[B, H // 2, 2, W // 2, 2, C]`` (odd trailing row/column dropped)."""
  b, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  return x[:, : 2 * h2, : 2 * w2, :].reshape(b, h2, 2, w2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 on NHWC inputs, with a one-pass gradient.

  Values and gradients are identical to
  ``flax.linen.max_pool(x, (2, 2), strides=(2, 2))`` (VALID padding: an odd
  trailing row/column is dropped), ties included: the cotangent of a window
  goes to its *first* maximal element in row-major order, as XLA's
  ``select_and_scatter`` (the gradient of ``reduce_window``) routes it.

  Why not ``nn.max_pool``: on CPU ``select_and_scatter`` is several times
  slower than an elementwise pass. Why not a plain ``reshape + max``: its
  autodiff gradient (``eq`` mask, tie counts, divide) takes ~4 passes over
  the input and splits ties. Here the forward is a reshape + max and the
  backward one fused elementwise pass ``dx = g * [x is the first max]``
  (x7 faster than the ``reshape + max`` gradient on the first layer of the
  small CNN). The gradient is first-order only (no JVP of the VJP).

  Args:
    x: Array of shape [B, H, W, C].

  Returns:
    Array of shape [B, H // 2, W // 2, C].
  """
  if x.ndim != 4:
    raise ValueError(f"max_pool_2x2 expects [B, H, W, C], got shape {x.shape}.")
  return _pool_windows(x).max(axis=(2, 4))


def _max_pool_2x2_fwd(x):
  y = max_pool_2x2(x)
  return y, (x, y)


def _max_pool_2x2_bwd(res, g):
  x, y = res
  eq = _pool_windows(x) == y[:, :, None, :, None, :]
  e00, e01, e10 = eq[:, :, 0, :, 0], eq[:, :, 0, :, 1], eq[:, :, 1, :, 0]
  # First maximal element of each window in row-major order (00, 01, 10, 11);
  # the last one takes the cotangent when none of the first three is maximal
  # (which also sends a NaN window's cotangent somewhere, as select_and_scatter).
  first = jnp.stack([jnp.stack([e00, e01 & ~e00], axis=3),
                     jnp.stack([e10 & ~(e00 | e01), ~(e00 | e01 | e10)], axis=3)], axis=2)
  dx = jnp.where(first, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
  b, h2, _, w2, _, c = dx.shape
  dx = dx.reshape(b, 2 * h2, 2 * w2, c)
  if dx.shape != x.shape:  # odd H or W: the dropped row/column gets no gradient
    dx = jnp.pad(dx, ((0, 0), (0, x.shape[1] - 2 * h2), (0, x.shape[2] - 2 * w2), (0, 0)))
  return (dx,)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


class ConvNet(nn.Module):
  """Conv -> ReLU -> 2x2 max-pool stack, spatial mean, ReLU MLP, linear head.

  Attributes:
    num_classes: Number of output logits (all classes of all tasks).
    features: Number of 3x3 filters of every conv layer.
    num_conv: Number of conv blocks; each halves the spatial resolution.
    mlp_width: Width of every hidden Dense layer.
    mlp_layers: Number of hidden Dense + ReLU layers before the head.
    dtype: Computation dtype (parameters are always float32).
    conv_impl: convolution and pooling kernels, ``'auto'`` (the CPU-tuned
      custom VJPs on CPU, XLA's own ops on GPU/TPU), ``'custom_vjp'`` or
      ``'xla'`` (see :func:`resolve_conv_impl`); parameters are the same.
    rotograd: put RotoGrad's per-task rotations
      (:class:`ldro.rotograd.TaskRotations`, named ``'rotograd'``) between
      the trunk and the head; the model then needs to know each example's
      task (a task-grouped input, or ``tasks``).
    num_tasks: ``N``, the number of rotations (``rotograd`` only).
  """

  num_classes: int
  features: int = 32
  num_conv: int = 4
  mlp_width: int = 128
  mlp_layers: int = 3
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  rotograd: bool = False
  num_tasks: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               tasks: jax.Array | None = None) -> jax.Array:
    """Computes logits: trunk, RotoGrad's rotations (if ``rotograd``), head.

    Args:
      x: Float images of shape [B, H, W, C] (e.g. [B, 32, 32, 3]), already
        normalised, or a task-grouped [N, b, H, W, C] (row block ``k`` is
        task ``k``'s; the trunk runs once on the ``N * b`` images). H and W
        must be >= 2**num_conv.
      train: Unused (the model has no dropout / batch norm); kept so that all
        models share the `(x, train)` calling convention.
      tasks: with ``rotograd`` and [B, H, W, C] images: the [B] int task id
        of every image (evaluation: rotations without RotoGrad's backward
        pass). Ignored without ``rotograd``.

    Returns:
      Logits of shape [B, num_classes] (or [N, b, num_classes]) in `dtype`.

    Raises:
      ValueError: images of another rank; with ``rotograd``, [B, H, W, C]
        images without ``tasks`` or a grouped input whose N is not
        ``num_tasks``.
    """
    del train
    if x.ndim not in (4, 5):
      raise ValueError(f"Expected images of shape [B, H, W, C] (or task-grouped "
                       f"[N, b, H, W, C]), got {x.shape}.")
    lead = x.shape[:-3]
    if self.rotograd and len(lead) == 1 and tasks is None:
      raise ValueError("ConvNet(rotograd=True) needs each image's task: a task-grouped input "
                       "[N, b, H, W, C], or tasks [B] with [B, H, W, C] images.")
    x = x.reshape((-1,) + x.shape[-3:]).astype(self.dtype)
    for i in range(self.num_conv):
      # relu(max_pool(conv(x)) + b) == max_pool(relu(conv(x) + b)) exactly (the
      # max commutes with the bias add and the monotone relu), with the bias
      # and relu on the pooled tensor; gradients agree too (a window whose max
      # is <= 0 passes no gradient either way).
      x = nn.relu(SameConv(self.features, (3, 3), dtype=self.dtype, pool_2x2=True,
                           conv_impl=self.conv_impl, name=f"conv_{i}")(x))
    x = jnp.mean(x, axis=(1, 2))
    for i in range(self.mlp_layers):
      x = nn.relu(nn.Dense(self.mlp_width, dtype=self.dtype,
                           name=f"dense_{i}")(x))
    # x: the trunk's representation z [N * b, d] (or [B, d]).
    if self.rotograd:
      rotations = rotograd_lib.TaskRotations(self.num_tasks, name="rotograd")
      if len(lead) == 2:
        x = rotations(x.reshape(lead + x.shape[-1:])).reshape(x.shape)
      else:
        x = rotations(x, tasks)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return x.reshape(lead + x.shape[-1:])


class SmallCNN(ConvNet):
  """The small CNN of Section 5.1 (4 conv layers of 32, MLP 3 x 128).

  Attributes: as `ConvNet`, with defaults features=32, num_conv=4,
  mlp_width=128, mlp_layers=3.
  """

  features: int = 32
  num_conv: int = 4
  mlp_width: int = 128
  mlp_layers: int = 3


class LargeCNN(ConvNet):
  """The larger CNN of Appendix B.3 (3 conv layers of 160, MLP 2 x 320).

  Attributes: as `ConvNet`, with defaults features=160, num_conv=3,
  mlp_width=320, mlp_layers=2.
  """

  features: int = 160
  num_conv: int = 3
  mlp_width: int = 320
  mlp_layers: int = 2
