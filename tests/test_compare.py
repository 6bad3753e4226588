"""``experiments/compare.py``: every method runs through the production step, rows carry all the columns.

The real comparison (600 steps per method, ~3 min; digits ~15 min) is run by hand (BUILD_NOTES.md section 8.12).
"""
import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from am_jax import losses, methods, rewards
from am_jax import comparison as compare, jobs, launch


def _counted(apply_fn, name, counts):
  """``apply_fn`` whose every forward pass and every VJP (backward pass) calls back with the rows it processes."""
  def tally(kind):
    return lambda rows: counts.update({name + kind: rows.shape[0]})

  @jax.custom_vjp
  def f(params, x, t):
    jax.debug.callback(tally("F"), t)
    return apply_fn(params, x, t)

  def fwd(params, x, t):
    jax.debug.callback(tally("F"), t)
    return apply_fn(params, x, t), (params, x, t)

  def bwd(res, ct):
    jax.debug.callback(tally("B"), ct)
    return jax.vjp(apply_fn, *res)[1](ct)

  f.defvjp(fwd, bwd)
  return lambda params, x, t, *cond: f(params, x, t)


def _sub_jaxprs(value):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _replay_callbacks(jaxpr, times=1):
  """Calls every debug callback of the program as often as it runs: a scan body ``length`` times (callbacks are
  effects, so XLA keeps each one; vmap unrolls them).  Same counts as running the compiled step (checked when
  written), without compiling it."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "debug_callback":
      for _ in range(times):
        eqn.params["callback"](*[np.zeros(v.aval.shape, v.aval.dtype) for v in eqn.invars])
    subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
    assert not (eqn.primitive.name in ("while", "cond") and any("debug_callback" in str(j) for j in subs)), eqn
    for j in subs:
      _replay_callbacks(j, times * (eqn.params["length"] if eqn.primitive.name == "scan" else 1))


@pytest.mark.parametrize("method,options", list(compare.RUNS.values()) + [("eam", {"ode_solver": "euler"}),
                                                                          ("eam", {"weights": "hutchinson"}),
                                                                          ("draft", {"k": 3}),
                                                                          ("deterministic_am", {"anchor_steps": 2})])
def test_network_passes_counts_the_network_calls(method, options):
  """``compare.network_passes`` = the forward and VJP passes of the fine-tuned and base nets in one gradient step,
  counted by instrumenting both nets (rows processed / batch)."""
  counts, batch, dim = collections.Counter(), 4, 2
  net = lambda w, x, t: jnp.tanh(x @ w + t[:, None])  # noqa: E731
  ft, base = _counted(net, "ft", counts), _counted(net, "base", counts)
  am = losses.AMConfig(num_steps=6, num_random_timesteps=2, num_last_timesteps=2, loss_clip=None)
  objective = methods.build(method, am, **options)
  reward = rewards.quadratic_reward(0.5 * jnp.eye(dim), jnp.ones(dim))
  step = jax.grad(lambda w: objective(ft, w, base, 0.3 * jnp.eye(dim), reward, jax.random.PRNGKey(0),
                                      (batch, dim))[0])
  _replay_callbacks(jax.make_jaxpr(step)(0.5 * jnp.eye(dim)).jaxpr)
  forward, backward = (counts["ftF"] + counts["baseF"]) / batch, (counts["ftB"] + counts["baseB"]) / batch
  assert forward > 0 and backward > 0
  assert compare.network_passes(method, am, dim, **options) == {"forward": forward, "backward": backward,
                                                                "total": forward + backward}


def test_network_passes_errors():
  with pytest.raises(ValueError, match="unknown method 'dpo'"):
    compare.network_passes("dpo", losses.AMConfig(), 2)
  with pytest.raises(ValueError, match="no option 'num_time' \\(did you mean 'num_times'"):
    compare.network_passes("eam", losses.AMConfig(), 2, num_time=4)


def test_every_run_of_the_toy2d_comparison_executes(tmp_path):
  cfg = launch.load_config("gmm2d")
  cfg.model.kind, cfg.finetune.hidden, cfg.finetune.batch_size, cfg.am.reward_multiplier = "exact", (64, 64), 32, 4.0
  cfg.am.loss_clip = None
  task = compare.exact_task(jobs.build_finetune_problem(cfg, str(tmp_path)), 32)
  task["eval"] = task["final_eval"] = _cheap_eval(task)
  rows = [compare.run_one(task, name, steps=3, eval_every=2, seed=0) for name in compare.RUNS]
  for row in rows:
    for key in ("reward", "distance", "diversity", "ms_per_step", "nfe_per_step"):
      assert math.isfinite(row[key]), (row["name"], key, row[key])
    assert row["peak_memory_mb"] > 0
    assert [h["step"] for h in row["history"]] == [0, 2]
    if row["method"] != "am_const_sigma":  # (whose biased SDE does not sample the base)
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
  assert md.count("\n") == len(rows) + 2 and "| eam_unweighted | eam |" in md
  compare.plot(saved, str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").stat().st_size > 1000


def _cheap_eval(task):
  """256 ODE samples instead of 4096 / 20000 (the structure, not the accuracy, is under test)."""
  import jax
  from am_jax import metrics, sampling
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
