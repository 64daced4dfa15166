"""Per-task epoch streams: the deterministic example order shared by the batchers.

Task ``i`` reads an infinite stream of its ``n_i`` examples made of
consecutive epochs, epoch ``e`` being the permutation
``np.random.default_rng((seed, i, e)).permutation(n_i)``. Stream position
``p`` is example ``perm_e[p % n_i]`` of epoch ``e = p // n_i``. A batcher that
takes positions ``[s * b, (s + 1) * b)`` at step ``s`` makes ``batch(step)`` a
pure function of ``(seed, step)``, so training resumes exactly from any step,
and every example of a task is seen exactly once per epoch of that task. Used
by :class:`ldro.data.images.GroupedBatcher` and the text batchers of
:mod:`ldro.data.text`.
"""

import collections

import numpy as np


class EpochStream:
  """Infinite epoch-permuted stream of the example indices of one task."""

  def __init__(self, num_examples: int, seed: int, task: int, cached_epochs: int = 4):
    self.num_examples = int(num_examples)
    self._seed = int(seed)
    self._task = int(task)
    self._cached = int(cached_epochs)
    self._perms: "collections.OrderedDict[int, np.ndarray]" = collections.OrderedDict()

  def permutation(self, epoch: int) -> np.ndarray:
    """The example order of ``epoch`` (memoised for the last few epochs)."""
    perm = self._perms.get(epoch)
    if perm is None:
      rng = np.random.default_rng((self._seed, self._task, epoch))
      perm = self._perms[epoch] = rng.permutation(self.num_examples)
      while len(self._perms) > self._cached:
        self._perms.popitem(last=False)
    return perm

  def indices(self, positions) -> np.ndarray:
    """Example indices at global stream positions (position p: epoch p // n)."""
    positions = np.asarray(positions, np.int64)
    if positions.size and positions.min() < 0:
      raise ValueError(f"stream positions must be >= 0, got {positions.min()}.")
    epochs, within = np.divmod(positions, self.num_examples)
    out = np.empty_like(positions)
    for e in np.unique(epochs):
      m = epochs == e
      out[m] = self.permutation(int(e))[within[m]]
    return out

  def window(self, start: int, stop: int) -> np.ndarray:
    """Example indices at positions ``[start, stop)``."""
    return self.indices(np.arange(start, stop))


def part_slice(num_examples: int, index: int, count: int) -> slice:
  """Part ``index`` of ``count`` contiguous, near-equal parts of ``range(num_examples)``.

  Used to split an evaluation set across processes: part ``p`` is
  ``[p * n // count, (p + 1) * n // count)``; the parts cover every example once.
  """
  if not 0 <= int(index) < int(count):
    raise ValueError(f"part index must lie in [0, {count}), got {index}.")
  n = int(num_examples)
  return slice(int(index) * n // int(count), (int(index) + 1) * n // int(count))


def mixture_draws(seed: int, salt: int, block: int, steps: int, batch_size: int,
                  rates: np.ndarray) -> np.ndarray:
  """``[steps, batch_size]`` task ids of a static mixture's block ``block`` of steps.

  Each row is drawn i.i.d. from ``rates`` with
  ``np.random.default_rng((seed, salt, block))``: a block is a pure function of
  its index, so a mixture batcher (:class:`ldro.data.text_batchers.MixtureBatcher`,
  its per-host variant in :mod:`ldro.data.text_shards`) resumes exactly at any step.
  """
  rng = np.random.default_rng((seed, salt, block))
  return rng.choice(len(rates), size=(steps, batch_size), p=rates)


class MixtureBlocks:
  """:func:`mixture_draws` of one mixture, block by block, keeping the last block drawn.

  ``blocks(k)`` is the ``[steps, batch_size]`` block ``k``; the batchers read the same block
  for many consecutive steps, so only the last one is kept.
  """

  def __init__(self, seed: int, salt: int, steps: int, batch_size: int, rates: np.ndarray):
    self._args = (seed, salt, steps, batch_size, rates)
    self._last: tuple = (-1, None)

  def __call__(self, block: int) -> np.ndarray:
    if self._last[0] != block:
      seed, salt, steps, batch_size, rates = self._args
      self._last = (block, mixture_draws(seed, salt, block, steps, batch_size, rates))
    return self._last[1]
