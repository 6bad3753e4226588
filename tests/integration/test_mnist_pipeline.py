"""The MNIST workload end to end, tiny: SHIPPED DiT base -> LoRA fine-tune (adjoint matching, class reward from
the null label) -> evaluate (base vs fine-tuned, same noise; gold twin) -> reload, merged-weight sampling.

Default suite (issue 13: "a tiny version of the whole pipeline in <= 60 s"): 6 steps of batch 8 on a 6-step grid,
32 evaluation samples, the reward-hacking monitor watching every step.  ONE run serves the pipeline test and the
quiet half of the monitor tests (the firing half: tests/integration/test_mnist_monitor.py).  The notebook runs the
same pipeline at a size where the change is visible (tests/test_notebook.py, slow).
"""
import contextlib
import io
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from am_jax import builders, jobs, lora
from tests import launch_helpers

WINDOW, MARGIN = 4, 0.5  # the monitor of tests/integration/test_mnist_monitor.py


@pytest.fixture(scope="module")
def am_class_run(tmp_path_factory):
  """(config, workdir, summary, stderr) of the tiny AM (lambda = 4) LoRA fine-tune on the class reward."""
  cfg = launch_helpers.tiny_mnist_config("reward=class", "am", 4.0, 6, WINDOW, MARGIN)
  cfg.eval.num_samples = 32
  work = str(tmp_path_factory.mktemp("mnist") / "ft")
  err = io.StringIO()
  with contextlib.redirect_stderr(err):  # the monitor's warnings (reporting.warn), for the quiet test
    summary = jobs.finetune(cfg, work)
  sys.stderr.write(err.getvalue())
  return cfg, work, summary, err.getvalue()


def _tree_bytes_on_disk(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_shipped_dit_lora_class_reward_pipeline(am_class_run):
  cfg, work, summary, _ = am_class_run

  # Evaluate (same noise for base and fine-tuned): the training reward log p_A(3 | x) and its held-out gold twin
  # (classifier B) both rise.  Measured (6 steps): reward -17.4 -> -8.6, gold -8.3 -> -5.5.
  assert summary["reward_mean_finetuned_ode"] > summary["reward_mean_base_ode"] + 3.0, summary
  assert summary["gold/class/finetuned_ode"] > summary["gold/class/base_ode"] + 1.0, summary
  assert summary["hacking_detected"] is False
  assert os.path.isfile(os.path.join(work, "grid.png"))
  with open(os.path.join(work, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert {"reward", "gold/class"} <= set(rows[-1]) and np.isfinite(rows[-1]["gold/class"])

  # Only the adapters are trained and checkpointed: the checkpoint (adapters + their Adam moments) is smaller
  # than the base's own params.
  problem, adapters = jobs.load_finetuned(cfg, work)
  assert problem.parameterisation == "lora"
  counts = lora.param_counts(problem.base_params, adapters)
  assert set(adapters) == set(problem.init_params) and counts["fraction"] < 0.2, counts
  ckpt_bytes = _tree_bytes_on_disk(os.path.join(work, "checkpoints"))
  assert ckpt_bytes < _tree_bytes_on_disk(builders.resolve_path("shipped:mnist_dit")), ckpt_bytes

  # Sampling the base network with the merged weights W + s A B equals sampling the LoRA model (what the
  # notebook and the evaluation rely on), with trained (non-zero) adapters.
  assert max(float(jnp.abs(a["b"]).max()) for a in adapters.values()) > 0
  key = jax.random.PRNGKey(3)
  merged = jax.jit(lambda p: problem.sample(p, key, 4, "ode", 4, which="base"))(problem.merged_params(adapters))
  lora_x = jax.jit(lambda p: problem.sample(p, key, 4, "ode", 4, which="finetuned"))(adapters)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(lora_x), atol=2e-4)


def test_monitor_stays_quiet_when_am_raises_reward_and_gold_together(am_class_run):
  """The quiet half of tests/integration/test_mnist_monitor.py (its docstring): AM raises the trained reward
  log p_A(3 | x) and its gold twin log p_B(3 | x) together, and the monitor does not flag it."""
  _, work, summary, stderr = am_class_run
  assert summary["hacking_detected"] is False, summary
  assert summary["num_flagged"] == {"class": 0} and summary["first_flagged_step"] == {"class": None}
  rows = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
  curves = {r["step"]: (r["reward"], r["gold/class"]) for r in rows}
  # The monitor had something to watch: both rewards rose a lot over the evaluated windows.
  assert curves[6][0] > curves[1][0] + 3.0 and curves[6][1] > curves[1][1] + 1.0, curves
  assert "reward hacking suspected" not in stderr
