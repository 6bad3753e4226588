"""notebooks/quickstart.ipynb: its cells parse and it is portable (default suite); it runs top to bottom (slow).

The run (shipped DiT base -> 40 LoRA steps -> grids and curves) takes 60-110 s on 2 shared CPU cores, over the
default suite's budget for one test, so it is marked slow; tests/integration/test_mnist_pipeline.py runs the
same pipeline tiny in the default suite.
"""
import ast
import json
import os
import re
import shutil

import pytest

NB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NB = os.path.join(NB_DIR, "quickstart.ipynb")


def _cells(kind="code"):
  with open(NB) as f:
    nb = json.load(f)
  return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
          for c in nb["cells"] if c["cell_type"] == kind]


def test_notebook_cells_parse():
  cells = _cells()
  assert len(cells) >= 5
  for c in cells:
    # IPython shell escapes / magics are commented out in the shipped notebook; drop any that remain.
    ast.parse("\n".join(line for line in c.splitlines() if not line.lstrip().startswith(("!", "%"))))


def test_notebook_is_portable():
  """Runs from notebooks/ and on Colab: the installed package only, an unpinned (commented) install first."""
  cells = _cells()
  install = [line for line in cells[0].splitlines() if "pip install" in line]
  assert install and all(line.lstrip().startswith("#") for line in install), cells[0]
  assert not any(re.search(r"==\d", line) for line in install), "no exact pins: Colab's numpy/matplotlib stay"
  code = "\n".join(cells)
  assert "sys.path" not in code and not re.search(r"^\s*(from|import) configs\b", code, re.MULTILINE)
  assert "launch.load_config(" in code
  assert "pretrain(" not in code, "the notebook starts from the shipped base"
  assert any(re.search(r"^SCALE_UP = False", c, re.MULTILINE) for c in cells), "a marked scale-up cell"


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  """Executes a copy of notebooks/ with nbclient, cwd = that folder (as Jupyter started there would)."""
  import nbclient
  import nbformat
  work = tmp_path / "notebooks"
  shutil.copytree(NB_DIR, work, ignore=shutil.ignore_patterns("runs", ".ipynb_checkpoints"))
  # The kernel inherits the environment: drop the suite's 8 virtual CPU devices (a 2-core runtime has one).
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  nb = nbformat.read(work / "quickstart.ipynb", as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))

  run = work / "runs" / "quickstart"
  summary = json.loads((run / "metrics.json").read_text())
  # The reward log p_A(3 | x) and its gold twin rise (same noise); measured -16.5 -> -0.8 and -7.6 -> -0.6.
  assert summary["reward_mean_finetuned_ode"] > summary["reward_mean_base_ode"] + 8.0, summary
  assert summary["gold/class/finetuned_ode"] > summary["gold/class/base_ode"] + 4.0, summary
  assert summary["hacking_detected"] is False
  watch = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  watch = [r for r in watch if "gold/class" in r]
  assert len(watch) == 10 and watch[-1]["reward"] > watch[0]["reward"] + 4.0, watch
  # The notebook's own table (classifier B): most fine-tuned samples are 3s, few base samples are.
  acc = re.search(r"gold_accuracy\s+(\S+)\s+(\S+)\s+(\S+)", text)
  assert acc and float(acc.group(1)) < 0.3 and float(acc.group(2)) > 0.6, text[-2000:]
  for name in ("quickstart_grid.png", "quickstart_curves.png", "grid.png"):
    assert (run / name).stat().st_size > 10_000, name
  assert "notebook ran in" in text
