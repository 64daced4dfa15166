"""The benchmark's sections, flags and main (``python -m experiments.benchmark``)."""

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

from absl import flags

from experiments.benchmark import harness
from experiments.benchmark import references
from experiments.benchmark import report
from experiments.benchmark import solvers
from experiments.benchmark import workloads
from experiments.runner import cpu_runtime
from ldro.data import fileio
from ldro.models import cnn

SECTIONS = ("cnn", "direct", "allocator", "convs", "xla_ops", "torch", "lm", "scaling", "memory",
            "solvers")


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The command-line flags (defined only when run as a program, or on a private
  ``FlagValues`` by :func:`main`, so importing the package defines none)."""
  flags.DEFINE_bool("quick", False, "CI-sized run (tiny sizes).", flag_values=fv)
  flags.DEFINE_string("out", None, "Output folder (default results/benchmark, or "
                      "results/benchmark/quick with --quick, so a quick run never overwrites "
                      "the full results).", flag_values=fv)
  flags.DEFINE_string("sections", ",".join(SECTIONS),
                      f"Comma-separated subset of {','.join(SECTIONS)}. 'cnn' includes a row "
                      "per registered method (Jacobian mode) for the small (--quick: tiny) CNN; "
                      "'solvers' includes each Gram method's coefficient computation.",
                      flag_values=fv)
  flags.DEFINE_string("cnn_models", None, "e.g. 'small,large'.", flag_values=fv)
  flags.DEFINE_integer("rounds", None, "Interleaved timing rounds.", flag_values=fv)
  flags.DEFINE_string("scaling_ns", None, "e.g. '2,5,10,20,50,100'.", flag_values=fv)
  flags.DEFINE_bool("untuned", False, "Run in the environment as given: no re-exec under the "
                    "settings of experiments/runner/cpu_runtime.py (see README).", flag_values=fv)
  flags.DEFINE_string("methods", None, "Only the rows whose label contains one of these "
                      "comma-separated strings (commas inside parentheses do not separate; "
                      "plain is always timed).", flag_values=fv)
  flags.DEFINE_bool("per_method", True, "A row per registered method (its paper defaults, "
                    "Jacobian mode) for the small (--quick: tiny) CNN.", flag_values=fv)
  flags.DEFINE_enum("conv_impl", "auto", list(cnn.CONV_IMPLS),
                    "The CNNs' convolution/max-pool kernels (ldro.models.cnn.resolve_conv_impl): "
                    "'auto' = the custom VJPs on CPU, XLA's own ops on GPU/TPU.", flag_values=fv)
  flags.DEFINE_string("strategies", None, "Only these comma-separated scaling strategies "
                      "(e.g. 'grouped,pairwise').", flag_values=fv)
  flags.DEFINE_string("torch_python", None, "Python interpreter of the PyTorch reference "
                      "child process (default: this one), e.g. a virtual environment with "
                      "torch and torchjd.", flag_values=fv)


def split_methods(spec: str) -> list[str]:
  """``--methods`` items: comma-separated, but not at commas inside parentheses."""
  return [x.strip() for x in re.split(r",(?![^()]*\))", spec) if x.strip()]


#: Child checks of the full run: the small-CNN rows with one setting undone,
#: as (what, environment change, extra arguments).
CHILD_CHECKS = {
    "allocator": ("without the malloc tunables (GLIBC_TUNABLES unset)",
                  lambda env: {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"}, []),
    "convs": ("with XLA:CPU's default (YNNPACK) convolutions",
              lambda env: dict(env, XLA_FLAGS=" ".join(
                  f for f in env.get("XLA_FLAGS", "").split()
                  if not f.startswith(cpu_runtime.YNN_OPTION))), []),
    "xla_ops": ("with XLA's own convolution and max-pool gradients (conv_impl='xla')",
                lambda env: env, ["--conv_impl", "xla"]),
}
CHILD_CHECK_METHODS = "L-DRO T=100 (lean, grouped),PCGrad (jacobian),DRO (lean)"


def child_check(name: str, methods: str, rounds: int, log) -> Optional[dict]:
  """The small-CNN rows again in a child process with one CPU setting undone."""
  what, undo, extra_args = CHILD_CHECKS[name]
  with tempfile.TemporaryDirectory() as tmp:
    env = undo(cpu_runtime.tuned_env())
    cmd = [sys.executable, "-m", "experiments.benchmark", "--sections", "cnn", "--cnn_models",
           "small", "--methods", methods, "--rounds", str(rounds), "--untuned", "--out", tmp,
           *extra_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    path = os.path.join(tmp, "benchmark.json")
    if proc.returncode != 0 or not os.path.exists(path):
      log(f"    {name} check failed: {proc.stderr[-500:]}")
      return None
    with open(path, encoding="utf-8") as f:
      rows = json.load(f)["cnn"]["small"]["rows"]
  for r in rows:
    log(f"    {what}: {r['label']:36s} {r['step_ms']:8.2f} ms x{r['ratio_to_plain']:.3f} "
        f"({r['page_faults_per_step']:.0f} page faults/step)")
  return {"what": what, "xla_flags": env.get("XLA_FLAGS", ""),
          "glibc_tunables": env.get("GLIBC_TUNABLES", ""), "args": extra_args, "rows": rows}


def bench_torch(model: str, n: int, per_task: int, rounds: int, k: int, log,
                python: Optional[str] = None) -> Optional[dict]:
  """PyTorch reference steps (:mod:`experiments.benchmark.references`) of the same CNN, in
  a child process (no JAX threads around); None if torch is missing there."""
  args = dict(arch=workloads.cnn_architecture(model), n=n, per_task=per_task, rounds=rounds,
              k=k)
  proc = subprocess.run([python or sys.executable, "-m", "experiments.benchmark.references",
                         json.dumps(args)], capture_output=True, text=True, check=False)
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not line:
    log(f"    torch reference failed: {proc.stderr.strip()[-500:]}")
    return None
  out = json.loads(line[0][len("RESULT "):])
  if out is None:
    log("    torch not importable: PyTorch references skipped")
    return None
  out["model"] = model
  for name, r in out["steps"].items():
    log(f"    torch {out['torch']} {name} ({model} CNN, {out['examples']} examples, "
        f"{out['threads']} threads): {r['step_ms']:.1f} ms")
  for name, why in out.get("skipped", {}).items():
    log(f"    torch {name}: not timed ({why})")
  return out


def run(fv: flags.FlagValues, argv: Sequence[str], log=None, note: str = "") -> dict:
  """Runs the sections of ``fv`` and writes ``benchmark.{json,md}`` (and ``scaling.png``)."""
  log = log or (lambda s: print(s, flush=True))
  out_dir = fv.out or ("results/benchmark/quick" if fv.quick else "results/benchmark")
  quick = fv.quick
  sections = set(fv.sections.split(","))
  unknown = sections - set(SECTIONS)
  if unknown:
    raise ValueError(f"unknown --sections {sorted(unknown)}; known: {', '.join(SECTIONS)}.")
  t_start = time.perf_counter()
  command = ("python -m experiments.benchmark " + " ".join(shlex.quote(a) for a in argv)).strip()
  command += note
  res: dict = {"quick": quick, "command": command,
               "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
               "machine": harness.machine_info(),
               "conv_impl": cnn.resolve_conv_impl(fv.conv_impl),
               "registered_methods": workloads.ldro.method_names()}
  log(f"machine: {json.dumps(res['machine'])}")

  if quick:
    models = (fv.cnn_models or "tiny").split(",")
    n_cnn, per_task = 4, 2
    rounds, k, k_ref = fv.rounds or 2, 2, 1
    scaling_strategies = [s for s in harness.SCALING_STRATEGIES if s[2] != "chunked"]
    cnn_specs = [s for s in workloads.cnn_variants() if s.label in workloads.QUICK_CNN_VARIANTS]
    lm_size, n_lm = "test", 4
    lm_specs = [s for s in workloads.lm_variants() if s.label in workloads.QUICK_LM_VARIANTS]
    scaling_ns = [int(x) for x in (fv.scaling_ns or "2,3").split(",")]
    scaling_model, scaling_batch = "tiny", 8
    mem = dict(n=4, chunks=[1, 4], ns=[2], fixed=1, others=("grouped",))
    n_nash, n_update = 20, 100
    direct_steps = 0
    per_method_model = "tiny"
  else:
    models = (fv.cnn_models or "small,large").split(",")
    n_cnn, per_task = 20, 128 // 20
    rounds, k, k_ref = fv.rounds or 7, 10, 2
    cnn_specs = workloads.cnn_variants()
    lm_size, n_lm, lm_specs = "tiny", 40, workloads.lm_variants()
    scaling_ns = [int(x) for x in (fv.scaling_ns or "2,5,10,20,50,100").split(",")]
    scaling_model, scaling_batch = "small", 128
    mem = dict(n=40, chunks=[1, 2, 4, 8, 20, 40], ns=[10, 20, 40, 80], fixed=4,
               others=("grouped", "jacrev"))
    scaling_strategies = harness.SCALING_STRATEGIES
    n_nash, n_update = 100, 1000
    direct_steps = 100
    per_method_model = "small"

  per_method, res["per_method_skipped"] = workloads.per_method_specs("jacobian")
  if not fv.per_method:
    per_method = []
  keep = lambda s: True
  if fv.methods:
    items = split_methods(fv.methods)
    keep = lambda s: any(x in s.label for x in items)
  lm_specs = [s for s in lm_specs if keep(s)]
  if fv.strategies:
    names = fv.strategies.split(",")
    scaling_strategies = [s for s in harness.SCALING_STRATEGIES
                          if s[2] in names or s[0].split(" ")[0] in names]

  if "cnn" in sections:
    res["cnn"] = {}
    for model in models:
      specs = workloads.merge_specs(cnn_specs, per_method if model == per_method_model else [])
      specs = [s for s in specs if keep(s)]
      log(f"== {model} CNN: N={n_cnn}, {per_task} examples per task, {len(specs)} methods")
      wl = workloads.cnn_workload(model, n_cnn, per_task, conv_impl=fv.conv_impl)
      if model == "large" and not quick:  # ~1 s steps: fewer, shorter rounds
        out = harness.bench_steps(wl, specs, max(2, rounds - 2), 2, 1, log)
      elif model == "small" and not quick and not fv.rounds:
        # ~30 ms steps: 15 rounds, medians robust to the bursts of other
        # workers' load on a shared machine.
        out = harness.bench_steps(wl, specs, 15, k, k_ref, log)
      else:
        out = harness.bench_steps(wl, specs, rounds, k, k_ref, log)
      out.update(n=n_cnn, per_task=per_task, num_params=wl.num_params)
      res["cnn"][model] = out
      for r in out["rows"]:
        log(f"  {r['label']:40s} {r['step_ms']:9.2f} ms/step {r['steps_per_s']:8.2f} steps/s "
            f"x{r['ratio_to_plain']:.3f}")
      if "direct" in sections and direct_steps and model == "small":
        log("== direct check (whole periods), small CNN")
        direct = [s for s in workloads.cnn_variants() + workloads.merge_specs([], per_method)
                  if s.method == "ldro" and s.period == 100 and s.reuse is None
                  and not s.vmap_losses and s.strategy == "grouped"]
        res["direct"] = harness.bench_direct(wl, direct, direct_steps, 3, log)
  for name in CHILD_CHECKS:
    if name in sections and not quick and not fv.untuned:
      log(f"== {name} check: small CNN {CHILD_CHECKS[name][0]}")
      res[f"{name}_check"] = child_check(name, CHILD_CHECK_METHODS, max(2, rounds // 2), log)
  if "torch" in sections:
    log("== PyTorch reference steps (if torch is importable)")
    res["torch"] = bench_torch(models[0], n_cnn, per_task, 3 if quick else 5,
                               2 if quick else 10, log, fv.torch_python)
  if "lm" in sections:
    log(f"== decoder ({lm_size}): N={n_lm}")
    wl = workloads.lm_workload(lm_size, n_lm)
    if quick:
      out = harness.bench_steps(wl, lm_specs, rounds, k, k_ref, log)
    else:  # ~1 s steps, refreshes of up to ~15 s
      out = harness.bench_steps(wl, lm_specs, max(2, rounds - 2), 5, 1, log)
    out.update(n=n_lm, rows_per_task=1, length=workloads.LM_SIZES[lm_size][1],
               num_params=wl.num_params)
    res["lm"] = out
    for r in out["rows"]:
      log(f"  {r['label']:40s} {r['step_ms']:9.2f} ms/step {r['steps_per_s']:8.2f} steps/s "
          f"x{r['ratio_to_plain']:.3f}")
  if "scaling" in sections:
    log(f"== interaction-step cost per Gram strategy ({scaling_model} CNN)")
    res["scaling"] = harness.bench_scaling(scaling_model, scaling_ns, scaling_batch,
                                           scaling_strategies, log, conv_impl=fv.conv_impl)
    res["scaling_model"], res["scaling_batch"] = scaling_model, scaling_batch
  if "memory" in sections:
    log(f"== memory of the chunked Gram strategy (decoder {lm_size})")
    res["memory"] = harness.bench_memory(lm_size, mem["n"], mem["chunks"], mem["ns"],
                                         mem["fixed"], mem["others"], log)
  if "solvers" in sections:
    log("== solvers")
    res["solvers"] = solvers.bench_solvers(n_nash, n_update, log, 0.05 if quick else 1.0,
                                           n_gram=n_cnn if quick else 20)

  res["targets"] = report.evaluate_targets(res)
  res["methods"] = report.method_table(res)
  res["total_s"] = time.perf_counter() - t_start
  fileio.atomic_write_json(os.path.join(out_dir, "benchmark.json"), res)
  md = report.to_markdown(res, CHILD_CHECKS)
  fileio.atomic_write_text(os.path.join(out_dir, "benchmark.md"), md + "\n")
  if res.get("scaling"):
    report.plot_scaling(res["scaling"], os.path.join(out_dir, "scaling.png"),
                        f"interaction step / plain step ({scaling_model} CNN, "
                        f"{scaling_batch}//N examples per task)")
  print(md)
  return res


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Parses ``argv`` (the flags, without the program name) on a private
  ``FlagValues`` and runs: the entry point for tests and scripts."""
  fv = flags.FlagValues()
  define_flags(fv)
  argv = list(sys.argv[1:] if argv is None else argv)
  rest = fv(["experiments.benchmark"] + argv)
  if len(rest) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(rest[1:])}")
  return run(fv, argv)


def app_main(argv: Sequence[str]) -> None:
  """``absl.app`` main of ``python -m experiments.benchmark`` (flags on ``flags.FLAGS``)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  note = "" if flags.FLAGS.untuned else (
      "  # (re-runs itself under experiments/runner/cpu_runtime.py's settings)")
  run(flags.FLAGS, sys.argv[1:], note=note)
