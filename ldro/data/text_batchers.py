"""Numpy batchers of packed LM rows for the training runner and the evaluation (paper §5.2).

* :class:`StratifiedBatcher` -- language-stratified, task-grouped batches
  ``[N, b, L]`` (every language in every batch) for the dynamic methods (DRO,
  Baselined-DRO, L-DRO) that need a loss per language at every step.
* :class:`MixtureBatcher` -- static-mixing batches ``[B, L]`` whose rows are
  drawn from languages with probability proportional to the mixture rates,
  with a ``'task'`` id per row.
* :func:`eval_batches` -- fixed per-language batches of the validation or test
  split for per-language token cross-entropy / perplexity (section 5.2.2).

Rows are ``{lang: {feature: [R_i, L]}}`` as produced by
:func:`ldro.data.text_rows.materialize` (the ``from_tasks`` constructors and
:func:`eval_batches` materialise them from registered tasks).

Determinism: a language's packed rows are materialised once (unshuffled
source, so the packing is fixed) and training batches index them with
per-epoch permutations drawn from ``np.random.default_rng((seed, i, epoch))``;
``batch(step)`` is a pure function of ``(rows, seed, step)``, so a run resumes
exactly from any step. The per-host (input-sharded) versions are in
:mod:`ldro.data.text_shards`.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ldro.data import streams
from ldro.data.text import FEATURES, Array, RowDict
from ldro.data.text_rows import materialize


def _check_rows(rows: Mapping[str, RowDict]) -> Tuple[Tuple[str, ...], int]:
  if not rows:
    raise ValueError("No languages.")
  langs = tuple(rows)
  length = None
  for lang in langs:
    shapes = {rows[lang][k].shape for k in FEATURES}
    if len(shapes) != 1:
      raise ValueError(f"Inconsistent feature shapes for {lang!r}: {shapes}")
    (r, l), = shapes
    if r == 0:
      raise ValueError(f"Language {lang!r} has no rows.")
    if length is None:
      length = l
    elif l != length:
      raise ValueError("All languages must have the same row length.")
  return langs, length


class StratifiedBatcher:
  """Language-stratified, task-grouped batches for dynamic methods (§5.2).

  ``batch(step)[k]`` has shape ``[N, b, L]``: ``b`` packed rows of language
  ``n`` at ``[n]``, so every language is present in every batch. Language
  ``n`` walks through its rows in epochs; epoch ``e`` uses the permutation
  ``np.random.default_rng((seed, n, e)).permutation(R_n)`` and step ``s`` takes
  stream positions ``[s*b, (s+1)*b)``. Pure in ``(rows, seed, step)``.
  """

  def __init__(self, rows: Mapping[str, RowDict], rows_per_language: int,
               seed: int = 0):
    """Builds the batcher.

    Args:
      rows: ``{lang: {feature: [R_i, L]}}`` (:func:`materialize`); the key order
        defines the language ids ``0..N-1``.
      rows_per_language: ``b`` rows per language per batch.
      seed: permutation seed.
    """
    self.languages, self.sequence_length = _check_rows(rows)
    if rows_per_language < 1:
      raise ValueError("rows_per_language must be >= 1")
    self.rows_per_language = rows_per_language
    self.seed = seed
    self._rows = {l: {k: rows[l][k] for k in FEATURES} for l in self.languages}
    self._streams = [streams.EpochStream(rows[l]["decoder_target_tokens"].shape[0], seed, i)
                     for i, l in enumerate(self.languages)]

  @classmethod
  def from_tasks(cls, tasks: Mapping[str, str], sequence_length: int,
                 rows_per_language: int, seed: int = 0, *, split: str = "train",
                 max_examples: Optional[int] = None,
                 cache_dir: Optional[str] = None) -> "StratifiedBatcher":
    """Materialises ``split`` of the registered tasks and builds the batcher.

    Args:
      tasks: language -> task name.
      sequence_length: tokens per row ``L``.
      rows_per_language: ``b``.
      seed: permutation seed.
      split: split to batch.
      max_examples: per-language cap on examples.
      cache_dir: optional ``.npz`` cache folder.

    Returns:
      A :class:`StratifiedBatcher`.
    """
    return cls(materialize(tasks, split, sequence_length,
                           max_examples=max_examples, cache_dir=cache_dir),
               rows_per_language, seed)

  @property
  def num_languages(self) -> int:
    return len(self.languages)

  @property
  def num_rows(self) -> Dict[str, int]:
    """Packed rows ``R_i`` per language."""
    return {l: s.num_examples for l, s in zip(self.languages, self._streams)}

  def epochs(self, step: int) -> Dict[str, float]:
    """Epochs of each language completed after ``step`` batches."""
    return {l: step * self.rows_per_language / s.num_examples
            for l, s in zip(self.languages, self._streams)}

  def batch(self, step: int) -> RowDict:
    """Returns batch ``step``.

    Args:
      step: non-negative step index.

    Returns:
      ``{feature: [N, b, L]}`` (int32; ``decoder_loss_weights`` float32).
    """
    b = self.rows_per_language
    pos = np.arange(step * b, (step + 1) * b)
    out = {k: [] for k in FEATURES}
    for lang, stream in zip(self.languages, self._streams):
      idx = stream.indices(pos)
      for k in FEATURES:
        out[k].append(self._rows[lang][k][idx])
    return {k: np.stack(v) for k, v in out.items()}


class MixtureBatcher:
  """Static-mixing batches ``[B, L]`` with a language id per row (§2.2, §5.2.1).

  Row ``j`` of step ``s`` is from language ``c[s, j]`` drawn i.i.d. with
  probabilities ``rates``; steps are grouped into blocks of ``block_steps``
  whose draws come from ``np.random.default_rng((seed, 0x6D6978, block))``.
  The row taken is language ``c``'s next row in its epoch-permuted stream
  (as in :class:`StratifiedBatcher`), so ``batch(step)`` is a pure function of
  ``(rows, rates, seed, step)``; jumping to a late step costs one pass over
  the preceding blocks' draws (cached).
  """

  _SALT = 0x6D6978

  def __init__(self, rows: Mapping[str, RowDict],
               rates: Union[Mapping[str, float], Sequence[float]],
               batch_size: int, seed: int = 0, block_steps: int = 1000):
    """Builds the batcher.

    Args:
      rows: ``{lang: {feature: [R_i, L]}}``; key order defines the task ids.
      rates: mixing rates per language (dict keyed like ``rows``, or a
        sequence in ``rows`` order); normalised here.
      batch_size: ``B`` rows per batch.
      seed: seed of the language draws and row permutations.
      block_steps: steps per block of language draws.
    """
    self.languages, self.sequence_length = _check_rows(rows)
    if isinstance(rates, Mapping):
      missing = set(self.languages) - set(rates)
      if missing:
        raise ValueError(f"rates lacks languages {sorted(missing)}")
      p = np.array([rates[l] for l in self.languages], np.float64)
    else:
      p = np.asarray(rates, np.float64)
    if p.shape != (len(self.languages),) or np.any(p < 0) or p.sum() <= 0:
      raise ValueError(f"Bad rates {p}")
    self.rates = p / p.sum()
    self.batch_size = batch_size
    self.seed = seed
    self.block_steps = block_steps
    self._rows = {l: {k: rows[l][k] for k in FEATURES} for l in self.languages}
    self._streams = [streams.EpochStream(rows[l]["decoder_target_tokens"].shape[0], seed, i)
                     for i, l in enumerate(self.languages)]
    self._counts_before = [np.zeros(len(self.languages), np.int64)]
    self._block = streams.MixtureBlocks(self.seed, self._SALT, self.block_steps,
                                        self.batch_size, self.rates)

  @classmethod
  def from_tasks(cls, tasks: Mapping[str, str],
                 rates: Union[Mapping[str, float], Sequence[float]],
                 sequence_length: int, batch_size: int, seed: int = 0, *,
                 split: str = "train", max_examples: Optional[int] = None,
                 cache_dir: Optional[str] = None) -> "MixtureBatcher":
    """Materialises ``split`` of the tasks and builds the batcher.

    Args:
      tasks: language -> task name.
      rates: mixing rates, e.g. ``register_language_tasks(...)['rates'][alpha]``.
      sequence_length: tokens per row ``L``.
      batch_size: ``B``.
      seed: seed.
      split: split to batch.
      max_examples: per-language cap on examples.
      cache_dir: optional ``.npz`` cache folder.

    Returns:
      A :class:`MixtureBatcher`.
    """
    return cls(materialize(tasks, split, sequence_length,
                           max_examples=max_examples, cache_dir=cache_dir),
               rates, batch_size, seed)

  @property
  def num_languages(self) -> int:
    return len(self.languages)

  def _counts_before_block(self, k: int) -> Array:
    n = len(self.languages)
    while len(self._counts_before) <= k:
      j = len(self._counts_before) - 1
      self._counts_before.append(
          self._counts_before[j] + np.bincount(self._block(j).ravel(), minlength=n))
    return self._counts_before[k]

  def languages_of(self, step: int) -> Array:
    """Language ids ``[B]`` of the rows of batch ``step``."""
    k, r = divmod(step, self.block_steps)
    return self._block(k)[r].astype(np.int32)

  def batch(self, step: int) -> RowDict:
    """Returns batch ``step``.

    Args:
      step: non-negative step index.

    Returns:
      ``{feature: [B, L]}`` plus ``'task'``: int32 ``[B]`` language ids
      (index into ``self.languages``).
    """
    n = len(self.languages)
    k, r = divmod(step, self.block_steps)
    counts = self._counts_before_block(k).copy()
    block = self._block(k)
    counts += np.bincount(block[:r].ravel(), minlength=n)
    task = block[r].astype(np.int32)
    out = {key: np.empty((self.batch_size, self.sequence_length),
                         np.float32 if key == "decoder_loss_weights" else np.int32)
           for key in FEATURES}
    for lang_id in np.unique(task):
      where = np.nonzero(task == lang_id)[0]
      pos = counts[lang_id] + np.arange(len(where))
      idx = self._streams[lang_id].indices(pos)
      src = self._rows[self.languages[lang_id]]
      for key in FEATURES:
        out[key][where] = src[key][idx]
    out["task"] = task
    return out


def eval_batches(tasks: Mapping[str, str], split: str = "validation",
                 sequence_length: int = 128, batch_size: int = 32, *,
                 max_examples: Optional[int] = None,
                 cache_dir: Optional[str] = None,
                 rows: Optional[Mapping[str, RowDict]] = None
                 ) -> Dict[str, List[RowDict]]:
  """Fixed per-language evaluation batches (§5.2.2 per-language perplexity).

  Every packed row of ``split`` appears exactly once; the last batch of a
  language is padded with all-zero rows (loss weight 0) so all batches have
  shape ``[batch_size, L]``. Per-language token cross-entropy is the sum of
  token losses over all batches divided by the sum of ``decoder_loss_weights``;
  perplexity is its exponential.

  Args:
    tasks: language -> task name.
    split: ``'validation'`` or ``'test'``.
    sequence_length: tokens per row ``L`` (the paper evaluates with 1024).
    batch_size: rows per batch.
    max_examples: per-language cap on examples.
    cache_dir: optional ``.npz`` cache folder.
    rows: pre-materialised rows (then ``tasks``/``split`` are ignored).

  Returns:
    ``{lang: [{feature: [batch_size, L]}, ...]}``.
  """
  if rows is None:
    rows = materialize(tasks, split, sequence_length, max_examples=max_examples,
                       cache_dir=cache_dir)
  out = {}
  for lang, r in rows.items():
    n = r["decoder_target_tokens"].shape[0]
    batches = []
    for start in range(0, n, batch_size):
      b = {}
      for k in FEATURES:
        x = r[k][start:start + batch_size]
        if x.shape[0] < batch_size:
          pad = np.zeros((batch_size - x.shape[0],) + x.shape[1:], x.dtype)
          x = np.concatenate([x, pad])
        b[k] = x
      batches.append(b)
    out[lang] = batches
  return out
