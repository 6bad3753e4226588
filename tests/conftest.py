import os

# Tests run on CPU; 8 virtual devices let the sharding tests run on one machine.  Must be set before jax is
# imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# XLA:CPU's MLIR fusion emitters cost most of a small program's compile time; the suite compiles ~3000 small programs
# and runs each a few times, so it compiles with the older elemental emitters (the same HLO and fusions, other code
# generation).  Measured on the digits pipeline test: 37-41 s -> 27-31 s user CPU (BUILD_NOTES.md section 10).  Not
# set when XLA_FLAGS already names it; inherited by the tests' child processes (launch_helpers.env), except the
# golden runs, which compile as users do.
FAST_COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flags: str) -> bool:
  """Whether this jaxlib's XLA knows ``flags`` (an unknown XLA flag aborts the process: try it in a child, ~1 s)."""
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True,
                        timeout=120).returncode == 0


if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"] and _xla_accepts(FAST_COMPILE_FLAGS):
  os.environ["XLA_FLAGS"] += " " + FAST_COMPILE_FLAGS
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's time is mostly XLA compiling small programs: compile them with little optimisation
# (``jax_disable_most_optimizations``: LLVM level 0, no expensive passes; the same HLO, results equal up to float
# rounding).  Measured on the whole suite: 25% less CPU (BUILD_NOTES.md section 10).  Inherited by the processes
# the tests start; tests/test_golden.py, which compares with numbers captured at XLA's defaults, drops it
# (``launch_helpers.env(..., plain=True)``).  JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the suite fully optimised.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# One XLA compilation cache for the whole run, shared by the xdist workers and every process the tests start (CLI
# runs, kill-and-resume, the two-process distributed run, user-task launches): they compile many identical programs.
# Every program is cached (thresholds 0); the directory is fresh per run (no stale entries) and removed at the end.
# Measured on the whole suite (2 idle cores, 2026-11-26): 337 s -> 291 s wall, 612 -> 526 s user CPU (BUILD_NOTES.md
# section 10).  Set JAX_COMPILATION_CACHE_DIR yourself to keep (or disable, "") it.
_OWN_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  _OWN_CACHE_DIR = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="am_jax_tests_xla_cache_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

# Default parallelism (issue 12: the default suite in <= 4 min on 2 cores): with pytest-xdist installed (the `test`
# extra) and no -n given, two workers, whole files per worker (module fixtures and caches stay shared).  -n0 or
# -p no:xdist runs in one process; -n N overrides.
DEFAULT_WORKERS = 2
# Files handed out first (longest first: the last file a worker gets is then a short one).  CPU seconds measured on
# 2026-11-26 (BUILD_NOTES.md section 10); the rest follow in collection order.  Only the schedule depends on it.
HEAVY_FIRST = ("integration/test_training_system.py", "test_soc.py", "integration/test_digits_pipeline.py",
               "integration/test_mnist_pipeline.py", "methods/test_efficient_am.py", "test_losses.py",
               "test_integrators.py", "methods/test_registry.py", "test_training.py", "test_golden.py",
               "integration/test_mnist_monitor.py", "test_sampling.py", "test_toy.py")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
  if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
    return
  option = config.option
  if getattr(option, "numprocesses", 0) is None and not option.usepdb and not option.collectonly:
    option.numprocesses = DEFAULT_WORKERS
    if option.dist == "no":
      option.dist = "loadfile"
      option.loadscopereorder = False  # xdist's default hands out files with the most tests first


def pytest_collection_modifyitems(config, items):
  """Under xdist: the files of HEAVY_FIRST first, in that order (a stable sort: tests keep their order)."""
  if not hasattr(config, "workerinput"):
    return
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  rank = {os.path.join(tests_dir, f): i for i, f in enumerate(HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(str(item.path), len(HEAVY_FIRST)))


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
  """One tiny 2-D ring base (``tests.launch_helpers.tiny_config``), pre-trained once per test session (without the
  base's evaluation against the data, ``eval.at_end``: no test reads it)."""
  from am_jax import jobs
  from tests.launch_helpers import tiny_config
  d = str(tmp_path_factory.mktemp("tiny_base"))
  jobs.pretrain(tiny_config(**{"mesh.num_devices": 1, "eval.at_end": False}), d)
  return d


def pytest_unconfigure(config):
  """The run's compilation cache goes with the process that made it (the controller; workers inherit its path)."""
  if _OWN_CACHE_DIR is not None and not hasattr(config, "workerinput"):
    import shutil
    shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)
