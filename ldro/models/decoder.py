"""Decoder-only Transformer language model (T5 1.1 / T5X style) and LM losses.

Model of the multilingual language-modelling experiment (paper section 5.2.1:
"a large autoregressive transformer model"), written after T5X's
``examples/decoder_only`` network in plain Flax linen:

* token embedding (``normal(1.0)`` init) and, by default, a *separate* output
  projection to the vocabulary (T5 1.1 / mT5; ``logits_via_embedding=True``
  ties them and scales the logits by ``1/sqrt(emb_dim)`` as in T5X);
* T5 relative position bias (unidirectional buckets, one bias table shared by
  all layers), computed from ``decoder_positions`` when given (a ``[B, H, L,
  L]`` bias); without them it is the T5X ``[1, H, L, L]`` bias from
  ``arange(L)``, which is identical inside contiguous packed segments and
  uses less memory at paper scale;
* pre-RMSNorm residual blocks, causal multi-head self-attention that respects
  packing (no attention across ``decoder_segment_ids``), gated-GELU MLP
  (``gelu(x W0) * (x W1)``), no biases anywhere, dropout as in T5X;
* the attention logits are explicitly scaled by ``1/sqrt(head_dim)`` (T5
  folds this into the query initialisation, which is only equivalent under
  Adafactor; the paper trains with Adam).

Loss helpers compute token cross-entropy sums and per-language (per-task)
mean token losses, for grouped ``[N, b, L]`` batches (stratified batching) and
for mixture ``[B, L]`` batches with a task id per row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DType = Any

_NEG_INF = -1e10


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Hyper-parameters of :class:`Decoder` (section 5.2.1 model).

  Attributes:
    vocab_size: vocabulary size (output logits).
    emb_dim: model width.
    num_heads: attention heads.
    num_layers: decoder blocks.
    head_dim: per-head query/key/value size.
    mlp_dim: gated-GELU hidden size.
    dropout_rate: dropout on embeddings, attention weights, block outputs,
      MLP hidden units and the final norm output.
    relative_attention_num_buckets: T5 relative-position buckets.
    relative_attention_max_distance: distance beyond which buckets saturate.
    dtype: activation dtype (parameters are float32; logits float32).
    logits_via_embedding: tie the output projection to the embedding.
  """
  vocab_size: int
  emb_dim: int = 512
  num_heads: int = 8
  num_layers: int = 6
  head_dim: int = 64
  mlp_dim: int = 1024
  dropout_rate: float = 0.0
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dtype: DType = jnp.float32
  logits_via_embedding: bool = False


#: Named sizes. ``tiny`` trains in minutes on 2 CPU cores; ``small`` is the
#: T5 1.1-small decoder; ``base``/``large`` follow T5X's decoder-only base
#: (~mT5-base decoder width) and T5 1.1-large, for accelerators.
DECODER_SIZES: Mapping[str, Mapping[str, Any]] = {
    "tiny": dict(emb_dim=128, num_heads=4, head_dim=32, num_layers=2, mlp_dim=256),
    "small": dict(emb_dim=512, num_heads=6, head_dim=64, num_layers=8, mlp_dim=1024),
    "base": dict(emb_dim=768, num_heads=12, head_dim=64, num_layers=12,
                 mlp_dim=2048, dtype=jnp.bfloat16),
    "large": dict(emb_dim=1024, num_heads=16, head_dim=64, num_layers=24,
                  mlp_dim=2816, dtype=jnp.bfloat16),
}


def decoder_config(name: str, vocab_size: int, **overrides: Any) -> DecoderConfig:
  """Returns a named :class:`DecoderConfig` (section 5.2.1 model sizes).

  Args:
    name: one of :data:`DECODER_SIZES` (``tiny``, ``small``, ``base``,
      ``large``).
    vocab_size: vocabulary size.
    **overrides: any other :class:`DecoderConfig` field.

  Returns:
    The config.
  """
  if name not in DECODER_SIZES:
    raise ValueError(f"Unknown decoder size {name!r}; one of {sorted(DECODER_SIZES)}")
  kwargs = dict(DECODER_SIZES[name])
  kwargs.update(overrides)
  if isinstance(kwargs.get("dtype"), str):
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  return DecoderConfig(vocab_size=vocab_size, **kwargs)


def relative_position_bucket(relative_position: Array, bidirectional: bool = False,
                             num_buckets: int = 32, max_distance: int = 128) -> Array:
  """T5 relative-position bucketing (Raffel et al., 2020; section 5.2.1 model).

  ``relative_position = key_position - query_position``. For a causal decoder
  (``bidirectional=False``) only ``n = max(-relative_position, 0)`` matters:
  ``n < num_buckets // 2`` get their own bucket; larger distances share
  logarithmically sized buckets up to ``max_distance``, beyond which all map
  to ``num_buckets - 1``.

  Args:
    relative_position: int array.
    bidirectional: whether future positions get their own half of buckets.
    num_buckets: number of buckets.
    max_distance: distance of the last bucket boundary.

  Returns:
    int32 array of bucket ids in ``[0, num_buckets)``, same shape.
  """
  xp = jnp if isinstance(relative_position, jax.Array) else np
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int32) * num_buckets
    n = xp.abs(n)
  else:
    n = xp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  val_if_large = max_exact + (
      xp.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
      / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int32)
  val_if_large = xp.minimum(val_if_large, num_buckets - 1)
  return (ret + xp.where(is_small, n, val_if_large)).astype(np.int32)


def make_attention_mask(length: int, segment_ids: Optional[Array] = None) -> Array:
  """Causal (and packing) attention mask.

  Args:
    length: sequence length ``L``.
    segment_ids: optional ``[B, L]`` segment ids; a query only sees keys of
      the same segment (padding, id 0, only sees padding).

  Returns:
    bool ``[B or 1, 1, L, L]``: ``mask[b, 0, q, k]`` is True iff ``k <= q``
    (and same segment).
  """
  idx = jnp.arange(length)
  mask = (idx[None, :] <= idx[:, None])[None, None]
  if segment_ids is not None:
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    mask = jnp.logical_and(mask, same)
  return mask


_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class RelativePositionBias(nn.Module):
  """T5 relative position bias, ``[B or 1, heads, L, L]``."""
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, length: int, positions: Optional[Array] = None) -> Array:
    """Computes the bias.

    Args:
      length: ``L``.
      positions: optional ``[B, L]`` positions (restart at 0 per packed
        example); default ``arange(L)``.

    Returns:
      Bias ``[B or 1, num_heads, L, L]`` (query, key).
    """
    if positions is None:
      positions = jnp.arange(length)[None]
    rel = positions[:, None, :] - positions[:, :, None]  # [B, q, k] = k - q
    buckets = relative_position_bucket(rel, False, self.num_buckets, self.max_distance)
    table = self.param("rel_embedding",
                       nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                       (self.num_heads, self.num_buckets), jnp.float32)
    bias = jnp.take(table, buckets, axis=1)  # [H, B, q, k]
    return jnp.transpose(bias, (1, 0, 2, 3)).astype(self.dtype)


class SelfAttention(nn.Module):
  """Multi-head causal self-attention without biases."""
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array, bias: Array,
               deterministic: bool = True) -> Array:
    """Applies attention.

    Args:
      x: ``[B, L, E]``.
      mask: bool, broadcastable to ``[B, H, L, L]``.
      bias: relative position bias, broadcastable to ``[B, H, L, L]``.
      deterministic: disables dropout.

    Returns:
      ``[B, L, E]``.
    """
    proj = functools.partial(nn.DenseGeneral, features=(self.num_heads, self.head_dim),
                             axis=-1, use_bias=False, dtype=self.dtype,
                             kernel_init=nn.initializers.variance_scaling(
                                 1.0, "fan_in", "normal"))
    q = proj(name="query")(x)
    k = proj(name="key")(x)
    v = proj(name="value")(x)
    q = q * jnp.asarray(self.head_dim ** -0.5, q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    logits = logits + bias.astype(jnp.float32)
    logits = jnp.where(mask, logits, _NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(
        weights, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return nn.DenseGeneral(features=x.shape[-1], axis=(-2, -1), use_bias=False,
                           dtype=self.dtype, kernel_init=_kernel_init,
                           name="out")(out)


class GatedGeluMlp(nn.Module):
  """T5 1.1 gated-GELU MLP: ``(gelu(x W0) * x W1) Wo``, no biases."""
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """Applies the MLP to ``[B, L, E]``."""
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype,
                              kernel_init=_kernel_init)
    h = nn.gelu(dense(self.mlp_dim, name="wi_0")(x), approximate=True)
    h = h * dense(self.mlp_dim, name="wi_1")(x)
    h = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(h, deterministic=deterministic)
    return dense(x.shape[-1], name="wo")(h)


class DecoderLayer(nn.Module):
  """Pre-RMSNorm decoder block: self-attention then gated-GELU MLP."""
  config: DecoderConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, bias: Array,
               deterministic: bool = True) -> Array:
    """Applies the block to ``[B, L, E]``."""
    cfg = self.config
    drop = functools.partial(nn.Dropout, cfg.dropout_rate, broadcast_dims=(-2,))
    y = nn.RMSNorm(epsilon=1e-6, dtype=cfg.dtype, name="pre_self_attention_norm")(x)
    y = SelfAttention(cfg.num_heads, cfg.head_dim, cfg.dropout_rate, cfg.dtype,
                      name="self_attention")(y, mask, bias, deterministic)
    x = x + drop()(y, deterministic=deterministic)
    y = nn.RMSNorm(epsilon=1e-6, dtype=cfg.dtype, name="pre_mlp_norm")(x)
    y = GatedGeluMlp(cfg.mlp_dim, cfg.dropout_rate, cfg.dtype, name="mlp")(
        y, deterministic)
    return x + drop()(y, deterministic=deterministic)


class Decoder(nn.Module):
  """Decoder-only Transformer LM (section 5.2.1), T5 1.1 / T5X style.

  Attributes:
    config: :class:`DecoderConfig`.
  """
  config: DecoderConfig

  @nn.compact
  def __call__(self, decoder_input_tokens: Array,
               decoder_segment_ids: Optional[Array] = None,
               decoder_positions: Optional[Array] = None,
               enable_dropout: bool = False) -> Array:
    """Computes next-token logits.

    Args:
      decoder_input_tokens: int ``[B, L]`` inputs (targets shifted right, 0 at
        the start of every packed example, as produced by seqio).
      decoder_segment_ids: optional int ``[B, L]`` packing segment ids (0 =
        padding); attention never crosses segments.
      decoder_positions: optional int ``[B, L]`` positions within each
        segment; used for the relative position bias (default ``arange(L)``,
        which gives the same bias within contiguous segments).
      enable_dropout: apply dropout (needs a ``'dropout'`` rng).

    Returns:
      float32 logits ``[B, L, vocab_size]``.
    """
    cfg = self.config
    deterministic = not enable_dropout
    length = decoder_input_tokens.shape[-1]
    mask = make_attention_mask(length, decoder_segment_ids)
    bias = RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                cfg.relative_attention_max_distance, cfg.dtype,
                                name="relpos_bias")(length, decoder_positions)
    embed = nn.Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.dtype,
                     embedding_init=nn.initializers.normal(stddev=1.0),
                     name="token_embedder")
    drop = functools.partial(nn.Dropout, cfg.dropout_rate, broadcast_dims=(-2,))
    x = embed(decoder_input_tokens.astype(jnp.int32))
    x = drop()(x, deterministic=deterministic).astype(cfg.dtype)
    for i in range(cfg.num_layers):
      x = DecoderLayer(cfg, name=f"layers_{i}")(x, mask, bias, deterministic)
    x = nn.RMSNorm(epsilon=1e-6, dtype=cfg.dtype, name="decoder_norm")(x)
    x = drop()(x, deterministic=deterministic)
    if cfg.logits_via_embedding:
      logits = embed.attend(x.astype(jnp.float32)) / jnp.sqrt(cfg.emb_dim)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=jnp.float32,
                        kernel_init=_kernel_init, name="logits_dense")(x)
    return logits.astype(jnp.float32)


def apply_decoder(model: Decoder, variables: Any, batch: Mapping[str, Array],
                  enable_dropout: bool = False,
                  rngs: Optional[Mapping[str, Array]] = None) -> Array:
  """Applies the decoder to a ``[B, L]`` or grouped ``[N, b, L]`` batch.

  Args:
    model: the :class:`Decoder`.
    variables: its variables (``{'params': ...}``).
    batch: dict with ``decoder_input_tokens`` and optionally
      ``decoder_segment_ids`` / ``decoder_positions`` (seqio feature names).
    enable_dropout: apply dropout.
    rngs: e.g. ``{'dropout': key}`` when ``enable_dropout``.

  Returns:
    Logits ``[..., L, vocab]`` with the batch's leading shape.
  """
  tokens = batch["decoder_input_tokens"]
  lead = tokens.shape[:-1]
  flat = lambda k: (None if batch.get(k) is None
                    else jnp.reshape(batch[k], (-1, tokens.shape[-1])))
  logits = model.apply(variables, flat("decoder_input_tokens"),
                       flat("decoder_segment_ids"), flat("decoder_positions"),
                       enable_dropout=enable_dropout, rngs=rngs)
  return jnp.reshape(logits, lead + logits.shape[-2:])


def _token_losses(logits: Array, targets: Array, z_loss: float = 0.0) -> Array:
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  loss = lse - tgt
  if z_loss:
    loss = loss + z_loss * jnp.square(lse)
  return loss


def token_cross_entropy(logits: Array, targets: Array, weights: Array,
                        z_loss: float = 0.0) -> Tuple[Array, Array]:
  """Weighted sum of token cross-entropies (section 5.2.2 perplexity).

  Args:
    logits: ``[..., L, V]``.
    targets: int ``[..., L]``.
    weights: ``[..., L]`` loss weights (``decoder_loss_weights``).
    z_loss: optional T5X auxiliary ``z_loss * logsumexp**2`` per token.

  Returns:
    ``(sum_loss, sum_weights)`` float32 scalars; the mean token cross-entropy
    is their ratio and the perplexity its exponential.
  """
  w = weights.astype(jnp.float32)
  return jnp.sum(_token_losses(logits, targets, z_loss) * w), jnp.sum(w)


def per_task_token_loss(logits: Array, targets: Array, weights: Array,
                        task_ids: Optional[Array] = None,
                        num_tasks: Optional[int] = None,
                        z_loss: float = 0.0) -> Tuple[Array, Array]:
  """Per-language mean token cross-entropy (the task losses l_i of section 5.2).

  Two layouts:

  * grouped (``task_ids=None``): ``logits [N, b, L, V]``, ``targets/weights
    [N, b, L]``; language ``i`` is slice ``[i]``.
  * mixture: ``logits [B, L, V]``, ``targets/weights [B, L]``, ``task_ids``
    int ``[B]`` in ``[0, num_tasks)``; per-language sums are segment sums.

  Args:
    logits: logits, see above.
    targets: target tokens.
    weights: loss weights (``decoder_loss_weights``).
    task_ids: language id per row (mixture layout).
    num_tasks: number of languages ``N`` (static; required with ``task_ids``).
    z_loss: optional auxiliary loss coefficient.

  Returns:
    ``(losses, counts)``, float32 ``[N]`` each: ``losses[i]`` is the mean
    token loss of language ``i`` (0 where ``counts[i] == 0``, e.g. a language
    absent from a mixture batch -- mask it with ``counts > 0``) and
    ``counts[i]`` its number of weighted target tokens.
  """
  w = weights.astype(jnp.float32)
  tok = _token_losses(logits, targets, z_loss) * w
  if task_ids is None:
    red = tuple(range(1, tok.ndim))
    sums, counts = jnp.sum(tok, axis=red), jnp.sum(w, axis=red)
  else:
    if num_tasks is None:
      raise ValueError("num_tasks is required with task_ids.")
    red = tuple(range(1, tok.ndim))
    ids = task_ids.astype(jnp.int32)
    sums = jax.ops.segment_sum(jnp.sum(tok, axis=red), ids, num_segments=num_tasks)
    counts = jax.ops.segment_sum(jnp.sum(w, axis=red), ids, num_segments=num_tasks)
  losses = jnp.where(counts > 0, sums / jnp.where(counts > 0, counts, 1.0), 0.0)
  return losses, counts
