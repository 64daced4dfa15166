"""Multilingual language-modelling data: constants, vocabulary, seqio tasks and mixtures.

Data pipeline of the multilingual LM experiment (paper section 5.2): one seqio
``Task`` per language (each language is one task of the multitask problem) and
a ``seqio.Mixture`` per static-mixing temperature alpha (section 5.2.1, "Static
mixing", rates proportional to ``|D_i|**alpha``). This module holds the
constants (:data:`FEATURES`, :data:`MC4_TFDS_NAME`), the vocabulary, the seqio
data sources and preprocessors, the sizes / mixing rates and the registration
(:func:`register_language_tasks`). The rest of the pipeline:

* :mod:`ldro.data.text_rows` -- packed rows of a task split materialised into
  numpy (:func:`~ldro.data.text_rows.packed_rows`,
  :func:`~ldro.data.text_rows.materialize`), with an optional ``.npz`` cache.
* :mod:`ldro.data.text_batchers` -- numpy batchers for the training runner
  (``StratifiedBatcher``, ``MixtureBatcher``) and fixed evaluation batches
  (``eval_batches``).
* :mod:`ldro.data.text_shards` -- per-host input: the training batchers over
  seqio input shards read on demand.

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

Determinism: see :mod:`ldro.data.text_batchers`.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ldro.data.languages import MC4_SPLIT_NAMES, PAPER_MC4_LANGUAGES, XTREME_LANGUAGES  # pylint: disable=unused-import

try:  # Data-only dependencies (``pip install ldro[data]``).
  import seqio
  import tensorflow as tf
except ImportError as _e:  # pragma: no cover
  raise ImportError("ldro.data.text needs tensorflow and seqio "
                    "(pip install 'ldro[data]').") from _e

#: Types of packed rows (used by :mod:`ldro.data.text_rows` and :mod:`ldro.data.text_batchers`).
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
