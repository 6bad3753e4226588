"""Structure rules anyone can check: thin launchers, a library that never imports its users, one place
that builds a Problem, small method modules, launchers that work when installed."""
import ast
import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imports(path):
  """Top-level package names and dotted modules imported by a file (absolute imports)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      out.add(node.module)
      out |= {f"{node.module}.{a.name}" for a in node.names}
  return out


def _py(folder):
  return sorted(glob.glob(os.path.join(REPO, folder, "**", "*.py"), recursive=True))


@pytest.mark.parametrize("path", _py("am_jax"), ids=lambda p: os.path.relpath(p, REPO))
def test_library_never_imports_launchers_benchmarks_or_configs(path):
  bad = {m for m in _imports(path) if m.split(".")[0] in ("experiments", "benchmarks", "configs", "tests")}
  assert not bad, f"{os.path.relpath(path, REPO)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _py("experiments"), ids=lambda p: os.path.relpath(p, REPO))
def test_launchers_import_only_the_library(path):
  """No launcher imports another launcher, the benchmarks or the repo's configs (they ship installed as
  ``am_jax.experiments`` / ``am_jax.configs``, where top-level ``experiments``/``configs`` do not exist)."""
  bad = {m for m in _imports(path) if m.split(".")[0] in ("experiments", "benchmarks", "configs", "tests")}
  assert not bad, f"{os.path.relpath(path, REPO)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _py("configs"), ids=lambda p: os.path.relpath(p, REPO))
def test_configs_are_self_contained(path):
  bad = {m for m in _imports(path) if m.split(".")[0] in ("experiments", "benchmarks", "configs", "tests")}
  assert not bad, f"{os.path.relpath(path, REPO)} imports {sorted(bad)}"


def test_problem_is_built_in_one_place():
  """``Problem(...)`` is constructed only by ``builders.build_problem`` (outside the tests)."""
  callers = []
  for path in _py("am_jax") + _py("experiments") + _py("benchmarks"):
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
        if name == "Problem":
          callers.append(os.path.relpath(path, REPO))
  assert callers == ["am_jax/builders.py"], callers


def test_method_modules_are_small():
  sizes = {os.path.basename(p): sum(1 for _ in open(p)) for p in _py("am_jax/methods")}
  assert len(sizes) >= 5 and max(sizes.values()) <= 300, sizes
