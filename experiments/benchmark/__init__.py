r"""Speed, memory and solver benchmark of the task-weighting methods against plain training.

Measures, in one process, so that every ratio compares runs of the same
process on the same machine:

* **steps/s** of plain training (one ordinary backward pass of the mean loss
  on the flattened batch) and of each method's training step
  (:func:`ldro.train.make_train_step`) for the small and large CNN (N = 20,
  batch 128 -> 6 examples per task) and the tiny decoder (N = 40, one 128-token
  row per language, L-DRO with T = 1000 and a memory-lean Gram strategy);
  for the small CNN also **a row per registered method** (its paper
  defaults, Jacobian mode; issue 12);
* the **interaction-step cost** (an L-DRO step that refreshes the Gram
  matrix, divided by a plain step on the same examples) of every Gram
  strategy for N in {2, 5, 10, 20, 50, 100};
* **peak memory** (XLA's compiled memory analysis) of the ``chunked`` Gram
  strategy against the chunk size and against N;
* **solver times**: each Gram method's jitted coefficient computation for
  N = 20, ``maxent_nash`` for N = 100 and ``update_weights`` for N = 1000;
* if ``torch`` imports (in this interpreter or ``--torch_python``), PyTorch
  reference steps of the same small CNN and batch: a plain step, PCGrad,
  MGDA and CAGrad as LibMTL computes them (N backward passes and the
  method's solver; CAGrad's with scipy's SLSQP) and, if ``torchjd`` imports,
  PCGrad through torchjd's Gramian engine.

Layout (one concern per module):

* :mod:`~experiments.benchmark.workloads`: the experiments' models and losses
  (``experiments.families.image``/``lm``) on random task-grouped batches, and
  the methods to time (:class:`~experiments.benchmark.workloads.MethodSpec`,
  labels from the registry);
* :mod:`~experiments.benchmark.harness`: the timing harness (jitted steps with
  donated state, timed by phases in interleaved rounds; scaling, memory);
* :mod:`~experiments.benchmark.solvers`: the solver timings;
* :mod:`~experiments.benchmark.references`: the PyTorch/torchjd reference
  steps (child process);
* :mod:`~experiments.benchmark.report`: targets, markdown, plot;
* :mod:`~experiments.benchmark.run`: sections, absl flags, main.

Usage::

    python -m experiments.benchmark                # full (~20 min on 2 CPU cores)
    python -m experiments.benchmark --quick        # CI-sized (tiny sizes, ~1 min)
    python -m experiments.benchmark --sections cnn,direct,solvers,torch --cnn_models small

Like the training programs, the command runs under the CPU settings of
:mod:`experiments.runner.cpu_runtime` (it re-executes itself to apply them;
``--untuned`` to skip), and, in the full run, measures the small CNN once
more without each of them in child processes, and once more with XLA's own
convolution and max-pool gradients (``--conv_impl=xla``).

Writes ``<out>/benchmark.json``, ``<out>/benchmark.md`` and
``<out>/scaling.png`` (default ``--out=results/benchmark``).
"""


def main(argv=None) -> dict:
  """Runs the benchmark with the flags in ``argv`` (see :func:`experiments.benchmark.run.main`)."""
  from experiments.benchmark import run  # pylint: disable=g-import-not-at-top
  return run.main(argv)


def split_methods(spec: str) -> list:
  """``--methods`` items (see :func:`experiments.benchmark.run.split_methods`)."""
  from experiments.benchmark import run  # pylint: disable=g-import-not-at-top
  return run.split_methods(spec)
