"""The task-weighting transformations: L-DRO and the baselines."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ldro

N, D = 4, 3


def quadratic_problem():
  """Task i: l_i(theta) = 0.5 ||A_i theta - y_i||^2, theta in R^D."""
  rng = np.random.default_rng(0)
  A = jnp.asarray(rng.normal(size=(N, D, D)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(N, D)) * np.arange(1, N + 1)[:, None], jnp.float32)

  def losses_fn(theta):
    r = jnp.einsum("nij,j->ni", A, theta["w"]) - y
    return 0.5 * jnp.sum(r * r, axis=1)

  return {"w": jnp.zeros(D)}, losses_fn


def algorithm3_numpy(losses_fn, theta, steps, lam, eta, k, lr, normalize=True):
  """Hand-written Algorithm 3 with plain SGD, in float64 numpy."""
  w = np.full(N, 1 / N)
  A = np.zeros((N, N))
  th = np.asarray(theta["w"], np.float64)
  ws = []
  for i in range(steps):
    l = np.asarray(losses_fn({"w": jnp.asarray(th, jnp.float32)}), np.float64)
    J = np.asarray(jax.jacrev(lambda t: losses_fn({"w": t}))(jnp.asarray(th, jnp.float32)),
                   np.float64)
    if i % k == 0:
      G = J @ J.T
      A = G / np.sqrt(np.diag(G))[None, :] if normalize else G
    L = l[:, None] - lam * A
    v = np.argmax(L @ w)
    w = w * np.exp(-eta * L[v])
    w /= w.sum()
    th = th - lr * (w @ J)
    ws.append(w.copy())
  return th, np.array(ws)


@pytest.mark.parametrize("normalize", [True, False])
def test_ldro_in_chain_under_jit_matches_algorithm_3(normalize):
  theta, losses_fn = quadratic_problem()
  lam, eta, k, lr, steps = 0.05, 0.3, 3, 0.01, 10
  tx = optax.chain(ldro.ldro_weights(N, lam, eta, update_every=k, normalize=normalize),
                   optax.sgd(lr))
  state = tx.init(theta)

  @jax.jit
  def step(theta, state):
    losses = losses_fn(theta)
    task_grads = jax.jacrev(losses_fn)(theta)
    updates, state = tx.update(task_grads, state, theta, task_losses=losses)
    return optax.apply_updates(theta, updates), state

  ws = []
  for _ in range(steps):
    theta, state = step(theta, state)
    ws.append(np.asarray(ldro.task_weights(state)))
  th_ref, ws_ref = algorithm3_numpy(losses_fn, quadratic_problem()[0], steps, lam, eta, k, lr,
                                    normalize)
  np.testing.assert_allclose(np.array(ws), ws_ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(theta["w"], th_ref, rtol=1e-4, atol=1e-6)


def test_lean_mode_equals_jacobian_mode():
  theta, losses_fn = quadratic_problem()
  txs = [ldro.ldro_weights(N, 0.05, 0.3, update_every=2) for _ in range(2)]
  states = [t.init(theta) for t in txs]

  # Jitted: op-by-op (eager) execution compiles every primitive of the updates on its own.
  @jax.jit
  def step(theta, states):
    losses = losses_fn(theta)
    u_jac, s_jac = txs[0].update(jax.jacrev(losses_fn)(theta), states[0], theta,
                                 task_losses=losses)
    losses2, vjp = jax.vjp(losses_fn, theta)
    gram_fn = lambda: ldro.task_gram(jax.jacrev(losses_fn)(theta))
    u_lean, s_lean = txs[1].update(None, states[1], theta, task_losses=losses2, task_vjp=vjp,
                                   gram_fn=gram_fn)
    return u_jac, u_lean, [s_jac, s_lean]

  for _ in range(5):
    u_jac, u_lean, states = step(theta, states)
    np.testing.assert_allclose(u_jac["w"], u_lean["w"], rtol=1e-5, atol=1e-7)
    theta = jax.tree.map(lambda p, u: p - 0.01 * u, theta, u_jac)


@pytest.mark.parametrize("exact", [False, True])
def test_lean_mode_with_gradient_reuse(exact):
  # task_grads_fn: refresh steps take their Gram matrix and their update from
  # the N gradients it returns; ordinary steps pull w back through task_vjp.
  # Gradients that differ from the VJP's by a factor 2 show which one each
  # step used; the weights follow Jacobian mode's exactly.
  theta, losses_fn = quadratic_problem()
  txs = [ldro.ldro_weights(N, 0.05, 0.3, update_every=3, exact=exact) for _ in range(2)]

  @jax.jit
  def steps(theta, s_jac, s_reuse):
    losses = losses_fn(theta)
    grads = jax.jacrev(losses_fn)(theta)
    u_jac, s_jac = txs[0].update(grads, s_jac, theta, task_losses=losses)
    _, vjp = jax.vjp(losses_fn, theta)
    twice = lambda: jax.tree.map(lambda g: 2.0 * g, grads)
    u_reuse, s_reuse = txs[1].update(None, s_reuse, theta, task_losses=losses, task_vjp=vjp,
                                     task_grads_fn=twice)
    return u_jac, s_jac, u_reuse, s_reuse

  jacobian = jax.jit(jax.jacrev(losses_fn))  # the reference gradients, compiled once
  s_jac, s_reuse = txs[0].init(theta), txs[1].init(theta)
  for i in range(7):
    u_jac, s_jac, u_reuse, s_reuse = steps(theta, s_jac, s_reuse)
    refresh = i % 3 == 0
    # The Gram of 2g is 4G: the normalised interaction matrix doubles.
    np.testing.assert_allclose(ldro.lookahead_dro.interaction(s_reuse), 2.0 * ldro.lookahead_dro.interaction(s_jac), rtol=1e-5,
                               atol=1e-6)
    if not refresh:
      np.testing.assert_allclose(
          u_reuse["w"], jnp.tensordot(s_reuse.task_weights, jacobian(theta)["w"], 1),
          rtol=1e-5, atol=1e-6)
    else:
      np.testing.assert_allclose(
          u_reuse["w"], 2.0 * jnp.tensordot(s_reuse.task_weights,
                                            jacobian(theta)["w"], 1),
          rtol=1e-5, atol=1e-6)
    theta = jax.tree.map(lambda p, u: p - 0.01 * u, theta, u_jac)
  # With the true gradients, the updates and weights equal Jacobian mode's.
  # Jitted: op-by-op (eager) execution compiles every primitive of the updates on its own.
  @jax.jit
  def true_steps(theta, s_jac, s_reuse):
    losses, vjp = jax.vjp(losses_fn, theta)
    grads = jax.jacrev(losses_fn)(theta)
    u_jac, s_jac = txs[0].update(grads, s_jac, theta, task_losses=losses)
    u_reuse, s_reuse = txs[1].update(None, s_reuse, theta, task_losses=losses, task_vjp=vjp,
                                     task_grads_fn=lambda: grads)
    return u_jac, s_jac, u_reuse, s_reuse

  theta = quadratic_problem()[0]
  s_jac, s_reuse = txs[0].init(theta), txs[1].init(theta)
  for _ in range(5):
    u_jac, s_jac, u_reuse, s_reuse = true_steps(theta, s_jac, s_reuse)
    # (maxent_nash, compiled in another context (e.g. eager), meets float32 round-off in L
    # with weights that agree to ~1e-5 absolute on this near-degenerate game)
    tol, w_atol = (1e-3, 1e-4) if exact else (1e-5, 1e-6)
    np.testing.assert_allclose(u_reuse["w"], u_jac["w"], rtol=tol, atol=1e-7)
    np.testing.assert_allclose(s_reuse.task_weights, s_jac.task_weights, rtol=tol, atol=w_atol)
    theta = jax.tree.map(lambda p, u: p - 0.01 * u, theta, u_jac)


def test_gradient_reuse_argument_errors():
  theta, losses_fn = quadratic_problem()
  tx = ldro.ldro_weights(N, 0.05, 0.3)
  state = tx.init(theta)
  losses, vjp = jax.vjp(losses_fn, theta)
  grads_fn = lambda: jax.jacrev(losses_fn)(theta)
  with pytest.raises(ValueError, match="task_grads_fn"):
    tx.update(None, state, theta, task_losses=losses, task_grads_fn=grads_fn)
  with pytest.raises(ValueError, match="task_grads_fn"):
    tx.update(None, state, theta, task_losses=losses, task_vjp=vjp, task_grads_fn=grads_fn,
              gram_fn=lambda: ldro.task_gram(grads_fn()))
  with pytest.raises(ValueError, match="leading task axis"):
    tx.update(None, state, theta, task_losses=losses, task_vjp=vjp,
              task_grads_fn=lambda: {"w": jnp.zeros((N + 1, D))})


def test_interaction_refreshed_only_when_due_and_zero_at_start():
  theta, losses_fn = quadratic_problem()
  tx = ldro.ldro_weights(N, 0.1, 0.1, update_every=3)
  state = tx.init(theta)
  np.testing.assert_array_equal(ldro.lookahead_dro.interaction(state), np.zeros((N, N)))
  calls = []
  for i in range(6):
    losses, vjp = jax.vjp(losses_fn, theta)
    theta = jax.tree.map(lambda p: p + 0.1, theta)  # move so a refresh changes A
    gram = ldro.task_gram(jax.jacrev(losses_fn)(theta))
    before = ldro.lookahead_dro.interaction(state)
    _, state = tx.update(None, state, theta, task_losses=losses, task_vjp=vjp, gram=gram)
    calls.append(not np.allclose(before, ldro.lookahead_dro.interaction(state)))
  assert calls == [True, False, False, True, False, False]


def test_inject_hyperparams_and_task_weights_lookup():
  theta, losses_fn = quadratic_problem()
  tx = optax.chain(
      optax.inject_hyperparams(ldro.ldro_weights)(num_tasks=N, lookahead_lr=0.1, weight_lr=0.5,
                                                  update_every=2),
      optax.sgd(0.01, momentum=0.9, nesterov=True))
  state = tx.init(theta)

  @jax.jit
  def step(theta, state):
    updates, state = tx.update(jax.jacrev(losses_fn)(theta), state, theta,
                               task_losses=losses_fn(theta))
    return optax.apply_updates(theta, updates), state

  theta, state = step(theta, state)
  w = ldro.task_weights(state)
  assert w.shape == (N,) and abs(float(w.sum()) - 1) < 1e-6
  state[0].hyperparams["weight_lr"] = jnp.asarray(0.0)
  w_before = ldro.task_weights(state)
  theta, state = step(theta, state)
  # eta = 0 freezes the weights
  np.testing.assert_allclose(ldro.task_weights(state), w_before, rtol=1e-6)


def test_exact_variant_uses_maxent_nash():
  theta, losses_fn = quadratic_problem()
  tx = ldro.ldro_weights(N, 0.1, update_every=1, exact=True)
  state = tx.init(theta)
  losses = losses_fn(theta)
  J = jax.jacrev(losses_fn)(theta)
  _, state = tx.update(J, state, theta, task_losses=losses)
  w_ref, _ = ldro.maxent_nash(ldro.lookahead_matrix(losses, ldro.task_gram(J), 0.1))
  np.testing.assert_allclose(state.task_weights, w_ref, atol=1e-5)
  assert bool(state.method_state.solver_converged)


def test_exact_variant_gives_an_absent_task_no_weight():
  """With a task absent from the batch (zero gradient, stale interaction column from the last
  refresh), the exact game is the present tasks' game: no weight on the absent task."""
  g = jnp.array([[1.0, 0.0, 0.2], [0.0, 1.0, 0.2], [0.7, 0.7, 0.5]])  # task 2 helps both
  tx = ldro.ldro_weights(3, 1.0, update_every=2, exact=True)
  state = tx.init({"a": jnp.zeros(3)})
  losses = jnp.array([1.0, 1.0, 1.0])
  # Jitted: op-by-op (eager) execution compiles every primitive of the update on its own.
  update = jax.jit(lambda g, s, l, m: tx.update(g, s, None, task_losses=l, task_mask=m))
  _, state = update({"a": g}, state, losses, None)  # refresh: all present
  present = jnp.array([True, True, False])
  out, state = update({"a": g.at[2].set(0.0)}, state, losses,
                      present)  # no refresh: task 2's column is stale
  w = np.asarray(state.task_weights)
  assert w[2] == 0.0 and w.sum() == pytest.approx(1.0) and w[0] == pytest.approx(w[1], abs=1e-4)
  np.testing.assert_allclose(out["a"], w[0] * g[0] + w[1] * g[1], rtol=1e-5)
  # The present tasks' game alone gives the same weights.
  L = ldro.lookahead_matrix(losses[:2], ldro.task_gram(g[:2]), 1.0)
  np.testing.assert_allclose(w[:2], jax.jit(ldro.maxent_nash)(L)[0], atol=1e-5)


def test_ldro_nonfinite_loss_keeps_weights():
  theta, losses_fn = quadratic_problem()
  tx = ldro.ldro_weights(N, 0.1, 0.1, update_every=1)
  state = tx.init(theta)
  J = jax.jacrev(losses_fn)(theta)
  bad = losses_fn(theta).at[2].set(jnp.nan)
  _, state2 = tx.update(J, state, theta, task_losses=bad)
  np.testing.assert_array_equal(state2.task_weights, state.task_weights)


def test_shape_errors_name_the_problem():
  theta, losses_fn = quadratic_problem()
  tx = ldro.ldro_weights(N, 0.1, 0.1)
  state = tx.init(theta)
  J = jax.jacrev(losses_fn)(theta)
  with pytest.raises(ValueError, match=r"task_losses must have shape \(4,\)"):
    tx.update(J, state, theta, task_losses=jnp.ones(3))
  with pytest.raises(ValueError, match="task_losses"):
    tx.update(J, state, theta)
  with pytest.raises(ValueError, match=r"leading task axis of size 4.*\['w'\]"):
    tx.update({"w": jnp.ones((3, D))}, state, theta, task_losses=jnp.ones(N))
  with pytest.raises(ValueError, match="gram_fn"):
    tx.update(None, state, theta, task_losses=jnp.ones(N), task_vjp=lambda w: w)


# --------------------------------------------------------------------------
# Baselines against their formulas on hand-worked examples.
# --------------------------------------------------------------------------

G3 = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])}  # three task gradients
L3 = jnp.array([1.0, 3.0, 2.0])


def run(tx, **kw):
  state = tx.init(None)
  upd, state = tx.update(G3, state, None, **kw)
  return np.asarray(upd["w"]), np.asarray(ldro.task_weights(state))


def test_equal_and_static_mixing():
  u, w = run(ldro.equal_weighting(3))
  np.testing.assert_allclose(u, [2 / 3, 1.0], rtol=1e-6)
  u, w = run(ldro.static_mixing([1, 4, 16], alpha=0.5))  # sqrt sizes 1,2,4 -> /7
  np.testing.assert_allclose(w, [1 / 7, 2 / 7, 4 / 7], rtol=1e-6)
  np.testing.assert_allclose(u, [1 / 7 + 4 / 7, 4 / 7 + 4 / 7], rtol=1e-6)
  np.testing.assert_allclose(ldro.mixing_weights([5, 10], 0.0), [0.5, 0.5])
  with pytest.raises(ValueError, match="task 1 has size 0"):
    ldro.static_mixing([3, 0], 1.0)


def test_group_dro_and_baselined_dro():
  eta = 0.5
  q = np.exp(eta * np.array([1.0, 3.0, 2.0]))
  q /= q.sum()
  u, w = run(ldro.group_dro(3, eta), task_losses=L3)
  np.testing.assert_allclose(w, q, rtol=1e-6)
  np.testing.assert_allclose(u, q @ np.asarray(G3["w"]), rtol=1e-6)
  b = np.array([0.0, 2.5, 0.0])
  q = np.exp(eta * (np.array([1.0, 3.0, 2.0]) - b))
  q /= q.sum()
  _, w = run(ldro.baselined_dro(b, eta), task_losses=L3)
  np.testing.assert_allclose(w, q, rtol=1e-6)
  _, w = run(ldro.group_dro(3, 0.0), task_losses=L3)
  np.testing.assert_allclose(w, np.full(3, 1 / 3), rtol=1e-6)


def test_group_dro_mask_keeps_absent_weight():
  tx = ldro.group_dro(3, 1.0)
  s = tx.init(None)
  _, s = tx.update(G3, s, None, task_losses=jnp.array([jnp.nan, 1.0, 2.0]),
                   task_mask=jnp.array([False, True, True]))
  assert float(s.task_weights[0]) == pytest.approx(1 / 3)
  assert float(s.task_weights.sum()) == pytest.approx(1.0)


def test_avg_max_interpolation():
  u, w = run(ldro.avg_max_interpolation(3, 0.5), task_losses=L3)
  np.testing.assert_allclose(w, [1 / 6, 1 / 6 + 0.5, 1 / 6], rtol=1e-6)


def test_pcgrad_matches_direct_projection():
  g = np.array([[1.0, 0.0], [-1.0, 1.0], [0.5, -2.0]])
  key = jax.random.key(3)
  tx = ldro.pcgrad(3, reduction="sum")
  state = tx.init(None)
  upd, _ = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, None, key=key)
  # Direct PCGrad with the same orders.
  perms = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, 3))(jax.random.split(key, 3)))
  out = np.zeros(2)
  for i in range(3):
    gi = g[i].copy()
    for j in perms[i]:
      if j != i and gi @ g[j] < 0:
        gi -= (gi @ g[j]) / (g[j] @ g[j]) * g[j]
    out += gi
  np.testing.assert_allclose(upd["w"], out, rtol=1e-5)
  with pytest.raises(ValueError, match="PRNG key"):
    tx.update({"w": jnp.asarray(g)}, state, None)


def test_random_weighting():
  key = jax.random.key(0)
  u, w = run(ldro.random_loss_weighting(3), key=key)
  np.testing.assert_allclose(w, jax.nn.softmax(jax.random.normal(key, (3,))), rtol=1e-6)
  np.testing.assert_allclose(u, w @ np.asarray(G3["w"]), rtol=1e-5)
  for dist in ["uniform", "dirichlet", "bernoulli", "c-bernoulli"]:
    _, w = run(ldro.random_gradient_weighting(3, dist), key=key)
    assert abs(w.sum() - 1) < 1e-6 and np.all(w >= 0)
  with pytest.raises(ValueError, match="unknown distribution"):
    ldro.random_loss_weighting(3, "cauchy")
  with pytest.raises(ValueError, match="PRNG key"):
    run(ldro.random_loss_weighting(3))


def test_registry():
  assert {"ldro", "dro", "pcgrad", "rlw", "rgw", "equal", "static_mixing", "avg_max",
          "baselined_dro", "ldro_exact"} <= set(ldro.method_names())
  tx = ldro.get_method("ldro", num_tasks=3, lookahead_lr=0.1, weight_lr=0.1)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  with pytest.raises(ValueError, match="unknown method 'lddro'; known methods: .*ldro"):
    ldro.get_method("lddro")
  with pytest.raises(ValueError, match="bad arguments"):
    ldro.get_method("dro", num_tasks=3, weight_lr=0.1, typo=1)


@pytest.mark.parametrize("name,kw", [
    ("equal", {}), ("dro", {"weight_lr": 0.1}), ("avg_max", {"alpha": 0.5}),
    ("ldro", {"lookahead_lr": 0.1, "weight_lr": 0.1}), ("rlw", {}), ("rgw", {}), ("pcgrad", {}),
])
def test_weights_permute_with_tasks(name, kw):
  tx = ldro.get_method(name, num_tasks=3, **kw)
  p = np.array([2, 0, 1])
  key = jax.random.key(1)
  s1, s2 = tx.init(None), tx.init(None)
  u1, s1 = tx.update(G3, s1, None, task_losses=L3, key=key)
  u2, s2 = tx.update(jax.tree.map(lambda x: x[p], G3), s2, None, task_losses=L3[p], key=key)
  if name in ("rlw", "rgw", "pcgrad"):  # random: only the simplex/shape property
    assert np.asarray(ldro.task_weights(s2)).shape == (3,)
  else:
    np.testing.assert_allclose(np.asarray(ldro.task_weights(s1))[p], ldro.task_weights(s2),
                               rtol=1e-5)
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-5)
