r"""Every fine-tuning method of ``am_jax.methods`` with the same budget, on a 2-D exact problem and on images.

    python -m experiments.compare --task=toy2d --workdir=runs/compare_toy2d
    python -m experiments.compare --task=digits --workdir=runs/compare_digits     # needs the digits base + rewards

(The 1-D problem of paper Fig. 2, with its EAM / deterministic-AM diagnostics, is ``experiments.compare_toy``.)

toy2d: base = the exact 8-component ring mixture of ``configs/gmm2d.py`` (radius 2, std 0.25), reward
r(x) = -|x|^2 / 4 + (1, 0.5).x, lambda = 1; the exact target p_base e^r / Z is again a Gaussian mixture
(``gmm.tilt_quadratic``).  Fine-tuned = exact base + zero-initialised (64, 64) MLP residual (control
parameterisation), Adam 1e-3, batch 256, K = 40, 600 steps.  Distance = sliced W1 of 20k ODE samples to 20k exact
target samples (noise floor ~0.01).

digits: the class-conditional 8x8 U-Net base and classifiers A (reward r = log p_A(label | x)) / B (held out)
of ``configs/digits_finetune.py`` (train them first with the commands in that file); fine-tuned = full copy of
the U-Net, the config's optimizer (Adam 1e-4, 10 warm-up steps, clip 1), lambda 8, batch 16, K = 20, 120 steps.  Metrics on 200 ODE samples (20 per class, fixed
noise): reward A, held-out reward B, diversity (mean pairwise distance of B-features within a class) and FD to
the test digits on B-features.

Every run: the production step (``training.make_finetune_step``: one jit) with the method's objective; an
evaluation every ``eval_every`` steps (its time excluded from the wall-clock); "to reach" = first evaluation
whose reward passes ``reach``: toy2d: 90% of the way from the base's reward to the exact target's; digits: 70% of
the way from the base's reward A to its maximum 0.  NFE = network passes per trajectory per step (forward and
backward / VJP passes of the fine-tuned and base nets, counted from the method's algorithm:
``network_passes``); "NFE to reach" = steps to reach x NFE per step.  Peak memory = XLA's memory analysis of
the compiled step (temporaries + arguments + outputs - donated).

Writes to --workdir: compare_<task>.json (rows + histories), compare_<task>.md (table), compare_<task>.png
(reward and distance vs training wall-clock).  Measured times are in BUILD_NOTES.md section 8.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from am_jax import gmm, losses, methods, metrics, models, rewards, sampling, schedules, training

def define_flags():
  """Flags of the launcher (defined only when run as a script, so importing this module defines none)."""
  flags.DEFINE_enum("task", "toy2d", ["toy2d", "digits"], "Which comparison.")
  flags.DEFINE_string("workdir", None, "Output folder (default runs/compare_<task>).")
  flags.DEFINE_list("runs", None, "Subset of run names (default: all of RUNS).")
  flags.DEFINE_integer("steps", 0, "Steps per run (0: task default: toy2d 600, digits 120).")
  flags.DEFINE_integer("batch_size", 0, "Trajectories per step (0: task default: toy2d 256, digits 16).")
  flags.DEFINE_integer("eval_every", 0, "Evaluate every this many steps (0: task default: toy2d 50, digits 20).")
  flags.DEFINE_float("lam", 0.0, "Reward multiplier lambda (0: task default: toy2d 1, digits 8).")
  flags.DEFINE_integer("seed", 0, "Seed (same for every run).")
  flags.DEFINE_string("digits_config", "configs/digits_finetune.py", "digits: config with the checkpoints.")
  flags.DEFINE_float("eam_max_log_weight", 0.0, "EAM: clip log-weights at (max - this) (0: no clipping).")
  flags.DEFINE_bool("replot", False, "Only rebuild the markdown and PNG from compare_<task>.json.")


FLAGS = flags.FLAGS

# name -> (method, MethodConfig keyword overrides).  The shared AMConfig is the task's.
RUNS = {
    "am": ("am", {}),
    "basic_am": ("basic_am", {}),
    "continuous_adjoint": ("continuous_adjoint", {}),
    "discrete_adjoint": ("discrete_adjoint", {}),
    "eam": ("eam", {}),
    "eam_unweighted": ("eam", {"eam_weights": "none"}),
    "am_const_sigma_1.0": ("am_const_sigma", {"const_sigma": 1.0}),
    "draft_k1": ("draft", {"draft_k": 1}),
    "refl": ("refl", {}),
    "deterministic_am_kinetic": ("deterministic_am", {"regulariser": "kinetic", "truncation": 0.25}),
}


def network_passes(method: str, cfg: methods.MethodConfig, dim: int) -> dict:
  """Network passes per trajectory per step: forward (F) and backward / VJP (B) passes, fine-tuned + base nets.

  K = num_steps, M = loss time steps.  am / am_const_sigma: K F (sampling) + K (F + B) base VJPs (lean adjoint) +
  M (F + B) fine-tuned + M F base (loss).  basic_am: the full adjoint differentiates the fine-tuned AND base drift
  (2K (F + B)).  continuous_adjoint: full adjoint + the surrogate on all K steps (K (F + B) fine-tuned + K F base).
  discrete_adjoint: K F of each net, backprop through both (2K B).  draft: K F + draft_k B.  refl: K F + one F + B.
  eam (n sampler steps, m regression times, P = dim (exact divergence) or 1 (Hutchinson)): weighted midpoint: per
  step one fine-tuned F, then at the midpoint one F of each net and P VJPs of each, + 1 base F (data score) + m (F + B);
  unweighted: 2n + 1 + m F, m B; the Euler sampler has one stage per step instead of two.  deterministic_am (window W = ceil(truncation K), A anchors): K F + W base VJPs +
  (W + A) x (F + B fine-tuned, F base).
  """
  am = cfg.am
  k = am.num_steps
  m = am.num_random_timesteps + am.num_last_timesteps
  if method in ("am", "am_const_sigma"):
    f, b = 2 * k + 2 * m, k + m
  elif method == "basic_am":
    f, b = 3 * k + 2 * m, 2 * k + m
  elif method == "continuous_adjoint":
    f, b = 5 * k, 3 * k
  elif method == "discrete_adjoint":
    f, b = 2 * k, 2 * k
  elif method == "draft":
    f, b = k, cfg.draft_k
  elif method == "refl":
    f, b = k + 1, 1
  elif method == "eam":
    n, mt = cfg.eam_ode_steps, cfg.eam_num_times
    mode = methods.eam_weight_mode(cfg, (1, dim))
    stages = 1 if cfg.eam_ode_solver == "euler" else 2  # fine-tuned forwards per sampler step
    if mode == "none":
      f, b = stages * n + 1 + mt, mt
    else:  # the last stage also evaluates the base and P VJPs of each net (``methods.log_ratio_rate``)
      p = dim if mode == "exact" else 1
      f, b = (stages + 1) * n + 1 + mt, 2 * n * p + mt
  elif method == "deterministic_am":
    w = max(1, min(k, math.ceil(cfg.truncation * k - 1e-6)))
    a = min(cfg.det_anchor_steps, k - w)
    f, b = k + w + 2 * (w + a), w + (w + a)
  else:
    raise ValueError(f"network_passes: unknown method {method!r}")
  return {"forward": f, "backward": b, "total": f + b}


# ---------------------------------------------------------------------------------------------------------
# Tasks: each returns a dict with the model, reward, evaluation and reach threshold.
# ---------------------------------------------------------------------------------------------------------


def toy2d_task(lam: float, batch: int, seed: int) -> dict:
  schedule = schedules.LinearSchedule()
  base_mix = gmm.ring_2d()
  a_mat, b_vec = 0.5 * jnp.eye(2), jnp.array([1.0, 0.5])
  reward_fn = rewards.quadratic_reward(lam * a_mat, lam * b_vec)
  reward_raw = rewards.quadratic_reward(a_mat, b_vec)
  target = gmm.tilt_quadratic(base_mix, lam * a_mat, lam * b_vec)
  base_apply = methods.mixture_base(base_mix, schedule)
  net = models.MLP(2, hidden=(64, 64), zero_init_output=True, rngs=nnx.Rngs(seed))
  net_apply, params = models.functional(net)
  ft_apply = methods.residual_model(base_apply, base_mix, net_apply, schedule, "control")
  am = losses.AMConfig(loss_clip=None, reward_multiplier=1.0)  # lambda is inside reward_fn
  target_x = np.asarray(gmm.sample(target, jax.random.PRNGKey(99), 20000))
  base_x = np.asarray(gmm.sample(base_mix, jax.random.PRNGKey(98), 20000))
  target_reward = float(jnp.mean(reward_raw(jnp.asarray(target_x))))
  base_reward = float(jnp.mean(reward_raw(jnp.asarray(base_x))))

  def make_eval(num):
    draw = jax.jit(lambda p: sampling.sample(ft_apply, p, jax.random.PRNGKey(123), (num, 2), schedule, "ode",
                                             am.num_steps, am.time_offset))

    def evaluate(p):
      x = np.asarray(draw(p))
      if not np.all(np.isfinite(x)):
        return {"reward": float("nan"), "distance": float("nan"), "diversity": float("nan")}
      return {"reward": float(jnp.mean(reward_raw(jnp.asarray(x)))),
              "distance": metrics.sliced_wasserstein1(x, target_x[:num]),
              "diversity": float(np.sqrt(np.trace(np.cov(x.T))))}
    return evaluate

  return {
      "ft_apply": ft_apply, "params": params, "base_apply": base_apply, "base_params": base_mix,
      "reward_fn": reward_fn, "am": am, "x_shape": (batch, 2), "dim": 2, "optimizer": lambda steps: optax.adam(1e-3), "cond_fn": None,
      "eval": make_eval(4096), "final_eval": make_eval(20000),
      "reach": base_reward + 0.9 * (target_reward - base_reward),
      "reference": {"target_reward": target_reward, "base_reward": base_reward,
                    "target_diversity": float(np.sqrt(np.trace(np.cov(target_x.T)))),
                    "base_distance": metrics.sliced_wasserstein1(base_x, target_x),
                    "distance_floor": metrics.sliced_wasserstein1(np.asarray(gmm.sample(target, jax.random.PRNGKey(7),
                                                                                        20000)), target_x)},
      "distance_name": "sliced W1 to exact target",
  }


def digits_task(lam: float, batch: int, seed: int, config_path: str = "configs/digits_finetune.py") -> dict:
  import dataclasses

  from am_jax import builders, classifiers, data as data_lib
  from experiments import evaluate, finetune, finetune_images, pretrain, train_reward
  cfg = _load(config_path)
  for d, cmd in ((cfg.base_checkpoint, "experiments.pretrain --config=configs/digits_pretrain.py"),
                 (cfg.reward_checkpoint, "experiments.train_reward --config=configs/digits_reward.py")):
    if not os.path.isdir(d):
      raise FileNotFoundError(f"{d!r} not found: run `python -m {cmd} --workdir={d}` first "
                              f"(commands in {config_path}).")
  base_apply, base_params, _ = finetune.load_base(cfg.base_checkpoint, None)
  base_params = pretrain.to_local(base_params)
  reward_fn_raw = finetune_images.build_reward(cfg)
  reward_fn = lambda x, label: lam * reward_fn_raw(x, label)  # noqa: E731
  am = dataclasses.replace(builders.build_am_config(cfg), reward_multiplier=1.0)
  clf_a = train_reward.load_classifier(cfg.reward_checkpoint, "A")[:3]
  clf_b = train_reward.load_classifier(cfg.reward_checkpoint, "B")[:3]
  classify = evaluate.make_classify(clf_a, clf_b)
  x_test, _ = data_lib.digits("test")
  ref_feats = np.asarray(classify(x_test)[2])
  per_class = 20
  labels = jnp.repeat(jnp.arange(classifiers.NUM_CLASSES, dtype=jnp.int32), per_class)
  n = labels.shape[0]
  schedule = am.schedule
  draw = jax.jit(lambda p: sampling.sample(base_apply, p, jax.random.PRNGKey(1234), (n, 8, 8, 1), schedule, "ode",
                                           am.num_steps, am.time_offset, noiseless_last_step=True, cond=(labels,)))

  def evaluate_fn(p):
    x = np.asarray(draw(p))
    if not np.all(np.isfinite(x)):
      return {"reward": float("nan"), "heldout_reward": float("nan"), "diversity": float("nan"), "fd": float("nan")}
    s = evaluate.score(x, labels, classify, ref_feats)
    return {"reward": s["reward_A"], "heldout_reward": s["reward_B"], "diversity": s["diversity"], "fd": s["fd"]}

  base_eval = evaluate_fn(base_params)
  return {
      "ft_apply": base_apply, "params": jax.tree.map(jnp.copy, base_params), "base_apply": base_apply,
      "base_params": base_params, "reward_fn": reward_fn, "am": am, "x_shape": (batch, 8, 8, 1), "dim": 64,
      "optimizer": lambda steps: builders.build_optimizer(cfg, "finetune.optimizer", steps),
      "cond_fn": finetune_images.label_cond_fn,
      # The U-Net's velocity at t = 0.999 gives a useless data score (|a(1)|^2 ~ 1e7: (v - kappa x) / eta with
      # eta = 1e-3 amplifies its errors); t_s = 0.9 reads the score of the data smoothed by N(0, 0.11^2).
      "method_overrides": {"eam_score_time": 0.9}, "eval": evaluate_fn, "final_eval": evaluate_fn,
      "reach": 0.3 * base_eval["reward"],
      "reference": {"base": base_eval}, "distance_name": None,
  }


def _load(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


# ---------------------------------------------------------------------------------------------------------
# One run.
# ---------------------------------------------------------------------------------------------------------


def run_one(task: dict, name: str, steps: int, eval_every: int, seed: int) -> dict:
  method, overrides = RUNS[name]
  # Task-level options of a method (e.g. eam_* for 'eam'): applied only to that method's runs.
  task_overrides = {k: v for k, v in task.get("method_overrides", {}).items() if k.startswith(method + "_")}
  cfg = methods.MethodConfig(am=task["am"], **{**task_overrides, **overrides})
  objective = methods.get_objective(method)
  optimizer = task["optimizer"](steps)
  state = training.init_state(jax.tree.map(jnp.copy, task["params"]), optimizer, seed)
  step = training.make_finetune_step(task["ft_apply"], task["base_apply"], task["reward_fn"], cfg, optimizer,
                                     task["x_shape"], None, 0.0, cond_fn=task["cond_fn"],
                                     objective=lambda *a, mesh=None: objective(*a))
  t0 = time.perf_counter()
  compiled = step.lower(state, task["base_params"]).compile()
  compile_s = time.perf_counter() - t0
  try:
    from benchmarks.common import memory_stats
    mem = memory_stats(compiled)
  except ImportError:  # benchmarks/ not on the path
    mem = {}
  passes = network_passes(method, cfg, task["dim"])
  history, wall, reach_step = [], 0.0, None
  for s in range(steps):
    t = time.perf_counter()
    state, m = compiled(state, task["base_params"])
    jax.block_until_ready(state.params)
    if s > 0:  # step 0 includes one-off dispatch costs
      wall += time.perf_counter() - t
    if s % eval_every == 0 or s == steps - 1:
      ev = task["eval"](state.params)
      history.append({"step": s, "wall_s": wall, **{k: float(v) for k, v in m.items() if np.ndim(v) == 0}, **ev})
      if reach_step is None and math.isfinite(ev["reward"]) and ev["reward"] >= task["reach"]:
        reach_step = (s, wall)
      print(f"[{name}] step {s:4d} wall {wall:6.1f}s " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()), flush=True)
  final = task["final_eval"](state.params)
  per_step = wall / max(steps - 1, 1)
  row = {"name": name, "method": method, "steps": steps, "batch_size": task["x_shape"][0], **final,
         "train_seconds": wall, "ms_per_step": 1e3 * per_step, "compile_seconds": compile_s,
         "peak_memory_mb": mem.get("total_bytes", float("nan")) / 2**20, "nfe_per_step": passes["total"],
         "nfe_forward": passes["forward"], "nfe_backward": passes["backward"],
         "reach_step": reach_step[0] if reach_step else None, "reach_seconds": reach_step[1] if reach_step else None,
         "reach_nfe": (reach_step[0] + 1) * passes["total"] if reach_step else None,
         "history": history}
  print(name, json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)
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


def main(_):
  task_name = FLAGS.task
  workdir = FLAGS.workdir or f"runs/compare_{task_name}"
  out_json = os.path.join(workdir, f"compare_{task_name}.json")
  if FLAGS.replot:
    with open(out_json) as f:
      saved = json.load(f)
  else:
    defaults = {"toy2d": (600, 256, 50, 1.0), "digits": (120, 16, 20, 8.0)}[task_name]
    steps, batch, eval_every, lam = (FLAGS.steps or defaults[0], FLAGS.batch_size or defaults[1],
                                     FLAGS.eval_every or defaults[2], FLAGS.lam or defaults[3])
    task = (toy2d_task(lam, batch, FLAGS.seed) if task_name == "toy2d"
            else digits_task(lam, batch, FLAGS.seed, FLAGS.digits_config))
    if FLAGS.eam_max_log_weight:
      task.setdefault("method_overrides", {})["eam_max_log_weight"] = FLAGS.eam_max_log_weight
    names = FLAGS.runs or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
      raise ValueError(f"--runs: unknown run names {unknown}; choose from {list(RUNS)}.")
    rows = [run_one(task, n, steps, eval_every, FLAGS.seed) for n in names]
    meta = {"task": task_name, "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()} CPU x{os.cpu_count()}" if jax.default_backend() == "cpu"
            else jax.devices()[0].device_kind, "jax": jax.__version__, "steps": steps, "batch_size": batch,
            "lambda": lam, "seed": FLAGS.seed, "reach": task["reach"], "reference": task["reference"],
            "method_overrides": task.get("method_overrides", {})}
    saved = {"meta": meta, "runs": rows}
    os.makedirs(workdir, exist_ok=True)
    with open(out_json, "w") as f:
      json.dump(saved, f, indent=1)
  md = markdown(saved)
  with open(os.path.join(workdir, f"compare_{task_name}.md"), "w") as f:
    f.write(f"Settings: {json.dumps(saved['meta'])}\n\n" + md)
  plot(saved, os.path.join(workdir, f"compare_{task_name}.png"))
  print(md)


if __name__ == "__main__":
  define_flags()
  app.run(main)
