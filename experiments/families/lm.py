"""Multilingual language modelling (paper section 5.2) as an :class:`Experiment`.

Each language is one task. The model is the decoder-only Transformer of
:mod:`ldro.models.decoder` over the committed 8k SentencePiece vocabulary
(``ldro/data/assets/spm/xtreme40_8k.model``; the paper used mT5's 250k vocabulary); the
data pipeline is :mod:`ldro.data.text` (one seqio Task per language, one seqio
Mixture per static-mixing temperature).

* Dynamic methods (DRO, Baselined-DRO, L-DRO; ``mode='jacobian'|'lean'``):
  language-stratified, task-grouped batches ``[N, rows_per_language, L]``
  (every language in every batch); ``task_loss`` is the mean token
  cross-entropy over that language's target tokens.
* Static mixing (``alpha`` set, ``mode='plain'``): batches of ``batch_size``
  packed rows drawn from the languages with the seqio Mixture's rates
  ``|D_i|**alpha / sum_j |D_j|**alpha`` (section 2.2, 5.2.1); ``plain_loss``
  is the mean over all target tokens of the batch, and the per-language losses
  (0 for languages absent from the batch) are only logged.
* ``evaluate``: per-language validation token cross-entropy (``task_loss``)
  and perplexity (``task_perplexity``, the main metric, lower is better) on a
  fixed set of ``eval_rows`` packed rows per language (optionally also the
  ``'test'`` split, as ``test_task_loss``/``test_task_perplexity``).

Gin use::

    train_and_evaluate.experiment = @LanguageModelingExperiment()
    LanguageModelingExperiment.languages = ['en', 'sw', 'yo']
    LanguageModelingExperiment.data_dir = '../shared/data/multilingual'

Relative paths (``data_dir``, ``cache_dir``, ``vocab_path``) are relative to
the repository root when run from a checkout, else to the working directory
(:func:`experiments.runner.paths.resolve`). ``ldro.data.text`` (seqio and
TensorFlow) is imported only when an experiment is built, so parsing configs
stays cheap.
"""

import json
import os
from typing import Any, Mapping, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from experiments.families import base as experiment_lib
from experiments.runner import paths
from experiments.runner import validation
from ldro.data import streams
from ldro.data.languages import PAPER_MC4_LANGUAGES, XTREME_LANGUAGES
from ldro.models import decoder as decoder_lib

PyTree = Any

# For the gin files (gin_configs/multilingual/base.gin, paper.gin): one list, in ldro.data.languages.
gin.constant("XTREME_LANGUAGES", list(XTREME_LANGUAGES))
gin.constant("PAPER_MC4_LANGUAGES", list(PAPER_MC4_LANGUAGES))

DEFAULT_DATA_DIR = "../shared/data/multilingual"
SOURCES = ("textfiles", "mc4")
EVAL_SPLITS = ("validation", "test")
EVAL_SELECTIONS = ("spread", "head")


@gin.configurable
def baselines_from_json(path: str = gin.REQUIRED,
                        languages: Sequence[str] = XTREME_LANGUAGES,
                        key: str = "validation_loss") -> list[float]:
  """Per-language baseline losses for Baselined-DRO (paper section 5.2.1).

  Reads the JSON written by :mod:`experiments.monolingual` (``{'languages':
  {lang: {'validation_loss': ..., ...}}}``), i.e. each language's monolingual
  validation loss, the proxy of its entropy ``H(p_i)``.

  Gin use::

      train_and_evaluate.baseline_losses = @baselines_from_json()
      baselines_from_json.path = 'workdirs/lm/mono/baselines.json'
      baselines_from_json.languages = %LANGUAGES

  Args:
    path: the JSON file (relative: from the repo root).
    languages: the experiment's languages, in its task order.
    key: which entry to use (``'validation_loss'``).

  Returns:
    ``[N]`` baselines in the order of ``languages``.

  Raises:
    FileNotFoundError: no such file (run ``experiments.monolingual`` first).
    ValueError: a language or the key is missing, or a value is not finite.
  """
  full = paths.resolve(path)
  if not os.path.isfile(full):
    raise FileNotFoundError(
        f"baselines file not found: {full} (baselines_from_json.path); write it with "
        "`python -m experiments.monolingual`.")
  with open(full, encoding="utf-8") as f:
    data = json.load(f)
  table = data.get("languages", data)
  out = []
  for lang in languages:
    if lang not in table:
      raise ValueError(f"baselines file {full} has no entry for language {lang!r} "
                       f"(it has {sorted(table)}).")
    entry = table[lang]
    value = entry.get(key) if isinstance(entry, Mapping) else entry
    if value is None or not np.isfinite(float(value)):
      raise ValueError(f"baselines file {full}: language {lang!r} has no finite {key!r}.")
    out.append(float(value))
  return out


def decoder_logits(model: decoder_lib.Decoder, params: PyTree, batch: PyTree,
                   rng: Optional[jax.Array] = None) -> jax.Array:
  """The decoder's logits on ``batch`` (dropout when the model has some and ``rng`` is given)."""
  dropout = model.config.dropout_rate > 0 and rng is not None
  return decoder_lib.apply_decoder(model, params, batch, enable_dropout=dropout,
                                   rngs={"dropout": rng} if dropout else None)


def token_loss(model: decoder_lib.Decoder, params: PyTree, task_batch: PyTree,
               rng: Optional[jax.Array] = None):
  """Mean token cross-entropy of one language's rows ``[b, L]``.

  The loss of :meth:`LanguageModelingExperiment.task_loss`, as a function of
  the model (reused by ``experiments.benchmark``).

  Returns:
    ``(loss, {'count': weighted target tokens})``.
  """
  logits = decoder_logits(model, params, task_batch, rng)
  total, count = decoder_lib.token_cross_entropy(
      logits, task_batch["decoder_target_tokens"], task_batch["decoder_loss_weights"])
  return total / jnp.maximum(count, 1.0), {"count": count}


def grouped_token_losses(model: decoder_lib.Decoder, params: PyTree, batch: PyTree,
                         rng: Optional[jax.Array] = None):
  """All languages' :func:`token_loss` of a stratified ``[N, b, L]`` batch from one
  decoder application on the flattened ``[N * b, L]`` rows.

  Equal to ``vmap`` of :func:`token_loss` over the task axis without dropout
  (the experiment itself uses that ``vmap``; ``experiments.benchmark`` times
  both).

  Returns:
    ``(losses [N], {'count': [N] weighted target tokens})``.
  """
  flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
  logits = decoder_logits(model, params, flat, rng)
  lead = batch["decoder_target_tokens"].shape[:2]
  logits = logits.reshape(lead + logits.shape[1:])
  losses, counts = decoder_lib.per_task_token_loss(
      logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"])
  return losses, {"count": counts}


@gin.configurable
class LanguageModelingExperiment(experiment_lib.Experiment):
  """Multilingual LM, one task per language (paper section 5.2).

  Attributes:
    languages: language codes (task order).
    info: the result of ``ldro.data.text.register_language_tasks``.
    sampling_rates: ``[N]`` mixture rates when ``alpha`` is set (static
      mixing; the runner records them as task weights), else ``None``.
    model: the :class:`ldro.models.decoder.Decoder`.
    num_train_rows: packed training rows materialised per language.
    num_eval_rows: ``{split: [N]}`` evaluation rows per language.
  """

  main_metric = "perplexity"
  higher_is_better = False
  # No convolutions: the decoder's backward pass keeps its speed inside lax.cond
  # (tiny decoder, lean grouped L-DRO T=1000: x0.94 of plain, results/benchmark).
  reuse_refresh_grads = True

  def __init__(self,
               languages: Sequence[str] = XTREME_LANGUAGES,
               source: str = "textfiles",
               data_dir: Optional[str] = DEFAULT_DATA_DIR,
               include_tatoeba: bool = True,
               sequence_length: int = 128,
               rows_per_language: int = 1,
               alpha: Optional[float] = None,
               batch_size: Optional[int] = None,
               model_size: str = "tiny",
               dropout_rate: float = 0.0,
               eval_rows: int = 32,
               eval_batch_size: int = 64,
               eval_splits: Sequence[str] = ("validation",),
               eval_selection: str = "spread",
               max_train_examples: Optional[int] = None,
               max_eval_examples: Optional[int] = None,
               cache_dir: Optional[str] = None,
               vocab_path: Optional[str] = None,
               sizes: Optional[Mapping[str, float]] = None,
               size_unit: str = "examples",
               tfds_data_dir: Optional[str] = None,
               seed: int = 0,
               input_shards: Optional[int] = None):
    """Registers the seqio tasks, materialises the rows and builds the model.

    Args:
      languages: language codes (default: the 40 XTREME languages).
      source: ``'textfiles'`` (the offline corpus in ``data_dir``) or
        ``'mc4'`` (TFDS ``c4/multilingual``).
      data_dir: folder of ``<lang>.{train,test}.txt`` (textfiles; relative to
        the repo root).
      include_tatoeba: add ``<data_dir>/tatoeba/<lang>.*.txt`` (imbalanced
        sizes like mC4; textfiles only).
      sequence_length: tokens per packed row ``L``.
      rows_per_language: rows of each language per step (stratified batches).
      alpha: static-mixing inverse temperature; if set, training batches are
        mixture batches (use ``mode='plain'``), else stratified.
      batch_size: rows per mixture batch (default ``N * rows_per_language``,
        the same number of rows as a stratified batch).
      model_size: ``'tiny'``, ``'small'``, ``'base'`` or ``'large'``.
      dropout_rate: decoder dropout during training.
      eval_rows: evaluation rows per language (fixed across evaluations).
      eval_batch_size: rows per evaluation forward pass.
      eval_splits: ``'validation'`` (always first) and optionally ``'test'``.
      eval_selection: ``'spread'`` (rows evenly spaced over the whole split,
        so that e.g. both the core and the Tatoeba part are represented) or
        ``'head'`` (the first rows).
      max_train_examples: per-language cap on materialised training examples
        (``|D_i|`` still counts the whole training files).
      max_eval_examples: per-language cap on materialised evaluation examples.
      cache_dir: ``.npz`` cache of packed rows (e.g. ``'workdirs/lm_cache'``).
      vocab_path: SentencePiece model (default: the committed 8k model).
      sizes: ``|D_i|`` overriding the counted sizes (needed for mc4 without
        prepared TFDS metadata).
      size_unit: ``'examples'`` or ``'bytes'`` (see ``language_sizes``).
      tfds_data_dir: TFDS data dir (mc4).
      seed: seed of the batch order.
      input_shards: ``S``: every language's training split is read as ``S``
        seqio shards (``ShardInfo``), materialised only where a process's
        part of the batch needs them (:mod:`ldro.data.text_shards`); the
        batch order depends on ``S`` (not on the process count). Must divide
        ``rows_per_language`` (stratified) or ``batch_size`` (mixture).
        ``None``: ``gcd(process count, that size)`` (1 in a single process:
        the whole split, as without sharding). Pin it to resume a run on
        another number of processes with the same data order.
    """
    from ldro.data import text  # pylint: disable=g-import-not-at-top  (seqio, TF: slow)
    from ldro.data import text_rows  # pylint: disable=g-import-not-at-top
    self._text_rows = text_rows
    languages = [str(l) for l in languages]
    if not languages:
      raise ValueError("LanguageModelingExperiment.languages is empty.")
    if source not in SOURCES:
      raise ValueError(f"unknown source {source!r} (LanguageModelingExperiment.source); "
                       f"known: {', '.join(SOURCES)}.")
    if model_size not in decoder_lib.DECODER_SIZES:
      raise ValueError(f"unknown model_size {model_size!r}; known: "
                       f"{', '.join(decoder_lib.DECODER_SIZES)}.")
    eval_splits = list(dict.fromkeys(["validation"] + list(eval_splits)))
    bad = [s for s in eval_splits if s not in EVAL_SPLITS]
    if bad:
      raise ValueError(f"unknown eval split(s) {bad}; known: {', '.join(EVAL_SPLITS)}.")
    if eval_selection not in EVAL_SELECTIONS:
      raise ValueError(f"unknown eval_selection {eval_selection!r}; known: "
                       f"{', '.join(EVAL_SELECTIONS)}.")
    v, name = validation, "LanguageModelingExperiment."
    sequence_length = v.whole_number(sequence_length, name + "sequence_length", 1)
    rows_per_language = v.whole_number(rows_per_language, name + "rows_per_language", 1)
    eval_rows = v.whole_number(eval_rows, name + "eval_rows", 1)
    eval_batch_size = v.whole_number(eval_batch_size, name + "eval_batch_size", 1)
    batch_size = v.optional_whole_number(batch_size, name + "batch_size", 1)
    max_train_examples = v.optional_whole_number(max_train_examples, name + "max_train_examples", 1)
    max_eval_examples = v.optional_whole_number(max_eval_examples, name + "max_eval_examples", 1)
    alpha = None if alpha is None else v.real(alpha, name + "alpha")
    dropout_rate = v.real(dropout_rate, name + "dropout_rate", 0.0, 1.0, high_inclusive=False)
    seed = v.seed(seed, name + "seed")
    self.task_names = languages
    self.languages = languages
    self.source = source
    self.sequence_length = int(sequence_length)
    self.rows_per_language = int(rows_per_language)
    self.alpha = None if alpha is None else float(alpha)
    self.batch_size = int(batch_size) if batch_size else len(languages) * self.rows_per_language
    self.eval_splits = eval_splits
    self.eval_batch_size = int(eval_batch_size)
    cache_dir = paths.resolve(cache_dir)

    vocab = text.default_vocabulary(paths.resolve(vocab_path))
    kwargs = {}
    if source == "textfiles":
      kwargs = dict(data_dir=paths.require_dir(
                        paths.resolve(data_dir), "Multilingual data directory",
                        "LanguageModelingExperiment.data_dir / DATA_DIR"),
                    include_tatoeba=bool(include_tatoeba))
    else:
      kwargs = dict(tfds_data_dir=tfds_data_dir)
    self.info = text.register_language_tasks(
        languages, source, vocab, sequence_length=self.sequence_length,
        alpha_values=() if self.alpha is None else (self.alpha,),
        sizes=sizes, size_unit=size_unit, **kwargs)
    self._sizes = self.info["sizes"]
    tasks = self.info["tasks"]

    if self.alpha is None:
      self.sampling_rates = None
    else:
      import seqio  # pylint: disable=g-import-not-at-top
      mixture = seqio.get_mixture_or_task(self.info["mixtures"][self.alpha])
      rates = np.array([mixture.get_rate(seqio.get_mixture_or_task(tasks[l]))
                        for l in languages], np.float64)
      self.sampling_rates = [float(r) for r in rates / rates.sum()]
    self.batcher = self._train_batcher(tasks, input_shards, max_train_examples, cache_dir,
                                       int(seed))
    if jax.process_count() == 1:  # read every shard now (a process reads its own on first use)
      self.num_train_rows  # pylint: disable=pointless-statement

    # Fixed evaluation rows: [sum_i K_i, L] per split, with a language id per row.
    self._eval = {}
    self.num_eval_rows = {}
    for split in eval_splits:
      rows = text_rows.materialize(tasks, split, self.sequence_length,
                                   max_examples=max_eval_examples, cache_dir=cache_dir)
      feats, ids, counts = {k: [] for k in text.FEATURES}, [], []
      for i, lang in enumerate(languages):
        r = rows[lang]
        n = r["decoder_target_tokens"].shape[0]
        k = min(int(eval_rows), n)
        if eval_selection == "spread":
          idx = np.unique(np.round(np.linspace(0, n - 1, k)).astype(np.int64))
        else:
          idx = np.arange(k)
        for f in text.FEATURES:
          feats[f].append(r[f][idx])
        ids.append(np.full((len(idx),), i, np.int32))
        counts.append(len(idx))
      self._eval[split] = ({f: np.concatenate(v) for f, v in feats.items()},
                           np.concatenate(ids))
      self.num_eval_rows[split] = counts

    self.config = decoder_lib.decoder_config(model_size, vocab.vocab_size,
                                             dropout_rate=float(dropout_rate))
    self.model = decoder_lib.Decoder(self.config)
    self._eval_sums = jax.jit(self._eval_sums_fn)

  # ---------------------------------------------------------------- sizes --

  @property
  def task_sizes(self) -> Optional[list[float]]:
    """``|D_i|``: training examples (lines / documents) of each language."""
    if self._sizes is None:
      return None
    return [float(self._sizes[l]) for l in self.languages]

  # ---------------------------------------------------------------- model --

  def init_params(self, rng: jax.Array) -> PyTree:
    """Initial decoder variables."""
    tokens = jnp.zeros((1, self.sequence_length), jnp.int32)
    # Eager, unlike the CNNs' jitted init: the decoder's jitted init is slower on CPU (about
    # 1.5 s tiny / 6 s small, against 0.04-0.5 s eager once warm) and not bitwise the eager
    # init's, so jitting it would change every committed LM run's starting point.
    return self.model.init(rng, tokens)

  def _logits(self, params, batch, rng):
    return decoder_logits(self.model, params, batch, rng)

  def task_loss(self, params: PyTree, task_batch: PyTree, rng: jax.Array):
    """Mean token cross-entropy of one language's rows ``[b, L]``.

    Returns:
      ``(loss, {'count': weighted target tokens})``.
    """
    return token_loss(self.model, params, task_batch, rng)

  def plain_loss(self, params: PyTree, batch: PyTree, rng: jax.Array):
    """Mean token cross-entropy of a mixture batch ``[B, L]`` (static mixing).

    Returns:
      ``(loss, {'task_losses': [N]})``: per-language mean token losses of the
      batch (0 for languages absent from it), for logging only.
    """
    logits = self._logits(params, batch, rng)
    losses, counts = decoder_lib.per_task_token_loss(
        logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"],
        task_ids=batch["task"], num_tasks=self.num_tasks)
    loss = jnp.sum(losses * counts) / jnp.maximum(jnp.sum(counts), 1.0)
    return loss, {"task_losses": losses}

  def train_batch(self, step: int) -> PyTree:
    """Stratified ``[N, b, L]`` batch, or a mixture ``[B, L]`` batch if ``alpha`` is set."""
    return self.batcher.batch(int(step))

  # ------------------------------------------- per-host input (host_input) --

  def _train_batcher(self, tasks, input_shards, max_examples, cache_dir, seed):
    """The (sharded) training batcher; shards are read on first use (ldro.data.text_shards)."""
    from ldro.data import text_shards  # pylint: disable=g-import-not-at-top
    import seqio  # pylint: disable=g-import-not-at-top
    axis = self.rows_per_language if self.alpha is None else self.batch_size
    try:
      s = text_shards.resolve_input_shards(input_shards, axis, jax.process_count())
    except ValueError as e:
      raise ValueError(f"{e} (LanguageModelingExperiment.input_shards)") from None
    self.input_shards = s
    if s > 1 and max_examples is not None:
      max_examples = -(-int(max_examples) // s)  # the cap is shared by the shards

    def load(lang, shard):
      info = seqio.ShardInfo(index=shard, num_shards=s) if s > 1 else None
      return self._text_rows.packed_rows(tasks[lang], "train", self.sequence_length,
                                         max_examples=max_examples, cache_dir=cache_dir,
                                         shard_info=info)

    rows = text_shards.ShardedRows(self.languages, s, load)
    if self.alpha is None:
      return text_shards.ShardedStratifiedBatcher(rows, self.rows_per_language, seed)
    return text_shards.ShardedMixtureBatcher(rows, self.sampling_rates, self.batch_size, seed)

  @property
  def num_train_rows(self) -> list:
    """Packed training rows per language (materialises every shard)."""
    rows = self.batcher.rows
    return [sum(int(rows.get(i, g)["decoder_target_tokens"].shape[0])
                for g in range(rows.num_shards)) for i in range(self.num_tasks)]

  def train_batch_prefix(self) -> tuple:
    """``(N, b)`` (stratified) or ``(B,)`` (static mixture)."""
    if self.alpha is None:
      return (self.num_tasks, self.rows_per_language)
    return (self.batch_size,)

  def train_batch_part(self, step: int, block: tuple) -> PyTree:
    """This process's part of batch ``step``, reading only the input shards it needs."""
    return self.batcher.batch_part(int(step), *block)

  supports_split_evaluation = True

  def evaluate_part(self, params: PyTree, index: int, count: int) -> dict:
    """Per-language token-loss sums and token counts over part ``index`` of ``count``.

    Part ``p`` is the contiguous ``p``-th of each split's fixed evaluation rows.
    """
    return {split: np.stack(self._split_sums(params, split, index, count))
            for split in self.eval_splits}

  def evaluate_from_sums(self, sums: dict) -> dict:
    """:meth:`evaluate`'s record from the summed :meth:`evaluate_part` of all parts."""
    out = {}
    for split in self.eval_splits:
      loss_sums, counts = sums[split]
      loss = loss_sums / np.maximum(counts, 1.0)
      prefix = "" if split == "validation" else f"{split}_"
      out[f"{prefix}task_loss"] = [float(x) for x in loss]
      out[f"{prefix}task_perplexity"] = [float(x) for x in np.exp(loss)]
      out[f"{prefix}avg_loss"] = float(np.mean(loss))
    return out

  # ----------------------------------------------------------- evaluation --

  def _eval_sums_fn(self, params, batch, ids):
    logits = decoder_lib.apply_decoder(self.model, params, batch)
    losses, counts = decoder_lib.per_task_token_loss(
        logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"],
        task_ids=ids, num_tasks=self.num_tasks)
    return losses * counts, counts

  def evaluate_split(self, params: PyTree, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-language mean token loss and token counts on the fixed ``split`` rows."""
    sums, counts = self._split_sums(params, split)
    return sums / np.maximum(counts, 1.0), counts

  def _split_sums(self, params: PyTree, split: str, index: int = 0,
                  count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-language token-loss sums and counts over part ``index`` of ``count`` of the rows."""
    feats, ids = self._eval[split]
    part, bs = streams.part_slice(ids.shape[0], index, count), self.eval_batch_size
    sums, counts = np.zeros(self.num_tasks), np.zeros(self.num_tasks)
    for start in range(part.start, part.stop, bs):
      b = {k: v[start:min(start + bs, part.stop)] for k, v in feats.items()}
      t = ids[start:min(start + bs, part.stop)]
      if t.shape[0] < bs:  # pad with zero-weight rows: one compiled shape
        pad = bs - t.shape[0]
        b = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
             for k, v in b.items()}
        t = np.concatenate([t, np.zeros((pad,), np.int32)])
      s, c = jax.device_get(self._eval_sums(params, b, t))
      sums += s
      counts += c
    return sums, counts

  def evaluate(self, params: PyTree) -> dict:
    """Per-language loss and perplexity on the fixed evaluation rows.

    Returns:
      ``{'task_loss': [N], 'task_perplexity': [N], 'avg_loss': float}`` for
      the validation split, and ``test_``-prefixed entries for ``'test'``.
    """
    out = {}
    for split in self.eval_splits:
      loss, _ = self.evaluate_split(params, split)
      prefix = "" if split == "validation" else f"{split}_"
      out[f"{prefix}task_loss"] = [float(x) for x in loss]
      out[f"{prefix}task_perplexity"] = [float(x) for x in np.exp(loss)]
      out[f"{prefix}avg_loss"] = float(np.mean(loss))
    return out
