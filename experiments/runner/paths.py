"""Where things are: the checkout (if any), the gin configs, data directories.

The experiments run from a git checkout (``pip install -e .`` or ``python -m``
from the repository root) or from a non-editable ``pip install .`` in any
directory. This module is the one place that tells those apart:

* :func:`repo_root` -- the checkout's root, or ``None`` when the package is
  installed elsewhere (site-packages).
* :func:`configs_root` -- the folder that holds ``gin_configs/`` (the checkout,
  or site-packages where ``gin_configs`` is installed as package data). The
  entry points add it to gin's search path (as t5x does), so
  ``--gin_file=gin_configs/cifar10_mtl/ldro.gin`` and the files' ``include``
  lines resolve from any working directory.
* :func:`resolve` -- a data/cache/baselines path from a flag or gin: absolute
  and ``~`` paths as given; relative ones from the checkout's root when run
  from a checkout (the gin files' defaults such as
  ``'../shared/data/cifar10_images'`` are written that way), else from the
  working directory.
* :func:`require_dir` -- one clear error naming a missing data directory.
"""

import functools
import os
from typing import Optional

import gin


@functools.lru_cache(maxsize=None)
def repo_root() -> Optional[str]:
  """The root of the checkout this package runs from, or ``None`` if installed elsewhere."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(
      os.path.join(root, "gin_configs")):
    return root
  return None


def configs_root() -> str:
  """The folder holding ``gin_configs/`` (checkout root or site-packages)."""
  import gin_configs  # pylint: disable=g-import-not-at-top
  return os.path.dirname(os.path.dirname(os.path.abspath(gin_configs.__file__)))


def add_gin_search_paths() -> None:
  """Lets gin find ``gin_configs/...`` files and includes from any working directory."""
  root = configs_root()
  if root not in gin.config._LOCATION_PREFIXES:  # pylint: disable=protected-access
    gin.add_config_file_search_path(root)


def find_gin_file(path: str) -> str:
  """``path`` as given if it exists, else under :func:`configs_root` (raises if neither)."""
  if os.path.exists(path):
    return path
  candidate = os.path.join(configs_root(), path)
  if not os.path.isabs(path) and os.path.exists(candidate):
    return candidate
  raise FileNotFoundError(f"gin file not found: {path} (looked in {os.getcwd()} and "
                          f"{configs_root()})")


def resolve(path: Optional[str]) -> Optional[str]:
  """A user path: ``~`` expanded; relative to the checkout root, or the cwd when installed."""
  if path is None:
    return None
  path = os.path.expanduser(str(path))
  if os.path.isabs(path):
    return os.path.normpath(path)
  return os.path.normpath(os.path.join(repo_root() or os.getcwd(), path))


def require_dir(path: Optional[str], what: str, setting: str) -> str:
  """``path`` if it is a directory, else an error naming it and how to set it."""
  if path is None:
    raise ValueError(f"{what} is not set (set {setting}, e.g. --data_dir=/path/to/data)")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what} not found: {path} (set {setting}, e.g. "
                            f"--data_dir=/path/to/data)")
  return path
