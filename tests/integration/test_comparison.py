"""``am-jax compare`` on a shrunk toy2d task: ``comparison.run_one`` trains through the production step and its
rows carry every column; the table and the plot are written.

Every method also runs one sharded production step in tests/methods/test_registry.py, and every run's options
build and trace in tests/test_comparison.py; here three runs whose memory the method designs order.  The real
comparison (600 steps per method, ~3 min; digits ~15 min) is run by hand (BUILD_NOTES.md section 8.12).
"""
import math

import jax
import numpy as np

from am_jax import comparison as compare, jobs, launch, metrics, sampling


def test_runs_of_the_toy2d_comparison_execute(tmp_path):
  cfg = launch.load_config("gmm2d")
  cfg.model.kind, cfg.finetune.hidden, cfg.finetune.batch_size, cfg.am.reward_multiplier = "exact", (64, 64), 32, 4.0
  cfg.am.loss_clip = None
  cfg.am.num_steps, cfg.am.num_random_timesteps, cfg.am.num_last_timesteps = 10, 3, 3
  task = compare.exact_task(jobs.build_finetune_problem(cfg, str(tmp_path)), 32)
  task["eval"] = task["final_eval"] = _cheap_eval(task)
  names = ["am", "discrete_adjoint", "draft_k1"]
  rows = [compare.run_one(task, name, steps=3, eval_every=2, seed=0) for name in names]
  for row in rows:
    for key in ("reward", "distance", "diversity", "ms_per_step", "nfe_per_step"):
      assert math.isfinite(row[key]), (row["name"], key, row[key])
    assert row["peak_memory_mb"] > 0 and row["steps"] == 3 and row["method"] == compare.RUNS[row["name"]][0]
    assert [h["step"] for h in row["history"]] == [0, 2]
    # lambda = 4 lives in the AMConfig, not in the reward: the step's reward_mean is the RAW reward of samples of
    # the (still zero-residual) base, -1.03; with lambda folded into the reward it would read -4.1.
    assert abs(row["history"][0]["reward_mean"] - task["reference"]["base_reward"]) < 1.0, row["name"]
  by_name = {r["name"]: r for r in rows}
  # Memory ordering that the method designs imply: backprop through K steps stores the most.
  assert by_name["discrete_adjoint"]["peak_memory_mb"] > by_name["am"]["peak_memory_mb"]
  assert by_name["draft_k1"]["peak_memory_mb"] < by_name["am"]["peak_memory_mb"]
  saved = {"meta": {"task": "toy2d", "steps": 3, "batch_size": 32, "machine": "test", "reach": task["reach"],
                    "reference": task["reference"]}, "runs": rows}
  md = compare.markdown(saved)
  assert md.count("\n") == len(rows) + 2 and "| draft_k1 | draft |" in md
  compare.plot(saved, str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").stat().st_size > 1000


def _cheap_eval(task):
  """256 ODE samples instead of 4096 / 20000 (the structure, not the accuracy, is under test)."""
  target_x = None
  problem = task["problem"]
  draw = jax.jit(lambda p: sampling.sample(problem.finetuned_apply(), p, jax.random.PRNGKey(1), (256, 2),
                                           problem.schedule, "ode", 10))

  def evaluate(p):
    nonlocal target_x
    x = np.asarray(draw(p))
    if target_x is None:
      target_x = x + 1.0
    return {"reward": float(np.mean(x[:, 0])), "distance": metrics.sliced_wasserstein1(x, target_x),
            "diversity": float(np.std(x))}
  return evaluate
