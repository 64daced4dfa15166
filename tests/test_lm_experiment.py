"""Tests of the multilingual LM experiment (paper section 5.2): experiment, configs, table."""

import glob
import json
import os

import gin
import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

from experiments.families import lm as lm_experiment  # pylint: disable=g-import-not-at-top
from experiments.runner import loop  # pylint: disable=g-import-not-at-top
from experiments.runner import paths  # pylint: disable=g-import-not-at-top
from experiments import lm_table  # pylint: disable=g-import-not-at-top
from experiments import train as train_lib  # pylint: disable=g-import-not-at-top

REPO = paths.repo_root()
L = 16
WORDS = {
    "en": "the cat sat on a mat and we read books about rivers".split(),
    "de": "der hund lief schnell durch den park und wir lesen".split(),
    "yo": "mo fe lati lo si oja ni ola pelu awon ore mi".split(),
}


def _write(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(l + "\n" for l in lines))


def _sentences(lang, n, seed):
  rng = np.random.RandomState(seed)
  return [" ".join(rng.choice(WORDS[lang], rng.randint(3, 8))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("lm_corpus"))
  for i, lang in enumerate(WORDS):
    _write(f"{d}/{lang}.train.txt", _sentences(lang, 30, i))
    _write(f"{d}/{lang}.test.txt", _sentences(lang, 8, 10 + i))
  _write(f"{d}/tatoeba/en.train.txt", _sentences("en", 60, 7))  # imbalance
  _write(f"{d}/tatoeba/en.test.txt", _sentences("en", 4, 8))
  return d


@pytest.fixture(scope="module")
def rows_cache(tmp_path_factory):
  """One packed-row cache for the module: the first experiment reads the corpus through
  seqio, the others load its rows (the same tasks, L and splits)."""
  return str(tmp_path_factory.mktemp("lm_rows_cache"))


def _train(corpus, cache, workdir, method_file, bindings):
  gin.clear_config()
  train_lib.parse_gin(
      [f"gin_configs/multilingual/{method_file}"],
      [f"LANGUAGES = {list(WORDS)!r}", f"DATA_DIR = {corpus!r}", f"CACHE_DIR = {cache!r}",
       f"SEQUENCE_LENGTH = {L}", "EVAL_ROWS = 3", "NUM_STEPS = 3", "EVAL_EVERY = 3",
       "WARMUP_STEPS = 1", "LanguageModelingExperiment.eval_batch_size = 8"] + bindings)
  return loop.train_and_evaluate(str(workdir), quiet=True)


def test_ldro_lean_pairwise_trains(corpus, rows_cache, tmp_path):
  recs = _train(corpus, rows_cache, tmp_path / "ldro", "ldro.gin", ["UPDATE_EVERY = 2"])
  assert [r["step"] for r in recs] == [0, 3]
  last = recs[-1]
  assert len(last["task_perplexity"]) == 3 and len(last["test_task_perplexity"]) == 3
  np.testing.assert_allclose(np.exp(last["task_loss"]), last["task_perplexity"], rtol=1e-6)
  assert np.isclose(sum(last["task_weights"]), 1.0, atol=1e-5)
  assert all(np.isfinite(last["train_task_losses"]))
  assert last["avg_perplexity"] < recs[0]["avg_perplexity"]  # it learns something
  cfg = open(tmp_path / "ldro" / "config.gin", encoding="utf-8").read()
  assert "'pairwise'" in cfg


def test_static_mixing_plain_mode(corpus, rows_cache, tmp_path):
  recs = _train(corpus, rows_cache, tmp_path / "mix", "static_alpha1.gin", [])
  last = recs[-1]
  # Rates of the seqio mixture ~ |D_i| (en: 30 core + 60 Tatoeba lines).
  np.testing.assert_allclose(last["task_weights"], np.array([90, 30, 30]) / 150, rtol=1e-5)
  losses = np.asarray(last["train_task_losses"])
  assert np.all(np.isfinite(losses)) and np.all(losses >= 0)


def test_experiment_batches_and_losses(corpus, rows_cache):
  import jax  # pylint: disable=g-import-not-at-top
  exp = lm_experiment.LanguageModelingExperiment(
      languages=list(WORDS), data_dir=corpus, sequence_length=L, rows_per_language=2,
      eval_rows=2, alpha=0.0, batch_size=4, cache_dir=rows_cache)
  assert exp.task_sizes == [90.0, 30.0, 30.0]
  np.testing.assert_allclose(exp.sampling_rates, [1 / 3] * 3)
  b = exp.train_batch(0)
  assert b["decoder_target_tokens"].shape == (4, L) and b["task"].shape == (4,)
  # Jitted: op-by-op (eager) execution compiles every primitive of the decoder on its own.
  params = jax.jit(exp.init_params)(jax.random.PRNGKey(0))
  # A language absent from the batch gets a finite 0 loss.
  b["task"] = np.zeros_like(b["task"])
  loss, aux = jax.jit(exp.plain_loss)(params, b, jax.random.PRNGKey(1))
  assert np.isfinite(loss) and aux["task_losses"][1] == 0 and aux["task_losses"][2] == 0
  np.testing.assert_allclose(aux["task_losses"][0], loss, rtol=1e-5)
  strat = lm_experiment.LanguageModelingExperiment(
      languages=list(WORDS), data_dir=corpus, sequence_length=L, rows_per_language=2,
      eval_rows=2, cache_dir=rows_cache)
  assert strat.sampling_rates is None
  assert strat.train_batch(5)["decoder_input_tokens"].shape == (3, 2, L)


def test_baselines_from_json(tmp_path):
  path = tmp_path / "b.json"
  path.write_text(json.dumps({"languages": {"en": {"validation_loss": 2.0},
                                            "yo": {"validation_loss": 3.5}}}))
  assert lm_experiment.baselines_from_json(str(path), ["yo", "en"]) == [3.5, 2.0]
  with pytest.raises(ValueError, match="'de'"):
    lm_experiment.baselines_from_json(str(path), ["de"])
  with pytest.raises(FileNotFoundError, match="monolingual"):
    lm_experiment.baselines_from_json(str(tmp_path / "missing.json"), ["en"])


def test_every_multilingual_gin_file_parses(gin_config):
  files = sorted(glob.glob(os.path.join(REPO, "gin_configs", "multilingual", "*.gin")))
  sizes = {"base.gin", "cpu.gin", "cpu_mono.gin", "small.gin", "paper.gin", "cpu_seeds.gin",
           "cpu_mono_seeds.gin"}
  methods = [f for f in files if os.path.basename(f) not in sizes]
  assert len(methods) >= 9
  for f in methods:
    for extra in ([], ["cpu.gin"], ["small.gin"], ["paper.gin"]):
      gin_config([f] + [f"gin_configs/multilingual/{e}" for e in extra])
      mode = gin.query_parameter("%MODE")
      name = os.path.basename(f)
      assert (mode == "plain") == name.startswith("static_"), name
      if mode != "plain":
        assert gin.query_parameter("%METHOD") in ("dro", "baselined_dro", "ldro", "equal")
      if name.startswith("ldro"):
        assert gin.query_parameter("%UPDATE_EVERY") == {"": 1000, "cpu.gin": 100}.get(
            "".join(extra), 1000)
  # Monolingual CPU models: as many rows per step as a multilingual CPU step.
  gin_config([f"gin_configs/multilingual/{f}"
              for f in ("monolingual.gin", "cpu.gin", "cpu_mono.gin")])
  assert gin.query_parameter("%ROWS_PER_LANGUAGE") == len(gin.query_parameter("%LANGUAGES"))
  # The same for the 3-seed set-up (2 rows per language): 2 x 8 rows of the one language.
  gin_config([f"gin_configs/multilingual/{f}" for f in
              ("monolingual.gin", "cpu.gin", "cpu_seeds.gin", "cpu_mono_seeds.gin")])
  assert gin.query_parameter("%ROWS_PER_LANGUAGE") == 2 * len(gin.query_parameter("%LANGUAGES"))


def _fake_run(root, name, task_losses_by_step, test_offset=0.1):
  os.makedirs(os.path.join(root, name), exist_ok=True)
  with open(os.path.join(root, name, "metrics.jsonl"), "w", encoding="utf-8") as f:
    for step, losses in task_losses_by_step:
      losses = np.asarray(losses, float)
      f.write(json.dumps({"step": step, "task_loss": losses.tolist(),
                          "task_perplexity": np.exp(losses).tolist(),
                          "test_task_loss": (losses + test_offset).tolist(),
                          "test_task_perplexity": np.exp(losses + test_offset).tolist(),
                          "task_weights": [0.5, 0.5]}) + "\n")


def test_lm_table_on_fabricated_runs(tmp_path):
  root = str(tmp_path / "root")
  mono = {"languages": {"en": {"validation_loss": 1.0, "test_loss": 1.0,
                               "test_perplexity": float(np.exp(1.0)),
                               "validation_perplexity": float(np.exp(1.0))},
                        "yo": {"validation_loss": 2.0, "test_loss": 2.0,
                               "test_perplexity": float(np.exp(2.0)),
                               "validation_perplexity": float(np.exp(2.0))}}}
  os.makedirs(os.path.join(root, "mono"))
  with open(os.path.join(root, "mono", "baselines.json"), "w", encoding="utf-8") as f:
    json.dump(mono, f)
  for lang in ("en", "yo"):  # mono runs are not multilingual runs
    _fake_run(os.path.join(root, "mono"), lang, [(0, [1.0, 1.0])])
  # Best average validation loss at step 100 (not the last evaluation).
  _fake_run(root, "ldro", [(0, [3.0, 3.0]), (100, [1.2, 2.2]), (200, [1.1, 2.5])], 0.0)
  _fake_run(root, "static_alpha1", [(0, [3.0, 3.0]), (100, [1.0, 3.0])], 0.0)
  for name in ("dro_lr1e-2", "dro_lr1e-3"):
    _fake_run(root, name, [(0, [2.0, 2.5 if name.endswith("2") else 2.4])], 0.0)
  with open(os.path.join(root, "ldro", "metrics.jsonl"), "a", encoding="utf-8") as f:
    f.write('{"step": 300, "task_lo')  # a torn line is ignored
  out = str(tmp_path / "out")
  table = lm_table.build_table(root, mono_path=None, split="test")
  rows = {r["run"]: r for r in table["runs"]}
  assert set(rows) == {"ldro", "static_alpha1", "dro_lr1e-2", "dro_lr1e-3"}
  r = rows["ldro"]
  assert r["step"] == 100
  np.testing.assert_allclose(r["perplexity"], np.exp([1.2, 2.2]))
  rel = (np.exp([1.2, 2.2]) - np.exp([1.0, 2.0])) / np.exp([1.0, 2.0]) * 100
  np.testing.assert_allclose(r["relative_perplexity"], rel)
  np.testing.assert_allclose([r["avg_perplexity"], r["worst_perplexity"]],
                             [np.exp([1.2, 2.2]).mean(), np.exp(2.2)])
  np.testing.assert_allclose([r["avg_relative"], r["worst_relative"]], [rel.mean(), rel.max()])
  # Method rows: the DRO sweep is collapsed to its best average validation loss (lr 1e-3).
  methods = {m["method"]: m for m in table["methods"]}
  assert methods["DRO"]["run"] == "dro_lr1e-3"
  assert "Monolingual" in methods and methods["Monolingual"]["avg_relative"] == 0
  lm_table.write_outputs(table, out)
  md = open(os.path.join(out, "table1.md"), encoding="utf-8").read()
  assert "L-DRO" in md and "Static mixing (α = 1)" in md and "| yo |" not in md.split("##")[1]
  assert os.path.getsize(os.path.join(out, "per_language.png")) > 10_000
  data = json.load(open(os.path.join(out, "table1.json"), encoding="utf-8"))
  assert data["languages"] == ["en", "yo"]


def test_lm_table_over_seeds(tmp_path):
  """A sweep's root (<run>/seed<k>/): mean ± std per run and paired claim verdicts."""
  root = tmp_path / "runs"
  # Validation = test losses (offset 0); L-DRO's average perplexity is below static mixing's
  # at every seed by a margin that varies a little; DRO's worst is above L-DRO's.
  for k, jitter in enumerate((0.0, 0.05, -0.03)):
    _fake_run(str(root), f"static_alpha0/seed{k}", [(0, [1.5 + jitter, 2.0])], 0.0)
    _fake_run(str(root), f"ldro_lam0.1/seed{k}", [(0, [1.0 + jitter, 2.0 + jitter])], 0.0)
    if k < 2:  # DRO has two seeds only
      _fake_run(str(root), f"dro_lr1e-4/seed{k}", [(0, [1.0, 2.5])], 0.0)
  for done in root.glob("*/seed*"):
    (done / "DONE").write_text("x\n")
  # A run still training (no DONE) is left out and listed.
  _fake_run(str(root), "dro_lr1e-4/seed2", [(0, [0.5, 0.5])], 0.0)
  _fake_run(str(root), "static_alpha0/seed3", [(0, [0.5, 0.5])], 0.0)
  assert lm_table.seeds_of(str(root)) == [0, 1, 2]
  table = lm_table.build_seeded_table(str(root), str(tmp_path / "no_mono.json"))
  runs = {r["run"]: r for r in table["runs"]}
  want = [np.mean(np.exp([1.0 + j, 2.0 + j])) for j in (0.0, 0.05, -0.03)]
  assert runs["ldro_lam0.1"]["seeds"] == [0, 1, 2] and runs["dro_lr1e-4"]["seeds"] == [0, 1]
  np.testing.assert_allclose([runs["ldro_lam0.1"]["avg_perplexity"],
                              runs["ldro_lam0.1"]["avg_perplexity_std"]],
                             [np.mean(want), np.std(want, ddof=1)])
  assert "avg_relative" not in runs["ldro_lam0.1"]  # no monolingual baselines
  ppl = np.exp([[1.0 + j, 2.0 + j] for j in (0.0, 0.05, -0.03)])  # per seed, per language
  np.testing.assert_allclose(runs["ldro_lam0.1"]["perplexity"], ppl.mean(0))
  np.testing.assert_allclose(runs["ldro_lam0.1"]["perplexity_std"], ppl.std(0, ddof=1))
  claims = {(c["run"], c["key"], c["versus"]): c for c in table["claims"]}
  c = claims[("ldro_lam0.1", "avg_perplexity", "static_alpha0")]
  assert c["verdict"] == "holds" and c["seeds"] == [0, 1, 2] and c["mean"] > 0
  c = claims[("dro_lr1e-4", "worst_perplexity", "ldro_lam0.1")]  # DRO's worst is higher
  assert c["verdict"] == "does not hold" and c["seeds"] == [0, 1]
  lm_table.write_seeded_outputs(table, str(tmp_path / "out"))
  md = (tmp_path / "out" / "table1_seeds.md").read_text(encoding="utf-8")
  assert (tmp_path / "out" / "per_language_seeds.png").stat().st_size > 0
  assert "| ldro_lam0.1 | 0.500 | 0.500 |" in md  # the weights at the selected evaluation
  assert "| ldro_lam0.1 | L-DRO (lam0.1) | 0,1,2 |" in md and "# Seed 2" in md
  assert "Not finished, left out: dro_lr1e-4/seed2, static_alpha0/seed3." in md
  with pytest.raises(ValueError, match="no finished runs"):
    lm_table.build_seeded_table(str(tmp_path / "out"), "none.json")


def test_mc4_source_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    exp = lm_experiment.LanguageModelingExperiment(
        languages=["en", "he"], source="mc4", sizes={"en": 400, "he": 25},
        sequence_length=L, eval_rows=2, alpha=0.3)
  assert exp.task_sizes == [400.0, 25.0]
  w = np.array([400, 25], float) ** 0.3
  np.testing.assert_allclose(exp.sampling_rates, w / w.sum(), rtol=1e-6)
  assert exp.train_batch(0)["decoder_target_tokens"].shape == (2, L)
  assert exp.num_eval_rows["validation"][1] >= 1


def test_monolingual_processes_share_the_languages(tmp_path, monkeypatch):
  """A language another process holds is waited for, then trained only if that process
  stopped before the end; every language ends trained once, and baselines.json lists them."""
  import threading  # pylint: disable=g-import-not-at-top
  from experiments import monolingual  # pylint: disable=g-import-not-at-top
  from experiments.runner import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  files = [f"gin_configs/multilingual/{f}" for f in ("monolingual.gin", "cpu.gin", "cpu_mono.gin")]
  gin.clear_config()
  train_lib.parse_gin(files, [])
  langs = list(monolingual.query("LanguageModelingExperiment.languages"))[:3]
  steps = int(monolingual.query("train_and_evaluate.num_steps"))
  trained = []
  mono = tmp_path / "mono"
  # "Another process" holds languages 0 and 1: it finishes 0 and stops before finishing 1,
  # half a second after this process trained the free language 2 (so this one waits for it).
  held = [workdir_lib.claim(str(mono / lang)) for lang in langs[:2]]

  def other_process():
    fake_train(str(mono / langs[0]))
    for c in held:
      c.close()
  other = threading.Timer(0.5, other_process)

  def fake_train(workdir, quiet=True):  # one evaluation record at the last step
    del quiet
    trained.append(os.path.basename(workdir))
    with open(os.path.join(workdir, "metrics.jsonl"), "w", encoding="utf-8") as f:
      f.write(json.dumps({"step": steps, "task_loss": [1.5], "test_task_loss": [1.6]}) + "\n")
    if trained == [langs[2]]:
      other.start()
  monkeypatch.setattr(loop, "train_and_evaluate", fake_train)
  try:
    data = monolingual.run(str(tmp_path), files, [], languages=langs)
  finally:
    if other.is_alive():
      other.join()
  assert trained == [langs[2], langs[0], langs[1]]  # each language trained exactly once
  assert sorted(data["languages"]) == sorted(langs)
  assert data["languages"][langs[1]]["validation_loss"] == 1.5
  # the training's wall-clock, for the languages this process trained
  assert data["languages"][langs[1]]["wall_s"] >= 0 and "wall_s" not in data["languages"][langs[0]]
