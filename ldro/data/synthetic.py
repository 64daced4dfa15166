"""The synthetic 2-D multitask problem of the paper's section 4 (Figure 2).

Task ``i`` is a point ``y_i`` in the plane with loss
``l_i(theta) = ||y_i - f(theta)||^2``. Most points form a cluster around
``(-1, 0)``; one outlier sits at ``(1, 0)``. The model
``f(theta) = y_outlier + (R + r^2) [cos phi, sin phi]``, ``theta = (r, phi)``,
cannot enter the disc of radius ``R`` around the outlier, so the outlier's
loss is at least ``R^2``.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class SyntheticTasks(NamedTuple):
  """Task points and model constants.

  Attributes:
    points: ``[N, 2]`` task points; the LAST row is the outlier.
    radius: ``R``, radius of the forbidden disc around the outlier.
  """
  points: np.ndarray
  radius: float

  @property
  def outlier(self) -> np.ndarray:
    return self.points[-1]

  @property
  def num_tasks(self) -> int:
    return self.points.shape[0]


def make_tasks(num_cluster: int = 10, spread: float = 0.15, radius: float = 1.25,
               center=(-1.0, 0.0), outlier=(1.0, 0.0), seed: int = 0) -> SyntheticTasks:
  """Builds the cluster + outlier task set.

  Args:
    num_cluster: number of cluster tasks (the outlier is one more).
    spread: standard deviation of the cluster points around ``center``.
    radius: ``R`` (the paper uses 1.25).
    center: cluster centre.
    outlier: outlier position.
    seed: seed of the cluster points.

  Returns:
    :class:`SyntheticTasks` with ``num_cluster + 1`` tasks.
  """
  if num_cluster < 1:
    raise ValueError(f"num_cluster must be >= 1, got {num_cluster}.")
  rng = np.random.default_rng(seed)
  cluster = np.asarray(center, np.float32) + spread * rng.normal(size=(num_cluster, 2))
  points = np.concatenate([cluster, np.asarray(outlier, np.float32)[None]], 0).astype(np.float32)
  return SyntheticTasks(points=points, radius=float(radius))


def predict(theta: dict, outlier: Array, radius: float) -> Array:
  """``f(theta) = y_outlier + (R + r^2) [cos phi, sin phi]`` for ``theta={'r','phi'}``."""
  rho = radius + theta["r"] ** 2
  return outlier + rho * jnp.stack([jnp.cos(theta["phi"]), jnp.sin(theta["phi"])])


def task_loss(theta: dict, point: Array, outlier: Array, radius: float) -> Array:
  """``l_i(theta) = ||y_i - f(theta)||^2`` for one task point ``y_i``."""
  d = point - predict(theta, outlier, radius)
  return jnp.sum(d * d)


def noisy_task_loss(theta: dict, point: Array, outlier: Array, radius: float, key: Array,
                    loss_noise: float, grad_noise: float) -> Array:
  """Task loss with additive Gaussian noise on its value and on its gradient.

  Emulates minibatch noise (section 4, Figure 2c): the returned value is
  ``l + loss_noise * e`` and its gradient ``grad l + grad_noise * xi`` with
  ``e ~ N(0, 1)``, ``xi ~ N(0, I)`` (the gradient noise enters through
  ``(theta - stop_gradient(theta)) . xi``, which is zero in value).
  """
  k1, k2 = jax.random.split(key)
  loss = task_loss(theta, point, outlier, radius)
  xi = jax.random.normal(k2, (2,))
  flat = jnp.stack([theta["r"], theta["phi"]])
  grad_term = jnp.dot(flat - jax.lax.stop_gradient(flat), xi)
  return loss + loss_noise * jax.random.normal(k1, ()) + grad_noise * grad_term
