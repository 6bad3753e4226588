"""Adjoint Matching as an SOC solver vs the discrete / continuous adjoint methods, on the SOC-matching benchmarks.

    python -m experiments.soc --config=configs/soc_linear_ou.py --workdir=runs/soc_linear_ou

Each method trains the same control net (``am_jax.models.MLP`` on (x, time_scale * t), widths from the config, zero-initialised
output so every method starts at u = 0) with optax Adam; one training step (sampling, adjoint, loss, gradient,
update) is one ``jax.jit`` call.  Every ``eval_every`` iterations the control is evaluated on a fixed batch of
``eval_batch_size`` paths (same key for every evaluation and method: common random numbers):
L2 error E int |u - u*|^2 dt and control objective E[J] (with standard errors), see ``am_jax.soc``.

Writes to --workdir:
  metrics.jsonl  one line per evaluation: method, iteration, train_seconds (excl. compile and evaluation), ...
  metrics.json   final summary per method + the objective of u* and of u = 0 on the same paths
  l2_error.png   L2 error vs iteration and vs training seconds (log scale), one line per method
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging
import jax
import matplotlib
import optax
from flax import nnx
from ml_collections import config_flags

from am_jax import models, soc

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/soc_*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created).")

LOSSES = {
    "am": soc.am_soc_objective,
    "discrete_adjoint": soc.discrete_adjoint_loss,
    "continuous_adjoint": soc.continuous_adjoint_loss,
}


def make_optimizer(config):
  if config.lr_schedule == "cosine":
    lr = optax.cosine_decay_schedule(config.learning_rate, config.num_iterations, alpha=config.get("lr_final_fraction", 0.1))
  elif config.lr_schedule == "constant":
    lr = config.learning_rate
  else:
    raise ValueError(f"Unknown lr_schedule {config.lr_schedule!r}.")
  chain = [optax.clip_by_global_norm(config.grad_clip)] if config.get("grad_clip") else []
  return optax.chain(*chain, optax.adam(lr))


def train_method(method: str, problem: soc.SOCProblem, config, write_record):
  """Trains one method; returns its list of evaluation records."""
  net = models.MLP(problem.dim, hidden=tuple(config.hidden), zero_init_output=True, rngs=nnx.Rngs(config.seed))
  net_apply, params = models.functional(net)
  # models.MLP embeds t with sinusoids of 1000 t (DDPM step-index scale); time_scale < 1 makes the time
  # features smooth over [0, T] (right for the OU problems), 1 keeps the sharp ones (double well: u* varies
  # on the scale of one step just before T).
  time_scale = config.get("time_scale", 1.0)

  def apply_fn(p, x, t):
    return net_apply(p, x, time_scale * t)

  opt = make_optimizer(config)
  opt_state = opt.init(params)
  loss_fn = LOSSES[method]
  eval_key = jax.random.PRNGKey(config.eval_seed)

  @jax.jit
  def train_step(params, opt_state, key):
    (loss, _), grads = jax.value_and_grad(
        lambda p: loss_fn(apply_fn, p, problem, key, config.batch_size), has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def evaluate(params):
    return soc.evaluate_control(problem, apply_fn, params, problem.u_star, eval_key, config.eval_batch_size)

  records, key = [], jax.random.PRNGKey(config.seed + 1)
  train_seconds, compile_seconds, loss = 0.0, 0.0, float("nan")
  n_iter = config.num_iterations
  budget = config.get("time_budget_s", 0) or float("inf")
  target = config.l2_target

  def log_eval(it):
    stats = {k: float(v) for k, v in evaluate(params).items()}
    rec = dict(method=method, iteration=it, train_seconds=train_seconds, loss=float(loss), **stats)
    records.append(rec)
    write_record(rec)
    rate = train_seconds / max(it - 1, 1)
    eta = rate * (n_iter - it)
    logging.info("[%s] it %5d/%d  L2 %.3e  J %.4f +- %.4f  loss %.3e  train %.1fs  ETA %.0fs", method, it, n_iter,
                 stats["l2_error"], stats["objective"], stats["objective_se"], float(loss), train_seconds, eta)

  log_eval(0)
  it = 0
  while it < n_iter and train_seconds < budget:
    segment = min(config.eval_every - it % config.eval_every, n_iter - it)
    start = time.perf_counter()
    for _ in range(segment):
      key, sub = jax.random.split(key)
      params, opt_state, loss = train_step(params, opt_state, sub)
      it += 1
      if it == 1:
        # The first call compiles; keep it out of the training clock.
        jax.block_until_ready(params)
        compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
    jax.block_until_ready(params)
    train_seconds += time.perf_counter() - start
    log_eval(it)
  for rec in records:
    rec["compile_seconds"] = compile_seconds
  return records


def summarise(records, target):
  last = records[-1]
  best = min(records, key=lambda r: r["l2_error"])
  hit = next((r for r in records if r["l2_error"] <= target), None)
  n_trained = max(last["iteration"] - 1, 1)
  return {
      "final_iteration": last["iteration"], "final_l2_error": last["l2_error"], "final_l2_error_se": last["l2_error_se"],
      "final_objective": last["objective"], "final_objective_se": last["objective_se"],
      "best_l2_error": best["l2_error"], "best_iteration": best["iteration"], "best_train_seconds": best["train_seconds"],
      "l2_target": target, "reached_target": hit is not None,
      "target_iteration": hit["iteration"] if hit else None, "target_train_seconds": hit["train_seconds"] if hit else None,
      "train_seconds": last["train_seconds"], "compile_seconds": last["compile_seconds"],
      "seconds_per_iteration": last["train_seconds"] / n_trained,
  }


def plot(records_by_method, path, title):
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for method, recs in records_by_method.items():
    its = [r["iteration"] for r in recs]
    secs = [r["train_seconds"] for r in recs]
    l2 = [r["l2_error"] for r in recs]
    axes[0].plot(its, l2, label=method, marker=".")
    axes[1].plot(secs, l2, label=method, marker=".")
  for ax, xlabel in zip(axes, ["iteration", "training seconds (excl. compile/eval)"]):
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("L2 error  E int |u - u*|^2 dt")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  if workdir is None:
    raise app.UsageError("--workdir is required.")
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  problem = soc.get_problem(config.problem)
  setup_seconds = time.perf_counter() - t0
  logging.info("problem %s: d=%d K=%d (setup incl. reference solve %.1fs); methods %s", problem.name, problem.dim,
               problem.num_steps, setup_seconds, list(config.methods))
  jsonl_path = os.path.join(workdir, "metrics.jsonl")
  open(jsonl_path, "w").close()

  def write_record(rec):
    with open(jsonl_path, "a") as fh:
      fh.write(json.dumps(rec) + "\n")

  # The exact control and u = 0 on the evaluation paths: the objective's reference values.
  eval_key = jax.random.PRNGKey(config.eval_seed)
  reference = {}
  for name, control in [("u_star", soc.reference_as_control(problem.u_star)), ("zero", soc.zero_control)]:
    stats = jax.jit(lambda: soc.evaluate_control(problem, control, None, problem.u_star, eval_key,
                                                 config.eval_batch_size))()
    reference[name] = {k: float(v) for k, v in stats.items()}
  logging.info("reference: J(u*) = %.4f +- %.4f,  J(0) = %.4f +- %.4f,  L2(0) = %.3e", reference["u_star"]["objective"],
               reference["u_star"]["objective_se"], reference["zero"]["objective"], reference["zero"]["objective_se"],
               reference["zero"]["l2_error"])

  records_by_method, summary = {}, {}
  for method in config.methods:
    if method not in LOSSES:
      raise ValueError(f"Unknown method {method!r}; expected one of {list(LOSSES)}.")
    records_by_method[method] = train_method(method, problem, config, write_record)
    summary[method] = summarise(records_by_method[method], config.l2_target)
    logging.info("[%s] done: %s", method, json.dumps(summary[method]))
  out = {"problem": problem.name, "config": config.to_dict(), "setup_seconds": setup_seconds,
         "reference": reference, "methods": summary, "devices": str(jax.devices()),
         "total_seconds": time.perf_counter() - t0}
  with open(os.path.join(workdir, "metrics.json"), "w") as fh:
    json.dump(out, fh, indent=2)
  plot(records_by_method, os.path.join(workdir, "l2_error.png"), f"{problem.name}: control L2 error")
  logging.info("wrote %s (total %.0fs)", workdir, out["total_seconds"])


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
