"""Shared helpers of the method tests: a method on fixed task gradients, step by step, and the
check that its three gradient sources agree.
"""

import jax
import jax.numpy as jnp
import numpy as np

import ldro


_STEPS = {}  # id(tx) -> (tx, its jitted update): one compilation per transformation


def run_fixed(tx, losses_seq, grads, mask=None):
  """Runs ``tx`` on fixed task gradients, one jitted update per row of ``losses_seq``.

  Args:
    tx: the transformation.
    losses_seq: ``[T, N]`` task losses, one row per step.
    grads: the task gradients: a ``[N, d]`` array (as ``{"w": grads}``) or a pytree with a
      leading task axis.
    mask: ``task_mask``: None, one ``[N]`` mask for every step, or ``[T, N]``, one per step.

  Returns:
    ``(weights, updates, state)``: each step's ``task_weights`` after the step, each step's
    update (the ``[d]`` array for an array ``grads``, else the pytree) and the final state.
  """
  tree = {"w": grads} if isinstance(grads, np.ndarray) else grads
  tree = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), tree)
  if _STEPS.get(id(tx), (None,))[0] is not tx:
    _STEPS[id(tx)] = (tx, jax.jit(lambda s, g, l, m: tx.update(g, s, None, task_losses=l,
                                                                task_mask=m)))
  step = _STEPS[id(tx)][1]
  per_step = mask is not None and np.ndim(mask) == 2
  state, weights, updates = tx.init(None), [], []
  for t, l in enumerate(losses_seq):
    m = mask[t] if per_step else mask
    u, state = step(state, tree, jnp.asarray(l, jnp.float32),
                    None if m is None else jnp.asarray(m))
    weights.append(np.asarray(ldro.task_weights(state)))
    updates.append(np.asarray(u["w"]) if isinstance(grads, np.ndarray) else u)
  return weights, updates, state


def modes_agree(make_tx, n=4, dim=6, steps=3, lr=0.02, loss_offset=0.0, pass_losses=False,
                extra_txs=()):
  """The task Jacobian (Jacobian mode), a Gram function and a VJP (lean mode), and a
  ``task_grads_fn`` and a VJP (lean mode) give the same update.

  The problem: ``N`` quadratic tasks ``l_i(w) = |X_i w - y_i|^2 / 2 (+ offset)``, a few SGD
  steps on the Jacobian-mode update. Yields after each step, once the updates are compared.

  Args:
    make_tx: a function returning a fresh transformation (called three times).
    n, dim: tasks and parameters.
    steps: SGD steps taken on the Jacobian-mode update.
    lr: their step size.
    loss_offset: added to every loss (keeps losses away from 0 for loss-normalised methods).
    pass_losses: give ``task_losses`` to every update.
    extra_txs: more transformations run in Jacobian mode that must agree too (e.g. the method
      under ``optax.inject_hyperparams``).

  Yields:
    ``states`` (the Jacobian, Gram and ``task_grads_fn`` runs' states, then ``extra_txs``'),
    ``grads`` (the ``[N, dim]`` Jacobian at the step's parameters) and the losses. Before each
    yield: ``u = c @ J`` for the Jacobian run's weights ``c``, and every run's update equals it.
  """
  rng = np.random.default_rng(0)
  X = jnp.asarray(rng.normal(size=(n, dim, dim)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)

  def losses_fn(theta):
    r = jnp.einsum("nij,j->ni", X, theta["w"]) - y
    return 0.5 * jnp.sum(r * r, axis=1) + loss_offset

  txs = [make_tx() for _ in range(3)] + list(extra_txs)

  @jax.jit
  def step(theta, states):
    losses, vjp = jax.vjp(losses_fn, theta)
    grads = jax.jacrev(losses_fn)(theta)
    kw = {"task_losses": losses} if pass_losses else {}
    out = [txs[0].update(grads, states[0], theta, **kw),
           txs[1].update(None, states[1], theta, task_vjp=vjp,
                         gram_fn=lambda: ldro.task_gram(grads), **kw),
           txs[2].update(None, states[2], theta, task_vjp=vjp, task_grads_fn=lambda: grads, **kw)]
    out += [tx.update(grads, s, theta, **kw) for tx, s in zip(txs[3:], states[3:])]
    return [u for u, _ in out], tuple(s for _, s in out), grads, losses

  theta = {"w": jnp.asarray(rng.normal(size=dim), jnp.float32)}
  states = tuple(t.init(theta) for t in txs)
  for _ in range(steps):
    updates, states, grads, losses = step(theta, states)
    c = ldro.task_weights(states[0])
    np.testing.assert_allclose(updates[0]["w"], c @ grads["w"], rtol=1e-5, atol=1e-6)
    for u in updates[1:]:
      np.testing.assert_allclose(u["w"], updates[0]["w"], rtol=1e-4, atol=1e-6)
    yield states, grads, losses
    theta = {"w": theta["w"] - lr * updates[0]["w"]}
