"""Tests for experiments.cpu_runtime (process settings of the experiment programs)."""

import json
import os
import subprocess
import sys

import pytest

from experiments.runner import cpu_runtime
from experiments.runner import paths

REPO = paths.repo_root()


@pytest.fixture
def cpu_host(monkeypatch):
  """A host with no accelerator plugin installed."""
  monkeypatch.setattr(cpu_runtime, "accelerator_plugins", lambda: ())


def test_tuned_env_adds_both_settings_and_keeps_the_users(cpu_host):
  env = cpu_runtime.tuned_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                               "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.rtld.x=1"})
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8",
                                      cpu_runtime.YNN_FLAG]
  if sys.platform.startswith("linux"):
    assert env["GLIBC_TUNABLES"] == ("glibc.malloc.arena_max=2:glibc.rtld.x=1:glibc.malloc.hugetlb=1:"
                                     "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296")
  # A user's own YNN setting wins; applying twice changes nothing.
  own = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"}
  assert cpu_runtime.tuned_env(own)["XLA_FLAGS"] == own["XLA_FLAGS"]
  assert cpu_runtime.tuned_env(env) == env


def test_opt_out_leaves_the_environment_alone(cpu_host):
  env = {"LDRO_CPU_TUNING": "0", "XLA_FLAGS": ""}
  assert cpu_runtime.tuned_env(env) == env


def test_settings_stay_off_when_an_accelerator_is_the_target(monkeypatch):
  # JAX_PLATFORMS decides when set; otherwise an installed accelerator plugin
  # turns the (CPU-measured) settings off; LDRO_CPU_TUNING=1/0 overrides both.
  monkeypatch.setattr(cpu_runtime, "accelerator_plugins", lambda: ("xla_cuda12",))
  for env, want in [({}, False), ({"JAX_PLATFORMS": "cpu"}, True),
                    ({"JAX_PLATFORMS": "cuda,cpu"}, False), ({"JAX_PLATFORMS": "tpu"}, False),
                    ({"JAX_PLATFORMS": "tpu", "LDRO_CPU_TUNING": "1"}, True),
                    ({"JAX_PLATFORMS": "cpu", "LDRO_CPU_TUNING": "0"}, False)]:
    assert cpu_runtime.applies(env) is want, env
    assert (cpu_runtime.tuned_env(env) != env) is want, env
  monkeypatch.setattr(cpu_runtime, "accelerator_plugins", lambda: ())
  assert cpu_runtime.applies({}) and not cpu_runtime.applies({"JAX_PLATFORMS": "cuda"})


def test_ynn_flag_only_where_jaxlib_knows_it(cpu_host, monkeypatch):
  # XLA aborts on an XLA_FLAGS entry it does not know: the flag is looked up
  # in the installed jaxlib (this pinned one has it) and left out elsewhere.
  assert cpu_runtime.jaxlib_knows_flag(cpu_runtime.YNN_OPTION)
  assert not cpu_runtime.jaxlib_knows_flag("--xla_cpu_ldro_no_such_flag")
  monkeypatch.setattr(cpu_runtime, "jaxlib_knows_flag", lambda option: False)
  env = cpu_runtime.tuned_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


def test_program_applies_them_before_jax_keeping_its_pid():
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "GLIBC_TUNABLES", "LDRO_CPU_TUNING", "JAX_PLATFORMS")}
  env["JAX_PLATFORMS"] = "cpu"  # the same on a host with an accelerator plugin
  out = subprocess.run([sys.executable, "-m", "experiments.runner.cpu_runtime"], cwd=REPO, env=env,
                       capture_output=True, text=True, check=True, timeout=120)
  got = json.loads(out.stdout)
  assert got["XLA_FLAGS"] == cpu_runtime.YNN_FLAG
  assert got["pid"] == got["pid_before"]
  if sys.platform.startswith("linux"):
    assert got["GLIBC_TUNABLES"] == ":".join(f"{k}={v}" for k, v in cpu_runtime.MALLOC_TUNABLES)
  out = subprocess.run([sys.executable, "-m", "experiments.runner.cpu_runtime"], cwd=REPO,
                       env=dict(env, LDRO_CPU_TUNING="0"), capture_output=True, text=True,
                       check=True, timeout=120)
  assert json.loads(out.stdout)["XLA_FLAGS"] == ""
