"""Tests of the multilingual LM data pipeline (ldro.data.text, paper §5.2)."""

import json
import os

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tfds = pytest.importorskip("tensorflow_datasets")

from ldro.data import text  # pylint: disable=g-import-not-at-top
from ldro.data import text_batchers  # pylint: disable=g-import-not-at-top
from ldro.data import text_rows  # pylint: disable=g-import-not-at-top
from experiments.runner import paths  # pylint: disable=g-import-not-at-top

SHARED_CORPUS = paths.resolve("../shared/data/multilingual")

L = 32
WORDS = {
    "en": "the cat sat on a mat and we read books about rivers in the summer".split(),
    "de": "der hund lief schnell durch den park und wir lesen ein buch heute".split(),
    "yo": "mo fe lati lo si oja ni ola pelu awon ore mi ati ebi".split(),
}


def _sentences(lang, n, seed, long_every=0):
  rng = np.random.RandomState(seed)
  out = []
  for i in range(n):
    k = 40 if long_every and i % long_every == 0 else rng.randint(3, 9)
    out.append(" ".join(rng.choice(WORDS[lang], k)))
  return out


def _write(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(l + "\n" for l in lines))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("multilingual"))
  for i, lang in enumerate(WORDS):
    _write(f"{d}/{lang}.train.txt", _sentences(lang, 60 + 20 * i, i, long_every=25))
    _write(f"{d}/{lang}.test.txt", _sentences(lang, 11, 100 + i))
  _write(f"{d}/tatoeba/en.train.txt", _sentences("en", 30, 7))
  _write(f"{d}/tatoeba/en.test.txt", _sentences("en", 5, 8))
  return d


@pytest.fixture(scope="module")
def vocab():
  return text.default_vocabulary()


@pytest.fixture(scope="module")
def registered(corpus, vocab):
  info = text.register_language_tasks(list(WORDS), "textfiles", vocab,
                                      data_dir=corpus, include_tatoeba=True,
                                      prefix="test_ldro", sequence_length=L)
  rows = text_rows.materialize(info["tasks"], "train", L)
  return info, rows


def _lines(path):
  with open(path, encoding="utf-8") as f:
    return [l.strip() for l in f if l.strip()]


def test_vocabulary_asset(vocab):
  assert os.path.getsize(text.DEFAULT_VOCAB_PATH) < 500_000
  assert (vocab.vocab_size, vocab.pad_id, vocab.eos_id, vocab.unk_id) == (8000, 0, 1, 2)
  samples = ["The quick brown fox.", "Привет, мир!", "مرحبا بالعالم",
             "नमस्ते दुनिया", "こんにちは世界", "你好，世界", "안녕하세요 세계",
             "გამარჯობა", "Ẹ kú àárọ̀", "สวัสดีชาวโลก", "မင်္ဂလာပါ", "வணக்கம்"]
  for s in samples:
    ids = vocab.encode(s)
    assert vocab.unk_id not in ids, s
  assert vocab.decode(vocab.encode("The quick brown fox.")) == "The quick brown fox."


def test_xtreme_languages():
  assert len(text.XTREME_LANGUAGES) == 40 == len(set(text.XTREME_LANGUAGES))
  assert len(text.PAPER_MC4_LANGUAGES) == 39 and "tl" not in text.PAPER_MC4_LANGUAGES
  d = SHARED_CORPUS
  if os.path.isdir(d):
    found = {f.split(".")[0] for f in os.listdir(d) if f.endswith(".train.txt")}
    assert found == set(text.XTREME_LANGUAGES)


def test_registration_sizes_rates_and_splits(registered, corpus, vocab):
  info, _ = registered
  assert info["tasks"] == {l: f"test_ldro_textfiles_tatoeba_{l}" for l in WORDS}
  assert info["mixtures"][0.3] == "test_ldro_textfiles_tatoeba_mix_alpha0p3"
  sizes = info["sizes"]
  assert sizes == {"en": 60 + 30, "de": 80, "yo": 100}  # lines (+ Tatoeba for en)
  np.testing.assert_allclose(list(info["rates"][0.0].values()), [1 / 3] * 3)
  np.testing.assert_allclose([info["rates"][1.0][l] for l in WORDS],
                             np.array([90, 80, 100]) / 270)
  mix = seqio.get_mixture_or_task(info["mixtures"][1.0])
  assert sorted(t.name for t in mix.tasks) == sorted(info["tasks"].values())
  # Validation = first ceil(n/2) lines, test = the rest, per eval file.
  task = seqio.get_mixture_or_task(info["tasks"]["en"])
  got = {}
  for split in ("validation", "test"):
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=False)
    got[split] = [vocab.decode([t for t in ex["targets"].tolist() if t != 1])
                  for ex in ds.as_numpy_iterator()]
    assert task.num_input_examples(split) == len(got[split])
  core, tato = _lines(f"{corpus}/en.test.txt"), _lines(f"{corpus}/tatoeba/en.test.txt")
  assert got["validation"] == core[:6] + tato[:3]
  assert got["test"] == core[6:] + tato[3:]
  # Idempotent re-registration (replaces tasks and mixtures).
  again = text.register_language_tasks(list(WORDS), "textfiles", vocab,
                                       data_dir=corpus, include_tatoeba=True,
                                       prefix="test_ldro")
  assert again["tasks"] == info["tasks"] and again["mixtures"] == info["mixtures"]


def test_packed_rows_layout_and_cache(registered, corpus, vocab, tmp_path):
  info, rows = registered
  for lang, r in rows.items():
    assert set(r) == set(text.FEATURES)
    shapes = {v.shape for v in r.values()}
    assert len(shapes) == 1 and shapes.pop()[1] == L
    assert r["decoder_loss_weights"].dtype == np.float32
    assert r["decoder_target_tokens"].dtype == np.int32
    seg, pos = r["decoder_segment_ids"], r["decoder_positions"]
    np.testing.assert_array_equal(r["decoder_loss_weights"], (seg > 0).astype(np.float32))
    inp, tgt = r["decoder_input_tokens"], r["decoder_target_tokens"]
    assert np.all(inp[pos == 0] == 0)
    inner = (pos[:, 1:] > 0)
    np.testing.assert_array_equal(inp[:, 1:][inner], tgt[:, :-1][inner])
    # Nothing truncated: all tokens of every line (long ones are chunked).
    lines = _lines(f"{corpus}/{lang}.train.txt")
    if os.path.exists(f"{corpus}/tatoeba/{lang}.train.txt"):
      lines += _lines(f"{corpus}/tatoeba/{lang}.train.txt")
    assert np.sum(tgt == 1) == len(lines)
    assert np.sum(seg > 0) == sum(len(vocab.encode(s)) + 1 for s in lines)
  assert np.max(rows["de"]["decoder_positions"]) == L - 1  # a chunked long line
  cached = text_rows.packed_rows(info["tasks"]["yo"], "train", L, cache_dir=str(tmp_path))
  assert len(os.listdir(tmp_path)) == 1
  again = text_rows.packed_rows(info["tasks"]["yo"], "train", L, cache_dir=str(tmp_path))
  for k in text.FEATURES:
    np.testing.assert_array_equal(cached[k], rows["yo"][k])
    np.testing.assert_array_equal(again[k], rows["yo"][k])


def test_stratified_batcher(registered):
  _, rows = registered
  sb = text_batchers.StratifiedBatcher(rows, rows_per_language=2, seed=3)
  assert sb.languages == tuple(WORDS)
  for step in range(12):
    b = sb.batch(step)
    assert b["decoder_target_tokens"].shape == (3, 2, L)
    assert b["decoder_loss_weights"].dtype == np.float32
    assert np.all(b["decoder_loss_weights"].sum((1, 2)) > 0)  # every language
  fresh = text_batchers.StratifiedBatcher(rows, rows_per_language=2, seed=3)
  for k in text.FEATURES:
    np.testing.assert_array_equal(fresh.batch(11)[k], sb.batch(11)[k])
  other = text_batchers.StratifiedBatcher(rows, rows_per_language=2, seed=4)
  assert any(not np.array_equal(other.batch(s)["decoder_target_tokens"],
                                sb.batch(s)["decoder_target_tokens"]) for s in range(3))


def _synthetic_rows(sizes):
  rows = {}
  for lang_id, (lang, n) in enumerate(sizes.items()):
    tgt = np.zeros((n, 4), np.int32)
    tgt[:, 0] = np.arange(n)
    tgt[:, 1] = lang_id
    rows[lang] = {k: tgt.copy() for k in text.FEATURES}
    rows[lang]["decoder_loss_weights"] = np.ones((n, 4), np.float32)
  return rows


def test_stratified_epochs_cover_all_rows():
  rows = _synthetic_rows({"a": 5, "b": 3})
  sb = text_batchers.StratifiedBatcher(rows, rows_per_language=1, seed=0)
  seen_a = [int(sb.batch(s)["decoder_target_tokens"][0, 0, 0]) for s in range(10)]
  seen_b = [int(sb.batch(s)["decoder_target_tokens"][1, 0, 0]) for s in range(6)]
  assert sorted(seen_a[:5]) == sorted(seen_a[5:]) == list(range(5))
  assert sorted(seen_b[:3]) == sorted(seen_b[3:]) == list(range(3))
  assert seen_a[:5] != seen_a[5:] or seen_b[:3] != seen_b[3:]  # reshuffled
  big = text_batchers.StratifiedBatcher(rows, rows_per_language=7, seed=0).batch(0)
  assert sorted(big["decoder_target_tokens"][1, :3, 0]) == [0, 1, 2]


def test_mixture_batcher():
  rows = _synthetic_rows({"a": 50, "b": 20, "c": 7})
  rates = {"a": 0.6, "b": 0.3, "c": 0.1}
  mb = text_batchers.MixtureBatcher(rows, rates, batch_size=16, seed=1, block_steps=7)
  seq = [mb.batch(s) for s in range(60)]
  for b in seq:
    assert b["task"].dtype == np.int32 and b["task"].shape == (16,)
    np.testing.assert_array_equal(b["decoder_target_tokens"][:, 1], b["task"])
  fresh = text_batchers.MixtureBatcher(rows, rates, batch_size=16, seed=1, block_steps=7)
  for s in (45, 23, 59):  # random access == sequential
    for k in list(text.FEATURES) + ["task"]:
      np.testing.assert_array_equal(fresh.batch(s)[k], seq[s][k])
  tasks = np.concatenate([b["task"] for b in seq])
  np.testing.assert_allclose(np.bincount(tasks, minlength=3) / len(tasks),
                             [0.6, 0.3, 0.1], atol=0.05)
  # Within a language, rows follow epochs (no repeat before all rows used).
  c_rows = [int(b["decoder_target_tokens"][j, 0]) for b in seq
            for j in np.nonzero(b["task"] == 2)[0]]
  assert sorted(c_rows[:7]) == list(range(7))
  with pytest.raises(ValueError):
    text_batchers.MixtureBatcher(rows, {"a": 1.0}, batch_size=4)


def test_eval_batches(registered, corpus, vocab):
  info, _ = registered
  tasks = {"en": info["tasks"]["en"], "yo": info["tasks"]["yo"]}
  ev = text_batchers.eval_batches(tasks, "validation", L, batch_size=4)
  for lang, batches in ev.items():
    assert all(b["decoder_target_tokens"].shape == (4, L) for b in batches)
    lines = _lines(f"{corpus}/{lang}.test.txt")[:6]  # first half of 11
    if lang == "en":
      lines += _lines(f"{corpus}/tatoeba/en.test.txt")[:3]
    weights = np.concatenate([b["decoder_loss_weights"] for b in batches])
    tokens = np.concatenate([b["decoder_target_tokens"] for b in batches])
    assert weights.sum() == sum(len(vocab.encode(s)) + 1 for s in lines)
    assert np.sum(tokens == 1) == len(lines)
    assert np.all(weights.sum(1)[: (weights.sum(1) > 0).sum()] > 0)  # padding last


def test_errors(corpus, vocab, tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="nope"):
    text.register_language_tasks(["en"], "textfiles", vocab, data_dir=missing)
  with pytest.raises(FileNotFoundError, match="xx.train.txt"):
    text.register_language_tasks(["en", "xx"], "textfiles", vocab, data_dir=corpus)
  d = tmp_path / "data"
  d.mkdir()
  (d / "en.train.txt").write_text("")
  (d / "en.test.txt").write_text("a b\n")
  with pytest.raises(ValueError, match="'en'"):
    text.register_language_tasks(["en"], "textfiles", vocab, data_dir=str(d))
  with pytest.raises(ValueError):
    text.register_language_tasks(["en"], "bogus", vocab, data_dir=corpus)


def test_mc4_with_tfds_mock_data(vocab):
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    info = text.register_language_tasks(["en", "he"], "mc4", vocab,
                                        prefix="test_ldro",
                                        sizes={"en": 400, "he": 25})
    task = seqio.get_mixture_or_task(info["tasks"]["he"])
    assert task.source.split_map == {"train": "iw", "validation": "iw-validation[:50%]",
                                  "test": "iw-validation[50%:]"}
    np.testing.assert_allclose(info["rates"][1.0]["en"], 400 / 425)
    rows = text_rows.materialize(info["tasks"], "train", L)
    assert all(r["decoder_target_tokens"].shape[0] > 0 for r in rows.values())
    b = text_batchers.StratifiedBatcher(rows, 1).batch(0)
    assert b["decoder_input_tokens"].shape == (2, 1, L)
    ev = text_batchers.eval_batches({"he": info["tasks"]["he"]}, "test", L, batch_size=2)
    assert ev["he"][0]["decoder_target_tokens"].shape == (2, L)
    # Without sizes (no prepared metadata) registration still works lazily.
    lazy = text.register_language_tasks(["en"], "mc4", vocab, prefix="test_ldro_lazy")
    assert lazy["rates"] is None


def test_shared_corpus_smoke(vocab):
  d = SHARED_CORPUS
  if not os.path.isdir(d):
    pytest.skip("shared multilingual corpus not available")
  with open(os.path.join(d, "manifest.json"), encoding="utf-8") as f:
    manifest = json.load(f)["languages"]
  info = text.register_language_tasks(["jv", "yo"], "textfiles", vocab, data_dir=d,
                                     prefix="test_ldro")
  assert info["sizes"] == {l: manifest[l]["train"]["lines"] for l in ("jv", "yo")}
  ev = text_batchers.eval_batches({"jv": info["tasks"]["jv"]}, "test", 64, batch_size=64)
  weights = sum(b["decoder_loss_weights"].sum() for b in ev["jv"])
  assert weights > 1000


def test_train_vocab_script_small(corpus, tmp_path):
  """experiments/train_vocab.py: balanced sampling, T5 special ids, byte fallback, report."""
  from experiments import train_vocab  # pylint: disable=g-import-not-at-top
  langs = list(WORDS)
  sampled = train_vocab.sample_sentences(corpus, langs, 25, include_tatoeba=True, seed=0)
  assert [len(sampled[l]) for l in langs] == [25, 25, 25]  # capped per language
  again = train_vocab.sample_sentences(corpus, langs, 25, include_tatoeba=True, seed=0)
  assert again == sampled  # seeded
  path = train_vocab.train(sampled, str(tmp_path / "spm" / "small"), vocab_size=300,
                           character_coverage=1.0, num_threads=1)
  voc = seqio.SentencePieceVocabulary(path)
  assert (voc.vocab_size, voc.pad_id, voc.eos_id, voc.unk_id) == (300, 0, 1, 2)
  for s in ["der hund liest", "mo fe lo si oja", "Привет ☃"]:  # unseen script: bytes, no <unk>
    ids = voc.encode(s)
    assert voc.unk_id not in ids and voc.decode(ids) == s
  table = train_vocab.report(path, corpus, langs)
  assert table.splitlines()[-1].startswith("all   unk% = 0.0000")
  with pytest.raises(FileNotFoundError):
    train_vocab.sample_sentences(corpus, ["xx"], 5, include_tatoeba=False, seed=0)
