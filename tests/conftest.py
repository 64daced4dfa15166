"""Shared test fixtures: a clean gin config around every test, and a parser for config files.

Also XLA:CPU flags and a JAX compilation cache for the test session: many tests build the same
programs (the same gin config run in several tests, a CLI subprocess that
compiles what an in-process test compiled), and on 2 CPU cores compiling is
most of the suite's time. The cache lives in a temporary folder of this
session (shared by pytest-xdist workers and by the subprocesses the tests
start, through the environment) and is removed at the end; a cached
executable is the one XLA compiled, so results are unchanged.
"""

import os
import shutil
import tempfile


# Set before jax is imported; pytest-xdist workers and subprocesses inherit them.
# The tests' programs are tiny: XLA:CPU's backend optimisations cost more compile time than
# they save run time (the suite ~15% faster; results within every test's tolerance, and
# runs compared bitwise are compiled alike).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                             " --xla_llvm_disable_expensive_passes=true").strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ldro_test_jax_cache_")
  os.environ["LDRO_TEST_OWNS_JAX_CACHE"] = "1"
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import gin  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import train as train_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_sessionfinish(session):
  """Removes this session's compilation cache (by the controller, after its workers)."""
  del session
  if os.environ.get("LDRO_TEST_OWNS_JAX_CACHE") and not os.environ.get("PYTEST_XDIST_WORKER"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


#: The modules that take longest, longest first (summed ``--durations=0`` of a full idle run,
#: 2026-12-01 23:36 UTC: 144, 136, 70, 68, 66, 55, 49, 45, 44, 37, 37, 31 s). They are
#: collected first, so that pytest-xdist's ``loadscope`` scheduler, which deals modules to the
#: workers in collection order, spreads them over the workers instead of leaving one to the end.
SLOW_MODULES = ("test_multiprocess.py", "test_contract.py", "test_lm_experiment.py",
                "test_benchmark.py", "test_faults.py", "test_train_step.py", "test_synthetic.py",
                "test_properties.py", "test_game.py", "test_worst_group_image.py",
                "test_transforms.py", "test_image_experiment.py")


def pytest_collection_modifyitems(items):
  """Longest-first order of the slow modules (stable: tests keep their order in a module)."""
  rank = {name: i for i, name in enumerate(SLOW_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_MODULES)))


@pytest.fixture(autouse=True)
def clean_gin():
  """Every test starts and ends with an empty gin config (bindings never leak between tests)."""
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture
def gin_config():
  """``parse(files, bindings=())``: a fresh config from ``gin_configs/...`` files and bindings.

  Files resolve as on the command line (gin's search path over the configs);
  each call starts from an empty config.
  """
  def parse(files, bindings=()):
    gin.clear_config()
    train_lib.parse_gin(list(files), list(bindings))
  return parse


@pytest.fixture
def image_folder(tmp_path, monkeypatch):
  """``make(root_name='imgs', classes=..., n_train=8, n_test=3)``: a tiny JPEG ImageFolder.

  Random 32x32 pixels, ``<root>/{train,test}/<class>/NNNN.jpg``; the decoded-images cache
  (``XDG_CACHE_HOME``) goes to the test's tmp folder, not ``$HOME``.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

  def make(root_name="imgs", classes=("bird", "cat", "dog", "frog"), n_train=8, n_test=3):
    rng = np.random.default_rng(0)
    root = tmp_path / root_name
    for split, n in (("train", n_train), ("test", n_test)):
      for name in classes:
        d = root / split / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
          Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
              d / f"{i:04d}.jpg", quality=95)
    return root
  return make
