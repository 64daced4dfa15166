"""Packed LM rows: a seqio task split materialised into numpy, with an optional ``.npz`` cache.

A language's split (a task registered by
:func:`ldro.data.text.register_language_tasks`) is read unshuffled,
preprocessed by its seqio task and packed by
``seqio.DecoderFeatureConverter(pack=True)`` into rows of exactly ``L``
tokens (:data:`ldro.data.text.FEATURES`), so the packing of a language is
fixed. :func:`packed_rows` materialises one task split (or one seqio input
shard of it, :mod:`ldro.data.text_shards`); :func:`materialize` every
language of a task dict. Both optionally cache the rows as ``.npz`` files
keyed by the task source (files, sizes, mtimes), vocabulary, split, ``L``,
``max_examples`` and shard.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from typing import Dict, Mapping, Optional

import numpy as np

from ldro.data import fileio
from ldro.data.text import FEATURES, RowDict  # raises a clear ImportError without seqio / TF

import seqio  # pylint: disable=g-bad-import-order,g-import-not-at-top


def _cache_key(task_name: str, split: str, sequence_length: int,
               max_examples: Optional[int]) -> str:
  task = seqio.get_mixture_or_task(task_name)
  src = task.source
  files = []
  if isinstance(src, seqio.FileDataSource):
    for s in ("train", "validation", "test"):
      for p in src.list_shards(s):
        st = os.stat(p)
        files.append((p, st.st_size, st.st_mtime))
  vocab = task.output_features["targets"].vocabulary
  blob = json.dumps([task_name, split, sequence_length, max_examples, repr(src),
                     files, getattr(vocab, "sentencepiece_model_file", None),
                     vocab.vocab_size], sort_keys=True, default=str)
  return hashlib.sha1(blob.encode()).hexdigest()[:16]


def packed_rows(task_name: str, split: str, sequence_length: int, *,
                max_examples: Optional[int] = None,
                cache_dir: Optional[str] = None,
                shard_info: Optional["seqio.ShardInfo"] = None) -> RowDict:
  """Materialises all packed rows of one task split into numpy.

  The source is read unshuffled, preprocessed by the seqio task and packed by
  ``seqio.DecoderFeatureConverter(pack=True)`` (BOS id 0 on the inputs).

  Args:
    task_name: registered task.
    split: ``'train'``, ``'validation'`` or ``'test'``.
    sequence_length: tokens per row ``L``.
    max_examples: keep only the first examples (after chunking); ``None`` all.
    cache_dir: optional folder for an ``.npz`` cache keyed by the task source,
      vocabulary, split, ``L`` and ``max_examples`` (and the shard).
    shard_info: ``seqio.ShardInfo(index, num_shards)``: read only that shard of
      the split (seqio shards the source's files, or its examples when it has
      fewer files than shards); ``max_examples`` then caps the shard. ``None``:
      the whole split. Per-host input: :mod:`ldro.data.text_shards`.

  Returns:
    ``{feature: [R, L]}`` for :data:`FEATURES`: int32, except
    ``decoder_loss_weights`` float32.
  """
  path = None
  if cache_dir:
    key = _cache_key(task_name, split, sequence_length, max_examples)
    shard = (f".shard{shard_info.index}of{shard_info.num_shards}" if shard_info is not None
             else "")
    path = os.path.join(cache_dir, f"{task_name}.{split}.L{sequence_length}.{key}{shard}.npz")
    if os.path.exists(path):
      with np.load(path) as z:
        return {k: z[k] for k in FEATURES}
  task = seqio.get_mixture_or_task(task_name)
  lengths = {"targets": sequence_length}
  ds = task.get_dataset(sequence_length=lengths, split=split, shuffle=False,
                        seed=0, num_epochs=1, use_cached=False,
                        try_in_mem_cache=False, shard_info=shard_info)
  if max_examples is not None:
    ds = ds.take(max_examples)
  ds = seqio.DecoderFeatureConverter(pack=True)(ds, lengths)
  chunks = collections.defaultdict(list)
  for batch in ds.batch(1024).as_numpy_iterator():
    for k in FEATURES:
      chunks[k].append(batch[k])
  out = {}
  for k in FEATURES:
    arr = (np.concatenate(chunks[k]) if chunks[k]
           else np.zeros((0, sequence_length), np.int32))
    out[k] = arr.astype(np.float32 if k == "decoder_loss_weights" else np.int32)
  if path:
    fileio.atomic_savez(path, compressed=True, **out)
  return out


def materialize(tasks: Mapping[str, str], split: str, sequence_length: int, *,
                max_examples: Optional[int] = None,
                cache_dir: Optional[str] = None) -> Dict[str, RowDict]:
  """Packed rows of every language (see :func:`packed_rows`).

  Args:
    tasks: language -> task name (``register_language_tasks(...)['tasks']``).
    split: split name.
    sequence_length: tokens per row ``L``.
    max_examples: per-language cap on examples.
    cache_dir: optional ``.npz`` cache folder.

  Returns:
    ``{lang: {feature: [R_i, L]}}`` in the order of ``tasks``.

  Raises:
    ValueError: a language has no rows in ``split``.
  """
  rows = {}
  for lang, name in tasks.items():
    rows[lang] = packed_rows(name, split, sequence_length,
                             max_examples=max_examples, cache_dir=cache_dir)
    if rows[lang]["decoder_target_tokens"].shape[0] == 0:
      raise ValueError(f"Language {lang!r} has no {split} rows ({name}).")
  return rows
