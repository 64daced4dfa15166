"""Per-host LM input: each language's training stream cut into input shards (seqio ``ShardInfo``).

Every language's training split is read as ``S = input_shards`` disjoint
shards, shard ``g`` being ``seqio.ShardInfo(index=g, num_shards=S)`` of the
language's seqio Task (seqio shards the source's files, or its examples when
the source has fewer files than shards, e.g. one text file per language).
A shard is tokenized, packed and materialised only when a batch part needs
it (:class:`ShardedRows`), so a process reads only the shards of its part of
the batch: with ``S`` equal to the number of processes and the batch split
along its example (row) axis, process ``p`` reads shard ``p`` of every language.

The global batch is a pure function of ``(rows, seed, S, step)``, never of
the number of processes or the mesh, so a run resumes exactly on any
topology with the same ``S``, and one process reading all ``S`` shards
builds the same batch as ``S`` processes reading one each:

* :class:`ShardedStratifiedBatcher` -- ``[N, b, L]``: the ``b`` rows of a
  language are ``S`` groups of ``b / S``; group ``g`` holds positions
  ``[s * b/S, (s+1) * b/S)`` of shard ``g``'s epoch-permuted stream.
* :class:`ShardedMixtureBatcher` -- ``[B, L]``: the language draws are those of
  :class:`ldro.data.text_batchers.MixtureBatcher` (the same for every ``S``); rows
  ``[g * B/S, (g+1) * B/S)`` take their language's next rows from shard ``g``.

With ``S = 1`` (one shard, the whole split) both equal
:class:`ldro.data.text_batchers.StratifiedBatcher` / ``MixtureBatcher`` exactly.
Shard streams for ``S > 1`` permute epoch ``e`` of language ``i``'s shard
``g`` with ``np.random.default_rng((seed, i, e, g, S))``.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ldro.data import streams

Array = np.ndarray
RowDict = Dict[str, Array]

#: Features of a row (as :data:`ldro.data.text.FEATURES`; kept here to stay TF-free).
FEATURES: Tuple[str, ...] = (
    "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
    "decoder_segment_ids", "decoder_positions")


class _ShardStream(streams.EpochStream):
  """Epoch stream of one shard of one language (permutation keyed by the shard too)."""

  def __init__(self, num_examples: int, seed: int, task: int, shard: int, num_shards: int):
    super().__init__(num_examples, seed, task)
    self._shard_key = (int(shard), int(num_shards))

  def permutation(self, epoch: int) -> np.ndarray:
    perm = self._perms.get(epoch)
    if perm is None:
      rng = np.random.default_rng((self._seed, self._task, epoch) + self._shard_key)
      perm = self._perms[epoch] = rng.permutation(self.num_examples)
      while len(self._perms) > self._cached:
        self._perms.popitem(last=False)
    return perm


def resolve_input_shards(input_shards: Optional[int], axis_size: int, process_count: int) -> int:
  """``input_shards``, or by default ``gcd(process_count, axis_size)``.

  The default gives every process its own shard when the batch's example
  (row) axis is split over the processes, and one shard (each process reads
  its languages whole) when only the task axis is.

  Raises:
    ValueError: ``input_shards`` < 1 or not dividing ``axis_size``.
  """
  s = int(np.gcd(int(process_count), int(axis_size))) if input_shards is None else int(input_shards)
  if s < 1:
    raise ValueError(f"input_shards must be >= 1, got {input_shards}.")
  if axis_size % s:
    raise ValueError(f"input_shards {s} must divide the per-language rows / mixture batch size "
                     f"{axis_size} (each shard gives an equal group of rows).")
  return s


class ShardedRows:
  """Packed training rows of every (language, shard), materialised on first use.

  Args:
    languages: language codes; their order defines the task ids.
    num_shards: ``S``.
    load: ``load(lang, shard) -> {feature: [R, L]}`` (e.g.
      :func:`ldro.data.text_rows.packed_rows` with ``seqio.ShardInfo(shard, S)``).
  """

  def __init__(self, languages: Sequence[str], num_shards: int,
               load: Callable[[str, int], RowDict]):
    self.languages = tuple(languages)
    self.num_shards = int(num_shards)
    self._load = load
    self._rows: Dict[Tuple[int, int], RowDict] = {}

  @classmethod
  def from_arrays(cls, rows: Mapping[str, Sequence[RowDict]]) -> "ShardedRows":
    """In-memory rows ``{lang: [shard 0 rows, shard 1 rows, ...]}`` (tests, tools)."""
    langs = list(rows)
    num = {len(v) for v in rows.values()}
    if len(num) != 1:
      raise ValueError("every language needs the same number of shards.")
    return cls(langs, num.pop(), lambda lang, g: rows[lang][g])

  def get(self, lang_id: int, shard: int) -> RowDict:
    """Rows of shard ``shard`` of language ``lang_id`` (loaded once)."""
    key = (int(lang_id), int(shard))
    if key not in self._rows:
      lang = self.languages[key[0]]
      rows = {k: np.asarray(v) for k, v in self._load(lang, key[1]).items() if k in FEATURES}
      if rows["decoder_target_tokens"].shape[0] == 0:
        raise ValueError(f"Language {lang!r} has no training rows in input shard {key[1]} of "
                         f"{self.num_shards} (too little data for this many input_shards).")
      self._rows[key] = rows
    return self._rows[key]

  @property
  def loaded(self) -> list:
    """``(language id, shard)`` pairs read so far (what this process has materialised)."""
    return sorted(self._rows)


class _ShardedBatcherBase:

  def __init__(self, rows: ShardedRows, seed: int):
    self.rows = rows
    self.languages = rows.languages
    self.num_shards = rows.num_shards
    self.seed = int(seed)
    self._streams: Dict[Tuple[int, int], streams.EpochStream] = {}

  @property
  def num_languages(self) -> int:
    return len(self.languages)

  def _stream(self, lang_id: int, shard: int) -> streams.EpochStream:
    key = (int(lang_id), int(shard))
    if key not in self._streams:
      n = self.rows.get(*key)["decoder_target_tokens"].shape[0]
      self._streams[key] = (streams.EpochStream(n, self.seed, key[0]) if self.num_shards == 1
                            else _ShardStream(n, self.seed, key[0], key[1], self.num_shards))
    return self._streams[key]

  def _gather(self, lang_id: int, shard: int, positions: Array) -> RowDict:
    src = self.rows.get(lang_id, shard)
    idx = self._stream(lang_id, shard).indices(positions)
    return {k: src[k][idx] for k in FEATURES}


class ShardedStratifiedBatcher(_ShardedBatcherBase):
  """Language-stratified ``[N, b, L]`` batches over ``S`` input shards per language.

  Row ``j`` of language ``n`` at step ``s`` is from shard ``g = j // (b/S)``,
  at position ``s * b/S + j % (b/S)`` of that shard's stream.
  """

  def __init__(self, rows: ShardedRows, rows_per_language: int, seed: int = 0):
    super().__init__(rows, seed)
    if rows_per_language < 1:
      raise ValueError("rows_per_language must be >= 1")
    if rows_per_language % self.num_shards:
      raise ValueError(f"rows_per_language {rows_per_language} must be divisible by "
                       f"input_shards {self.num_shards}.")
    self.rows_per_language = int(rows_per_language)
    self._per_shard = self.rows_per_language // self.num_shards

  def batch_part(self, step: int, tasks, positions) -> RowDict:
    """Languages ``tasks`` x row positions ``positions`` of batch ``step``: ``[T, P, L]``.

    Reads (materialises) only the shards ``positions // (b/S)`` of those languages.
    """
    positions = np.asarray(positions, np.int64)
    if positions.size and (positions.min() < 0 or positions.max() >= self.rows_per_language):
      raise ValueError(f"positions must lie in [0, {self.rows_per_language}).")
    shard, within = np.divmod(positions, self._per_shard)
    out = {k: [] for k in FEATURES}
    for lang_id in tasks:
      parts = {k: [None] * len(positions) for k in FEATURES}
      for g in np.unique(shard):
        where = np.flatnonzero(shard == g)
        got = self._gather(int(lang_id), int(g), int(step) * self._per_shard + within[where])
        for k in FEATURES:
          for w, row in zip(where, got[k]):
            parts[k][w] = row
      for k in FEATURES:
        out[k].append(np.stack(parts[k]))
    return {k: np.stack(v) for k, v in out.items()}

  def batch(self, step: int) -> RowDict:
    """Batch ``step``: ``{feature: [N, b, L]}``."""
    return self.batch_part(step, np.arange(self.num_languages), np.arange(self.rows_per_language))


class ShardedMixtureBatcher(_ShardedBatcherBase):
  """Static-mixing ``[B, L]`` batches (with ``'task'`` ids) over ``S`` input shards.

  The languages of the rows are :class:`ldro.data.text_batchers.MixtureBatcher`'s draws;
  row ``j`` (of language ``c``) in group ``g = j // (B/S)`` is the next row of
  ``c`` in shard ``g``'s stream (rows of group ``g`` counted over all earlier
  steps and the earlier rows of this step).
  """

  _SALT = 0x6D6978  # as MixtureBatcher

  def __init__(self, rows: ShardedRows, rates: Union[Mapping[str, float], Sequence[float]],
               batch_size: int, seed: int = 0, block_steps: int = 1000):
    super().__init__(rows, seed)
    if isinstance(rates, Mapping):
      p = np.array([rates[l] for l in self.languages], np.float64)
    else:
      p = np.asarray(rates, np.float64)
    if p.shape != (len(self.languages),) or np.any(p < 0) or p.sum() <= 0:
      raise ValueError(f"Bad rates {p}")
    if batch_size % self.num_shards:
      raise ValueError(f"batch_size {batch_size} must be divisible by input_shards "
                       f"{self.num_shards}.")
    self.rates = p / p.sum()
    self.batch_size = int(batch_size)
    self.block_steps = int(block_steps)
    self._group = self.batch_size // self.num_shards
    n = len(self.languages)
    self._counts_before = [np.zeros((self.num_shards, n), np.int64)]
    self._block = streams.MixtureBlocks(self.seed, self._SALT, self.block_steps,
                                        self.batch_size, self.rates)

  def _group_counts(self, draws: Array) -> Array:
    """[S, n] counts of each language in each row group of ``draws`` [steps, B]."""
    n = len(self.languages)
    return np.stack([np.bincount(draws[:, g * self._group:(g + 1) * self._group].ravel(),
                                 minlength=n) for g in range(self.num_shards)])

  def _counts_before_block(self, k: int) -> Array:
    while len(self._counts_before) <= k:
      j = len(self._counts_before) - 1
      self._counts_before.append(self._counts_before[j] + self._group_counts(self._block(j)))
    return self._counts_before[k]

  def languages_of(self, step: int) -> Array:
    """Language ids ``[B]`` of the rows of batch ``step``."""
    k, r = divmod(step, self.block_steps)
    return self._block(k)[r].astype(np.int32)

  def batch_part(self, step: int, rows) -> RowDict:
    """Rows ``rows`` of batch ``step``: ``{feature: [len(rows), L], 'task': [len(rows)]}``.

    Reads only the shards ``rows // (B/S)`` (of the languages drawn for those rows).
    """
    rows = np.asarray(rows, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= self.batch_size):
      raise ValueError(f"rows must lie in [0, {self.batch_size}).")
    k, r = divmod(int(step), self.block_steps)
    block = self._block(k)
    counts = self._counts_before_block(k) + self._group_counts(block[:r])
    task = block[r].astype(np.int32)
    out = None
    for g in np.unique(rows // self._group):
      in_group = np.flatnonzero(rows // self._group == g)
      group_langs = task[g * self._group:(g + 1) * self._group]
      for c in np.unique(task[rows[in_group]]):
        where = in_group[task[rows[in_group]] == c]  # output slots
        rank = np.cumsum(group_langs == c)[rows[where] - g * self._group] - 1
        got = self._gather(int(c), int(g), counts[g, c] + rank)
        if out is None:
          out = {key: np.empty((len(rows),) + v.shape[1:], v.dtype) for key, v in got.items()}
        for key in FEATURES:
          out[key][where] = got[key]
    if out is None:
      raise ValueError("batch_part needs at least one row.")
    out["task"] = task[rows]
    return out

  def batch(self, step: int) -> RowDict:
    """Batch ``step``: ``{feature: [B, L]}`` plus ``'task'`` ``[B]``."""
    return self.batch_part(step, np.arange(self.batch_size))
