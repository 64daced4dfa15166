r"""Trains the shared SentencePiece vocabulary for the multilingual LM experiment.

Offline stand-in for the mT5 vocabulary of paper section 5.2.1 (Lookahead-DRO,
"Multilingual language modeling"): a unigram SentencePiece model trained on a
language-balanced sample of the training text, so that every one of the 40
XTREME languages (12 scripts) is represented in the vocabulary.

Sampling: for each language we draw (without replacement, seeded) up to
``--sentences_per_language`` lines from ``<data_dir>/<lang>.train.txt`` (plus
``<data_dir>/tatoeba/<lang>.train.txt`` with ``--include_tatoeba``). Because the
core corpus is parallel (FLORES-200 + NTREX-128), every language contributes the
same *content*, i.e. uniform (alpha = 0) language sampling. Only training files
are read; test files are used afterwards for the coverage report.

Special ids follow the T5 / seqio convention: pad=0, eos=1, unk=2, no bos.
``byte_fallback=True`` makes characters outside the vocabulary decompose into
UTF-8 byte pieces instead of <unk>.

Usage:
  python experiments/train_vocab.py \
    --data_dir=/work/shared/data/multilingual --vocab_size=8000 \
    --out=ldro/data/assets/spm/xtreme40_8k

Writes ``<out>.model`` and ``<out>.vocab`` and prints a per-language table of
tokens per sentence, characters per token and the <unk> rate on the test files.
"""

from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Sequence

from absl import app
from absl import flags
import numpy as np
import sentencepiece as spm

from ldro.data.languages import XTREME_LANGUAGES

_FLAGS: dict = {}


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program, so modules import cleanly)."""
  _FLAGS['data_dir'] = flags.DEFINE_string(
      "data_dir", "/work/shared/data/multilingual",
      "Folder holding <lang>.train.txt / <lang>.test.txt (and tatoeba/).")
  _FLAGS['vocab_size'] = flags.DEFINE_integer("vocab_size", 8000, "Vocabulary size.")
  _FLAGS['out'] = flags.DEFINE_string(
      "out", "ldro/data/assets/spm/xtreme40_8k",
      "Output prefix: writes <out>.model and <out>.vocab.")
  _FLAGS['languages'] = flags.DEFINE_list(
      "languages", list(XTREME_LANGUAGES), "Comma-separated language codes.")
  _FLAGS['sentences_per_language'] = flags.DEFINE_integer(
      "sentences_per_language", 2500,
      "At most this many training lines are sampled per language.")
  _FLAGS['include_tatoeba'] = flags.DEFINE_bool(
      "include_tatoeba", False,
      "Also sample from <data_dir>/tatoeba/<lang>.train.txt.")
  _FLAGS['character_coverage'] = flags.DEFINE_float(
      "character_coverage", 0.9995,
      "SentencePiece character_coverage (rare characters use byte fallback).")
  _FLAGS['seed'] = flags.DEFINE_integer("seed", 0, "Seed of the sentence sampling.")
  _FLAGS['num_threads'] = flags.DEFINE_integer("num_threads", 2, "Trainer threads.")
  _FLAGS['report_only'] = flags.DEFINE_bool(
      "report_only", False, "Skip training; only print the report for <out>.model.")


def read_lines(path: str) -> List[str]:
  """Reads the non-empty lines of a UTF-8 text file.

  Args:
    path: file path.

  Returns:
    The stripped, non-empty lines.
  """
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def sample_sentences(data_dir: str, languages: Sequence[str], k: int,
                     include_tatoeba: bool, seed: int) -> Dict[str, List[str]]:
  """Samples up to ``k`` training sentences per language (section 5.2.1).

  Args:
    data_dir: folder with ``<lang>.train.txt`` (and ``tatoeba/``).
    languages: language codes.
    k: maximum number of sentences per language.
    include_tatoeba: also sample from the Tatoeba training file, if present.
    seed: sampling seed; the language index is mixed in.

  Returns:
    A dict language -> list of sampled sentences (in file order).
  """
  out = {}
  for i, lang in enumerate(languages):
    path = os.path.join(data_dir, f"{lang}.train.txt")
    if not os.path.exists(path):
      raise FileNotFoundError(path)
    pool = read_lines(path)
    tpath = os.path.join(data_dir, "tatoeba", f"{lang}.train.txt")
    if include_tatoeba and os.path.exists(tpath):
      pool += read_lines(tpath)
    if not pool:
      raise ValueError(f"No training text for language {lang!r} ({path}).")
    rng = np.random.default_rng((seed, i))
    idx = np.sort(rng.choice(len(pool), size=min(k, len(pool)), replace=False))
    out[lang] = [pool[j] for j in idx]
  return out


def train(sentences: Dict[str, List[str]], out: str, vocab_size: int,
          character_coverage: float, num_threads: int) -> str:
  """Trains the unigram SentencePiece model.

  Args:
    sentences: language -> sentences (concatenated in language order).
    out: output prefix (``<out>.model``/``<out>.vocab``).
    vocab_size: number of pieces (including specials and 256 byte pieces).
    character_coverage: character coverage of the model.
    num_threads: trainer threads.

  Returns:
    Path of the ``.model`` file.
  """
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
      for lang in sentences:
        for s in sentences[lang]:
          f.write(s + "\n")
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=out,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        byte_fallback=True,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        input_sentence_size=0,          # use every sampled sentence
        shuffle_input_sentence=False,   # determinism: order is fixed above
        max_sentence_length=16384,
        num_threads=num_threads,
        minloglevel=1,
    )
  _normalize_provenance(out + ".model", os.path.basename(out))
  return out + ".model"


def _normalize_provenance(model_path: str, prefix: str) -> None:
  """Replaces the temporary corpus path / output prefix recorded in the model.

  SentencePiece stores ``trainer_spec.input`` and ``model_prefix``; the corpus
  lives in a random temporary folder, so without this the ``.model`` bytes
  would differ between otherwise identical runs.

  Args:
    model_path: ``.model`` file to rewrite in place.
    prefix: stable value for ``trainer_spec.model_prefix``.
  """
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  proto = sentencepiece_model_pb2.ModelProto()
  with open(model_path, "rb") as f:
    proto.ParseFromString(f.read())
  del proto.trainer_spec.input[:]
  proto.trainer_spec.input.append("sampled_training_sentences.txt")
  proto.trainer_spec.model_prefix = prefix
  with open(model_path, "wb") as f:
    f.write(proto.SerializeToString())


def report(model_path: str, data_dir: str, languages: Sequence[str]) -> str:
  """Per-language coverage table on the test files.

  Args:
    model_path: SentencePiece ``.model`` path.
    data_dir: folder with ``<lang>.test.txt``.
    languages: language codes.

  Returns:
    The table as a string (tokens/sentence, chars/token, <unk> and byte-piece
    rates over the core test file of each language).
  """
  sp = spm.SentencePieceProcessor(model_file=model_path)
  unk = sp.unk_id()
  byte_ids = np.array([sp.is_byte(i) for i in range(sp.get_piece_size())])
  rows = ["lang  sents  tok/sent  chars/tok  unk%    byte%"]
  tot_tok = tot_unk = 0
  for lang in languages:
    lines = read_lines(os.path.join(data_dir, f"{lang}.test.txt"))
    ids = sp.encode(lines)
    n_tok = sum(len(x) for x in ids)
    n_unk = sum(int(np.sum(np.asarray(x) == unk)) for x in ids)
    n_byte = sum(int(np.sum(byte_ids[np.asarray(x, dtype=np.int64)])) for x in ids)
    n_chr = sum(len(s) for s in lines)
    tot_tok += n_tok
    tot_unk += n_unk
    rows.append(f"{lang:4s}  {len(lines):5d}  {n_tok / len(lines):8.1f}  "
                f"{n_chr / n_tok:9.2f}  {100 * n_unk / n_tok:5.3f}  "
                f"{100 * n_byte / n_tok:6.3f}")
  rows.append(f"all   unk% = {100 * tot_unk / max(tot_tok, 1):.4f}")
  return "\n".join(rows)


def main(argv: Sequence[str]) -> None:
  del argv
  languages = list(_FLAGS['languages'].value)
  model_path = _FLAGS['out'].value + ".model"
  if not _FLAGS['report_only'].value:
    sentences = sample_sentences(_FLAGS['data_dir'].value, languages,
                                 _FLAGS['sentences_per_language'].value,
                                 _FLAGS['include_tatoeba'].value, _FLAGS['seed'].value)
    print(f"Training on {sum(len(v) for v in sentences.values())} sentences "
          f"from {len(sentences)} languages.")
    model_path = train(sentences, _FLAGS['out'].value, _FLAGS['vocab_size'].value,
                       _FLAGS['character_coverage'].value, _FLAGS['num_threads'].value)
    print(f"Wrote {model_path} ({os.path.getsize(model_path)} bytes) and "
          f"{_FLAGS['out'].value}.vocab")
  print(report(model_path, _FLAGS['data_dir'].value, languages))


if __name__ == "__main__":
  define_flags()
  app.run(main)
