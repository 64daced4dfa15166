"""Shared test fixtures: a clean gin config around every test, and a parser for config files."""

import gin
import pytest

from experiments import train as train_lib


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
