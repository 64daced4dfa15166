"""Convolutional networks for the multitask CIFAR experiments.

Two architectures from the paper (Lookahead-DRO, Section 5.1 and Appendix B.3):

* `SmallCNN` (Section 5.1): 4 x [Conv(32, 3x3) -> ReLU -> MaxPool(2x2)],
  spatial average, 3 x [Dense(128) -> ReLU], shared Dense(num_classes) head.
* `LargeCNN` (Appendix B.3): 3 x [Conv(160, 3x3) -> ReLU -> MaxPool(2x2)],
  spatial average, 2 x [Dense(320) -> ReLU], shared Dense(num_classes) head.

Both are instances of the configurable `ConvNet`. The output layer is a single
softmax over *all* classes shared by every task; per-task restriction of the
logits (if any) is the caller's business.

Parameter tree (names are stable and may be relied upon)::

    {'conv_0': {'kernel', 'bias'}, ..., 'conv_{num_conv-1}': ...,
     'dense_0': {'kernel', 'bias'}, ..., 'dense_{mlp_layers-1}': ...,
     'head': {'kernel', 'bias'}}
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["max_pool_2x2", "ConvNet", "SmallCNN", "LargeCNN"]


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 on NHWC inputs, via reshape + max.

  Numerically identical to `flax.linen.max_pool(x, (2, 2), strides=(2, 2))`
  (VALID padding): an odd trailing row/column is dropped. It is written as a
  reshape followed by a reduction because the gradient of `lax.reduce_window`
  lowers to `select_and_scatter`, which is several times slower on CPU.

  Gradients agree with `nn.max_pool` whenever each 2x2 window has a unique
  maximum. On ties, `nn.max_pool` routes the whole cotangent to one element
  while this function splits it equally among the tied elements. In the CNNs
  below ties essentially only occur between ReLU zeros, whose incoming
  gradient is multiplied by relu'(0) = 0 anyway, so parameter gradients agree.

  Args:
    x: Array of shape [B, H, W, C].

  Returns:
    Array of shape [B, H // 2, W // 2, C].
  """
  if x.ndim != 4:
    raise ValueError(f"max_pool_2x2 expects [B, H, W, C], got shape {x.shape}.")
  b, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  x = x[:, : 2 * h2, : 2 * w2, :]
  return x.reshape(b, h2, 2, w2, 2, c).max(axis=(2, 4))


class ConvNet(nn.Module):
  """Conv -> ReLU -> 2x2 max-pool stack, spatial mean, ReLU MLP, linear head.

  Attributes:
    num_classes: Number of output logits (all classes of all tasks).
    features: Number of 3x3 filters of every conv layer.
    num_conv: Number of conv blocks; each halves the spatial resolution.
    mlp_width: Width of every hidden Dense layer.
    mlp_layers: Number of hidden Dense + ReLU layers before the head.
    dtype: Computation dtype (parameters are always float32).
  """

  num_classes: int
  features: int = 32
  num_conv: int = 4
  mlp_width: int = 128
  mlp_layers: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: Float images of shape [B, H, W, C] (e.g. [B, 32, 32, 3]), already
        normalised. H and W must be >= 2**num_conv.
      train: Unused (the model has no dropout / batch norm); kept so that all
        models share the `(x, train)` calling convention.

    Returns:
      Logits of shape [B, num_classes] in `dtype`.
    """
    del train
    if x.ndim != 4:
      raise ValueError(f"Expected images of shape [B, H, W, C], got {x.shape}.")
    x = x.astype(self.dtype)
    for i in range(self.num_conv):
      x = nn.Conv(self.features, (3, 3), padding="SAME", dtype=self.dtype,
                  name=f"conv_{i}")(x)
      x = max_pool_2x2(nn.relu(x))
    x = jnp.mean(x, axis=(1, 2))
    for i in range(self.mlp_layers):
      x = nn.relu(nn.Dense(self.mlp_width, dtype=self.dtype,
                           name=f"dense_{i}")(x))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


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
