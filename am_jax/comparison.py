"""Every fine-tuning method with the same budget on one ``Problem``: runs, network-pass counts, tables, plots.

The library behind ``am-jax compare`` (``experiments/compare.py``, whose docstring describes the two tasks).
A *task* is a ``Problem`` plus how to evaluate it: ``exact_task`` (a problem whose exact tilted target is
known: reward, sliced W1 to the target, diversity) and ``classifier_task`` (digits: training reward A,
held-out reward B, diversity and Fréchet distance on B-features).  ``run_one`` trains one method with the
production step (``training.make_finetune_step``: one jit) and records its history, time, memory and
network passes.
"""
from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from am_jax import builders, classifiers, image_eval, losses, methods, metrics, profiling, reporting, sampling
from am_jax import training
from am_jax.problem import Problem

__all__ = ["RUNS", "network_passes", "exact_task", "classifier_task", "run_one", "markdown", "plot"]

# name -> (method, options of its factory): ``methods.build(method, task AMConfig, **options)``.
RUNS = {
    "am": ("am", {}),
    "basic_am": ("basic_am", {}),
    "continuous_adjoint": ("continuous_adjoint", {}),
    "discrete_adjoint": ("discrete_adjoint", {}),
    "eam": ("eam", {}),
    "eam_unweighted": ("eam", {"weights": "none"}),
    "am_const_sigma_1.0": ("am_const_sigma", {"sigma": 1.0}),
    "draft_k1": ("draft", {"k": 1}),
    "refl": ("refl", {}),
    "deterministic_am_kinetic": ("deterministic_am", {"regulariser": "kinetic", "truncation": 0.25}),
}


def network_passes(method: str, am: losses.AMConfig, dim: int, **options) -> dict:
  """Network passes per trajectory per step: forward (F) and backward / VJP (B) passes, fine-tuned + base nets.

  K = num_steps, M = loss time steps.  am / am_const_sigma: K F (sampling) + K (F + B) base VJPs (lean adjoint) +
  M (F + B) fine-tuned + M F base (loss; 0 with ``AMConfig.reuse_base_velocity``, solver 'scan' and no remat: the
  lean adjoint's VJPs already evaluated the base there).  basic_am: the full adjoint differentiates the fine-tuned AND base drift
  (2K (F + B)).  continuous_adjoint: full adjoint + the surrogate on all K steps (K (F + B) fine-tuned + K F base).
  discrete_adjoint: K F of each net, backprop through both (2K B).  draft: K F + k B.  refl: K F + one F + B.
  eam (n sampler steps, m regression times, P = dim (exact divergence) or 1 (Hutchinson)): weighted midpoint: per
  step one fine-tuned F, then at the midpoint one F of each net and P VJPs of each, + 1 base F (data score) + m (F + B);
  unweighted: 2n + 1 + m F, m B; the Euler sampler has one stage per step instead of two.  deterministic_am
  (window W = ceil(truncation K), A anchors): K F + W base VJPs + (W + A) x (F + B fine-tuned, F base).
  ``options``: the method's factory options (``methods.options``: defaults filled in; unknown names raise).
  """
  opt = methods.options(method, **options)
  k = am.num_steps
  m = am.num_random_timesteps + am.num_last_timesteps
  if method in ("am", "am_const_sigma"):
    reused = am.reuse_base_velocity and am.solver == "scan" and not am.remat_segments
    f, b = 2 * k + m + (0 if reused else m), k + m
  elif method == "basic_am":
    f, b = 3 * k + 2 * m, 2 * k + m
  elif method == "continuous_adjoint":
    f, b = 5 * k, 3 * k
  elif method == "discrete_adjoint":
    f, b = 2 * k, 2 * k
  elif method == "draft":
    f, b = k, opt["k"]
  elif method == "refl":
    f, b = k + 1, 1
  elif method == "eam":
    n, mt = opt["ode_steps"], opt["num_times"]
    mode = methods.weight_mode(opt["weights"], (1, dim))
    stages = 1 if opt["ode_solver"] == "euler" else 2  # fine-tuned forwards per sampler step
    if mode == "none":
      f, b = stages * n + 1 + mt, mt
    else:  # the last stage also evaluates the base and P VJPs of each net (``methods.log_ratio_rate``)
      p = dim if mode == "exact" else 1
      f, b = (stages + 1) * n + 1 + mt, 2 * n * p + mt
  elif method == "deterministic_am":
    w = max(1, min(k, math.ceil(opt["truncation"] * k - 1e-6)))
    a = min(opt["anchor_steps"], k - w)
    f, b = k + w + 2 * (w + a), w + (w + a)
  else:  # a method registered after this table was written
    raise ValueError(f"network_passes: no pass count for method {method!r}")
  return {"forward": f, "backward": b, "total": f + b}


# ---------------------------------------------------------------------------------------------------------
# Tasks: a Problem + its evaluation and reach threshold.
# ---------------------------------------------------------------------------------------------------------


def exact_task(problem: Problem, batch: int, learning_rate: float = 1e-3) -> dict:
  """A 2-D problem with a known exact target (``problem.exact_target``): reward, sliced W1 to it, diversity."""
  target = problem.exact_target
  if target is None:
    raise ValueError("exact_task needs a problem with an exact target (an exact-mixture base and a linear or "
                     "quadratic reward).")
  am = problem.config
  reward_fn = problem.reward_fn
  ft_apply = problem.finetuned_apply()
  target_x = np.asarray(gmm_sample(target, 99, 20000))
  base_x = np.asarray(gmm_sample(problem.exact_base, 98, 20000))
  target_reward = float(jnp.mean(reward_fn(jnp.asarray(target_x))))
  base_reward = float(jnp.mean(reward_fn(jnp.asarray(base_x))))
  dim = problem.sample_shape[0]

  def make_eval(num):
    draw = jax.jit(lambda p: sampling.sample(ft_apply, p, jax.random.PRNGKey(123), (num, dim), am.schedule, "ode",
                                             am.num_steps, am.time_offset))

    def evaluate(p):
      x = np.asarray(draw(p))
      if not np.all(np.isfinite(x)):
        return {"reward": float("nan"), "distance": float("nan"), "diversity": float("nan")}
      return {"reward": float(jnp.mean(reward_fn(jnp.asarray(x)))),
              "distance": metrics.sliced_wasserstein1(x, target_x[:num]),
              "diversity": float(np.sqrt(np.trace(np.cov(x.T))))}
    return evaluate

  return {
      "problem": problem, "batch": batch, "optimizer": lambda steps: optax.adam(learning_rate),
      "eval": make_eval(4096), "final_eval": make_eval(20000),
      "reach": base_reward + 0.9 * (target_reward - base_reward),
      "reference": {"target_reward": target_reward, "base_reward": base_reward,
                    "target_diversity": float(np.sqrt(np.trace(np.cov(target_x.T)))),
                    "base_distance": metrics.sliced_wasserstein1(base_x, target_x),
                    "distance_floor": metrics.sliced_wasserstein1(np.asarray(gmm_sample(target, 7, 20000)), target_x)},
      "distance_name": "sliced W1 to exact target",
  }


def gmm_sample(mixture, seed: int, n: int):
  from am_jax import gmm
  return gmm.sample(mixture, jax.random.PRNGKey(seed), n)


def classifier_task(problem: Problem, cfg, batch: int, per_class: int = 20) -> dict:
  """Digits: reward A (= the training reward's classifier), held-out B, diversity and FD on B-features of
  ``per_class`` ODE samples per digit (fixed noise); reach = 30% of the base's reward A."""
  clf_a = builders.load_classifier(cfg.reward.checkpoint, "A")[:3]
  clf_b = builders.load_classifier(cfg.reward.checkpoint, "B")[:3]
  classify = image_eval.make_classify(clf_a, clf_b)
  x_test = image_eval.heldout_images(cfg)
  ref_feats = np.asarray(classify(x_test)[2])
  labels = jnp.repeat(jnp.arange(classifiers.NUM_CLASSES, dtype=jnp.int32), per_class)
  am = problem.config
  ft_apply = problem.finetuned_apply()
  shape = (labels.shape[0],) + problem.sample_shape
  draw = jax.jit(lambda p: sampling.sample(ft_apply, p, jax.random.PRNGKey(1234), shape, am.schedule, "ode",
                                           am.num_steps, am.time_offset, noiseless_last_step=True, cond=(labels,)))

  def evaluate_fn(p):
    x = np.asarray(draw(p))
    if not np.all(np.isfinite(x)):
      return {"reward": float("nan"), "heldout_reward": float("nan"), "diversity": float("nan"), "fd": float("nan")}
    s = image_eval.score(x, labels, classify, ref_feats)
    return {"reward": s["reward_A"], "heldout_reward": s["reward_B"], "diversity": s["diversity"], "fd": s["fd"]}

  base_eval = evaluate_fn(problem.init_params)
  return {
      "problem": problem, "batch": batch,
      "optimizer": lambda steps: builders.build_optimizer(cfg, "finetune.optimizer", steps),
      # The U-Net's velocity at t = 0.999 gives a useless data score (|a(1)|^2 ~ 1e7: (v - kappa x) / eta with
      # eta = 1e-3 amplifies its errors); t_s = 0.9 reads the score of the data smoothed by N(0, 0.11^2).
      "method_options": {"eam": {"score_time": 0.9}}, "eval": evaluate_fn, "final_eval": evaluate_fn,
      "reach": 0.3 * base_eval["reward"],
      "reference": {"base": base_eval}, "distance_name": None,
  }


# ---------------------------------------------------------------------------------------------------------
# One run.
# ---------------------------------------------------------------------------------------------------------


def run_one(task: dict, name: str, steps: int, eval_every: int, seed: int) -> dict:
  method, run_options = RUNS[name]
  # Task-level options of a method (task["method_options"][method], e.g. EAM's score_time on digits), then the run's.
  options = {**task.get("method_options", {}).get(method, {}), **run_options}
  problem = task["problem"]
  objective = methods.build(method, problem.config, **options)
  optimizer = task["optimizer"](steps)
  state = training.init_state(jax.tree.map(jnp.copy, problem.init_params), optimizer, seed)
  step = training.make_finetune_step(problem, objective, optimizer, task["batch"])
  t0 = time.perf_counter()
  compiled = step.lower(state, problem.base_params).compile()
  compile_s = time.perf_counter() - t0
  mem = profiling.memory_stats(compiled)
  passes = network_passes(method, problem.config, math.prod(problem.sample_shape), **options)
  history, wall, reach_step = [], 0.0, None
  for s in range(steps):
    t = time.perf_counter()
    state, m = compiled(state, problem.base_params)
    jax.block_until_ready(state.params)
    if s > 0:  # step 0 includes one-off dispatch costs
      wall += time.perf_counter() - t
    if s % eval_every == 0 or s == steps - 1:
      ev = task["eval"](state.params)
      history.append({"step": s, "wall_s": wall, **{k: float(v) for k, v in m.items() if np.ndim(v) == 0}, **ev})
      if reach_step is None and math.isfinite(ev["reward"]) and ev["reward"] >= task["reach"]:
        reach_step = (s, wall)
      reporting.info(f"[{name}] step {s:4d} wall {wall:6.1f}s " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
  final = task["final_eval"](state.params)
  per_step = wall / max(steps - 1, 1)
  row = {"name": name, "method": method, "steps": steps, "batch_size": task["batch"], **final,
         "train_seconds": wall, "ms_per_step": 1e3 * per_step, "compile_seconds": compile_s,
         "peak_memory_mb": mem.get("total_bytes", float("nan")) / 2**20, "nfe_per_step": passes["total"],
         "nfe_forward": passes["forward"], "nfe_backward": passes["backward"],
         "reach_step": reach_step[0] if reach_step else None, "reach_seconds": reach_step[1] if reach_step else None,
         "reach_nfe": (reach_step[0] + 1) * passes["total"] if reach_step else None,
         "history": history}
  reporting.info(name + " " + json.dumps({k: v for k, v in row.items() if k != "history"}))
  return row


# ---------------------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------------------


def _f(x, nd=3):
  return "diverged" if x is None or not isinstance(x, (int, float)) or not math.isfinite(x) else f"{x:.{nd}f}"


def markdown(saved: dict) -> str:
  rows, meta = saved["runs"], saved["meta"]
  task = meta["task"]
  extra = (["W1 to target"] if task == "toy2d" else ["held-out reward (B)", "FD (B feats)"])
  head = (["run", "method", "reward"] + extra + ["diversity", "to reach: steps", "s", "NFE", "NFE/step (F+B)",
                                                  "ms/step", "peak MB"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["name"], r["method"], _f(r["reward"])]
    cells += [_f(r["distance"])] if task == "toy2d" else [_f(r["heldout_reward"]), _f(r["fd"], 2)]
    reach = r["reach_step"] is not None
    cells += [_f(r["diversity"], 3), str(r["reach_step"]) if reach else "not reached",
              _f(r["reach_seconds"], 1) if reach else "-", f"{r['reach_nfe']:,}" if reach else "-",
              f"{r['nfe_per_step']} ({r['nfe_forward']}+{r['nfe_backward']})", _f(r["ms_per_step"], 1),
              _f(r["peak_memory_mb"], 1)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(saved: dict, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows, meta = saved["runs"], saved["meta"]
  second = "distance" if meta["task"] == "toy2d" else "heldout_reward"
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
  colors = plt.get_cmap("tab10").colors
  for i, r in enumerate(rows):
    h = [x for x in r["history"] if isinstance(x.get("reward"), float) and math.isfinite(x["reward"])]
    if not h:
      continue
    wall = [x["wall_s"] for x in h]
    axes[0].plot(wall, [x["reward"] for x in h], "-o", ms=2, color=colors[i % 10], label=r["name"])
    axes[1].plot(wall, [x[second] for x in h], "-o", ms=2, color=colors[i % 10], label=r["name"])
  axes[0].axhline(meta["reach"], color="k", lw=1, ls=":", label="'reach' threshold")
  if meta["task"] == "toy2d":
    axes[0].axhline(meta["reference"]["target_reward"], color="r", lw=1, ls=":", label="exact target")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("sliced W1 to exact tilted target")
    axes[0].set_ylabel("mean reward (ODE samples)")
  else:
    axes[0].set_ylabel("reward A = log p_A(label | x)")
    axes[1].set_ylabel("held-out reward B")
  for ax in axes:
    ax.set_xlabel(f"training wall-clock [s] ({meta['machine']}, compile + eval excluded)")
  axes[0].legend(fontsize=7, ncol=2)
  fig.suptitle(f"compare --task={meta['task']}: {meta['steps']} steps x batch {meta['batch_size']} per method")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_all(task: dict, task_name: str, names, steps: int, eval_every: int, seed: int, lam: float) -> dict:
  """Runs ``names`` (default: every entry of ``RUNS``) on ``task``; returns {"meta": ..., "runs": rows}."""
  import os
  import platform
  names = list(names or RUNS)
  unknown = [n for n in names if n not in RUNS]
  if unknown:
    raise ValueError(f"--runs: unknown run names {unknown}; choose from {list(RUNS)}.")
  rows = [run_one(task, n, steps, eval_every, seed) for n in names]
  meta = {"task": task_name, "date": time.strftime("%Y-%m-%d"),
          "machine": f"{platform.machine()} CPU x{os.cpu_count()}" if jax.default_backend() == "cpu"
          else jax.devices()[0].device_kind, "jax": jax.__version__, "steps": steps, "batch_size": task["batch"],
          "lambda": lam, "seed": seed, "reach": task["reach"], "reference": task["reference"],
          "method_options": task.get("method_options", {})}
  return {"meta": meta, "runs": rows}


def load(workdir: str, task_name: str) -> dict:
  """The saved result of ``write`` (``compare_<task>.json``)."""
  import os
  with open(os.path.join(workdir, f"compare_{task_name}.json")) as f:
    return json.load(f)


def write(saved: dict, workdir: str, task_name: str) -> str:
  """Writes ``compare_<task>.json``, ``.md`` (table) and ``.png`` (curves) to ``workdir``; returns the table."""
  import os
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, f"compare_{task_name}.json"), "w") as f:
    json.dump(reporting.to_json(saved), f, indent=1, allow_nan=False)
  md = markdown(saved)
  with open(os.path.join(workdir, f"compare_{task_name}.md"), "w") as f:
    f.write(f"Settings: {json.dumps(reporting.to_json(saved['meta']))}\n\n" + md)
  plot(saved, os.path.join(workdir, f"compare_{task_name}.png"))
  return md
