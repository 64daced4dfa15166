"""The 2-D proof of concept of the paper's section 4 (Figure 2) as an :class:`Experiment`.

The geometry (tasks, losses, noise) is :mod:`ldro.data.synthetic`; the Figure 2
driver that runs all its variants is the entry point :mod:`experiments.synthetic`.
"""

import gin
import jax
import jax.numpy as jnp

from experiments.families import base
from experiments.runner import validation
from ldro.data import synthetic


@gin.configurable
class SyntheticExperiment(base.Experiment):
  """The 2-D proof of concept of the paper's section 4 (Figure 2).

  Defaults: 10 cluster tasks around (-1, 0) with spread 0.15, the outlier at
  (1, 0), ``R = 1.25``, start ``theta0 = (r, phi) = (1.5, 2.6)``, i.e. ``f = (-2.0, 1.8)``, up and
  left of the cluster, where the outlier is the worst task: DRO then heads
  for the outlier and stalls on the disc at an angle far from the cluster,
  which makes the average-loss, DRO and L-DRO trajectories separate visibly. ``loss_noise``/``grad_noise`` > 0 give the
  noisy variant of Figure 2c.
  """

  main_metric = "loss"
  higher_is_better = False
  no_microbatches = "a task's batch is its fixed point, not a list of examples to cut"

  def __init__(self, num_cluster: int = 10, spread: float = 0.15, radius: float = 1.25,
               start_r: float = 1.5, start_phi: float = 2.6, loss_noise: float = 0.0,
               grad_noise: float = 0.0, seed: int = 0):
    v, name = validation, "SyntheticExperiment."
    num_cluster = v.whole_number(num_cluster, name + "num_cluster", 1)
    seed = v.seed(seed, name + "seed")
    spread, radius = v.nonnegative(spread, name + "spread"), v.positive(radius, name + "radius")
    start_r = v.positive(start_r, name + "start_r")
    start_phi = v.real(start_phi, name + "start_phi")
    loss_noise = v.nonnegative(loss_noise, name + "loss_noise")
    grad_noise = v.nonnegative(grad_noise, name + "grad_noise")
    self.tasks = synthetic.make_tasks(num_cluster, spread, radius, seed=seed)
    self.task_names = [f"cluster{i}" for i in range(num_cluster)] + ["outlier"]
    self.start = (float(start_r), float(start_phi))
    self.loss_noise, self.grad_noise = float(loss_noise), float(grad_noise)
    self._points = jnp.asarray(self.tasks.points)
    self._eval = jax.jit(self._eval_losses)

  def init_params(self, rng):
    del rng
    return {"r": jnp.asarray(self.start[0], jnp.float32),
            "phi": jnp.asarray(self.start[1], jnp.float32)}

  def task_loss(self, params, task_batch, rng):
    outlier = jnp.asarray(self.tasks.outlier)
    if self.loss_noise or self.grad_noise:
      loss = synthetic.noisy_task_loss(params, task_batch["point"], outlier, self.tasks.radius,
                                       rng, self.loss_noise, self.grad_noise)
    else:
      loss = synthetic.task_loss(params, task_batch["point"], outlier, self.tasks.radius)
    return loss, {}

  def train_batch(self, step):
    del step
    return {"point": self.tasks.points}

  def _eval_losses(self, params):
    outlier = jnp.asarray(self.tasks.outlier)
    losses = jax.vmap(lambda p: synthetic.task_loss(params, p, outlier, self.tasks.radius))(
        self._points)
    return losses, synthetic.predict(params, outlier, self.tasks.radius)

  def evaluate(self, params):
    losses, pred = jax.device_get(self._eval(params))
    return {"task_loss": [float(x) for x in losses],
            "prediction": [float(x) for x in pred],
            "theta": [float(params["r"]), float(params["phi"])]}
