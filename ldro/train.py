"""Pure, jittable multitask training steps (no I/O).

A step maps ``(TrainState, batch) -> (TrainState, metrics)``. The batch is
task-grouped: every leaf has a leading task axis ``N`` and
``task_loss_fn(params, task_batch, rng) -> (loss, aux)`` gives one task's
loss on its slice. Two ways to get the weighted update:

* ``mode='jacobian'``: all ``N`` task gradients by ``vmap(grad)`` over the task
  axis (about one backward pass), handed to the weighting transformation,
  which forms ``sum_i w_i g_i`` and, when due, the Gram matrix from the same
  gradients (no second backward pass). Needed by the methods that support it
  only (``ldro.method_info(name).modes == ('jacobian',)``: GradDrop, whose
  update is not a weighted sum of the task gradients, and RGW), and the cheaper
  choice for Gram-based methods that refresh every step (PCGrad, MGDA, L-DRO
  with ``update_every=1``).
* ``mode='lean'``: one forward pass with ``jax.vjp``; the transformation picks
  this step's weights from the losses and pulls them back through the VJP
  (exactly the cost of ordinary training). The Gram matrix is computed only
  on refresh steps, inside the transformation's ``lax.cond``, with the chosen
  strategy (``grouped``, ``chunked``, ``pairwise``, ``jacrev``). With
  ``grouped`` and ``reuse_refresh_grads`` the refresh step's ``N`` gradients
  (``vmap(grad)``) also give its update (``task_grads_fn``): no second
  backward pass on that step, but the ordinary step's backward pass then runs
  inside a ``lax.cond`` branch (see :func:`make_train_step`).

Non-finite values: every step checks the task losses and the final update
(on device, no host sync). A non-finite step is skipped: params and optimizer
state (task weights, interaction matrix) are kept. The state counts skipped
steps and remembers the first bad step and task, so a driver can stop with a
clear message (``nonfinite='error'``) or carry on (``'skip'``) by reading them
at its logging interval.

Sharding: the step is written for the *global* batch, so under ``jax.jit``
with sharded inputs (data parallel, FSDP) the per-task losses, gradients and
Gram matrix are global. ``param_shardings`` (optional, e.g. the
``NamedSharding`` s of the parameters) pins the per-task gradients
``[N, ...]`` to the parameters' sharding (task axis replicated) and the
update to the parameters' sharding, with ``jax.lax.with_sharding_constraint``.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ldro import lookahead
from ldro import weighting

Array = jax.Array
PyTree = Any

TRAIN_MODES = ("jacobian", "lean")


class TrainState(NamedTuple):
  """Everything a multitask run needs to resume exactly.

  Attributes:
    step: ``[]`` int32 number of steps taken.
    params: model parameters.
    opt_state: optimizer state (holds the task weights, interaction matrix).
    rng: base PRNG key; step ``t`` uses ``fold_in(rng, t)``.
    nonfinite_count: ``[]`` int32, steps skipped for NaN/Inf.
    first_nonfinite_step: ``[]`` int32, first skipped step, or -1.
    first_nonfinite_task: ``[]`` int32, first task with a non-finite loss at
      that step, or -1 if only the update was non-finite.
  """
  step: Array
  params: PyTree
  opt_state: PyTree
  rng: Array
  nonfinite_count: Array
  first_nonfinite_step: Array
  first_nonfinite_task: Array


def init_train_state(params: PyTree, tx: optax.GradientTransformation, rng: Array) -> TrainState:
  """Initial :class:`TrainState` (step 0).

  Args:
    params: the model parameters.
    tx: the whole optimizer chain (e.g. ``optax.chain(ldro.get_method(...), optax.sgd(...))``).
    rng: the PRNG key the train step splits each step.

  Returns:
    The state with ``tx.init(params)`` and no non-finite step recorded.
  """
  return TrainState(
      step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params), rng=rng,
      nonfinite_count=jnp.zeros([], jnp.int32),
      first_nonfinite_step=jnp.full([], -1, jnp.int32),
      first_nonfinite_task=jnp.full([], -1, jnp.int32))


def _all_finite(tree: PyTree) -> Array:
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _maybe_task_weights(opt_state: PyTree, num_tasks: int) -> Array:
  try:
    w = weighting.task_weights(opt_state)
  except ValueError:
    return jnp.full((num_tasks,), 1.0 / num_tasks)
  return w


def _finish(state: TrainState, new_params, new_opt_state, losses, updates, extra_metrics):
  """Applies the non-finite guard and assembles the metrics."""
  finite_losses = jnp.isfinite(losses)
  ok = jnp.all(finite_losses) & _all_finite(updates)
  select = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
  bad_task = jnp.where(jnp.all(finite_losses), -1, jnp.argmin(finite_losses)).astype(jnp.int32)
  first = (~ok) & (state.first_nonfinite_step < 0)
  new_state = TrainState(
      step=state.step + 1,
      params=select(new_params, state.params),
      opt_state=select(new_opt_state, state.opt_state),
      rng=state.rng,
      nonfinite_count=state.nonfinite_count + (~ok).astype(jnp.int32),
      first_nonfinite_step=jnp.where(first, state.step, state.first_nonfinite_step),
      first_nonfinite_task=jnp.where(first, bad_task, state.first_nonfinite_task),
  )
  metrics = {"task_losses": losses, "finite": ok,
             "task_weights": _maybe_task_weights(new_state.opt_state, losses.shape[0])}
  metrics.update(extra_metrics)
  return new_state, metrics


def _stacked(sharding):
  """The sharding of ``[N, *shape]`` given that of ``shape`` (task axis replicated)."""
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
  if isinstance(sharding, PartitionSpec):
    return PartitionSpec(None, *sharding)
  raise TypeError("param_shardings leaves must be NamedSharding or PartitionSpec, got "
                  f"{type(sharding).__name__}.")


def _constrain(tree: PyTree, shardings: Optional[PyTree], stacked: bool = False) -> PyTree:
  """``with_sharding_constraint`` (a no-op without shardings)."""
  if shardings is None:
    return tree
  if stacked:
    shardings = jax.tree_util.tree_map(_stacked, shardings,
                                       is_leaf=lambda x: isinstance(x, PartitionSpec))
  return jax.lax.with_sharding_constraint(tree, shardings)


def make_train_step(
    task_loss_fn: Callable[..., tuple[Array, Any]],
    tx: optax.GradientTransformationExtraArgs,
    *,
    mode: str = "jacobian",
    gram_strategy: str = "grouped",
    chunk_size: Optional[int] = None,
    param_shardings: Optional[PyTree] = None,
    losses_fn: Optional[Callable[..., tuple[Array, Any]]] = None,
    reuse_refresh_grads: Optional[bool] = None,
    val_grads: bool = False,
    microbatches: int = 1,
) -> Callable[[TrainState, PyTree], tuple[TrainState, dict]]:
  """Builds the multitask train step (pure; wrap it in ``jax.jit``).

  Args:
    task_loss_fn: ``task_loss_fn(params, task_batch, rng) -> (loss, aux)``,
      the loss of one task on its slice of a task-grouped batch. ``aux`` may
      hold a ``'count'`` (examples of the task in the batch): tasks with
      ``count == 0`` are marked absent (``task_mask``) and the loss function
      must then return a finite loss (e.g. 0) for them.
    tx: an optax chain whose first element is an ``ldro`` task-weighting
      transformation.
    mode: ``'jacobian'`` or ``'lean'`` (see the module docstring).
    gram_strategy: Gram strategy for lean mode's refresh steps.
    chunk_size: tasks per chunk for ``gram_strategy='chunked'``.
    param_shardings: optional pytree like the params of ``NamedSharding`` (or
      ``PartitionSpec``, under a mesh): per-task gradients are constrained to
      it (with a replicated task axis), and so is the update.
    losses_fn: optional: ``losses_fn(params, batch, rng) ->
      (losses [N], aux)``, all task losses of the grouped batch in one call
      (e.g. one model application on the flattened batch), used for lean
      mode's forward/backward pass (and, in either mode, for the validation
      gradient of ``val_grads=True``) instead of ``vmap`` of ``task_loss_fn``
      over tasks. The backward pass is then exactly an ordinary one even for
      layers with a custom VJP, whose backward ``vmap`` would otherwise run
      per task (see ``ldro.models.cnn.conv_same``). ``aux`` may hold
      ``'count'`` ``[N]``. The Gram strategies still use ``task_loss_fn``.
    reuse_refresh_grads: lean mode with ``gram_strategy='grouped'`` only: take
      a refresh step's update ``sum_i w_i g_i`` from the ``N`` gradients of its
      Gram matrix (``task_grads_fn`` of :func:`ldro.ldro_weights`) instead of
      a second backward pass. Both the refresh and the ordinary step's
      backward pass then run inside ``lax.cond`` branches, where XLA:CPU can
      lose its fast convolution kernels (measured: a x30 slower step with
      flax's ``nn.Conv`` gradients; ``ldro.models.cnn``'s custom VJPs and
      convolution-free models keep their speed). ``None`` (default): reuse on
      GPU and TPU, not on the CPU backend; pass ``True`` on CPU for models
      whose backward pass is known to be fast under ``lax.cond``.
    val_grads: for methods that read a validation gradient (MOML,
      ``'val_grads'`` in ``ldro.method_info(name).needs``): the batch is then
      ``{'train': grouped batch, 'val': grouped validation batch}`` (held-out
      training data, never the test split), and the step hands the gradient
      of the validation batch's mean task loss to the transformation as the
      ``val_grads`` extra argument (one more backward pass, on the
      validation batch).
    microbatches: gradient accumulation: each task's slice of the batch (its
      second axis, ``[N, B, ...]``) is cut into this many micro-batches of
      ``B / microbatches`` examples, run one after another under
      ``lax.scan`` (activation memory of one micro-batch), and combined
      into the full batch's task losses and gradients, weighted by each
      micro-batch's ``aux['count']`` when the loss function reports it
      (else equally). Jacobian mode accumulates the ``N`` task gradients
      (the same update as the whole batch at once, up to float rounding).
      Lean mode runs the micro-batches' forward passes for the losses, then
      the weighted backward pass of each (2 forward and 1 backward pass per
      micro-batch); its refresh steps accumulate the ``N`` task gradients
      (``gram_strategy='grouped'`` only). The per-task random keys differ
      from the whole-batch step's (one per micro-batch). A task with no
      example in a micro-batch adds nothing to it; its loss function must
      still give a finite loss and gradient there (as for absent tasks). With
      ``val_grads`` the validation gradient is still one backward pass over
      the whole validation batch. ``optax.MultiSteps`` cannot do this: it
      accumulates parameter-shaped gradients.

  Returns:
    ``step(state, batch) -> (state, metrics)``; metrics hold ``task_losses``
    ``[N]``, ``task_weights`` ``[N]`` and ``finite``.
  """
  if mode not in TRAIN_MODES:
    raise ValueError(f"unknown train mode {mode!r}; known: {', '.join(TRAIN_MODES)}.")
  if gram_strategy not in lookahead.GRAM_STRATEGIES:
    raise ValueError(f"unknown Gram strategy {gram_strategy!r}; known: "
                     f"{', '.join(lookahead.GRAM_STRATEGIES)}.")
  batched_losses_fn = losses_fn
  if reuse_refresh_grads is None:
    reuse_refresh_grads = jax.default_backend() != "cpu"
  if (isinstance(microbatches, bool) or not isinstance(microbatches, int)
      or microbatches < 1):
    raise ValueError(f"microbatches must be a whole number >= 1, got {microbatches!r}.")
  if microbatches > 1 and mode == "lean" and gram_strategy != "grouped":
    raise ValueError(f"microbatches={microbatches} in lean mode accumulates the N task "
                     f"gradients of a refresh step (gram_strategy='grouped'); got "
                     f"gram_strategy={gram_strategy!r}.")

  def step(state: TrainState, batch: PyTree):
    extra_args = {}
    if val_grads:
      if not (isinstance(batch, dict) and set(batch) == {"train", "val"}):
        raise ValueError("make_train_step(val_grads=True) needs the batch "
                         "{'train': ..., 'val': ...} (a validation batch for the method).")
      batch, val_batch = batch["train"], batch["val"]
      val_key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 2)
      # Tasks weighted equally: the gradient of the validation batch's mean task loss.
      extra_args["val_grads"] = _constrain(jax.grad(lambda p: jnp.mean(all_task_losses(
          task_loss_fn, batched_losses_fn, p, val_batch, val_key)[0]))(state.params),
                                           param_shardings)
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    key = jax.random.fold_in(state.rng, state.step)
    loss_key, tx_key = jax.random.split(key)
    if microbatches > 1:
      return _accumulated(state, batch, n, loss_key, tx_key, extra_args)
    task_keys = jax.random.split(loss_key, n)
    sliced = (batch, task_keys)

    def one_task(params, task_batch_and_key):
      task_batch, task_key = task_batch_and_key
      return task_loss_fn(params, task_batch, task_key)

    def losses_fn(params):  # every task's loss from its slice: vmap of task_loss_fn
      return all_task_losses(task_loss_fn, None, params, batch, loss_key)

    if mode == "jacobian":
      (losses, aux), task_grads = jax.vmap(
          jax.value_and_grad(one_task, has_aux=True), in_axes=(None, 0))(state.params, sliced)
      task_grads = _constrain(task_grads, param_shardings, stacked=True)
      mask = _task_mask(aux)
      updates, opt_state = tx.update(task_grads, state.opt_state, state.params,
                                     task_losses=losses, task_mask=mask, key=tx_key,
                                     **extra_args)
    else:
      losses, vjp_fn, aux = jax.vjp(
          lambda p: all_task_losses(task_loss_fn, batched_losses_fn, p, batch, loss_key),
          state.params, has_aux=True)
      mask = _task_mask(aux)
      scalar_loss = lambda p, tb_k: one_task(p, tb_k)[0]
      if gram_strategy == "grouped" and reuse_refresh_grads:
        # The N gradients of a refresh step serve the Gram matrix and the update
        # (no second backward pass); transformations that do not refresh
        # anything ignore this extra argument.
        refresh_args = {"task_grads_fn": lambda: _constrain(
            lookahead.per_task_grads(scalar_loss, state.params, sliced), param_shardings,
            stacked=True)}
      else:
        refresh_args = {"gram_fn": lambda: lookahead.compute_gram(
            gram_strategy,
            scalar_loss if gram_strategy != "jacrev" else (lambda p, b: losses_fn(p)[0]),
            state.params, sliced, chunk_size)}
      updates, opt_state = tx.update(None, state.opt_state, state.params, task_losses=losses,
                                     task_mask=mask, key=tx_key, task_vjp=vjp_fn,
                                     **refresh_args, **extra_args)
    updates = _constrain(updates, param_shardings)
    new_params = optax.apply_updates(state.params, updates)
    extra = {k: v for k, v in aux.items()} if isinstance(aux, dict) else {}
    return _finish(state, new_params, opt_state, losses, updates, extra)

  def _accumulated(state, batch, n, loss_key, tx_key, extra_args):
    """The step over ``microbatches`` micro-batches (see ``microbatches`` above)."""
    k = microbatches
    micro = split_microbatches(batch, k)  # [k, N, B / k, ...]
    keys = jax.vmap(lambda m: jax.random.fold_in(loss_key, m))(jnp.arange(k))

    def losses_of(params, mb, key):  # ([N], aux) of one micro-batch
      return all_task_losses(task_loss_fn, batched_losses_fn, params, mb, key)

    def task_grads_of(params, mb, key):  # ([N], aux), [N, ...] of one micro-batch
      task_keys = jax.random.split(key, n)
      return jax.vmap(jax.value_and_grad(lambda p, x: task_loss_fn(p, *x), has_aux=True),
                      in_axes=(None, 0))(params, (mb, task_keys))

    def weighted(stacked_losses, stacked_aux):
      """Each micro-batch's weight per task ``[k, N]`` (its share of the task's examples),
      the combined losses ``[N]`` and aux (counts summed, the rest averaged)."""
      if isinstance(stacked_aux, dict) and "count" in stacked_aux:  # [k, N]
        w = jnp.asarray(stacked_aux["count"], jnp.float32)
      else:
        w = jnp.ones((k, n), jnp.float32)
      share = w * _inverse_or_zero(w.sum(0))
      losses = jnp.sum(jnp.where(share > 0, share * stacked_losses, 0.0), axis=0)
      aux = {}
      if isinstance(stacked_aux, dict):
        for key_, v in stacked_aux.items():
          if key_ == "count":
            aux[key_] = v.sum(0)
          elif v.shape[:2] == (k, n):  # per task: the examples' share of each micro-batch
            aux[key_] = jnp.sum(share.reshape((k, n) + (1,) * (v.ndim - 2)) * v, axis=0)
          else:
            aux[key_] = v.mean(0)
      return jax.lax.stop_gradient(share), losses, aux

    def accumulate_task_grads(params):
      """The whole batch's ``N`` task gradients, losses and aux in one pass: the sums of the
      micro-batches' count-weighted values, divided by the counts at the end."""
      def body(acc, xs):
        mb, key = xs
        (l, aux), g = task_grads_of(params, mb, key)
        w = _micro_weight(aux, n)
        # A task without examples in this micro-batch adds nothing, even a non-finite value.
        g = weighting.scale_tasks(jax.tree_util.tree_map(
            lambda x: jnp.where((w > 0).reshape((n,) + (1,) * (x.ndim - 1)), x, 0), g), w)
        return jax.tree_util.tree_map(jnp.add, acc, (g, w)), (l, aux)
      zeros = (jax.tree_util.tree_map(lambda p: jnp.zeros((n,) + p.shape, p.dtype), params),
               jnp.zeros((n,), jnp.float32))
      (g_sum, w_sum), (l_all, aux_all) = jax.lax.scan(body, zeros, (micro, keys))
      grads = weighting.scale_tasks(g_sum, _inverse_or_zero(w_sum))
      _, losses, aux = weighted(l_all, aux_all)
      return _constrain(grads, param_shardings, stacked=True), losses, aux

    if mode == "jacobian":
      task_grads, losses, aux = accumulate_task_grads(state.params)
      mask = _task_mask(aux)
      updates, opt_state = tx.update(task_grads, state.opt_state, state.params,
                                     task_losses=losses, task_mask=mask, key=tx_key,
                                     **extra_args)
    else:
      l_all, aux_all = jax.lax.map(lambda xs: losses_of(state.params, *xs), (micro, keys))
      share, losses, aux = weighted(l_all, aux_all)
      mask = _task_mask(aux)

      def vjp_fn(c):  # the gradient of sum_i c_i l_i over the whole batch, micro-batch by one
        def body(acc, xs):
          mb, key, w = xs
          g = jax.grad(lambda p: jnp.dot(c * w, losses_of(p, mb, key)[0]))(state.params)
          return jax.tree_util.tree_map(jnp.add, acc, g), None
        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        return (jax.lax.scan(body, zeros, (micro, keys, share))[0],)

      grads_fn = lambda: accumulate_task_grads(state.params)[0]  # pylint: disable=unnecessary-lambda-assignment
      refresh_args = ({"task_grads_fn": grads_fn} if reuse_refresh_grads else
                      {"gram_fn": lambda: lookahead.task_gram(grads_fn())})
      updates, opt_state = tx.update(None, state.opt_state, state.params, task_losses=losses,
                                     task_mask=mask, key=tx_key, task_vjp=vjp_fn,
                                     **refresh_args, **extra_args)
    updates = _constrain(updates, param_shardings)
    new_params = optax.apply_updates(state.params, updates)
    return _finish(state, new_params, opt_state, losses, updates, aux)

  return step


def split_microbatches(batch: PyTree, k: int) -> PyTree:
  """A task-grouped batch cut into ``k`` strided micro-batches along its example axis.

  Leaves ``[N, B, ...]`` become ``[k, N, B / k, ...]``: micro-batch ``m`` holds
  examples ``m, m + k, m + 2k, ...`` of every task. Strided, so that under a mesh
  that shards the example axis in contiguous blocks every device keeps its own
  examples in every micro-batch (contiguous micro-batches would each sit on
  ``1/k`` of the devices). A leaf with the task axis only (``[N]``, e.g. task
  ids) goes to every micro-batch whole.

  Args:
    batch: the task-grouped batch (leaves ``[N, B, ...]`` or ``[N]``).
    k: the number of micro-batches.

  Returns:
    The batch with a leading micro-batch axis ``k`` on every leaf.

  Raises:
    ValueError: ``B`` not divisible by ``k`` (or a scalar leaf).
  """
  def cut(path, x):
    if x.ndim == 1:
      return jnp.broadcast_to(x, (k,) + x.shape)
    if x.ndim < 2 or x.shape[1] % k:
      raise ValueError(
          f"microbatches={k}: every batch leaf needs a per-task example axis (its second) "
          f"divisible by {k}; leaf {jax.tree_util.keystr(path)} has shape {x.shape}.")
    return jnp.moveaxis(x.reshape((x.shape[0], x.shape[1] // k, k) + x.shape[2:]), 2, 0)
  return jax.tree_util.tree_map_with_path(cut, batch)


def all_task_losses(task_loss_fn: Callable, grouped_losses_fn: Optional[Callable],
                    params: PyTree, batch: PyTree, key: Array) -> tuple[Array, Any]:
  """The ``N`` task losses of a task-grouped batch.

  Args:
    task_loss_fn: ``(params, task_batch, key) -> (loss, aux)`` on one task's slice.
    grouped_losses_fn: ``(params, batch, key) -> (losses [N], aux)`` on the whole
      batch, used when given (one forward pass, e.g. a model that mixes tasks).
    params: the model parameters.
    batch: the task-grouped batch (leaves ``[N, ...]``).
    key: PRNG key; without ``grouped_losses_fn`` task ``i`` gets the ``i``-th key
      of ``jax.random.split(key, N)``.

  Returns:
    ``(losses [N], aux)``, ``aux`` with a leading task axis when ``vmap`` forms it.
  """
  if grouped_losses_fn is not None:
    return grouped_losses_fn(params, batch, key)
  keys = jax.random.split(key, jax.tree_util.tree_leaves(batch)[0].shape[0])
  return jax.vmap(task_loss_fn, in_axes=(None, 0, 0))(params, batch, keys)


def _inverse_or_zero(x: Array) -> Array:
  """``1 / x`` where ``x > 0``, else 0 (a task with no examples)."""
  return jnp.where(x > 0, 1.0 / jnp.where(x > 0, x, 1.0), 0.0)


def _micro_weight(aux: Any, n: int) -> Array:
  """``[N]`` weight of a micro-batch's task losses: its examples per task (``aux['count']``)
  when the loss function reports them, else 1."""
  if isinstance(aux, dict) and "count" in aux:
    return jnp.asarray(aux["count"], jnp.float32)
  return jnp.ones((n,), jnp.float32)


def _task_mask(aux: Any) -> Optional[Array]:
  if isinstance(aux, dict) and "count" in aux:
    return aux["count"] > 0
  return None


def make_plain_step(
    loss_fn: Callable[..., tuple[Array, Any]],
    tx: optax.GradientTransformation,
    num_tasks: int,
    *,
    param_shardings: Optional[PyTree] = None,
) -> Callable[[TrainState, PyTree], tuple[TrainState, dict]]:
  """Ordinary training on any batch (no task weighting), e.g. for mixtures.

  Args:
    loss_fn: ``loss_fn(params, batch, rng) -> (loss, aux)``; ``aux`` may hold
      ``'task_losses'`` ``[N]`` (for logging; without it every task logs ``loss``).
    tx: a plain optax transformation.
    num_tasks: ``N``.
    param_shardings: optional shardings of the params (see
      :func:`make_train_step`); the gradients are constrained to them.

  Returns:
    ``step(state, batch) -> (state, metrics)`` like :func:`make_train_step`.
  """

  def step(state: TrainState, batch: PyTree):
    key = jax.random.fold_in(state.rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
    grads = _constrain(grads, param_shardings)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    losses = aux.get("task_losses", jnp.full((num_tasks,), loss))
    extra = {k: v for k, v in aux.items() if k != "task_losses"}
    # Guard on the scalar loss too (task losses may be masked).
    extra["loss"] = loss
    losses_checked = jnp.where(jnp.isfinite(loss), losses, jnp.nan)
    return _finish(state, new_params, opt_state, losses_checked, updates, extra)

  return step
