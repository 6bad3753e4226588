r"""Every fine-tuning method of ``am_jax.methods`` on the exact 1-D problem: table + reward-vs-wall-clock plot.

    python -m experiments.compare_toy --workdir=runs/compare_toy

Base 0.5 N(-1, 0.3^2) + 0.5 N(1, 0.3^2) (exact velocity), reward r(x) = x, lambda = 1; the exact target
p_base e^{r} / Z has right-mode mass 0.881 and mean reward 0.852.  Every run uses the same model (base +
zero-initialised (64, 64) MLP, control parameterisation), Adam 1e-3, batch 512, the same seed and number
of steps (``toy.finetune_mixture``); only the objective changes (``methods.build``).  Every ``eval_every`` steps
the model is sampled with the ODE on the training grid (K = 40, ``eval_samples`` samples, fixed key) and
its W1 to the exact target CDF, mean reward and right-mode mass are recorded; evaluation time is not
counted in the wall-clock.  The final numbers use ``toy.evaluate_against_target`` (20k ODE samples).

Extra rows (``--diagnostics``): EAM (importance-weighted and unweighted) and AM started at the exact target
and at a wrongly weighted target (right-mode mass 0.6), EAM on a unimodal Gaussian base, and the
deterministic-control reference (per-trajectory optimal open-loop controls) that deterministic_am should converge to.

Writes to --workdir: compare_toy.json (everything, with histories), compare_toy.md (the table),
compare_toy.png (reward and W1 vs training wall-clock).  ~15 min on 2 CPU cores with the defaults.
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

from am_jax import gmm, losses, methods, metrics, rewards, sampling, toy

flags.DEFINE_string("workdir", "runs/compare_toy", "Where the JSON, markdown table and PNG go.")
flags.DEFINE_integer("steps", 1000, "Fine-tuning steps per run.")
flags.DEFINE_integer("batch_size", 512, "Trajectories / samples per step.")
flags.DEFINE_integer("seed", 0, "Seed (same for every run).")
flags.DEFINE_integer("eval_every", 50, "Evaluate (ODE samples, W1, reward) every this many steps.")
flags.DEFINE_integer("eval_samples", 4096, "ODE samples per intermediate evaluation.")
flags.DEFINE_list("runs", None, "Subset of run names to do (default: all; '' = none, diagnostics only).")
flags.DEFINE_bool("diagnostics", True, "Also do the EAM fixed-point / unimodal and deterministic reference rows.")
flags.DEFINE_bool("replot", False, "Only rebuild the PNG and markdown from an existing compare_toy.json in --workdir.")
FLAGS = flags.FLAGS

LAMBDA = 1.0
REACH_W1 = 0.15  # W1 to the exact target below which a run "reaches" it (AM family: 0.05-0.11) ...
REACH_MASS = 0.08  # ... and |right-mode mass - target| below this (AM family 0.83-0.89 vs 0.881)


AM_CONFIG = losses.AMConfig(loss_clip=None, reward_multiplier=LAMBDA)  # shared by every run: K = 40, memoryless

# name -> (method, options of its factory): the comparison rows, ``methods.build(method, AM_CONFIG, **options)``.
RUNS = {
    "am": ("am", {}),
    "basic_am": ("basic_am", {}),
    "continuous_adjoint": ("continuous_adjoint", {}),
    "discrete_adjoint": ("discrete_adjoint", {}),
    "eam": ("eam", {}),
    "eam_unweighted": ("eam", {"weights": "none"}),
    # EAM sampler / variance ablations (docs/eam.md (g)).
    "eam_uniform_grid": ("eam", {"time_power": 1.0}),
    "eam_64_times": ("eam", {"num_times": 64}),
    "am_const_sigma_0.2": ("am_const_sigma", {"sigma": 0.2}),
    "am_const_sigma_1.0": ("am_const_sigma", {"sigma": 1.0}),
    "draft_k1": ("draft", {"k": 1}),
    "refl": ("refl", {}),
    "deterministic_am_kinetic": ("deterministic_am", {"regulariser": "kinetic", "truncation": 0.25}),
    "deterministic_am_kl": ("deterministic_am", {"regulariser": "kl", "truncation": 0.25}),
    "deterministic_am_power4": ("deterministic_am", {"regulariser": "power", "regulariser_power": 4.0,
                                                     "truncation": 0.25}),
}
DETERMINISTIC = [name for name, (method, _) in RUNS.items() if method == "deterministic_am"]


def _make_eval(target, am: losses.AMConfig, num_samples: int, seed: int = 123):
  """eval_fn(apply_fn, params) -> dict(eval_w1, eval_reward, eval_mass): ODE samples on the training grid."""
  cache = {}

  def eval_fn(apply_fn, params):
    if "sample" not in cache:  # compile once per run
      cache["sample"] = jax.jit(lambda p: sampling.sample(apply_fn, p, jax.random.PRNGKey(seed), (num_samples, 1),
                                                          am.schedule, "ode", am.num_steps, am.time_offset))
    xs = np.asarray(cache["sample"](params))
    if not np.all(np.isfinite(xs)):
      return {"eval_w1": float("nan"), "eval_reward": float("nan"), "eval_mass": float("nan")}
    return {"eval_w1": metrics.wasserstein1_to_cdf(xs, lambda z: np.asarray(gmm.cdf_1d(target, z))),
            "eval_reward": float(np.mean(xs)), "eval_mass": float(metrics.mode_mass(xs, target.means)[-1])}

  return eval_fn


def _finite(x):
  return x is not None and isinstance(x, float) and math.isfinite(x)


def _run(name, method, options, base, target, reward_fn, *, init=None, steps=None):
  steps = steps or FLAGS.steps
  eval_fn = _make_eval(target, AM_CONFIG, FLAGS.eval_samples)
  t0 = time.perf_counter()
  res = toy.finetune_mixture(base, reward_fn, AM_CONFIG, objective=methods.build(method, AM_CONFIG, **options),
                             steps=steps, batch_size=FLAGS.batch_size, learning_rate=1e-3, seed=FLAGS.seed, init=init,
                             log_every=FLAGS.eval_every, eval_fn=eval_fn,
                             log_fn=lambda s: print(f"[{name}] {s}", flush=True))
  total = time.perf_counter() - t0
  ev = toy.evaluate_against_target(res, target, diffusion="ode")
  hist = [{"step": int(k), **v} for k, v in sorted(res.history.items())]
  finite = [h for h in hist if _finite(h.get("eval_w1"))]
  best = min(finite, key=lambda h: h["eval_w1"]) if finite else None
  diverged = next((h["step"] for h in hist if not _finite(h.get("eval_w1"))), None)
  xs = np.asarray(ev["samples"])
  ok = np.all(np.isfinite(xs))
  row = {
      "name": name, "method": method, "steps": steps, "batch_size": FLAGS.batch_size,
      "w1": ev["distance_to_cdf"] if ok else float("nan"),
      "right_mass": ev["mode_mass"][-1] if ok else float("nan"),
      "target_right_mass": ev["target_mass"][-1],
      "reward": float(np.mean(xs)) if ok else float("nan"),
      "best_w1": best["eval_w1"] if best else float("nan"), "best_step": best["step"] if best else None,
      "diverged_at": diverged, "train_seconds": res.seconds, "total_seconds": total,
      "seconds_per_step": res.seconds / max(steps - 1, 1),
      "reaches_target": bool(ok and ev["distance_to_cdf"] < REACH_W1
                             and abs(ev["mode_mass"][-1] - ev["target_mass"][-1]) < REACH_MASS),
      "history": hist,
  }
  print(name, json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)
  return row, xs


def _fmt(x, nd=3):
  return "diverged" if not _finite(x) else f"{x:.{nd}f}"


def _markdown(rows, extra, target_reward):
  lines = ["| run | method | W1 to target | right-mode mass (target 0.881) | reward (target "
           f"{target_reward:.3f}) | best W1 along run (step) | reaches target | steps | train s | ms/step |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    best = f"{_fmt(r['best_w1'])} ({r['best_step']})" if r["best_step"] is not None else "-"
    div = f" (NaN from step {r['diverged_at']})" if r["diverged_at"] is not None else ""
    lines.append(f"| {r['name']} | {r['method']} | {_fmt(r['w1'])}{div} | {_fmt(r['right_mass'])} | "
                 f"{_fmt(r['reward'])} | {best} | {'yes' if r['reaches_target'] else 'no'} | {r['steps']} | "
                 f"{r['train_seconds']:.1f} | {1e3 * r['seconds_per_step']:.1f} |")
  if extra:
    lines += ["", "| diagnostic | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in extra.items()]
  return "\n".join(lines) + "\n"


def _plot(rows, target_reward, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
  colors = plt.get_cmap("tab20").colors
  for i, r in enumerate(rows):
    h = [x for x in r["history"] if _finite(x.get("eval_reward"))]
    if not h:
      continue
    wall = [x["wall_s"] for x in h]
    style = "-" if r["reaches_target"] else "--"
    axes[0].plot(wall, [x["eval_reward"] for x in h], style, color=colors[i % 20], label=r["name"])
    axes[1].plot(wall, [x["eval_w1"] for x in h], style, color=colors[i % 20], label=r["name"])
  axes[0].axhline(target_reward, color="k", lw=1, ls=":", label="exact tilted target")
  axes[0].set_ylim(-0.2, 2.0)
  axes[0].set_ylabel("mean reward of ODE samples")
  axes[1].set_yscale("log")
  axes[1].set_ylim(0.03, 3.0)  # DRaFT / ReFL leave the plot upwards: they diverge (NaN by step 250)
  axes[1].set_ylabel("W1 to exact tilted target")
  for ax in axes:
    ax.set_xlabel("training wall-clock [s] (2-core CPU, compile + eval excluded)")
  axes[1].legend(fontsize=7, ncol=2)
  fig.suptitle("1-D exact problem: 0.5 N(-1, .3^2) + 0.5 N(1, .3^2), r(x) = x  (solid: reaches the target)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def _diagnostics(base, target, reward_fn):
  """EAM fixed point and mode-weight neutrality; EAM on a unimodal base; deterministic_am reference."""
  out, rows = {}, []
  wrong = gmm.GaussianMixture(jnp.array([0.4, 0.6]), target.means, target.covs)
  for run in ("eam", "eam_unweighted", "am"):
    for label, init in (("from_target", target), ("from_mass_0.6", wrong)):
      method, options = RUNS[run]
      row, _ = _run(f"{run}_{label}", method, options, base, target, reward_fn, init=init)
      rows.append(row)
  # Unimodal base N(-0.5, 0.5^2), reward 2x: target N(0, 0.5^2); no mode weights to move.
  uni = gmm.make_mixture([1.0], [[-0.5]], [0.5])
  uni_target = gmm.tilt_linear(uni, 2.0)
  for method in ("eam", "am"):
    row, _ = _run(f"{method}_unimodal", method, RUNS[method][1], uni, uni_target, rewards.linear_reward(2.0))
    rows.append(row)
  # What deterministic_am converges to: per-trajectory optimal open-loop deterministic control.
  for name in DETERMINISTIC:
    x0 = jax.random.normal(jax.random.PRNGKey(7), (10000, 1))
    ref = np.asarray(methods.deterministic_reference_samples(toy.mixture_base(base, AM_CONFIG.schedule), base,
                                                             reward_fn, x0, AM_CONFIG, **RUNS[name][1],
                                                             iterations=400))
    w1 = metrics.wasserstein1_to_cdf(ref, lambda z: np.asarray(gmm.cdf_1d(target, z)))
    out[f"{name}: reference W1 to tilted target"] = f"{w1:.3f}"
    out[f"{name}: reference right-mode mass"] = f"{metrics.mode_mass(ref, target.means)[1]:.3f}"
    out[f"{name}: reference mean reward"] = f"{float(np.mean(ref)):.3f}"
    out[f"_{name}_reference"] = ref
  return out, rows


def _replot():
  with open(os.path.join(FLAGS.workdir, "compare_toy.json")) as f:
    saved = json.load(f)
  meta = saved["meta"]
  md = _markdown(saved["runs"] + saved["diagnostic_runs"], saved["diagnostics"], meta["target_reward"])
  with open(os.path.join(FLAGS.workdir, "compare_toy.md"), "w") as f:
    f.write(f"Settings: {json.dumps(meta)}\n\n" + md)
  _plot(saved["runs"], meta["target_reward"], os.path.join(FLAGS.workdir, "compare_toy.png"))
  print(md)


def main(_):
  if FLAGS.replot:
    return _replot()
  base = gmm.bimodal_1d()
  target = gmm.tilt_linear(base, LAMBDA)
  reward_fn = rewards.linear_reward(1.0)  # raw r(x) = x; lambda is AM_CONFIG.reward_multiplier
  target_reward = float(jnp.sum(target.weights * target.means[:, 0]))
  names = list(RUNS) if FLAGS.runs is None else [n for n in FLAGS.runs if n]
  rows, samples = [], {}
  for name in names:
    method, options = RUNS[name]
    row, xs = _run(name, method, options, base, target, reward_fn)
    rows.append(row)
    samples[name] = xs
  extra, diag_rows = ({}, [])
  if FLAGS.diagnostics:
    extra, diag_rows = _diagnostics(base, target, reward_fn)
    for name in DETERMINISTIC:
      ref = extra.pop(f"_{name}_reference")
      if name in samples and np.all(np.isfinite(samples[name])):
        extra[f"{name}: W1(model, reference)"] = f"{metrics.wasserstein1_1d(samples[name], ref):.3f}"
  meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
          "jax": jax.__version__, "steps": FLAGS.steps, "batch_size": FLAGS.batch_size, "seed": FLAGS.seed,
          "lambda": LAMBDA, "target_right_mass": float(target.weights[1]), "target_reward": target_reward,
          "reach_w1": REACH_W1, "reach_mass": REACH_MASS}
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, "compare_toy.json"), "w") as f:
    json.dump({"meta": meta, "runs": rows, "diagnostic_runs": diag_rows, "diagnostics": extra}, f, indent=1)
  md = _markdown(rows + diag_rows, extra, target_reward)
  with open(os.path.join(FLAGS.workdir, "compare_toy.md"), "w") as f:
    f.write(f"Settings: {json.dumps(meta)}\n\n" + md)
  _plot(rows, target_reward, os.path.join(FLAGS.workdir, "compare_toy.png"))
  print(md)


if __name__ == "__main__":
  app.run(main)
