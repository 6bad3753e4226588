"""``experiments/compare.py``: every method runs through the production step, rows carry all the columns.

The real comparison (600 steps per method, ~3 min; digits ~15 min) is run by hand (BUILD_NOTES.md section 8.12).
"""
import math

import numpy as np
import pytest

from am_jax import losses, methods
from experiments import compare


def test_network_passes_counts():
  cfg = methods.MethodConfig(am=losses.AMConfig(num_steps=40, num_random_timesteps=10, num_last_timesteps=10))
  # AM: K forwards (sampling) + K base VJPs (lean adjoint) + M (F + B) fine-tuned and M F base (loss).
  assert compare.network_passes("am", cfg, 2) == {"forward": 120, "backward": 60, "total": 180}
  assert compare.network_passes("discrete_adjoint", cfg, 2)["total"] == 160
  assert compare.network_passes("draft", cfg, 2)["total"] == 41
  # EAM, 8 midpoint steps, 16 times: exact divergence in 2-D costs 2 VJPs of each net per step.
  assert compare.network_passes("eam", cfg, 2) == {"forward": 3 * 8 + 1 + 16, "backward": 2 * 8 * 2 + 16,
                                                   "total": 89}
  assert compare.network_passes("eam", cfg, 64)["backward"] == 2 * 8 + 16  # Hutchinson above 16 dims
  unweighted = methods.MethodConfig(am=cfg.am, eam_weights="none")
  assert compare.network_passes("eam", unweighted, 2)["total"] == 2 * 8 + 1 + 16 + 16
  euler = methods.MethodConfig(am=cfg.am, eam_ode_solver="euler")
  assert compare.network_passes("eam", euler, 2) == {"forward": 2 * 8 + 1 + 16, "backward": 2 * 8 * 2 + 16,
                                                     "total": 81}
  with pytest.raises(ValueError, match="unknown method"):
    compare.network_passes("dpo", cfg, 2)


def test_every_run_of_the_toy2d_comparison_executes(tmp_path):
  task = compare.toy2d_task(lam=1.0, batch=32, seed=0)
  task["eval"] = task["final_eval"] = _cheap_eval(task)
  rows = [compare.run_one(task, name, steps=3, eval_every=2, seed=0) for name in compare.RUNS]
  for row in rows:
    for key in ("reward", "distance", "diversity", "ms_per_step", "nfe_per_step"):
      assert math.isfinite(row[key]), (row["name"], key, row[key])
    assert row["peak_memory_mb"] > 0
    assert [h["step"] for h in row["history"]] == [0, 2]
  by_name = {r["name"]: r for r in rows}
  # Memory ordering that the method designs imply: backprop through K steps stores the most.
  assert by_name["discrete_adjoint"]["peak_memory_mb"] > by_name["am"]["peak_memory_mb"]
  assert by_name["draft_k1"]["peak_memory_mb"] < by_name["am"]["peak_memory_mb"]
  saved = {"meta": {"task": "toy2d", "steps": 3, "batch_size": 32, "machine": "test", "reach": task["reach"],
                    "reference": task["reference"]}, "runs": rows}
  md = compare.markdown(saved)
  assert md.count("\n") == len(rows) + 2 and "| eam_unweighted | eam |" in md
  compare.plot(saved, str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").stat().st_size > 1000


def _cheap_eval(task):
  """256 ODE samples instead of 4096 / 20000 (the structure, not the accuracy, is under test)."""
  import jax
  from am_jax import metrics, sampling
  target_x = None
  draw = jax.jit(lambda p: sampling.sample(task["ft_apply"], p, jax.random.PRNGKey(1), (256, 2), task["am"].schedule,
                                           "ode", 10))

  def evaluate(p):
    nonlocal target_x
    x = np.asarray(draw(p))
    if target_x is None:
      target_x = x + 1.0
    return {"reward": float(np.mean(x[:, 0])), "distance": metrics.sliced_wasserstein1(x, target_x),
            "diversity": float(np.std(x))}
  return evaluate
