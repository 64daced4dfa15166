"""Where UW and IMTL-L part: the same coefficients, a different float summation of c . J.

UW (sign -1) and IMTL-L (sign +1) share ``_log_scale_step``; with the same losses their
log-scales are exact negatives and their coefficients bit-identical, but XLA compiles the two
programs differently around the constant sign, and the contraction ``sum_i c_i g_i`` comes out
in a different summation order: 1-ulp differences in the update from the second step on, which
training amplifies. Run: ``python results/litmus/diagnostics/uw_vs_imtl_l.py`` (CPU, seconds).
"""
import jax
import jax.numpy as jnp
import numpy as np

import ldro

N, D, T = 5, 7, 200
J = jnp.asarray(np.random.default_rng(1).normal(size=(N, D)), jnp.float32)
LOSSES = np.random.default_rng(7).uniform(0.5, 3.0, size=(T, N)).astype(np.float32)


def run(tx):
  step = jax.jit(lambda s, l: tx.update({"w": J}, s, None, task_losses=l))
  state, updates, scales = tx.init(None), [], []
  for l in LOSSES:
    scales.append(np.asarray(state.method_state[0]))  # the scales this step's coefficients use
    u, state = step(state, l)
    updates.append(np.asarray(u["w"]))
  return np.array(updates), np.array(scales)


uw_u, uw_s = run(ldro.uw(N))
im_u, im_s = run(ldro.imtl_l(N))
first_u = int(np.argmax(np.any(uw_u != im_u, axis=1)))
first_s = int(np.argmax(np.any(uw_s != -im_s, axis=1)))
c_uw = np.exp(-uw_s[first_u]) / N
c_im = np.exp(im_s[first_u]) / N
print(f"first step whose update differs: {first_u}; first step whose scales differ: {first_s}")
print(f"at step {first_u}: scales exact negatives: {bool(np.all(uw_s[first_u] == -im_s[first_u]))}; "
      f"coefficients bit-identical: {bool(np.all(c_uw == c_im))}; "
      f"largest update difference {np.abs(uw_u[first_u] - im_u[first_u]).max():.2e} "
      f"(update scale {np.abs(uw_u[first_u]).max():.2f})")
print(f"steps with different updates: {int(np.any(uw_u != im_u, axis=1).sum())} of {T}")
