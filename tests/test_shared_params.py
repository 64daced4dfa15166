"""``ldro.on_shared_params``: gradient methods with the Gram matrix on the shared parameters.

A model with a shared trunk and one head per task: the heads only add to the Gram matrix's
diagonal. With ``shared_params='trunk'`` every Gram-based method must choose exactly the
coefficients it chooses from the trunk's gradients alone, and still update every parameter
(the heads by ``c_i`` times their own task's gradient).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldro

N, D, H = 3, 5, 4


def _model_grads(head_scale=1.0):
  """Per-task gradients (vmap(grad) over a task-grouped batch), losses and the loss function."""
  rng = np.random.default_rng(0)
  params = {"trunk": {"kernel": jnp.asarray(rng.normal(size=(D, H)), jnp.float32)},
            "heads": {f"head_{i}": jnp.asarray(head_scale * rng.normal(size=(H,)), jnp.float32)
                      for i in range(N)}}
  x = jnp.asarray(rng.normal(size=(N, 8, D)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(N, 8)), jnp.float32)

  def task_loss(p, i, xi, yi):
    z = jnp.tanh(xi @ p["trunk"]["kernel"])
    head = jnp.stack([p["heads"][f"head_{j}"] for j in range(N)])[i]
    return jnp.mean((z @ head - yi) ** 2)

  def losses_fn(p):
    return jax.vmap(task_loss, in_axes=(None, 0, 0, 0))(p, jnp.arange(N), x, y)

  losses, grads = jax.vmap(jax.value_and_grad(task_loss), in_axes=(None, 0, 0, 0))(
      params, jnp.arange(N), x, y)
  return params, losses, grads, losses_fn


def _gram_methods():
  return [n for n in ldro.method_names() if "gram" in ldro.method_info(n).needs]


def test_the_heads_only_add_to_the_diagonal():
  _, _, grads, _ = _model_grads()
  full = ldro.weighting.filtered_gram(grads, None, "t")
  trunk = ldro.weighting.filtered_gram(grads, ldro.weighting.param_filter("trunk"), "t")
  off = ~np.eye(N, dtype=bool)
  np.testing.assert_allclose(np.asarray(full)[off], np.asarray(trunk)[off], rtol=1e-5)
  assert np.all(np.diag(full) > np.diag(trunk) + 1e-3)


@pytest.mark.parametrize("name", _gram_methods())
def test_coefficients_are_those_of_the_shared_gradients(name):
  _, losses, grads, _ = _model_grads()
  trunk_grads = {"trunk": grads["trunk"]}
  shared = ldro.get_method(name, num_tasks=N, shared_params="trunk")
  plain = ldro.get_method(name, num_tasks=N)
  s_sh, s_ref = shared.init(None), plain.init(None)
  for t in range(2):  # two steps: the methods' states must follow the same path too
    key = jax.random.key(t)
    out, s_sh = shared.update(grads, s_sh, None, task_losses=losses * (1 + t), key=key)
    _, s_ref = plain.update(trunk_grads, s_ref, None, task_losses=losses * (1 + t), key=key)
    c = np.asarray(ldro.task_weights(s_sh))
    np.testing.assert_allclose(c, ldro.task_weights(s_ref), rtol=2e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(s_sh.gram, s_ref.gram, rtol=1e-5, err_msg=name)
    # The update is sum_i c_i g_i on every parameter, each head c_i times its task's gradient.
    for i in range(N):
      np.testing.assert_allclose(out["heads"][f"head_{i}"],
                                 c[i] * np.asarray(grads["heads"][f"head_{i}"][i]),
                                 rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(out["trunk"]["kernel"],
                               np.tensordot(c, np.asarray(grads["trunk"]["kernel"]), axes=1),
                               rtol=1e-5, atol=1e-7, err_msg=name)


def test_the_heads_change_mgda_without_the_filter():
  # The reason for the wrapper: on all parameters, MGDA's min-norm weights move by 0.15-0.19
  # here (measured: 0.36/0.13/0.52 on the trunk, 0.51/0.17/0.32 with the heads).
  _, losses, grads, _ = _model_grads()
  shared = ldro.get_method("mgda", num_tasks=N, normalization="none", shared_params="trunk")
  plain = ldro.get_method("mgda", num_tasks=N, normalization="none")
  _, s_sh = shared.update(grads, shared.init(None), None, task_losses=losses)
  _, s_all = plain.update(grads, plain.init(None), None, task_losses=losses)
  c_sh, c_all = (np.asarray(ldro.task_weights(s)) for s in (s_sh, s_all))
  assert np.max(np.abs(c_sh / c_sh.sum() - c_all / c_all.sum())) > 0.1


@pytest.mark.parametrize("name,kwargs", [("cagrad", {}), ("ldro", {"update_every": 2})])
def test_lean_mode_with_task_grads_fn_agrees(name, kwargs):
  # L-DRO refreshes every 2 steps: its ordinary steps reuse the stored shared-parameter Gram.
  params, losses, grads, losses_fn = _model_grads()
  tx = ldro.get_method(name, num_tasks=N, shared_params=r"\['trunk'\]", **kwargs)
  lean_losses, vjp = jax.vjp(losses_fn, params)
  jac_step = jax.jit(lambda s: tx.update(grads, s, None, task_losses=losses))
  lean_step = jax.jit(lambda s: tx.update(None, s, None, task_losses=lean_losses, task_vjp=vjp,
                                          task_grads_fn=lambda: grads))
  s_jac = s_lean = tx.init(None)
  for _ in range(3):
    (jac, s_jac), (lean, s_lean) = jac_step(s_jac), lean_step(s_lean)
    for a, b in zip(jax.tree.leaves(jac), jax.tree.leaves(lean)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s_jac.gram, s_lean.gram, rtol=1e-6)
  with pytest.raises(ValueError, match="needs the per-task gradients.*task_grads_fn"):
    tx.update(None, tx.init(None), None, task_losses=lean_losses, task_vjp=vjp,
              gram_fn=lambda: jnp.eye(N))


def test_combine_keeps_the_filter():
  _, losses, grads, _ = _model_grads()
  key = jax.random.key(3)
  combined = ldro.combine(ldro.random_loss_weighting(N),
                          ldro.get_method("cagrad", num_tasks=N, shared_params="trunk"))
  reference = ldro.combine(ldro.random_loss_weighting(N), ldro.get_method("cagrad", num_tasks=N))
  _, s = combined.update(grads, combined.init(None), None, task_losses=losses, key=key)
  _, r = reference.update({"trunk": grads["trunk"]}, reference.init(None), None,
                          task_losses=losses, key=key)
  np.testing.assert_allclose(ldro.task_weights(s), ldro.task_weights(r), rtol=1e-5)


def test_bad_input():
  _, losses, grads, _ = _model_grads()
  with pytest.raises(ValueError, match="equal_weighting does not use the task-gradient Gram "
                     "matrix, so with specific='coefficients' nothing changes"):
    ldro.get_method("equal", num_tasks=N, shared_params="trunk")
  with pytest.raises(ValueError, match="gradnorm already takes its Gram matrix.*layer"):
    ldro.get_method("gradnorm", num_tasks=N, layer="trunk", shared_params="trunk")
  with pytest.raises(ValueError, match=r"on_shared_params\(mgda\): shared must be None"):
    ldro.get_method("mgda", num_tasks=N, shared_params=3)
  with pytest.raises(TypeError, match="must be an ldro task-weighting transformation"):
    ldro.on_shared_params(ldro.get_method("mgda", num_tasks=N).update, "trunk")
  tx = ldro.get_method("mgda", num_tasks=N, shared_params="encoder")
  with pytest.raises(ValueError, match="selects no parameter; paths are.*trunk"):
    tx.update(grads, tx.init(None), None, task_losses=losses)
  assert ldro.on_shared_params(tx, None) is tx  # None: all parameters, the method unchanged


def test_gin_method_hparams_pass_it():
  from experiments.runner import configurables  # pylint: disable=g-import-not-at-top
  tx = configurables.method(num_tasks=N, name="cagrad", hparams={"shared_params": "trunk"})
  assert tx.rule.gram_filter is not None and tx.rule.gram_filter("['trunk']['kernel']")
  assert not tx.rule.gram_filter("['heads']['head_0']")


def test_runner_lean_mode_takes_the_task_gradients(tmp_path):
  """The runner's lean mode reuses a refresh step's task gradients for a filtered Gram matrix
  (it cannot come from gram_fn) and trains as Jacobian mode does; other strategies are refused."""
  import gin  # pylint: disable=g-import-not-at-top
  from experiments import train as train_lib  # pylint: disable=g-import-not-at-top
  from experiments.runner import loop  # pylint: disable=g-import-not-at-top

  def run(workdir, *bindings):
    gin.clear_config()
    train_lib.parse_gin(["gin_configs/synthetic/base.gin", "gin_configs/methods/cagrad.gin"],
                        ["train_and_evaluate.num_steps = 6", "train_and_evaluate.eval_every = 6",
                         "method.hparams = {'shared_params': 'r|phi'}", *bindings])
    return loop.train_and_evaluate(str(workdir), quiet=True)
  jac = run(tmp_path / "jacobian")
  lean = run(tmp_path / "lean", "train_and_evaluate.mode = 'lean'")
  np.testing.assert_allclose(lean[-1]["task_loss"], jac[-1]["task_loss"], rtol=1e-5)
  with pytest.raises(ValueError, match="selected parameters.*gram_strategy 'chunked'"):
    run(tmp_path / "chunked", "train_and_evaluate.mode = 'lean'",
        "train_and_evaluate.gram_strategy = 'chunked'")


@pytest.mark.parametrize("name,kwargs", [("mgda", {}), ("ldro", {"update_every": 2})])
def test_specific_equal_gives_heads_their_unweighted_gradient(name, kwargs):
  """specific='equal' (LibMTL's MGDA/CAGrad/PCGrad): each head gets its task's gradient / N,
  the trunk sum_i c_i g_i; lean mode (refresh and ordinary steps) agrees."""
  params, losses, grads, losses_fn = _model_grads()
  tx = ldro.get_method(name, num_tasks=N, shared_params="trunk", specific_params="equal",
                       **kwargs)
  lean_losses, vjp = jax.vjp(losses_fn, params)
  jac_step = jax.jit(lambda s: tx.update(grads, s, None, task_losses=losses))
  lean_step = jax.jit(lambda s: tx.update(None, s, None, task_losses=lean_losses, task_vjp=vjp,
                                          task_grads_fn=lambda: grads))
  s_jac = s_lean = tx.init(None)
  for _ in range(3):  # L-DRO: steps 0 and 2 refresh, step 1 pulls back through the VJP
    (jac, s_jac), (lean, s_lean) = jac_step(s_jac), lean_step(s_lean)
    c = np.asarray(ldro.task_weights(s_jac))
    for i in range(N):
      np.testing.assert_allclose(jac["heads"][f"head_{i}"],
                                 np.asarray(grads["heads"][f"head_{i}"][i]) / N, rtol=1e-5)
    np.testing.assert_allclose(jac["trunk"]["kernel"],
                               np.tensordot(c, np.asarray(grads["trunk"]["kernel"]), axes=1),
                               rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(jac), jax.tree.leaves(lean)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_specific_params_bad_input():
  with pytest.raises(ValueError, match="specific_params='equal' needs shared_params"):
    ldro.get_method("mgda", num_tasks=N, specific_params="equal")
  with pytest.raises(ValueError, match="unknown specific 'sum'"):
    ldro.get_method("mgda", num_tasks=N, shared_params="trunk", specific_params="sum")


def test_rgw_on_shared_params_is_the_papers_algorithm_2():
  """RGW with specific='equal': random weights on the trunk's task gradients, each head its
  own task's gradient unweighted (/ N); plain RGW is RLW's update for the same draw."""
  _, losses, grads, _ = _model_grads()
  key = jax.random.key(3)
  paper = ldro.get_method("rgw", num_tasks=N, shared_params="trunk", specific_params="equal")
  out, state = paper.update(grads, paper.init(None), None, key=key)
  lam = np.asarray(ldro.task_weights(state))
  np.testing.assert_allclose(lam, ldro.random_weighting.sample_random_weights(key, N),
                             rtol=1e-6)
  np.testing.assert_allclose(out["trunk"]["kernel"],
                             np.tensordot(lam, np.asarray(grads["trunk"]["kernel"]), axes=1),
                             rtol=1e-5, atol=1e-7)
  for i in range(N):
    np.testing.assert_allclose(out["heads"][f"head_{i}"],
                               np.asarray(grads["heads"][f"head_{i}"][i]) / N, rtol=1e-5)
  plain = ldro.get_method("rgw", num_tasks=N)
  rlw = ldro.get_method("rlw", num_tasks=N)
  a, _ = plain.update(grads, plain.init(None), None, key=key)
  b, _ = rlw.update(grads, rlw.init(None), None, key=key)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6)
  assert not np.allclose(a["heads"]["head_0"], out["heads"]["head_0"])


def test_rgw_filter_that_selects_nothing_and_combine_refuse():
  _, _, grads, _ = _model_grads()
  tx = ldro.get_method("rgw", num_tasks=N, shared_params="encodr", specific_params="equal")
  with pytest.raises(ValueError, match="selects no parameter; paths are.*trunk"):
    tx.update(grads, tx.init(None), None, key=jax.random.key(0))
  rlw = ldro.get_method("rlw", num_tasks=N, shared_params="trunk", specific_params="equal")
  with pytest.raises(ValueError, match="has shared parameters set"):
    ldro.combine(rlw, ldro.get_method("mgda", num_tasks=N))


def test_runner_lean_mode_with_a_method_without_gram(tmp_path):
  """RLW with shared parameters and specific='equal' needs no per-task gradients: lean mode
  runs with any Gram strategy (only a filtered Gram matrix needs the grouped one)."""
  import gin  # pylint: disable=g-import-not-at-top
  from experiments import train as train_lib  # pylint: disable=g-import-not-at-top
  from experiments.runner import loop  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  train_lib.parse_gin(["gin_configs/synthetic/base.gin", "gin_configs/methods/rlw.gin"],
                      ["train_and_evaluate.num_steps = 2", "train_and_evaluate.eval_every = 2",
                       "method.hparams = {'shared_params': 'r', 'specific_params': 'equal'}",
                       "train_and_evaluate.mode = 'lean'",
                       "train_and_evaluate.gram_strategy = 'chunked'"])
  recs = loop.train_and_evaluate(str(tmp_path / "rlw"), quiet=True)
  assert recs[-1]["step"] == 2 and np.all(np.isfinite(recs[-1]["task_loss"]))
