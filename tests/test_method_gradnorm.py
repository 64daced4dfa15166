"""GradNorm (Chen et al., ICML 2018): loss weights from the gradient norms on one layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldro

import method_helpers
from ldro import gradient_normalization as gradnorm_lib

RNG = np.random.default_rng(0)
N = 3
# Per-task gradients of a two-layer model; W = Dense_2 (the "last shared layer").
GRADS = {"Dense_0": {"kernel": RNG.normal(size=(N, 2, 2)), "bias": RNG.normal(size=(N, 2))},
         "Dense_2": {"kernel": RNG.normal(size=(N, 4)) * [[1.0], [3.0], [0.5]],
                     "bias": RNG.normal(size=(N, 1))}}
SEQ = np.array([[1.0, 2.0, 0.5], [0.8, 1.9, 0.45], [0.5, 1.8, 0.4], [0.4, 1.5, 0.4]])


def flat(tree, keep=lambda name: True):
  return np.concatenate([np.asarray(g).reshape(N, -1) for name, sub in sorted(tree.items())
                         if keep(name) for _, g in sorted(sub.items())], axis=1)


def jgrads():
  return jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), GRADS)


def run(tx, losses_seq):
  return method_helpers.run_fixed(tx, losses_seq, GRADS)


def gradnorm_by_hand(gw, seq, alpha, lr):
  """Chen et al., Algorithm 1 on explicit gradients w.r.t. W (float64): the weights per step."""
  w, l0, used = np.ones(N), seq[0], []
  for l in seq:
    used.append(w.copy())
    G = np.linalg.norm(w[:, None] * gw, axis=1)  # ||grad_W w_i l_i||
    ratio = l / l0
    target = G.mean() * (ratio / ratio.mean()) ** alpha
    grad = np.sign(G - target) * np.linalg.norm(gw, axis=1)  # d sum_i |G_i - target_i| / dw
    w = np.maximum(w - lr * grad, 0.0)
    w = w * N / w.sum()
  return used, w


def test_weight_updates_on_fixed_losses_and_gradients_match_a_hand_computation():
  alpha, lr = 1.5, 0.1
  weights, outs, state = run(ldro.gradnorm(N, alpha=alpha, lr=lr, layer="Dense_2"), SEQ)
  used, w_final = gradnorm_by_hand(flat(GRADS, lambda n: n == "Dense_2"), SEQ, alpha, lr)
  full = flat(GRADS)
  for t in range(len(SEQ)):
    np.testing.assert_allclose(weights[t], used[t] / N, rtol=1e-5, err_msg=f"step {t}")
    update = np.concatenate([np.asarray(g).ravel() for _, sub in sorted(outs[t].items())
                             for _, g in sorted(sub.items())])
    np.testing.assert_allclose(update, (used[t] / N) @ full, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.method_state.loss_weights, w_final, rtol=1e-5)
  np.testing.assert_allclose(np.sum(state.method_state.loss_weights), N, rtol=1e-6)
  np.testing.assert_allclose(state.method_state.initial_losses, SEQ[0])
  gw = flat(GRADS, lambda n: n == "Dense_2")
  np.testing.assert_allclose(state.gram, gw @ gw.T, rtol=1e-5)  # the Gram matrix on W only
  # The task with the largest gradient on W (task 1) lost weight; the weights moved.
  assert w_final[1] < 1.0 and not np.allclose(w_final, 1.0)


def test_the_filter_selects_the_right_leaves():
  gw = flat(GRADS, lambda n: n == "Dense_2")
  for layer in ("Dense_2", "['Dense_2']", r"Dense_[2-9]"):
    keep = gradnorm_lib.layer_filter(layer)
    np.testing.assert_allclose(ldro.weighting.filtered_gram(jgrads(), keep, "gradnorm"),
                               gw @ gw.T, rtol=1e-5, err_msg=layer)
  keep = gradnorm_lib.layer_filter(r"Dense_2'\]\['kernel")
  assert keep("['Dense_2']['kernel']") and not keep("['Dense_2']['bias']")
  assert not keep("['Dense_0']['kernel']")
  # keystr form is literal (as a regex it would be a character class matching "s']").
  assert not gradnorm_lib.layer_filter("['Dense_2']")("['Dense_0']['bias']")
  assert gradnorm_lib.layer_filter(None) is None  # all parameters
  with pytest.raises(ValueError, match="selects no parameter; paths are"):
    tx = ldro.gradnorm(N, layer="Dense_9")
    tx.update(jgrads(), tx.init(None), None, task_losses=jnp.asarray(SEQ[0]))
  with pytest.raises(ValueError, match="layer must be None"):
    ldro.gradnorm(N, layer="")


def test_lean_mode_with_a_layer_needs_the_task_gradients_and_matches_jacobian_mode():
  A = jnp.asarray(RNG.normal(size=(N, 4)), jnp.float32)
  params = {"Dense_0": {"kernel": jnp.ones(4) * 0.3}, "Dense_2": {"kernel": jnp.ones(4) * -0.2}}

  def losses_fn(p):
    return (A @ p["Dense_0"]["kernel"]) ** 2 + (A @ p["Dense_2"]["kernel"] - 1.0) ** 2

  tx = ldro.gradnorm(N, lr=0.05, layer="Dense_2")
  losses, vjp = jax.vjp(losses_fn, params)
  grads = jax.jacrev(losses_fn)(params)
  with pytest.raises(ValueError, match="gram_filter"):
    tx.update(None, tx.init(params), params, task_losses=losses, task_vjp=vjp,
              gram_fn=lambda: ldro.task_gram(grads))

  @jax.jit
  def both(state_j, state_l):
    u_j, state_j = tx.update(grads, state_j, params, task_losses=losses)
    u_l, state_l = tx.update(None, state_l, params, task_losses=losses, task_vjp=vjp,
                             task_grads_fn=lambda: grads)
    return u_j, state_j, u_l, state_l

  s_j = s_l = tx.init(params)
  for _ in range(2):
    u_j, s_j, u_l, s_l = both(s_j, s_l)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), u_j, u_l)
  np.testing.assert_allclose(s_j.method_state.loss_weights, s_l.method_state.loss_weights,
                             rtol=1e-6)


def test_bad_hyperparameters_are_refused():
  with pytest.raises(ValueError, match="alpha must be in"):
    ldro.gradnorm(N, alpha=-1.0)
  with pytest.raises(ValueError, match="lr must be finite"):
    ldro.gradnorm(N, lr=float("inf"))
