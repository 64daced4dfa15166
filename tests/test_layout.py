"""Process hygiene of the library and the install layout of the experiments."""

import os
import subprocess
import sys

from experiments.runner import paths


def _modules_after(statement):
  code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       check=True, cwd=paths.repo_root())
  return set(out.stdout.split())


def test_importing_ldro_imports_no_tensorflow():
  mods = _modules_after("import ldro, ldro.data.images, ldro.data.streams, ldro.data.languages")
  assert "ldro.data.images" in mods  # the statement ran
  assert not {m for m in mods if m == "tensorflow" or m.startswith("tensorflow.")}


def test_gin_files_resolve_from_another_directory(tmp_path):
  cwd = os.getcwd()
  os.chdir(tmp_path)
  try:
    found = paths.find_gin_file("gin_configs/cifar10_mtl/ldro.gin")
  finally:
    os.chdir(cwd)
  assert os.path.samefile(found, os.path.join(paths.configs_root(), "gin_configs", "cifar10_mtl",
                                              "ldro.gin"))


def test_every_method_has_a_gin_file_usable_with_every_base(gin_config):
  import gin  # pylint: disable=g-import-not-at-top
  import ldro  # pylint: disable=g-import-not-at-top
  bases = ("synthetic", "cifar10_mtl", "cifar100", "multilingual", "toy")
  for name in ldro.method_names():
    info = ldro.method_info(name)
    for base in bases:
      gin_config([f"gin_configs/{base}/base.gin", f"gin_configs/methods/{name}.gin"])
      assert gin.query_parameter("%METHOD") == name
    # The method file's hyper-parameters are the registry's defaults (one source of truth
    # for what a paper's default is; the file only exposes them as macros).
    try:
      bound = gin.query_parameter("method.hparams") or {}
    except ValueError:  # no hyper-parameters (equal, imtl_g)
      bound = {}
    bound = {k: (v.scoped_configurable_fn() if hasattr(v, "scoped_configurable_fn") else v)
             for k, v in bound.items()}
    for k, v in bound.items():
      if k in info.defaults:
        assert v == info.defaults[k], (name, k, v, info.defaults[k])


def test_mode_defaults_to_the_methods_preferred_one_and_refuses_others():
  import ldro  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from experiments.runner import loop  # pylint: disable=g-import-not-at-top
  for name in ldro.method_names():
    info = ldro.method_info(name)
    assert loop.method_mode(name, None) == info.preferred_mode
    for mode in info.modes:
      assert loop.method_mode(name, mode) == mode
    for mode in set(ldro.registry.MODES) - set(info.modes):
      with pytest.raises(ValueError, match=f"method '{name}' does not support mode '{mode}'"):
        loop.method_mode(name, mode)
  assert loop.method_mode("rgw", "plain") == "plain"
