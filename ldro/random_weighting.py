"""Random loss and gradient weighting (Lin et al., ``random_weighting.md``)."""

import jax
import jax.numpy as jnp
import optax

from ldro import weighting
from ldro import registry

Array = jax.Array

DISTRIBUTIONS = ("normal", "uniform", "dirichlet", "bernoulli", "c-bernoulli")


def sample_random_weights(key: Array, num_tasks: int, distribution: str = "normal") -> Array:
  """Random task weights on the simplex (random-weighting paper, section 5.3).

  ================  =====================================  ===================
  distribution      sample ``lambda~``                     normalisation ``f``
  ================  =====================================  ===================
  ``normal``        ``N(0, 1)`` i.i.d. (the paper's)       softmax
  ``uniform``       ``U(0, 1)`` i.i.d.                     softmax
  ``dirichlet``     ``Dir(1, ..., 1)``                     identity
  ``bernoulli``     ``Bernoulli(1/2)`` i.i.d.              ``x / sum(x)``
  ``c-bernoulli``   one task uniformly at random           ``x / sum(x)``
  ================  =====================================  ===================

  All have ``E[lambda] = 1/N``. An all-zero Bernoulli draw (probability
  ``2^-N``) falls back to uniform weights, the expectation.

  Args:
    key: PRNG key.
    num_tasks: ``N``.
    distribution: one of ``DISTRIBUTIONS``.

  Returns:
    ``[N]`` float32 weights.
  """
  n = num_tasks
  if distribution == "normal":
    return jax.nn.softmax(jax.random.normal(key, (n,)))
  if distribution == "uniform":
    return jax.nn.softmax(jax.random.uniform(key, (n,)))
  if distribution == "dirichlet":
    return jax.random.dirichlet(key, jnp.ones((n,)))
  if distribution == "bernoulli":
    x = jax.random.bernoulli(key, 0.5, (n,)).astype(jnp.float32)
    s = jnp.sum(x)
    return jnp.where(s > 0, x / jnp.maximum(s, 1.0), 1.0 / n)
  if distribution == "c-bernoulli":
    return jax.nn.one_hot(jax.random.randint(key, (), 0, n), n)
  raise ValueError(f"unknown distribution {distribution!r}; known: {', '.join(DISTRIBUTIONS)}.")


def _check_distribution(distribution: str) -> None:
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"unknown distribution {distribution!r}; known: {', '.join(DISTRIBUTIONS)}.")


def random_loss_weighting(num_tasks: int, distribution: str = "normal") -> optax.GradientTransformationExtraArgs:
  """Random loss weighting, RLW (Lin et al., TMLR 2022, Algorithm 1).

  Each step draws ``lambda`` from ``distribution`` (:func:`sample_random_weights`)
  and follows ``grad sum_i lambda_i l_i = sum_i lambda_i g_i``. Works in lean
  mode (``task_vjp``). Needs ``key=`` as an extra argument.

  Args:
    num_tasks: ``N``.
    distribution: weight distribution (default the paper's ``normal`` + softmax).

  Returns:
    A transformation taking ``key`` (``task_losses`` optional).
  """
  _check_distribution(distribution)

  def next_weights(w, losses, mask, key, count):
    return sample_random_weights(key, w.shape[0], distribution)
  return weighting.loss_weighting("random_loss_weighting", num_tasks, next_weights,
                                  needs_losses=False, needs_key=True)


def random_gradient_weighting(num_tasks: int, distribution: str = "normal") -> optax.GradientTransformationExtraArgs:
  """Random gradient weighting, RGW (Lin et al., TMLR 2022, Algorithm 2).

  Each step draws ``lambda`` and outputs ``sum_i lambda_i g_i`` from the
  per-task gradients (Jacobian mode only), on every parameter: for the same
  draw this is RLW's update. The paper's RGW weights only the shared
  parameters' task gradients and updates task-specific ones with their own
  gradient, unweighted:
  ``ldro.on_shared_params(random_gradient_weighting(N), 'encoder',
  specific='equal')`` (the heads' gradients on the library's mean-loss
  scale, ``g_i / N``; or ``get_method('rgw', ..., shared_params='encoder',
  specific_params='equal')``). On models whose parameters are all shared by
  all tasks (ldro's CNN and decoder, one shared output layer) the two are
  RLW's update.

  Args:
    num_tasks: ``N``.
    distribution: weight distribution.

  Returns:
    A transformation taking per-task gradients and ``key``.
  """
  _check_distribution(distribution)
  return weighting.task_weighting(
      weighting.Rule(
          name="random_gradient_weighting",
          coefficients=lambda stats, state: (
              sample_random_weights(stats.key, stats.weights.shape[0], distribution), state),
          needs_key=True, lean=False,
          lean_hint="Use random_loss_weighting (rlw) for lean mode."),
      num_tasks)


registry.register_method(
    "rlw", random_loss_weighting, "random loss weighting (Lin et al., TMLR 2022)", label="RLW",
    needs=("key",), kind="loss", defaults={"distribution": "normal"})
registry.register_method(
    "rgw", random_gradient_weighting, "random gradient weighting (Lin et al., TMLR 2022)",
    label="RGW", needs=("key",), modes=("jacobian",), kind="gradient",
    defaults={"distribution": "normal"})
