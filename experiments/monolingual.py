r"""Monolingual baselines of the multilingual LM experiment (paper section 5.2).

    python -m experiments.monolingual --root=workdirs/multilingual \
        --gin_file=gin_configs/multilingual/monolingual.gin \
        --gin_file=gin_configs/multilingual/cpu.gin \
        --gin_file=gin_configs/multilingual/cpu_mono.gin [--languages=en,sw]

Trains one model per language (the architecture, schedule and steps of the
multilingual runs: the config's files plus ``LANGUAGES = ['<lang>']``) in
``<root>/mono/<lang>/`` through :func:`experiments.train.train_and_evaluate`
(resumable; a finished run is not retrained), picks each model's evaluation
with the best validation loss (as for the multilingual runs) and writes
``<root>/mono/baselines.json``::

    {"languages": {"en": {"validation_loss": ..., "validation_perplexity": ...,
                          "test_loss": ..., "test_perplexity": ..., "step": ...}, ...},
     "meta": {...}}

The validation losses are the baselines ``b_i`` of Baselined-DRO
(``baselines_from_json``); the perplexities are the ``theta_i^*`` of the
relative perplexity (Eq. 3) in ``experiments/lm_table.py``.

Languages default to ``LANGUAGES`` of the parsed config; ``--languages`` picks
a subset. Several processes may run side by side on the same root: each
trains the languages no other has claimed (``<lang>/.claim``), then waits for
the others' and trains any whose process stopped before the end, so every
process ends with all its languages trained. The JSON always covers every
language of the config that has a finished run.
"""

if __name__ == "__main__":  # before JAX starts: see experiments/runner/cpu_runtime.py
  from experiments.runner import cpu_runtime as _cpu_runtime  # pylint: disable=g-import-not-at-top
  _cpu_runtime.configure_process("experiments.monolingual")

import os
import shutil
import sys
import time
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import gin
import numpy as np

from experiments.runner import metrics_io
from experiments import train as train_lib  # defines --gin_file and --gin_bindings
from experiments.runner import loop
from experiments.runner import process
from experiments.runner import workdir as workdir_lib
from ldro.data import fileio

_FLAGS: dict = {}


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program, so modules import cleanly)."""
  _FLAGS['root'] = flags.DEFINE_string("root", "workdirs/multilingual", "Output root (runs in <root>/mono).")
  _FLAGS['languages'] = flags.DEFINE_list("languages", None,
                                 "Languages to train (default: LANGUAGES of the config).")
  _FLAGS['keep_checkpoints'] = flags.DEFINE_bool("keep_checkpoints", False,
                                        "Keep the checkpoints of finished runs.")

DEFAULT_CONFIG = "gin_configs/multilingual/monolingual.gin"


def summarize_language(workdir: str) -> Optional[dict]:
  """The baseline entry of one monolingual run (None if it has no evaluation)."""
  rec = metrics_io.best_record(metrics_io.read_metrics(os.path.join(workdir, "metrics.jsonl")))
  if rec is None:
    return None
  entry = {"step": int(rec["step"]),
           "validation_loss": float(rec["task_loss"][0]),
           "validation_perplexity": float(np.exp(rec["task_loss"][0]))}
  wall = workdir_lib.read_wall_clock(workdir)  # the training's, summed over attempts
  if wall and "wall_s" in wall:
    entry["wall_s"] = float(wall["wall_s"])
  if rec.get("test_task_loss"):
    entry["test_loss"] = float(rec["test_task_loss"][0])
    entry["test_perplexity"] = float(np.exp(rec["test_task_loss"][0]))
  return entry


def _parse(files: Sequence[str], bindings: Sequence[str]) -> None:
  gin.clear_config()
  train_lib.parse_gin(list(files), list(bindings))


def _finished(workdir: str, num_steps: int) -> bool:
  recs = metrics_io.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return bool(recs) and max(r["step"] for r in recs) >= num_steps


def run(root: str, gin_files: Sequence[str], bindings: Sequence[str],
        languages: Optional[Sequence[str]] = None, keep_checkpoints: bool = False) -> dict:
  """Trains the monolingual models and writes ``<root>/mono/baselines.json``.

  Args:
    root: output root.
    gin_files: config files (e.g. ``monolingual.gin`` and a size file).
    bindings: extra gin bindings (applied before ``LANGUAGES = ['<lang>']``).
    languages: languages to train (default: ``LANGUAGES`` of the config).
    keep_checkpoints: keep checkpoints of finished runs (default: deleted).

  Returns:
    The JSON content.
  """
  _parse(gin_files, bindings)
  all_languages = list(query("LanguageModelingExperiment.languages"))
  todo = list(languages) if languages else all_languages
  mono = os.path.join(root, "mono")

  def train_language(lang: str) -> None:
    workdir = os.path.join(mono, lang)
    _parse(gin_files, list(bindings) + [f"LANGUAGES = [{lang!r}]"])
    steps = int(query("train_and_evaluate.num_steps"))
    if _finished(workdir, steps):
      print(f"[mono {lang}] already trained ({steps} steps)", flush=True)
    else:
      print(f"[mono {lang}] training {steps} steps in {workdir}", flush=True)
      t0 = time.time()
      try:
        loop.train_and_evaluate(workdir, quiet=True)
      finally:  # every attempt's time, also an interrupted one's (resumed later)
        workdir_lib.add_wall_clock(workdir, time.time() - t0, _finished(workdir, steps))
    if not keep_checkpoints:
      shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
    entry = summarize_language(workdir)
    if entry:
      print(f"[mono {lang}] best step {entry['step']}: validation loss "
            f"{entry['validation_loss']:.4f} (perplexity {entry['validation_perplexity']:.2f})",
            flush=True)

  # Several processes may share the languages (lanes side by side): each trains the ones no
  # other has claimed, then waits for the others' and takes over any left unfinished.
  elsewhere = []
  for lang in todo:
    claim = workdir_lib.claim(os.path.join(mono, lang))
    if claim is None:
      print(f"[mono {lang}] training in another process; waiting for it at the end", flush=True)
      elsewhere.append(lang)
      continue
    with claim:
      train_language(lang)
  for lang in elsewhere:
    with workdir_lib.claim(os.path.join(mono, lang), block=True):
      train_language(lang)
  table, missing = {}, []
  for lang in all_languages:
    entry = summarize_language(os.path.join(mono, lang))
    if entry is None:
      missing.append(lang)
    else:
      table[lang] = entry
  data = {"languages": table,
          "meta": {"command": "python -m experiments.monolingual " + " ".join(sys.argv[1:]),
                   "gin_files": list(gin_files), "gin_bindings": list(bindings),
                   "selection": "evaluation with the lowest validation loss",
                   "missing": missing}}
  path = os.path.join(mono, "baselines.json")
  fileio.atomic_write_json(path, data, indent=2)  # several processes may write it
  print(f"wrote {path} ({len(table)} languages"
        + (f"; missing {', '.join(missing)}" if missing else "") + ")", flush=True)
  return data


def query(binding: str):
  """``gin.query_parameter`` with macro references (``%NAME``) resolved."""
  value = gin.query_parameter(binding)
  while isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro":
    value = gin.query_parameter("%" + value.scoped_selector.split("/")[0])
  return value


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  process.hide_gpus_from_tensorflow()
  gin_files = train_lib._GIN_FILE.value or [DEFAULT_CONFIG]  # pylint: disable=protected-access
  run(_FLAGS['root'].value, gin_files, train_lib._GIN_BINDINGS.value,  # pylint: disable=protected-access
      _FLAGS['languages'].value, _FLAGS['keep_checkpoints'].value)


if __name__ == "__main__":
  define_flags()
  app.run(main)
