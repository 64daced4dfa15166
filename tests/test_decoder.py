"""Tests of the decoder-only LM and its losses (ldro.models.decoder, §5.2)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ldro.models import decoder as dec

VOCAB = 50


@pytest.fixture(scope="module")
def tiny():
  cfg = dec.decoder_config("tiny", VOCAB, num_layers=2, emb_dim=32, num_heads=2,
                           head_dim=16, mlp_dim=64)
  model = dec.Decoder(cfg)
  tokens = jnp.asarray(np.random.RandomState(0).randint(1, VOCAB, (2, 12)))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
  return model, variables, _jit_apply(model)


def _jit_apply(model):
  """Jitted ``model.apply`` (eager Flax dispatch is slow on small CPUs)."""
  return jax.jit(model.apply, static_argnames=("enable_dropout",))


def test_named_configs():
  for name in ("tiny", "small", "base", "large"):
    cfg = dec.decoder_config(name, 8000)
    assert cfg.vocab_size == 8000 and cfg.relative_attention_num_buckets == 32
  cfg = dec.decoder_config("tiny", 100, num_layers=3, dropout_rate=0.1)
  assert (cfg.num_layers, cfg.dropout_rate, cfg.emb_dim) == (3, 0.1, 128)
  assert dec.decoder_config("base", 10).dtype == jnp.bfloat16
  with pytest.raises(ValueError):
    dec.decoder_config("huge", 10)


def test_relative_position_bucket_hand_values():
  # relative_position = key - query; causal: n = query - key >= 0.
  # n < 16 exact; n >= 16: 16 + floor(log(n/16)/log(8) * 16), capped at 31.
  n = np.array([0, 1, 15, 16, 20, 32, 64, 127, 128, 1000, -5])
  expected = np.array([0, 1, 15, 16, 17, 21, 26, 31, 31, 31, 0])
  np.testing.assert_array_equal(dec.relative_position_bucket(-n), expected)
  np.testing.assert_array_equal(
      np.asarray(dec.relative_position_bucket(jnp.asarray(-n))), expected)
  # Bidirectional: 16 buckets per direction, exact below 8, future offset 16.
  rel = np.array([-3, 3, -8, 8, -100])
  np.testing.assert_array_equal(
      dec.relative_position_bucket(rel, bidirectional=True),
      [3, 19, 8, 24, 15])


def test_shapes_and_no_bias(tiny):
  _, variables, apply = tiny
  tokens = jnp.ones((3, 7), jnp.int32)
  logits = apply(variables, tokens)
  assert logits.shape == (3, 7, VOCAB) and logits.dtype == jnp.float32
  names = [tuple(getattr(k, "key", k) for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]]
  assert not any(p[-1] == "bias" for p in names), names
  assert any(p[-1] == "rel_embedding" for p in names)
  # Separate output projection (T5 1.1) by default.
  assert "logits_dense" in variables["params"]


def test_causal_masking(tiny):
  _, variables, apply = tiny
  tokens = np.random.RandomState(1).randint(1, VOCAB, (1, 10))
  t = 6
  changed = tokens.copy()
  changed[0, t] = (changed[0, t] % (VOCAB - 1)) + 1
  a = apply(variables, jnp.asarray(tokens))
  b = apply(variables, jnp.asarray(changed))
  np.testing.assert_allclose(a[0, :t], b[0, :t], atol=1e-5)
  assert np.abs(np.asarray(a[0, t:] - b[0, t:])).max() > 1e-3


def test_packing_segments_are_independent(tiny):
  _, variables, apply = tiny
  rng = np.random.RandomState(2)
  seg1, seg2 = rng.randint(1, VOCAB, 4), rng.randint(1, VOCAB, 5)
  tokens = np.concatenate([seg1, seg2, [0, 0]])[None]
  segs = np.array([[1] * 4 + [2] * 5 + [0, 0]])
  pos = np.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 0]])
  packed = apply(variables, jnp.asarray(tokens), jnp.asarray(segs), jnp.asarray(pos))
  alone = apply(variables, jnp.asarray(seg2[None]))
  np.testing.assert_allclose(packed[0, 4:9], alone[0], atol=1e-4)
  other = tokens.copy()
  other[0, :4] = rng.randint(1, VOCAB, 4)
  packed2 = apply(variables, jnp.asarray(other), jnp.asarray(segs), jnp.asarray(pos))
  np.testing.assert_allclose(packed[0, 4:9], packed2[0, 4:9], atol=1e-5)
  # Without positions the arange-based bias is identical within segments.
  no_pos = apply(variables, jnp.asarray(tokens), jnp.asarray(segs))
  np.testing.assert_allclose(packed[0, :9], no_pos[0, :9], atol=1e-4)


def test_tied_embedding_bf16_and_dropout():
  cfg = dec.decoder_config("tiny", VOCAB, emb_dim=32, num_heads=2, head_dim=16,
                           mlp_dim=64, logits_via_embedding=True,
                           dtype=jnp.bfloat16, dropout_rate=0.5)
  model = dec.Decoder(cfg)
  tokens = jnp.ones((2, 6), jnp.int32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
  assert "logits_dense" not in variables["params"]
  apply = _jit_apply(model)
  a = apply(variables, tokens)
  assert a.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(a)))
  b = apply(variables, tokens, enable_dropout=True,
            rngs={"dropout": jax.random.PRNGKey(3)})
  assert np.abs(np.asarray(a - b)).max() > 1e-3
  np.testing.assert_allclose(a, apply(variables, tokens), atol=0)


def _np_ce(logits, targets):
  logits = np.asarray(logits, np.float64)
  lse = np.log(np.exp(logits).sum(-1))
  return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def test_token_cross_entropy_hand_example():
  # Uniform logits over 4 classes: loss ln 4 per token; a confident correct
  # token logits [10, 0, 0, 0] -> ln(1 + 3 e^-10).
  logits = np.zeros((1, 3, 4), np.float32)
  logits[0, 1, 0] = 10.0
  targets = np.array([[2, 0, 1]])
  weights = np.array([[1.0, 1.0, 0.0]], np.float32)
  # Jitted: op-by-op (eager) execution compiles every primitive on its own.
  token_cross_entropy = jax.jit(dec.token_cross_entropy)
  s, w = token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                             jnp.asarray(weights))
  np.testing.assert_allclose(float(s), np.log(4) + np.log1p(3 * np.exp(-10)), rtol=1e-5)
  assert float(w) == 2.0
  # Against numpy on random data.
  rng = np.random.RandomState(0)
  logits = rng.randn(2, 5, 7).astype(np.float32)
  targets = rng.randint(0, 7, (2, 5))
  weights = (rng.rand(2, 5) > 0.3).astype(np.float32)
  s, w = token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                             jnp.asarray(weights))
  np.testing.assert_allclose(float(s), (_np_ce(logits, targets) * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(float(w), weights.sum())


def test_per_task_token_loss_grouped_and_mixture():
  rng = np.random.RandomState(0)
  n, b, length, v = 3, 2, 4, 6
  logits = rng.randn(n, b, length, v).astype(np.float32)
  targets = rng.randint(0, v, (n, b, length))
  weights = (rng.rand(n, b, length) > 0.25).astype(np.float32)
  ce = _np_ce(logits, targets) * weights
  expected = ce.sum((1, 2)) / weights.sum((1, 2))
  # Jitted: op-by-op (eager) execution compiles every primitive on its own.
  per_task_token_loss = jax.jit(dec.per_task_token_loss, static_argnames=("num_tasks",))
  losses, counts = per_task_token_loss(jnp.asarray(logits), jnp.asarray(targets),
                                       jnp.asarray(weights))
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  np.testing.assert_allclose(counts, weights.sum((1, 2)))
  # Same rows as a mixture batch with task ids; task 3 absent -> count 0.
  task = np.repeat(np.arange(n), b)
  losses_m, counts_m = per_task_token_loss(
      jnp.asarray(logits.reshape(n * b, length, v)),
      jnp.asarray(targets.reshape(n * b, length)),
      jnp.asarray(weights.reshape(n * b, length)),
      task_ids=jnp.asarray(task), num_tasks=n + 1)
  np.testing.assert_allclose(losses_m[:n], expected, rtol=1e-5)
  assert float(counts_m[n]) == 0.0 and float(losses_m[n]) == 0.0
  with pytest.raises(ValueError):
    dec.per_task_token_loss(jnp.asarray(logits[0]), jnp.asarray(targets[0]),
                            jnp.asarray(weights[0]), task_ids=jnp.zeros(b, jnp.int32))


def test_grouped_train_step_decreases_loss(tiny):
  model, variables, _ = tiny
  rng = np.random.RandomState(3)
  n, b, length = 3, 2, 8
  targets = rng.randint(1, VOCAB, (n, b, length))
  batch = {
      "decoder_target_tokens": jnp.asarray(targets),
      "decoder_input_tokens": jnp.asarray(np.concatenate(
          [np.zeros((n, b, 1), int), targets[..., :-1]], -1)),
      "decoder_loss_weights": jnp.ones((n, b, length)),
      "decoder_segment_ids": jnp.ones((n, b, length), jnp.int32),
      "decoder_positions": jnp.broadcast_to(jnp.arange(length), (n, b, length)),
  }
  opt = optax.adam(1e-2)

  def loss_fn(params):
    logits = dec.apply_decoder(model, {"params": params}, batch)
    assert logits.shape == (n, b, length, VOCAB)
    losses, _ = dec.per_task_token_loss(logits, batch["decoder_target_tokens"],
                                        batch["decoder_loss_weights"])
    return jnp.mean(losses)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  params = variables["params"]
  state = opt.init(params)
  first = None
  for _ in range(15):
    params, state, loss = step(params, state)
    first = float(loss) if first is None else first
  assert float(loss) < first - 0.5
