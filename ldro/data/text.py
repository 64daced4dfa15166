"""Multilingual language-modelling data: seqio tasks, mixtures and batchers.

Data pipeline of the multilingual LM experiment (paper section 5.2): one seqio
``Task`` per language (each language is one task of the multitask problem), a
``seqio.Mixture`` per static-mixing temperature alpha (section 5.2.1, "Static
mixing", rates proportional to ``|D_i|**alpha``), and numpy batchers for the
training runner:

* :class:`StratifiedBatcher` -- language-stratified, task-grouped batches
  ``[N, b, L]`` (every language in every batch) for the dynamic methods (DRO,
  Baselined-DRO, L-DRO) that need a loss per language at every step.
* :class:`MixtureBatcher` -- static-mixing batches ``[B, L]`` whose rows are
  drawn from languages with probability proportional to the mixture rates,
  with a ``'task'`` id per row.
* :func:`eval_batches` -- fixed per-language batches of the validation or test
  split for per-language token cross-entropy / perplexity (section 5.2.2).

Two sources are supported:

* ``'textfiles'``: the offline corpus ``<data_dir>/<lang>.{train,test}.txt``
  (FLORES-200 + NTREX-128, parallel) optionally plus
  ``<data_dir>/tatoeba/<lang>.train.txt`` (naturally imbalanced, like mC4).
  The test file of each language is split deterministically into a
  ``'validation'`` half (its first ``ceil(n/2)`` lines) and a ``'test'`` half
  (the remaining lines). The test files hold out whole documents in file
  order, so contiguous halves keep (all but at most one) documents on one
  side -- a scaled-down version of the validation/test split of the mC4
  evaluation set in section 5.2.1.
* ``'mc4'``: TFDS ``c4/multilingual:3.1.0`` as in mT5: ``'train'`` is the
  ``<code>`` split and ``'validation'``/``'test'`` are the first/second half
  of ``<code>-validation``. mC4 uses ``iw`` for Hebrew; Tagalog is not in mC4
  under ``tl`` (the paper drops it, footnote 1; mC4 has ``fil``), see
  :data:`MC4_SPLIT_NAMES` and :data:`PAPER_MC4_LANGUAGES`.

Units: every example is one line (textfiles) or one document (mc4),
tokenized with the SentencePiece vocabulary, EOS appended, then cut into
chunks of at most ``L = sequence_length`` tokens (nothing is truncated away).
Training/eval rows are *packed* rows of exactly ``L`` tokens produced by
``seqio.DecoderFeatureConverter(pack=True)``: several examples of the same
language share one row, separated by ``decoder_segment_ids`` (0 = padding) and
with ``decoder_positions`` restarting at 0 for every example. ``|D_i|`` used
for the mixing rates is the number of training *examples* (lines / documents)
by default, or the number of UTF-8 bytes of the training files
(``unit='bytes'``, textfiles only).

Determinism: a language's packed rows are materialised once (unshuffled
source, so the packing is fixed) and training batches index them with
per-epoch permutations drawn from ``np.random.default_rng((seed, i, epoch))``;
``batch(step)`` is a pure function of ``(rows, seed, step)``, so a run resumes
exactly from any step.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import importlib.resources
import json
import logging
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ldro.data import streams
from ldro.data.languages import MC4_SPLIT_NAMES, PAPER_MC4_LANGUAGES, XTREME_LANGUAGES  # pylint: disable=unused-import

try:  # Data-only dependencies (``pip install ldro[data]``).
  import seqio
  import tensorflow as tf
except ImportError as _e:  # pragma: no cover
  raise ImportError("ldro.data.text needs tensorflow and seqio "
                    "(pip install 'ldro[data]').") from _e

Array = np.ndarray
RowDict = Dict[str, Array]

#: TFDS name of mC4 (the version shipped by tensorflow-datasets 4.9.10).
MC4_TFDS_NAME = "c4/multilingual:3.1.0"

#: Model features produced by the batchers (all ``[..., L]``).
FEATURES: Tuple[str, ...] = (
    "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
    "decoder_segment_ids", "decoder_positions")

#: Committed vocabulary (``experiments/train_vocab.py``): 8000 unigram pieces,
#: byte fallback, pad=0 eos=1 unk=2; installed with the package.
DEFAULT_VOCAB_PATH = str(importlib.resources.files("ldro.data").joinpath(
    "assets", "spm", "xtreme40_8k.model"))


def default_vocabulary(path: Optional[str] = None) -> "seqio.SentencePieceVocabulary":
  """Loads the committed SentencePiece vocabulary.

  Args:
    path: ``.model`` file; defaults to :data:`DEFAULT_VOCAB_PATH`.

  Returns:
    A ``seqio.SentencePieceVocabulary`` (no extra ids).
  """
  return seqio.SentencePieceVocabulary(path or DEFAULT_VOCAB_PATH)


# ------------------------------------------------------------------ files ----


def _count_nonempty_lines(path: str, start: int = 0, stop: Optional[int] = None) -> int:
  """Number of non-blank lines among raw lines ``[start, stop)`` of a file."""
  n = 0
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f):
      if stop is not None and i >= stop:
        break
      if i >= start and line.strip():
        n += 1
  return n


@functools.lru_cache(maxsize=512)
def _file_stats(path: str, mtime: float, size: int) -> Tuple[int, int]:
  """(raw line count, non-blank line count) of a file (cached by mtime/size).

  Every language file is read here once, in full, when the tasks are
  registered: invalid UTF-8 is reported then, naming the file and line.
  """
  del mtime, size
  raw = nonempty = 0
  try:
    with open(path, encoding="utf-8") as f:
      for line in f:
        raw += 1
        nonempty += bool(line.strip())
  except UnicodeDecodeError:
    raise _invalid_utf8(path) from None
  return raw, nonempty


def _invalid_utf8(path: str) -> ValueError:
  """The error for a text file that is not UTF-8: file, line and byte (on the error path)."""
  with open(path, "rb") as f:
    for number, line in enumerate(f, 1):
      try:
        line.decode("utf-8")
      except UnicodeDecodeError as e:
        return ValueError(f"Invalid UTF-8 in {path}, line {number} (byte {e.start + 1} of the "
                          f"line: {line[e.start:e.start + 4]!r}); language files must be UTF-8.")
  return ValueError(f"Invalid UTF-8 in {path}; language files must be UTF-8.")


def _stats(path: str) -> Tuple[int, int]:
  st = os.stat(path)
  return _file_stats(path, st.st_mtime, st.st_size)


def _language_files(lang: str, data_dir: str, include_tatoeba: bool
                    ) -> Tuple[List[str], List[str]]:
  """Checked (train_files, test_files) of one language for ``'textfiles'``.

  Raises:
    FileNotFoundError: ``data_dir`` or a core language file is missing.
    ValueError: a core language file has no non-blank line.
  """
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"Multilingual data directory not found: {data_dir}")
  train, test = [], []
  for split, out in (("train", train), ("test", test)):
    path = os.path.join(data_dir, f"{lang}.{split}.txt")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"Missing {split} file for language {lang!r}: {path}")
    if _stats(path)[1] == 0:
      raise ValueError(f"Empty {split} file for language {lang!r}: {path}")
    out.append(path)
    tpath = os.path.join(data_dir, "tatoeba", f"{lang}.{split}.txt")
    # Tatoeba is optional (no Yoruba); an empty Tatoeba file counts as absent.
    if include_tatoeba and os.path.isfile(tpath) and _stats(tpath)[1] > 0:
      out.append(tpath)
  return train, test


class HalvedTextLineDataSource(seqio.TextLineDataSource):
  """``TextLineDataSource`` whose eval files are split into two halves.

  ``'train'`` reads ``train_files`` like ``seqio.TextLineDataSource``.
  ``'validation'`` reads the first ``ceil(n/2)`` lines of each eval file and
  ``'test'`` the remaining ``floor(n/2)`` (``n`` = raw line count of the file),
  files concatenated in the given order (section 5.2.1, scaled down).
  """

  def __init__(self, train_files: Sequence[str], eval_files: Sequence[str]):
    """Builds the source.

    Args:
      train_files: text files of the ``'train'`` split.
      eval_files: text files split into ``'validation'`` / ``'test'`` halves.
    """
    self._eval_files = list(eval_files)
    self._half = {p: (_stats(p)[0] + 1) // 2 for p in self._eval_files}
    num = {
        "train": sum(_stats(p)[1] for p in train_files),
        "validation": sum(_count_nonempty_lines(p, 0, self._half[p])
                          for p in self._eval_files),
        "test": sum(_count_nonempty_lines(p, self._half[p])
                    for p in self._eval_files),
    }
    super().__init__(
        split_to_filepattern={"train": list(train_files),
                              "validation": self._eval_files,
                              "test": self._eval_files},
        num_input_examples=num,
        # seqio's offline cache would read whole eval files, not the halves.
        caching_permitted=False)

  def get_dataset(self, split: str = "train", shuffle: bool = True,
                  seed: Optional[int] = None, shard_info=None, *,
                  sequence_length=None, use_cached: bool = False,
                  num_epochs: Optional[int] = 1) -> "tf.data.Dataset":
    """Returns the lines of ``split`` (eval halves are never shuffled here)."""
    if split == "train":
      return super().get_dataset(split, shuffle, seed, shard_info,
                                 sequence_length=sequence_length,
                                 use_cached=use_cached, num_epochs=num_epochs)
    if split not in ("validation", "test"):
      raise ValueError(f"Unknown split {split!r}")
    ds = None
    for path in self._eval_files:
      lines = tf.data.TextLineDataset(path)
      half = self._half[path]
      lines = lines.take(half) if split == "validation" else lines.skip(half)
      ds = lines if ds is None else ds.concatenate(lines)
    if shard_info:
      ds = ds.shard(shard_info.num_shards, shard_info.index)
    return ds


class Mc4DataSource(seqio.TfdsDataSource):
  """``seqio.TfdsDataSource`` tolerant of missing TFDS split metadata.

  ``num_input_examples`` returns ``None`` (instead of raising) when the split
  sizes are unknown, e.g. under ``tfds.testing.mock_data`` or before the
  dataset is prepared; seqio then skips its in-memory caching decision.
  ``split_map`` records the seqio split -> TFDS split mapping.
  """

  def __init__(self, splits: Mapping[str, str], **kwargs: Any):
    """Builds the source.

    Args:
      splits: seqio split -> TFDS split (or slice) name.
      **kwargs: other ``seqio.TfdsDataSource`` arguments (``tfds_name``, ...).
    """
    self.split_map = dict(splits)
    super().__init__(splits=dict(splits), **kwargs)

  def num_input_examples(self, split: str) -> Optional[int]:
    """Number of examples of ``split`` or ``None`` if unknown."""
    try:
      return super().num_input_examples(split)
    except (KeyError, ValueError):
      return None


# ---------------------------------------------------------- preprocessors ----


def lines_to_targets(dataset: "tf.data.Dataset") -> "tf.data.Dataset":
  """Maps text lines to ``{'targets': line}``, dropping blank lines.

  Args:
    dataset: dataset of scalar ``tf.string`` lines.

  Returns:
    Dataset of ``{'targets': tf.string}``.
  """
  dataset = dataset.map(lambda s: {"targets": tf.strings.strip(s)},
                        num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.filter(lambda x: tf.strings.length(x["targets"]) > 0)


def text_to_targets(dataset: "tf.data.Dataset", key: str = "text") -> "tf.data.Dataset":
  """Maps mC4 documents ``{'text', 'url', ...}`` to ``{'targets': text}``.

  Args:
    dataset: TFDS mC4 dataset.
    key: text field.

  Returns:
    Dataset of ``{'targets': tf.string}`` without empty documents.
  """
  dataset = dataset.map(lambda x: {"targets": x[key]},
                        num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.filter(lambda x: tf.strings.length(x["targets"]) > 0)


def split_targets(dataset: "tf.data.Dataset",
                  sequence_length: Optional[Mapping[str, int]] = None
                  ) -> "tf.data.Dataset":
  """Cuts token sequences into consecutive chunks of at most ``L`` tokens.

  Avoids the silent truncation of ``Task.get_dataset`` for examples longer
  than a row (mC4 documents, long sentences); the EOS stays on the last chunk.
  A no-op when ``sequence_length['targets']`` is not set.

  Args:
    dataset: dataset of ``{'targets': int32 [n]}``.
    sequence_length: ``{'targets': L}`` (passed by seqio).

  Returns:
    Dataset of ``{'targets': int32 [<= L]}``.
  """
  length = (sequence_length or {}).get("targets")
  if not length:
    return dataset

  def _chunk(x):
    t = x["targets"]
    n = tf.size(t, out_type=tf.int64)
    starts = tf.range(0, n, length, dtype=tf.int64)
    lengths = tf.minimum(tf.cast(length, tf.int64), n - starts)
    return {"targets": tf.RaggedTensor.from_row_lengths(t, lengths)}

  return dataset.map(_chunk, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def _require_data_dir(data_dir: Optional[str]) -> str:
  if data_dir is None:
    raise ValueError("source 'textfiles' needs data_dir (the folder of <lang>.train.txt files).")
  return data_dir


def _preprocessors(source: str) -> List[Callable[..., Any]]:
  first = lines_to_targets if source == "textfiles" else text_to_targets
  return [
      first,
      functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
      seqio.preprocessors.append_eos,
      split_targets,
  ]


# ------------------------------------------------------------------ sizes ----


def _mc4_split(lang: str) -> str:
  return MC4_SPLIT_NAMES.get(lang, lang)


def language_sizes(languages: Sequence[str], source: str, *,
                   data_dir: Optional[str] = None, include_tatoeba: bool = False,
                   unit: str = "examples",
                   tfds_data_dir: Optional[str] = None) -> Dict[str, int]:
  """Training-set size ``|D_i|`` per language, used for mixing rates (§5.2.1).

  Args:
    languages: language codes (XTREME codes).
    source: ``'textfiles'`` or ``'mc4'``.
    data_dir: text folder (required for ``'textfiles'``).
    include_tatoeba: add the Tatoeba training file when present.
    unit: ``'examples'`` (non-blank lines / mC4 documents = seqio input
      examples, before chunking) or ``'bytes'`` (UTF-8 bytes of the training
      files; textfiles only).
    tfds_data_dir: TFDS data dir (``'mc4'``).

  Returns:
    Dict language -> size.

  Raises:
    FileNotFoundError / ValueError: see :func:`register_language_tasks`;
    ValueError for ``'mc4'`` when the TFDS metadata (split sizes) is not
    available (dataset not prepared) -- pass ``sizes=`` explicitly then.
  """
  if unit not in ("examples", "bytes"):
    raise ValueError(f"unit must be 'examples' or 'bytes', got {unit!r}")
  sizes = {}
  if source == "textfiles":
    data_dir = _require_data_dir(data_dir)
    for lang in languages:
      train, _ = _language_files(lang, data_dir, include_tatoeba)
      if unit == "bytes":
        sizes[lang] = sum(os.path.getsize(p) for p in train)
      else:
        sizes[lang] = sum(_stats(p)[1] for p in train)
  elif source == "mc4":
    if unit != "examples":
      raise ValueError("mc4 sizes are only available as numbers of documents.")
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    info = tfds.builder(MC4_TFDS_NAME, data_dir=tfds_data_dir).info
    for lang in languages:
      split = _mc4_split(lang)
      try:
        n = int(info.splits[split].num_examples)
      except (KeyError, ValueError) as e:
        raise ValueError(
            f"No TFDS split metadata for {MC4_TFDS_NAME} split {split!r} "
            f"(dataset not prepared?); pass sizes= explicitly.") from e
      sizes[lang] = n
  else:
    raise ValueError(f"source must be 'textfiles' or 'mc4', got {source!r}")
  return sizes


def mixture_rates(sizes: Mapping[str, float], alpha: float) -> Dict[str, float]:
  """Static-mixing rates ``r_i = |D_i|**alpha / sum_j |D_j|**alpha`` (§2.2).

  Args:
    sizes: ``|D_i|`` per language.
    alpha: inverse temperature (0 uniform, 1 proportional).

  Returns:
    Normalised rates (same keys/order as ``sizes``).
  """
  w = {k: float(v) ** alpha for k, v in sizes.items()}
  total = sum(w.values())
  return {k: v / total for k, v in w.items()}


def _alpha_tag(alpha: float) -> str:
  return f"{alpha:g}".replace(".", "p").replace("-", "m")


# ----------------------------------------------------------- registration ----


def register_language_tasks(
    languages: Sequence[str],
    source: str,
    vocabulary: "seqio.Vocabulary",
    *,
    data_dir: Optional[str] = None,
    include_tatoeba: bool = False,
    prefix: str = "ldro_lm",
    sequence_length: Optional[int] = None,
    alpha_values: Sequence[float] = (0.0, 0.3, 1.0),
    sizes: Optional[Mapping[str, float]] = None,
    size_unit: str = "examples",
    tfds_data_dir: Optional[str] = None,
) -> Dict[str, Any]:
  """Registers one seqio Task per language and one Mixture per alpha (§5.2.1).

  Task ``i`` of the multitask problem is language ``languages[i]``. Each task
  has the single output feature ``'targets'`` (``add_eos=True``) and the
  preprocessors: text -> ``{'targets'}``, ``seqio.preprocessors.tokenize``,
  ``seqio.preprocessors.append_eos``, :func:`split_targets`. Splits are
  ``'train'``, ``'validation'``, ``'test'`` (see the module docstring).
  Re-registering the same names replaces the previous tasks/mixtures.

  Names: task ``f'{prefix}_{tag}_{lang}'`` and mixture
  ``f'{prefix}_{tag}_mix_alpha{alpha}'`` (alpha with ``.`` -> ``p``) where
  ``tag`` is ``'textfiles'``, ``'textfiles_tatoeba'`` or ``'mc4'``.

  Args:
    languages: language codes (see :data:`XTREME_LANGUAGES`).
    source: ``'textfiles'`` or ``'mc4'``.
    vocabulary: seqio vocabulary (e.g. :func:`default_vocabulary`).
    data_dir: folder of the text files (required for ``'textfiles'``).
    include_tatoeba: also train on ``<data_dir>/tatoeba/<lang>.train.txt`` and
      evaluate on the halves of ``tatoeba/<lang>.test.txt`` where they exist.
    prefix: name prefix.
    sequence_length: tokens per row ``L``; only recorded in the returned dict
      (tasks receive it at ``get_dataset`` time, as usual in seqio).
    alpha_values: static-mixing inverse temperatures, one mixture each.
    sizes: ``|D_i|`` overriding :func:`language_sizes`. For ``'mc4'`` without
      prepared metadata, rates fall back to seqio-style lazy rates
      (``task.num_input_examples('train')**alpha``) and ``'sizes'``/``'rates'``
      are ``None`` in the result.
    size_unit: ``unit`` of :func:`language_sizes`.
    tfds_data_dir: TFDS data dir for ``'mc4'``.

  Returns:
    ``{'tasks': {lang: task_name}, 'mixtures': {alpha: mixture_name},
    'sizes': {lang: |D_i|} | None, 'rates': {alpha: {lang: rate}} | None,
    'languages': tuple, 'source': str, 'sequence_length': L}``.

  Raises:
    FileNotFoundError: missing data directory or language file (textfiles).
    ValueError: empty language file (names the language), unknown source.
  """
  languages = tuple(languages)
  if len(set(languages)) != len(languages):
    raise ValueError(f"Duplicate languages in {languages}")
  output_features = {"targets": seqio.Feature(vocabulary, add_eos=True,
                                              dtype=tf.int32)}
  if source == "textfiles":
    data_dir = _require_data_dir(data_dir)
    tag = "textfiles_tatoeba" if include_tatoeba else "textfiles"
    srcs = {}
    for lang in languages:
      train, test = _language_files(lang, data_dir, include_tatoeba)
      srcs[lang] = HalvedTextLineDataSource(train, test)
  elif source == "mc4":
    tag = "mc4"
    srcs = {}
    for lang in languages:
      split = _mc4_split(lang)
      srcs[lang] = Mc4DataSource(
          tfds_name=MC4_TFDS_NAME, tfds_data_dir=tfds_data_dir,
          splits={"train": split,
                  "validation": f"{split}-validation[:50%]",
                  "test": f"{split}-validation[50%:]"})
  else:
    raise ValueError(f"source must be 'textfiles' or 'mc4', got {source!r}")

  if sizes is None:
    try:
      sizes = language_sizes(languages, source, data_dir=data_dir,
                             include_tatoeba=include_tatoeba, unit=size_unit,
                             tfds_data_dir=tfds_data_dir)
    except ValueError:
      if source != "mc4":
        raise
      logging.warning("mC4 split sizes unavailable; using lazy seqio rates.")
      sizes = None
  else:
    missing = set(languages) - set(sizes)
    if missing:
      raise ValueError(f"sizes lacks languages {sorted(missing)}")
    sizes = {l: sizes[l] for l in languages}

  tasks = {}
  for lang in languages:
    name = f"{prefix}_{tag}_{lang}"
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(name, source=srcs[lang],
                           preprocessors=_preprocessors(source),
                           output_features=output_features, metric_fns=[])
    tasks[lang] = name

  mixtures, rates = {}, ({} if sizes is not None else None)
  for alpha in alpha_values:
    name = f"{prefix}_{tag}_mix_alpha{_alpha_tag(alpha)}"
    if sizes is not None:
      r = mixture_rates(sizes, alpha)
      rates[alpha] = r
      entries = [(tasks[l], r[l]) for l in languages]
    else:
      entries = [(tasks[l], functools.partial(_lazy_rate, alpha=alpha))
                 for l in languages]
    seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, entries)
    mixtures[alpha] = name
  return {"tasks": tasks, "mixtures": mixtures, "sizes": sizes,
          "rates": rates, "languages": languages, "source": source,
          "sequence_length": sequence_length}


def _lazy_rate(task: "seqio.Task", alpha: float) -> float:
  n = task.num_input_examples("train")
  if n is None:
    raise ValueError(f"Unknown size of {task.name} 'train'; pass sizes= to "
                     "register_language_tasks.")
  return float(n) ** alpha


# ---------------------------------------------------------- materialising ----


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
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **out)
    os.replace(tmp, path)
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


# --------------------------------------------------------------- batchers ----


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
    self._block_cache: Tuple[int, Optional[Array]] = (-1, None)

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

  def _block(self, k: int) -> Array:
    if self._block_cache[0] != k:
      rng = np.random.default_rng((self.seed, self._SALT, k))
      draws = rng.choice(len(self.languages), size=(self.block_steps, self.batch_size),
                         p=self.rates)
      self._block_cache = (k, draws)
    return self._block_cache[1]

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
