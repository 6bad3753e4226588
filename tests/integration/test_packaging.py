"""Packaging: the wheel ships the configs and launchers inside am_jax and the ``am-jax`` command; the API is lazy."""
import ast
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python_files(directory):
  return sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, directory, "**", "*.py"),
                                                              recursive=True))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """Builds the wheel from a copy of the sources (a stale build/ in the checkout cannot leak into it)."""
  src = tmp_path_factory.mktemp("src")
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), src / name)
  for name in ("am_jax", "configs", "experiments"):
    shutil.copytree(os.path.join(REPO, name), src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  out = tmp_path_factory.mktemp("wheel")
  r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(out)],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  (path,) = glob.glob(str(out / "*.whl"))
  with zipfile.ZipFile(path) as z:
    return {n: z.read(n).decode() if n.endswith((".txt", "METADATA")) else None for n in z.namelist()}


def test_wheel_ships_configs_launchers_and_command(wheel):
  names = set(wheel)
  assert "am_jax/configs/gmm2d.py" in names and "am_jax/experiments/finetune.py" in names
  # Every config and launcher of the checkout, inside am_jax (no top-level configs / experiments package).
  for rel in _python_files("configs") + _python_files("experiments"):
    assert f"am_jax/{rel}" in names, rel
  assert not any(n.startswith(("configs/", "experiments/", "tests/", "benchmarks/")) for n in names)
  # Every package of am_jax (a new am_jax/x/__init__.py must be added to [tool.setuptools] packages).
  for rel in _python_files("am_jax"):
    assert rel in names, f"{rel} is not in the wheel: add its package to pyproject.toml [tool.setuptools]"
  (entry_points,) = [v for n, v in wheel.items() if n.endswith(".dist-info/entry_points.txt")]
  assert "am-jax = am_jax.cli:main" in entry_points.splitlines()
  (metadata,) = [v for n, v in wheel.items() if n.endswith(".dist-info/METADATA")]
  requires = [line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
  core = [r for r in requires if "extra ==" not in r]
  # Ranges, not pins: installs into an existing environment without downgrading numpy / matplotlib.
  assert core and not any("==" in r for r in core), core
  assert any(r.startswith("numpy") and ">=" in r for r in core)


def _imports(path):
  tree = ast.parse(open(os.path.join(REPO, path)).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      yield node.module


@pytest.mark.parametrize("directory", ["configs", "experiments"])
def test_shipped_files_work_when_installed(directory):
  """Installed, configs/ and experiments/ are am_jax.configs / am_jax.experiments: they must not import the
  top-level ``configs`` / ``experiments`` / ``benchmarks`` / ``tests`` of a checkout."""
  bad = {(rel, m) for rel in _python_files(directory) for m in _imports(rel)
         if m.split(".")[0] in ("configs", "experiments", "benchmarks", "tests")}
  assert not bad, f"imports that only work inside the repository: {sorted(bad)}"


def test_import_is_lazy_and_the_api_resolves():
  code = ("import sys, am_jax; assert 'jax' not in sys.modules, 'import am_jax imported jax'; "
          "assert am_jax.losses.AMConfig is am_jax.AMConfig; assert callable(am_jax.methods.eam); "
          "missing = [n for n in am_jax.__all__ if not hasattr(am_jax, n)]; assert not missing, missing; "
          "print(len(am_jax.__all__))")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr
  import am_jax
  with pytest.raises(AttributeError, match="has no attribute 'nonexistent'"):
    am_jax.nonexistent  # noqa: B018
