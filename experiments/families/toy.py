"""A tiny multitask regression experiment (2-layer MLP on random data).

For smoke tests of the runner and of scale-out (meshes, FSDP, multi-host):
it runs in seconds on CPU, its batches are a pure function of the step, its
first-layer kernel is large enough to be FSDP-sharded, and the per-task
example axis is divisible by 8. Not a benchmark.

    python -m experiments.train --gin_file=gin_configs/toy/ldro.gin \
        --gin_file=gin_configs/mesh/fsdp.gin --workdir=/tmp/toy
"""

import gin
import jax
import jax.numpy as jnp
import numpy as np

from experiments.families import base as experiment_lib
from experiments.runner import validation


@gin.configurable
class ToyMLPExperiment(experiment_lib.Experiment):
  """``N`` regression tasks sharing an MLP ``x -> relu(x W1 + b1) W2 + b2``.

  Task ``i`` predicts output ``i`` of the shared MLP; its target is
  ``tanh(x . t_i) * scale_i`` plus noise of task-dependent size, so tasks
  differ in difficulty and the weighting methods move away from uniform.
  The batch is task-grouped: ``{'x': [N, b, dim], 'y': [N, b], 'task': [N]}``.

  Args:
    num_tasks: ``N``.
    dim: input dimension.
    hidden: hidden width.
    batch_per_task: examples per task per step (``b``).
    eval_per_task: held-out examples per task.
    noise: label-noise std of the noisiest task (task ``i`` gets
      ``noise * i / (N - 1)``).
    seed: data seed.
    report_params: add the flattened parameters to every evaluation record
      (``'params'``), for tests comparing runs.
  """

  main_metric = "loss"
  higher_is_better = False

  def __init__(self, num_tasks: int = 4, dim: int = 16, hidden: int = 64,
               batch_per_task: int = 16, eval_per_task: int = 64, noise: float = 0.5,
               seed: int = 0, report_params: bool = False):
    v, name = validation, "ToyMLPExperiment."
    for param, value in (("num_tasks", num_tasks), ("dim", dim), ("hidden", hidden),
                         ("batch_per_task", batch_per_task), ("eval_per_task", eval_per_task)):
      v.whole_number(value, name + param, 1)
    num_tasks, seed = int(num_tasks), v.seed(seed, name + "seed")
    noise = v.nonnegative(noise, name + "noise")
    self.task_names = [f"task{i}" for i in range(num_tasks)]
    self.dim, self.hidden, self.b = int(dim), int(hidden), int(batch_per_task)
    self.seed, self.report_params = int(seed), bool(report_params)
    rng = np.random.default_rng(seed)
    self.teachers = (rng.normal(size=(num_tasks, dim)) / np.sqrt(dim)).astype(np.float32)
    self.scales = np.linspace(1.0, 3.0, num_tasks).astype(np.float32)
    self.noise = (noise * np.arange(num_tasks) / max(num_tasks - 1, 1)).astype(np.float32)
    self._eval_batch = self._batch(rng, eval_per_task)
    self._eval = jax.jit(lambda p, b: jax.vmap(self._mse, in_axes=(None, 0))(p, b))

  def _batch(self, rng: np.random.Generator, b: int) -> dict:
    n = self.num_tasks
    x = rng.normal(size=(n, b, self.dim)).astype(np.float32)
    clean = np.tanh(np.einsum("nbd,nd->nb", x, self.teachers)) * self.scales[:, None]
    y = clean + self.noise[:, None] * rng.normal(size=(n, b)).astype(np.float32)
    return {"x": x, "y": y.astype(np.float32), "task": np.arange(n, dtype=np.int32)}

  def init_params(self, rng):
    k1, k2 = jax.random.split(rng)
    return {
        "dense_0": {"kernel": jax.random.normal(k1, (self.dim, self.hidden)) / np.sqrt(self.dim),
                    "bias": jnp.zeros((self.hidden,))},
        "head": {"kernel": jax.random.normal(k2, (self.hidden, self.num_tasks)) /
                           np.sqrt(self.hidden),
                 "bias": jnp.zeros((self.num_tasks,))},
    }

  def _mse(self, params, task_batch):
    h = jax.nn.relu(task_batch["x"] @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])
    out = h @ params["head"]["kernel"] + params["head"]["bias"]  # [b, N]
    pred = jnp.take(out, task_batch["task"], axis=-1)
    return jnp.mean((pred - task_batch["y"]) ** 2)

  def task_loss(self, params, task_batch, rng):
    del rng
    return self._mse(params, task_batch), {}

  def train_batch(self, step: int) -> dict:
    return self._batch(np.random.default_rng((self.seed, 1, int(step))), self.b)

  def evaluate(self, params) -> dict:
    losses = np.asarray(jax.device_get(self._eval(params, self._eval_batch)))
    out = {"task_loss": [float(x) for x in losses]}
    if self.report_params:
      leaves = jax.tree_util.tree_leaves(jax.device_get(params))
      out["params"] = [float(x) for x in np.concatenate([np.ravel(l) for l in leaves])]
    return out

