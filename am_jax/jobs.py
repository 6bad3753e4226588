"""Whole runs behind the launchers: pre-training and fine-tuning with checkpoints, logs and evaluation.

``pretrain(cfg, workdir)`` and ``finetune(cfg, workdir)`` are what ``am-jax pretrain|finetune`` (and
``python -m experiments.pretrain|finetune``) run: the launchers only parse flags.  Both resume from the
latest checkpoint in ``workdir`` (bit-identical: every step's key is ``fold_in(rng, step)``), print
"resuming from step N", and a rerun of a finished job says so and leaves its metrics intact.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from am_jax import builders, checkpointing, data as data_lib, gmm as gmm_lib, metrics as metrics_lib
from am_jax import reporting, sampling, sharding, training
from am_jax.problem import Problem

__all__ = ["pretrain", "finetune", "evaluate", "dataset", "build_finetune_problem"]


def dataset(cfg) -> tuple:
  """(x,) for the 2-D toys, (x, labels) for labelled images (the training split)."""
  d = cfg.data
  if d.name == "digits":
    return data_lib.digits("train")
  if d.name == "mnist":
    return data_lib.mnist("train")
  kwargs = {k: d[k] for k in ("num_components", "radius", "std") if k in d}
  return (data_lib.toy_2d(d.name, d.num_samples, seed=cfg.seed, **kwargs),)


def _finished(workdir: str, steps: int, latest: Optional[int], what: str) -> Optional[dict]:
  """The stored summary when the job in ``workdir`` already ran all ``steps`` (printing so), else None."""
  path = os.path.join(workdir, "metrics.json")
  if latest is not None and latest >= steps and os.path.isfile(path):
    with open(path) as f:
      summary = json.load(f)
    reporting.info(f"[{what}] {workdir}: already finished at step {latest}; metrics kept (delete the workdir "
                   "to start again).")
    return summary
  return None


def pretrain(cfg, workdir: str, stop_after: Optional[int] = None) -> dict:
  """Trains (or resumes) a base with flow matching; returns the summary written to ``metrics.json``.

  ``stop_after``: stop abruptly after that many steps without the final save (tests of resuming).
  """
  builders.validate_pretrain(cfg)
  mesh = sharding.make_mesh(cfg.mesh.num_devices)
  sharding.check_batch_divisible(cfg.pretrain.batch_size, mesh, "pretrain.batch_size")
  schedule = builders.build_schedule(cfg)
  pc = cfg.pretrain
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), pc.checkpoint.max_to_keep,
                                    pc.checkpoint.every_steps)
  done_summary = _finished(workdir, pc.steps, ckpt.latest_step(), "pretrain")
  if done_summary is not None:
    ckpt.close()
    return done_summary
  data = dataset(cfg)
  apply_fn, params = builders.build_model(cfg, data[0].shape[1:], cfg.seed)
  optimizer = builders.build_optimizer(cfg, "pretrain.optimizer", pc.steps)
  state = training.init_state(params, optimizer, cfg.seed)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(None, state, mesh)
  else:
    state = sharding.replicate_tree(state, mesh)
  start = int(sharding.to_local(state.step))
  if start:
    reporting.info(f"[pretrain] resuming from step {start}")
  labelled = len(data) > 1 and cfg.model.num_classes > 0
  step_fn = training.make_pretrain_step(apply_fn, schedule, optimizer, pc.batch_size, mesh, pc.ema_decay,
                                        cond_drop_prob=pc.get("cond_drop_prob", 0.0) if labelled else 0.0,
                                        null_label=cfg.model.num_classes)
  data_dev = sharding.replicate_tree(data if labelled else data[:1], mesh)
  writer = reporting.MetricsWriter(workdir, start_step=start)
  progress = reporting.Progress("pretrain", pc.steps, start)
  cfg_dict = cfg.to_dict()
  done = start
  for s in range(start, pc.steps):
    state, m = step_fn(state, data_dev)
    done = s + 1
    ckpt.save(done, state, cfg_dict)
    if done % pc.log_every == 0 or done == pc.steps or done == start + 1:
      m = {k: float(v) for k, v in sharding.to_local(m).items()}
      writer.write(done, dict(m, **progress.tick(done, m)))
    if stop_after is not None and done >= stop_after:
      ckpt.close()  # simulated crash: no final save; a rerun resumes and replays the lost steps
      return {"step": done, "stopped_early": True}
  if done > start and ckpt.latest_step() != done:
    ckpt.save(done, state, cfg_dict, force=True)
  ckpt.close()
  summary = {"step": done}
  if data[0].ndim == 2 and data[0].shape[1] == 2:
    summary.update(evaluate_base_2d(cfg, apply_fn, sharding.to_local(training.eval_params(state, pc.ema_decay))))
  writer.final(summary)
  return summary


def evaluate_base_2d(cfg, apply_fn, params, num_samples: int = 20_000) -> dict:
  """Sliced W1 between ODE samples of a 2-D base (training grid of cfg.am) and fresh data samples."""
  schedule = builders.build_schedule(cfg)
  xs = jax.jit(lambda p, k: sampling.sample(apply_fn, p, k, (num_samples, 2), schedule, "ode", cfg.am.num_steps,
                                            cfg.am.time_offset))(params, jax.random.PRNGKey(cfg.seed + 123))
  xs = np.asarray(xs)
  exact = builders.exact_data_mixture(cfg)
  if exact is not None:
    ref = np.asarray(gmm_lib.sample(exact, jax.random.PRNGKey(cfg.seed + 7), num_samples))
    ref2 = np.asarray(gmm_lib.sample(exact, jax.random.PRNGKey(cfg.seed + 8), num_samples))
  else:
    d = cfg.data
    ref = data_lib.toy_2d(d.name, num_samples, seed=cfg.seed + 7, std=d.get("std", 0.05))
    ref2 = data_lib.toy_2d(d.name, num_samples, seed=cfg.seed + 8, std=d.get("std", 0.05))
  return {"base_to_data_sliced_w1": metrics_lib.sliced_wasserstein1(xs, ref),
          "data_noise_floor_sliced_w1": metrics_lib.sliced_wasserstein1(ref2, ref)}


def build_finetune_problem(cfg, workdir: str, mesh=None) -> Problem:
  """Validates ``cfg``, pre-trains a base into ``<workdir>/base`` when ``base_checkpoint`` is empty,
  loads the base and builds the ``Problem``."""
  num_devices = None if mesh is None else sharding.num_devices(mesh)
  builders.validate_finetune(cfg, num_devices)
  if not cfg.get("base_checkpoint", "") and cfg.model.kind != "exact":
    base_dir = os.path.join(workdir, "base")
    pretrain(cfg, base_dir)
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.base_checkpoint = base_dir
  base_apply, base_params = builders.load_base(cfg, mesh)
  problem = builders.build_problem(cfg, base_apply, base_params)
  problem.check_shapes(int(cfg.finetune.batch_size))
  return problem


def finetune(cfg, workdir: str, stop_after: Optional[int] = None, return_state: bool = False):
  """Runs (or resumes) a fine-tuning job; returns the summary written to ``metrics.json``.

  ``stop_after``: stop abruptly after that many steps (no final save; tests of resuming).
  ``return_state``: also return the final TrainState and the Problem (``(summary, state, problem)``).
  """
  t_start = time.perf_counter()
  builders.validate_finetune(cfg)  # every field, before any device or file work
  mesh = sharding.make_mesh(cfg.mesh.num_devices)
  fc = cfg.finetune
  problem = build_finetune_problem(cfg, workdir, mesh)
  objective = builders.build_method(cfg, problem.config)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint.max_to_keep,
                                    cfg.checkpoint.every_steps, cfg.checkpoint.get("async_save", True))
  done_summary = _finished(workdir, fc.steps, ckpt.latest_step(), "finetune")
  if done_summary is not None and not return_state:
    ckpt.close()
    return done_summary
  optimizer = builders.build_optimizer(cfg, "finetune.optimizer", fc.steps)
  state = training.init_state(problem.init_params, optimizer, cfg.seed)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(None, state, mesh)
  else:
    state = sharding.replicate_tree(state, mesh)
  start = int(sharding.to_local(state.step))
  if 0 < start < fc.steps:
    reporting.info(f"[finetune] resuming from step {start}")
  base_params = sharding.replicate_tree(problem.base_params, mesh)
  step_fn = training.make_finetune_step(problem, objective, optimizer, fc.batch_size, mesh, fc.ema_decay)
  writer = reporting.MetricsWriter(workdir, start_step=start)
  progress = reporting.Progress("finetune", fc.steps, start)
  watch = _reward_watch(cfg, problem)
  cfg_dict = cfg.to_dict()
  done = start
  t_loop = time.perf_counter()
  for s in range(start, fc.steps):
    state, m = step_fn(state, base_params)
    done = s + 1
    ckpt.save(done, state, cfg_dict)
    if done % fc.log_every == 0 or done == fc.steps or done == start + 1:
      m = {k: float(v) for k, v in sharding.to_local(m).items()}
      if watch is not None and (done % watch.every == 0 or done == fc.steps):
        m.update(watch(sharding.to_local(training.eval_params(state, fc.ema_decay)), done))
      writer.write(done, dict(m, **progress.tick(done, m)))
    if stop_after is not None and done >= stop_after:
      ckpt.close()  # simulated crash: no final save; a rerun resumes from the last committed checkpoint
      return {"step": done, "stopped_early": True}
  loop_seconds = time.perf_counter() - t_loop
  if done > start and ckpt.latest_step() != done:
    ckpt.save(done, state, cfg_dict, force=True)
  ckpt.close()
  summary = dict(done_summary or {}, step=done)
  if done > start:
    summary.update(finetune_loop_seconds=loop_seconds, finetune_steps_per_s=(done - start) / loop_seconds)
  if watch is not None:
    summary.update(watch.summary())
  if done >= fc.steps and done_summary is None:
    final_params = sharding.to_local(training.eval_params(state, fc.ema_decay))
    summary.update(evaluate(cfg, workdir, problem, final_params))
  summary["total_seconds"] = time.perf_counter() - t_start
  if done_summary is None:
    writer.final(summary)
  return (summary, state, problem) if return_state else summary


class _RewardWatch:
  """Every ``eval.every`` steps: training reward, its terms and the gold rewards on a FIXED batch (same
  noise and conditions each time), and the reward-hacking monitor when the problem has gold rewards."""

  def __init__(self, cfg, problem: Problem):
    self.every = int(cfg.eval.every)
    n = int(cfg.eval.get("watch_samples", 256))
    key = jax.random.PRNGKey(cfg.seed + 4242)
    self._report = jax.jit(lambda p: problem.reward_report(*_sample_with_cond(problem, p, key, n)))
    self.monitor = None
    if problem.gold_rewards:
      from am_jax import monitor as monitor_lib
      options = cfg.eval.get("monitor", {}) or {}
      self.monitor = monitor_lib.HackingMonitor(**(options.to_dict() if hasattr(options, "to_dict") else options))

  def __call__(self, params, step: int) -> dict:
    out = {k: float(v) for k, v in self._report(params).items()}
    if self.monitor is not None:
      # Each gold reward watches the trained term of the same name (or the whole training reward).
      gold = {k[len("gold/"):]: v for k, v in out.items() if k.startswith("gold/")}
      trained = {name: out.get(f"reward/{name}", out["reward"]) for name in gold}
      for w in self.monitor.update(step, trained, gold):
        reporting.warn(w)
    return out

  def summary(self) -> dict:
    return self.monitor.state_dict() if self.monitor is not None else {}


def _reward_watch(cfg, problem: Problem):
  if "eval" not in cfg or not cfg.eval.get("every", 0):
    return None
  return _RewardWatch(cfg, problem)


def _sample_with_cond(problem: Problem, params, key, n: int):
  k_cond, k_x = jax.random.split(key)
  cond = tuple(problem.cond_fn(k_cond, n)) if problem.cond_fn is not None else ()
  return problem.sample(params, k_x, n, "ode", cond=cond), cond


def evaluate(cfg, workdir: str, problem: Problem, params) -> dict:
  """Samples base and fine-tuned models (same noise); rewards (terms, gold), distances to the exact target
  when known; ``scatter.png`` for 2-D samples, ``grid.png`` for images."""
  n = int(cfg.eval.num_samples)
  k_steps = int(cfg.eval.get("num_steps", 0)) or problem.config.num_steps
  key = jax.random.PRNGKey(cfg.seed + 99)
  k_cond, k_x = jax.random.split(key)
  cond = tuple(problem.cond_fn(k_cond, n)) if problem.cond_fn is not None else ()
  draw = jax.jit(lambda p, which, diffusion: problem.sample(p, k_x, n, diffusion, k_steps, cond, which),
                 static_argnums=(1, 2))
  samples = {"base_ode": draw(problem.base_params, "base", "ode"), "finetuned_ode": draw(params, "finetuned", "ode"),
             "finetuned_memoryless": draw(params, "finetuned", "memoryless")}
  out = {}
  for name, x in samples.items():
    x = jnp.asarray(x)
    if not bool(jnp.all(jnp.isfinite(x))):
      raise FloatingPointError(f"evaluation: {name} samples are not finite (diverged fine-tuning?).")
    for k, v in problem.reward_report(x, cond).items():
      out[f"{k}_mean_{name}" if k == "reward" else f"{k}/{name}"] = float(v)
  target = problem.exact_target
  target_samples = None
  if target is not None:
    target_samples = np.asarray(gmm_lib.sample(target, jax.random.PRNGKey(cfg.seed + 5), n))
    ref2 = np.asarray(gmm_lib.sample(target, jax.random.PRNGKey(cfg.seed + 6), n))
    out["target_noise_floor_sliced_w1"] = metrics_lib.sliced_wasserstein1(ref2, target_samples)
    out["exact_target_reward_mean"] = float(jnp.mean(problem.reward_fn(jnp.asarray(target_samples))))
    for k, v in samples.items():
      out[f"{k}_to_target_sliced_w1"] = metrics_lib.sliced_wasserstein1(np.asarray(v), target_samples)
  if jax.process_index() == 0:
    from am_jax import plots
    samples = {k: np.asarray(v) for k, v in samples.items()}
    if problem.sample_shape == (2,):
      plots.scatter(os.path.join(workdir, "scatter.png"), samples, target_samples, out)
    elif len(problem.sample_shape) == 3:
      plots.image_grid(os.path.join(workdir, "grid.png"),
                       [("base (ODE)", samples["base_ode"]), ("fine-tuned (ODE)", samples["finetuned_ode"])])
  return out


def load_finetuned(cfg, workdir: str, mesh=None):
  """(problem, params) of the fine-tuning job in ``workdir``: the latest checkpoint's (EMA) params.

  The job's own config (stored with its checkpoints) defines the problem (parameterisation, lambda, ...);
  ``cfg`` is only the fallback for checkpoints written without one.
  """
  import ml_collections
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"No fine-tuning checkpoint in {workdir}/checkpoints: run `am-jax finetune` first.")
    stored = ckpt.restore_config()
    run_cfg = ml_collections.ConfigDict(stored) if stored else cfg
    problem = build_finetune_problem(_with_base(run_cfg, workdir), workdir, mesh)
    optimizer = builders.build_optimizer(run_cfg, "finetune.optimizer", run_cfg.finetune.steps)
    state = ckpt.restore(None, training.init_state(problem.init_params, optimizer, run_cfg.seed), mesh)
  finally:
    ckpt.close()
  return problem, sharding.to_local(training.eval_params(state, run_cfg.finetune.ema_decay))


def _with_base(cfg, workdir: str):
  """``cfg`` with ``base_checkpoint`` pointing at ``<workdir>/base`` when the job pre-trained its own base."""
  if cfg.get("base_checkpoint", "") or cfg.model.kind == "exact":
    return cfg
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.base_checkpoint = os.path.join(workdir, "base")
  return cfg


def parse_diffusion(text: str):
  """'ode' | 'memoryless' | a finite constant sigma >= 0 (ValueError naming --diffusion otherwise)."""
  if text in ("ode", "memoryless"):
    return text
  try:
    value = float(text)
  except ValueError:
    raise ValueError(f"--diffusion={text!r}: must be 'ode', 'memoryless' or a constant sigma >= 0.") from None
  if not np.isfinite(value) or value < 0:
    raise ValueError(f"--diffusion={text!r}: a constant sigma must be finite and >= 0.")
  return value


def sample(cfg, workdir: str, diffusion: str = "ode", num_samples: int = 10_000, num_steps: int = 0,
           which: str = "finetuned", seed: int = 0) -> dict:
  """Samples the fine-tuned (or base) model of ``workdir``; writes ``samples_<which>_<diffusion>.npz/.json``
  (mean reward, sliced W1 to the exact target where known) and a scatter PNG for 2-D samples."""
  diffusion = parse_diffusion(str(diffusion))
  if num_samples <= 0 or num_steps < 0:
    raise ValueError(f"--num_samples={num_samples} must be > 0 and --num_steps={num_steps} >= 0.")
  mesh = sharding.make_mesh(cfg.mesh.num_devices)
  if which == "base":
    problem, params = build_finetune_problem(_with_base(cfg, workdir), workdir, mesh), None
  else:
    problem, params = load_finetuned(cfg, workdir, mesh)
  k = num_steps or problem.config.num_steps
  key = jax.random.PRNGKey(seed)
  k_cond, _ = jax.random.split(key)
  cond = tuple(problem.cond_fn(k_cond, num_samples)) if problem.cond_fn is not None else ()
  xs = jax.jit(lambda p: problem.sample(p, key, num_samples, diffusion, k, cond=cond, which=which))(params)
  xs = np.asarray(xs)
  if not np.all(np.isfinite(xs)):
    raise FloatingPointError(f"sample: the {which} model produced non-finite samples.")
  out = {"which": which, "diffusion": str(diffusion), "num_steps": k}
  out.update({f"{n}_mean" if n == "reward" else n: float(v)
              for n, v in problem.reward_report(jnp.asarray(xs), cond).items()})
  target = problem.exact_target
  if target is not None:
    ref = np.asarray(gmm_lib.sample(target, jax.random.PRNGKey(seed + 1), num_samples))
    out["to_target_sliced_w1"] = metrics_lib.sliced_wasserstein1(xs, ref)
  if jax.process_index() == 0:
    stem = os.path.join(workdir, f"samples_{which}_{diffusion}")
    np.savez_compressed(stem + ".npz", samples=xs)
    with open(stem + ".json", "w") as f:
      json.dump(out, f, indent=2)
    from am_jax import plots
    if xs.ndim == 2 and xs.shape[1] == 2:
      plots.scatter_one(stem + ".png", xs, f"{which}, {diffusion}, K={k}")
    elif xs.ndim == 4:
      plots.image_grid(stem + ".png", [(f"{which}, {diffusion}, K={k}", xs)])
  return out
