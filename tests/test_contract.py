"""The contract every registered task-weighting method meets (as optax's
``contrib/_common_test.py`` does for optimizers).

For each method of ``ldro.method_names()`` built with its registry defaults:
init/update under jit; its declared needs and modes are what it enforces;
``inject_hyperparams`` over its float hyper-parameters; bf16 gradients give a
bf16 update; the state's structure, shapes and dtypes are stable across
updates; ``ldro.task_weights`` finds its coefficients inside a chain; a
permutation of the tasks permutes the coefficients (deterministic methods);
finite output on degenerate input; Jacobian and lean mode agree where both
are supported; and on 8 devices the train step gives the 1-device result.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ldro
from ldro import train as ldro_train

N, D = 4, 6
METHODS = ldro.method_names()


def data_args(name: str, n: int) -> dict:
  """What the runner supplies from the data (task sizes, baselines), by signature."""
  params = inspect.signature(ldro.method_info(name).factory).parameters
  args = {}
  if "num_tasks" in params:
    args["num_tasks"] = n
  if "task_sizes" in params:
    args["task_sizes"] = list(np.arange(1, n + 1) * 10.0)
  if "baseline_losses" in params:
    args["baseline_losses"] = list(np.linspace(0.1, 0.4, n))
  return args


def build(name: str, n: int = N, **kw):
  return ldro.get_method(name, **data_args(name, n), **kw)


def problem(n: int = N, seed: int = 0, scale=None):
  """Task gradients, losses and a quadratic ``losses_fn`` whose Jacobian they are."""
  rng = np.random.default_rng(seed)
  A = rng.normal(size=(n, D)).astype(np.float32)
  if scale is not None:
    A = A * np.asarray(scale, np.float32)[:, None]
  theta = {"w": jnp.asarray(rng.normal(size=(D,)), jnp.float32)}

  def losses_fn(p):  # l_i = 0.5 (a_i . w)^2 + 0.1 (i + 1)
    z = jnp.asarray(A) @ p["w"]
    return 0.5 * z * z + 0.1 * jnp.arange(1, n + 1, dtype=jnp.float32)

  return theta, losses_fn


#: A validation-batch gradient (shaped like ``theta``), for methods that need
#: ``val_grads`` (MOML); the others ignore the extra argument.
VAL = {"w": jnp.linspace(-1.0, 1.0, D, dtype=jnp.float32)}


def jac_update(tx, losses_fn, theta, state, key):
  grads = jax.jacrev(losses_fn)(theta)
  return tx.update(grads, state, theta, task_losses=losses_fn(theta), key=key, val_grads=VAL)


@pytest.mark.parametrize("name", METHODS)
def test_registry_entry(name):
  info = ldro.method_info(name)
  assert info.label and info.reference and info.kind in ldro.registry.KINDS
  assert set(info.needs) <= set(ldro.weighting.NEEDS)
  assert info.preferred_mode in info.modes
  assert ldro.get_method(name, **data_args(name, N)) is not None  # defaults suffice


@pytest.mark.parametrize("name", METHODS)
def test_contract(name):
  info = ldro.method_info(name)
  tx = build(name)
  theta, losses_fn = problem()
  key = jax.random.key(0)
  state0 = tx.init(theta)

  # Needs are enforced as declared, with a message naming the missing input.
  grads = jax.jacrev(losses_fn)(theta)
  if "losses" in info.needs:
    with pytest.raises(ValueError, match="task_losses"):
      tx.update(grads, state0, theta, key=key, val_grads=VAL)
  if "key" in info.needs:
    with pytest.raises(ValueError, match="PRNG key"):
      tx.update(grads, state0, theta, task_losses=losses_fn(theta), val_grads=VAL)
  if "val_grads" in info.needs:
    with pytest.raises(ValueError, match="val_grads"):
      tx.update(grads, state0, theta, task_losses=losses_fn(theta), key=key)
  lean_vjp = jax.vjp(losses_fn, theta)[1]
  if "lean" not in info.modes:
    with pytest.raises(ValueError, match="Jacobian mode"):
      tx.update(None, state0, theta, task_losses=losses_fn(theta), key=key, task_vjp=lean_vjp,
                gram_fn=lambda: ldro.task_gram(grads), val_grads=VAL)
  elif "gram" in info.needs:
    with pytest.raises(ValueError, match="gram_fn"):
      tx.update(None, state0, theta, task_losses=losses_fn(theta), key=key, task_vjp=lean_vjp,
                val_grads=VAL)
  else:  # needs no Gram matrix: lean mode works with the VJP alone
    tx.update(None, state0, theta, task_losses=losses_fn(theta), key=key, task_vjp=lean_vjp,
              val_grads=VAL)

  # Under jit, in a chain; the state keeps its structure, shapes and dtypes.
  chain = optax.chain(tx, optax.sgd(0.1))

  # The state is donated, as the runner's train step does: every state leaf
  # must be its own buffer (one zeros array shared by two fields fails here).
  @functools.partial(jax.jit, donate_argnums=(1,))
  def step(theta, state, key):
    updates, state = jac_update(chain, losses_fn, theta, state, key)
    return optax.apply_updates(theta, updates), state, updates

  state = chain.init(theta)
  spec = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s)
  first = spec(state)
  for t in range(3):
    theta2, state, updates = step(theta, state, jax.random.fold_in(key, t))
    assert jax.tree.structure(state) == jax.tree.structure(chain.init(theta))
    assert spec(state) == first
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(updates))
  w = ldro.task_weights(state)
  assert w.shape == (N,) and np.all(np.isfinite(w))
  assert not np.allclose(np.asarray(updates["w"]), 0.0)

  # bf16 gradients give a bf16 update.
  bf16 = jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads)
  out, _ = jax.jit(lambda g, s: tx.update(g, s, theta, task_losses=losses_fn(theta), key=key,
                                          val_grads=VAL))(
      bf16, state0)
  assert out["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("name", METHODS)
def test_inject_hyperparams(name):
  info = ldro.method_info(name)
  args = {**info.defaults, **data_args(name, N)}
  rates = [k for k, v in args.items() if isinstance(v, float)]
  if not rates:
    pytest.skip(f"{name} has no float hyper-parameter")
  static = [k for k in args if k not in rates]
  tx = optax.inject_hyperparams(info.factory, static_args=static)(**args)
  direct = info.factory(**args)
  theta, losses_fn = problem()
  key = jax.random.key(1)
  s_inj, s_dir = tx.init(theta), direct.init(theta)
  u_inj, s_inj = jax.jit(lambda s: jac_update(tx, losses_fn, theta, s, key))(s_inj)
  u_dir, s_dir = jax.jit(lambda s: jac_update(direct, losses_fn, theta, s, key))(s_dir)
  np.testing.assert_allclose(u_inj["w"], u_dir["w"], rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(ldro.task_weights(s_inj), ldro.task_weights(s_dir), rtol=2e-4,
                             atol=1e-6)
  for k in rates:
    assert k in s_inj.hyperparams


@pytest.mark.parametrize("name", [n for n in METHODS if "key" not in ldro.method_info(n).needs])
def test_permutation_equivariance(name):
  p = np.array([2, 0, 3, 1])
  theta, losses_fn = problem(seed=3)
  grads = jax.jacrev(losses_fn)(theta)
  losses = losses_fn(theta)
  tx = build(name)
  args = data_args(name, N)
  permuted_args = {k: (list(np.asarray(v)[p]) if isinstance(v, list) else v)
                   for k, v in args.items()}
  # Methods configured by per-task data (sizes, baselines) get them permuted too;
  # the others reuse one jitted update (one compile).
  tx_p = ldro.get_method(name, **permuted_args) if permuted_args != args else tx
  s, s_p = tx.init(theta), tx_p.init(theta)
  step = jax.jit(tx.update)
  step_p = step if tx_p is tx else jax.jit(tx_p.update)
  for _ in range(2):
    u, s = step(grads, s, theta, task_losses=losses, val_grads=VAL)
    u_p, s_p = step_p(jax.tree.map(lambda g: g[p], grads), s_p, theta, task_losses=losses[p],
                      val_grads=VAL)
  # atol: float32 solvers (the exact L-DRO Nash) resolve weights near 0 to ~1e-4.
  np.testing.assert_allclose(np.asarray(ldro.task_weights(s))[p], ldro.task_weights(s_p),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(u["w"], u_p["w"], rtol=1e-4, atol=1e-6)


def degenerate_problems(n):
  """(case, grads, losses) of one shape: a zero gradient, a huge one, identical tasks."""
  out = []
  for case, scale in (("zero_gradient", [1.0, 0.0] + [1.0] * (n - 2)),
                      ("huge_gradient", [1.0, 1e3] + [1.0] * (n - 2)), ("identical_tasks", None)):
    theta, losses_fn = problem(n=n, seed=5, scale=scale)
    grads = jax.jacrev(losses_fn)(theta)
    if scale is None:
      grads = jax.tree.map(lambda g: jnp.broadcast_to(g[:1], g.shape), grads)
    out.append((case, grads, losses_fn(theta)))
  return theta, out


@pytest.mark.parametrize("name", METHODS)
def test_degenerate_inputs_give_finite_output(name):
  # One jitted update serves the three N-task cases (same shapes); one task is its own.
  theta, cases = degenerate_problems(N)
  theta1, losses_fn1 = problem(n=1, seed=5)
  cases = [(c, g, l, N) for c, g, l in cases]
  cases.append(("one_task", jax.jacrev(losses_fn1)(theta1), losses_fn1(theta1), 1))
  txs = {N: build(name, N), 1: build(name, 1)}
  steps = {n: jax.jit(tx.update) for n, tx in txs.items()}
  for case, grads, losses, n in cases:
    state = txs[n].init(theta)
    for t in range(2):
      u, state = steps[n](grads, state, theta, task_losses=losses, key=jax.random.key(t),
                          val_grads=VAL)
      assert np.all(np.isfinite(np.asarray(u["w"]))), case
      assert np.all(np.isfinite(np.asarray(ldro.task_weights(state)))), case


# The exact L-DRO's modes are compared through the train step in
# tests/test_train_step.py (its Nash solve makes this test 5x slower).
@pytest.mark.parametrize("name", [n for n in METHODS if "lean" in ldro.method_info(n).modes
                                  and n != "ldro_exact"])
def test_jacobian_and_lean_mode_agree(name):
  # Three steps from the same start: Jacobian mode; lean mode with gram_fn;
  # lean mode with task_grads_fn (gradient reuse on refresh steps).
  tx = optax.chain(build(name), optax.sgd(0.05))
  theta0, losses_fn = problem(seed=7)

  def run(mode):
    @jax.jit
    def step(theta, state, key):
      if mode == "jacobian":
        return jac_update(tx, losses_fn, theta, state, key)
      losses, vjp = jax.vjp(losses_fn, theta)
      grads_fn = lambda: jax.jacrev(losses_fn)(theta)
      source = ({"gram_fn": lambda: ldro.task_gram(grads_fn())} if mode == "gram_fn"
                else {"task_grads_fn": grads_fn})
      return tx.update(None, state, theta, task_losses=losses, key=key, task_vjp=vjp,
                       val_grads=VAL, **source)

    theta, state = theta0, tx.init(theta0)
    for t in range(3):
      updates, state = step(theta, state, jax.random.key(t))
      theta = optax.apply_updates(theta, updates)
    return theta["w"], ldro.task_weights(state)

  ref = run("jacobian")
  for mode in ("gram_fn", "task_grads_fn"):
    got = run(mode)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-6, err_msg=mode)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-4, atol=1e-6, err_msg=mode)


def test_task_weights_without_a_method_raises():
  with pytest.raises(ValueError, match="no ldro task-weighting method"):
    ldro.task_weights(optax.sgd(0.1).init({"w": jnp.zeros(2)}))


def test_unknown_method_and_bad_hyperparameters_name_the_problem():
  with pytest.raises(ValueError, match="unknown method 'cagrd'"):
    ldro.method_info("cagrd")
  with pytest.raises(ValueError, match="num_tasks must be a whole number"):
    ldro.get_method("equal", num_tasks=2.5)
  with pytest.raises(ValueError, match="weight_lr must be in"):
    ldro.get_method("ldro", num_tasks=2, weight_lr=-0.5)
  with pytest.raises(ValueError, match="weight_lr must be finite"):
    ldro.get_method("dro", num_tasks=2, weight_lr=float("nan"))
  with pytest.raises(ValueError, match="weight_lr must be a number, got 'fast'"):
    ldro.ldro_weights(2, 0.1, weight_lr="fast")
  with pytest.raises(ValueError, match="update_every must be in"):
    ldro.get_method("ldro", num_tasks=2, update_every=0)


# --------------------------------------------------------------------------
# 8 simulated devices: the sharded train step gives the 1-device result.
# --------------------------------------------------------------------------

SHARDED = [n for n in ("mgda", "nash_mtl", "gradvac", "cagrad", "pcgrad", "ldro")
           if n in METHODS]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices "
                    "(XLA_FLAGS=--xla_force_host_platform_device_count=8)")
@pytest.mark.parametrize("name", SHARDED)
def test_eight_devices_match_one(name):
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  b = 8
  batch = {"x": jnp.asarray(rng.normal(size=(N, b, D)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=(N, b)), jnp.float32)}
  params = {"w": jnp.zeros(D), "b": jnp.zeros([])}

  def task_loss(p, tb, rng):
    del rng
    r = tb["x"] @ p["w"] + p["b"] - tb["y"]
    return 0.5 * jnp.mean(r * r), {}

  tx = optax.chain(build(name), optax.sgd(0.05))
  step = jax.jit(ldro_train.make_train_step(task_loss, tx))

  def run(batch):
    state = ldro_train.init_train_state(params, tx, jax.random.key(0))
    for _ in range(3):
      state, _ = step(state, batch)
    return state.params["w"], ldro.task_weights(state.opt_state)

  ref = run(batch)
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  sharded = jax.device_put(batch, NamedSharding(mesh, P(None, "data")))
  got = run(sharded)
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got[1], ref[1], rtol=1e-4, atol=1e-6)
