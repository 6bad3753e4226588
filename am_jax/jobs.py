"""Whole runs behind the launchers: pre-training and fine-tuning with checkpoints, logs and evaluation.

``pretrain(cfg, workdir)`` and ``finetune(cfg, workdir)`` are what ``am-jax pretrain|finetune`` (and
``python -m experiments.pretrain|finetune``) run: the launchers only parse flags.  Both resume from the
latest checkpoint in ``workdir`` (bit-identical: every step's key is ``fold_in(rng, step)``), print
"resuming from step N", and a rerun of a finished job says so and leaves its metrics intact.

Reliability (docs/training_system.md, "Reliability"): the newest checkpoint that verifies is restored (others
are rejected with a message), a resume with a config that changes the maths is refused naming the fields
(``check_config_drift``), and a NaN/inf inside a step stops the run before the update with the source named
(trajectory, label, reward, adjoint, loss, gradient, parameters; ``finetune.on_nonfinite``).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from am_jax import builders, checkpointing, data as data_lib, dynamics, gmm as gmm_lib, metrics as metrics_lib
from am_jax import reporting, sampling, sharding, training
from am_jax.errors import ConfigDriftError, ConfigError, NonFiniteError
from am_jax.problem import Problem

__all__ = ["pretrain", "finetune", "evaluate", "dataset", "build_finetune_problem", "config_drift",
           "check_config_drift", "guard_problem", "guard_objective", "guard_optimizer", "check_workdir"]


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


# --------------------------------------------------------------------------------------------- reliability
# docs/training_system.md, "Reliability": config drift on resume, non-finite values blamed on their source.

# Fields that may change between an interrupted run and its resume (logged): they do not change the maths of the
# steps already taken.  A path names a field or a whole section.  Every other field refuses to resume.
FREE_FIELDS = {
    "finetune": ("finetune.steps", "finetune.log_every", "eval", "checkpoint", "mesh", "distributed", "resume",
                 "am.remat_segments", "am.chunk_loss", "am.reuse_base_velocity"),
    "pretrain": ("pretrain.steps", "pretrain.log_every", "pretrain.checkpoint", "mesh", "distributed", "resume"),
}
# The sections a pre-training run depends on (the rest of a fine-tuning config is ignored by its drift check).
PRETRAIN_SECTIONS = ("seed", "data", "model", "schedule", "pretrain")


def _flatten(tree, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, dict) and v:
      out.update(_flatten(v, path + "."))
    else:
      out[path] = v
  return out


def _normalised(cfg) -> dict:
  """Flat {path: JSON value} of a ConfigDict or of the dict stored with a checkpoint (tuples as lists)."""
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  return _flatten(json.loads(json.dumps(reporting.to_json(d))))


def _covered(path: str, prefixes) -> bool:
  return any(path == p or path.startswith(p + ".") for p in prefixes)


def allowed_changes(cfg) -> tuple:
  """``resume.allow_changes`` of ``cfg`` ('a.b,c' or 'all') as a tuple of field paths (() when absent)."""
  text = ""
  if "resume" in cfg and cfg.resume is not None:
    text = cfg.resume.get("allow_changes", "") or ""
  return tuple(p.strip().removeprefix("config.") for p in str(text).split(",") if p.strip())


def config_drift(stored, current, kind: str = "finetune", allow=()) -> tuple[list, list]:
  """(refused, allowed) lists of ``(path, old, new)`` between the config stored with a run's checkpoints and the
  current one.  ``kind``: 'finetune' or 'pretrain' (which fields may change: ``FREE_FIELDS``); ``allow``: paths
  the user allows deliberately ('all': every field)."""
  old, new = _normalised(stored), _normalised(current)
  refused, allowed = [], []
  for path in sorted(set(old) | set(new)):
    a, b = old.get(path, "<absent>"), new.get(path, "<absent>")
    if a == b:
      continue
    if kind == "pretrain" and not _covered(path, PRETRAIN_SECTIONS):
      continue
    if kind == "finetune" and path.startswith("pretrain.") and (new.get("base_checkpoint") or
                                                                 new.get("model.kind") == "exact"):
      continue  # the job does not pre-train its base: pre-training fields are unused
    free = _covered(path, FREE_FIELDS[kind]) or "all" in allow or _covered(path, allow)
    (allowed if free else refused).append((path, a, b))
  return refused, allowed


def check_config_drift(ckpt: checkpointing.Checkpointer, cfg, kind: str):
  """Compares ``cfg`` with the config stored with the newest readable step of ``ckpt``: raises one-line
  ``ConfigDriftError`` listing each changed field that changes the maths; logs the allowed changes."""
  if not ckpt.all_steps():
    return
  stored = ckpt.stored_config()
  if stored is None:
    return
  refused, allowed = config_drift(stored, cfg, kind, allowed_changes(cfg))
  show = lambda items: ", ".join(f"config.{p}: {a!r} -> {b!r}" for p, a, b in items)  # noqa: E731
  if refused:
    workdir = os.path.dirname(ckpt.directory)
    raise ConfigDriftError(
        f"{show(refused)}: the {kind} run in {workdir} (step {ckpt.latest_step()}) was made with the old value(s), "
        f"which change the maths, so it cannot resume.  Start fresh with a new --workdir (or delete "
        f"{ckpt.directory}), or resume deliberately with --config.resume.allow_changes="
        f"{','.join(p for p, _, _ in refused)} (launcher flag --allow_config_changes).")
  if allowed:
    note = ""
    if any(p == f"{kind}.steps" for p, _, _ in allowed) and cfg[kind].optimizer.get("decay") == "cosine":
      note = " (the cosine learning-rate decay is re-stretched to the new step count)"
    reporting.info(f"[{kind}] config changed since the stored run (allowed): {show(allowed)}{note}")


# Messages of the runtime checks inside a step, one per source (dynamics.checked raises them under jit).
NONFINITE_MESSAGES = {
    "label": "a condition label is outside [0, num_classes] (finetune.cond / the cond_fn)",
    "trajectory": "the trajectory became non-finite (X_1 has NaN/inf): the fine-tuned model diverged? (learning rate, "
                  "am.time_offset)",
    "adjoint": "the adjoint became non-finite (|sigma a| overflowed): lambda * grad r too large? "
               "(am.reward_multiplier, the reward's gradient)",
    "loss": "the loss became non-finite (with finite trajectory, reward and adjoint: the fine-tuned model's output?)",
    "gradient": "the gradient became non-finite (with a finite loss)",
    "parameters": "the parameters became non-finite after the update: learning rate too high? "
                  "(finetune.optimizer.learning_rate)",
}


def _tie(tree, bad, msg: str):
  """``dynamics.checked`` for every leaf dtype: integer arrays are tied to the check too."""
  zero = dynamics.checked(jnp.zeros((), jnp.float32), bad, msg)
  return jax.tree.map(lambda x: x + zero.astype(x.dtype) if hasattr(x, "dtype") and (
      jnp.issubdtype(x.dtype, jnp.inexact) or jnp.issubdtype(x.dtype, jnp.integer)) else x, tree)


def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def guard_problem(problem: Problem) -> Problem:
  """``problem`` whose condition sampler checks the labels' range and whose reward checks that the trajectory's
  end X_1 is finite before the reward sees it (so a diverged trajectory is not blamed on the reward)."""
  import dataclasses
  reward_fn, cond_fn, n_cls = problem.reward_fn, problem.cond_fn, problem.null_label

  def guarded_reward(x, *cond):
    x = _tie(x, ~jnp.all(jnp.isfinite(x)), NONFINITE_MESSAGES["trajectory"])
    return reward_fn(x, *cond)

  guarded_cond = cond_fn
  if cond_fn is not None and n_cls:
    def guarded_cond(key, b):
      out = []
      for c in tuple(cond_fn(key, b)):
        if hasattr(c, "dtype") and jnp.issubdtype(c.dtype, jnp.integer):
          c = _tie(c, jnp.any((c < 0) | (c > n_cls)), NONFINITE_MESSAGES["label"])
        out.append(c)
      return tuple(out)
  return dataclasses.replace(problem, reward_fn=guarded_reward, cond_fn=guarded_cond)


def guard_objective(objective: Callable, policy: str = "halt") -> Callable:
  """``objective`` whose loss is checked: the adjoint (aux ``target_norm`` = mean |sigma a|^2, when the method
  reports it) first, then the loss.  'halt': a failed check raises.  'skip': a non-finite adjoint or loss makes
  the loss NaN (times its gradient: a NaN gradient even where an overflowed loss has a finite one), so the
  optimizer guard drops that update."""
  if policy != "halt":
    def poisoned(*args, **kwargs):
      loss, aux = objective(*args, **kwargs)
      bad = ~jnp.isfinite(loss)
      if "target_norm" in aux:
        bad = bad | ~jnp.isfinite(aux["target_norm"])
      return loss * jnp.where(bad, jnp.nan, 1.0).astype(loss.dtype), aux
    return poisoned

  def guarded(*args, **kwargs):
    loss, aux = objective(*args, **kwargs)
    if "target_norm" in aux:
      loss = _tie(loss, ~jnp.isfinite(aux["target_norm"]), NONFINITE_MESSAGES["adjoint"])
    loss = _tie(loss, ~jnp.isfinite(loss), NONFINITE_MESSAGES["loss"])
    return loss, aux

  return guarded


class SkipState(NamedTuple):
  """Optimizer state under ``finetune.on_nonfinite = 'skip'``: the inner state and the count of dropped updates."""
  inner: object
  skipped: jax.Array


def guard_optimizer(optimizer, policy: str = "halt"):
  """``optimizer`` with the gradient and the updated parameters checked.

  'halt': a non-finite gradient or updated parameter raises (``dynamics.checked``) inside the step, before the
  update reaches the state.  'skip': the update is dropped instead (parameters and optimizer state unchanged)
  and counted in ``SkipState.skipped`` (logged as ``skipped_steps``).
  """
  import optax

  def new_params_finite(params, updates):
    return _all_finite(optax.apply_updates(params, updates))

  if policy == "halt":
    def update(grads, state, params=None):
      grads = _tie(grads, ~_all_finite(grads), NONFINITE_MESSAGES["gradient"])
      updates, state = optimizer.update(grads, state, params)
      if params is not None:
        updates = _tie(updates, ~new_params_finite(params, updates), NONFINITE_MESSAGES["parameters"])
      return updates, state
    return optax.GradientTransformation(optimizer.init, update)

  def init(params):
    return SkipState(optimizer.init(params), jnp.zeros((), jnp.int32))

  def update_skip(grads, state, params=None):
    updates, inner = optimizer.update(grads, state.inner, params)
    ok = _all_finite(grads) & _all_finite(updates)
    if params is not None:
      ok = ok & new_params_finite(params, updates)
    updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
    inner = jax.tree.map(lambda n, o: jnp.where(ok, n, o), inner, state.inner)
    return updates, SkipState(inner, state.skipped + (~ok).astype(jnp.int32))

  return optax.GradientTransformation(init, update_skip)


def skipped_steps(state) -> Optional[int]:
  """The dropped-update count of a state trained under the 'skip' policy (None otherwise)."""
  opt = state.opt_state
  return int(sharding.to_local(opt.skipped)) if isinstance(opt, SkipState) else None


_CHECK_MESSAGES = tuple(NONFINITE_MESSAGES.values()) + ("reward_fn returned a non-finite reward",
                                                        "The reward gradient is not finite")


def runtime_check_message(exc: BaseException) -> Optional[str]:
  """The message of a runtime check (``dynamics.checked``) that failed inside a jitted step, else None."""
  text = str(exc)
  for msg in _CHECK_MESSAGES:
    if msg in text:
      return msg
  import re
  m = re.search(r"EquinoxRuntimeError: ([^\n]+)", text)
  return m.group(1).strip() if m else None


def _nonfinite_error(e: BaseException, what: str, step: int, saved: Optional[int]) -> Optional[NonFiniteError]:
  msg = runtime_check_message(e)
  if msg is None:
    return None
  kept = f"the newest checkpoint is step {saved}" if saved is not None else "no checkpoint was written"
  return NonFiniteError(f"[{what}] step {step}: {msg.rstrip('.')}; stopped before applying the update ({kept}; "
                        f"finetune.on_nonfinite='skip' drops such updates instead).")


@contextlib.contextmanager
def _blaming_nonfinite(what: str, step: int, ckpt):
  """Turns a failed runtime check inside a training step into ONE line naming its source (``_nonfinite_error``);
  any other exception passes through unchanged."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 -- re-raised below unless it is a runtime check
    err = _nonfinite_error(e, what, step, ckpt.latest_step())
    if err is None:
      raise
    raise err from None


def check_workdir(workdir) -> str:
  """``workdir`` when it can hold a run's files; one-line ``ConfigError`` for an empty value (which would write
  into the current directory) or a path that is a file."""
  if workdir is None or not str(workdir).strip():
    raise ConfigError("workdir is empty: give an output directory (e.g. --workdir=runs/my_run); an empty one "
                      "would write checkpoints and metrics into the current directory.")
  workdir = str(workdir)
  if "://" not in workdir and os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir {workdir!r} is a file, not a directory.")
  return workdir


def pretrain(cfg, workdir: str, stop_after: Optional[int] = None) -> dict:
  """Trains (or resumes) a base with flow matching; returns the summary written to ``metrics.json``.

  ``stop_after``: stop abruptly after that many steps without the final save (tests of resuming).
  """
  builders.validate_pretrain(cfg)
  workdir = check_workdir(workdir)
  mesh = sharding.make_mesh(cfg.mesh.num_devices)
  sharding.check_batch_divisible(cfg.pretrain.batch_size, mesh, "pretrain.batch_size")
  schedule = builders.build_schedule(cfg)
  pc = cfg.pretrain
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), pc.checkpoint.max_to_keep,
                                    pc.checkpoint.every_steps, verify=pc.checkpoint.get("verify", True),
                                    for_training=True)
  with _closing(ckpt):
    check_config_drift(ckpt, cfg, "pretrain")
    done_summary = _finished(workdir, pc.steps, ckpt.latest_step(), "pretrain")
    if done_summary is not None:
      return done_summary
    data = dataset(cfg)
    apply_fn, params = builders.build_model(cfg, data[0].shape[1:], cfg.seed)
    optimizer = guard_optimizer(builders.build_optimizer(cfg, "pretrain.optimizer", pc.steps))
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
    limit = sharding.InFlightLimit(mesh)  # several CPU host devices: bounded asynchronous dispatch (no deadlock)
    for s in range(start, pc.steps):
      with _blaming_nonfinite("pretrain", s + 1, ckpt):
        state, m = step_fn(state, data_dev)
        limit(m)  # the metrics: the state is donated to the next step
        done = s + 1
        ckpt.save(done, state, cfg_dict)
        if _log_step(done, pc.log_every, pc.steps, start):
          m = {k: float(v) for k, v in sharding.to_local(m).items()}
          extra = progress.tick(done, m)
          if _metrics_row(done, pc.log_every, pc.steps):
            writer.write(done, dict(m, **extra))
      if stop_after is not None and done >= stop_after:
        return {"step": done, "stopped_early": True}  # simulated crash: no final save; a rerun replays
    if done > start and ckpt.latest_step() != done:
      ckpt.save(done, state, cfg_dict, force=True)
  summary = {"step": done}
  if data[0].ndim == 2 and data[0].shape[1] == 2 and eval_at_end(cfg):
    summary.update(evaluate_base_2d(cfg, apply_fn, sharding.to_local(training.eval_params(state, pc.ema_decay))))
  writer.final(summary)
  return summary


@contextlib.contextmanager
def _closing(ckpt: checkpointing.Checkpointer):
  """Closes ``ckpt`` on every exit path (the async writer commits its last save before the process ends); on an
  error, a failure to close is reported without hiding the error."""
  try:
    yield ckpt
  except BaseException:
    try:
      ckpt.close()
    except Exception as e:  # noqa: BLE001
      reporting.warn(f"closing the checkpointer after an error: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    raise
  else:
    ckpt.close()


def eval_at_end(cfg) -> bool:
  """``eval.at_end`` (default True): whether a finished run evaluates its final model (fine-tuning: base and
  fine-tuned samples, rewards, distances to the exact target, plots; pre-training of a 2-D base: sliced W1 to the
  data).  False skips it (its sampler compilations), e.g. in tests that check only the training itself."""
  return "eval" not in cfg or bool(cfg.eval.get("at_end", True))


def _log_step(done: int, log_every: int, steps: int, start: int) -> bool:
  """Steps with a progress line: the log grid, the last step and the first step after a (re)start."""
  return done % log_every == 0 or done == steps or done == start + 1


def _metrics_row(done: int, log_every: int, steps: int) -> bool:
  """Steps with a ``metrics.jsonl`` row: step 1, the log grid and the last step -- the same rows whether or not
  the run was interrupted and resumed (the progress line after a restart is printed, not logged)."""
  return done == 1 or done % log_every == 0 or done == steps


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
  workdir = check_workdir(workdir)
  policy = cfg.finetune.get("on_nonfinite", "halt")
  fc = cfg.finetune
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) or "://" in ckpt_dir:  # a resume: refuse a changed config before any work
    reader = checkpointing.Checkpointer(ckpt_dir)
    try:
      check_config_drift(reader, cfg, "finetune")
    finally:
      reader.close()
  mesh = sharding.make_mesh(cfg.mesh.num_devices)
  problem = build_finetune_problem(cfg, workdir, mesh)
  objective = guard_objective(builders.build_method(cfg, problem.config), policy)
  ckpt = checkpointing.Checkpointer(ckpt_dir, cfg.checkpoint.max_to_keep, cfg.checkpoint.every_steps,
                                    cfg.checkpoint.get("async_save", True), verify=cfg.checkpoint.get("verify", True),
                                    for_training=True)
  with _closing(ckpt):
    done_summary = _finished(workdir, fc.steps, ckpt.latest_step(), "finetune")
    if done_summary is not None and not return_state:
      return done_summary
    optimizer = guard_optimizer(builders.build_optimizer(cfg, "finetune.optimizer", fc.steps), policy)
    state = training.init_state(problem.init_params, optimizer, cfg.seed)
    if ckpt.latest_step() is not None:
      state = ckpt.restore(None, state, mesh)
    else:
      state = sharding.replicate_tree(state, mesh)
    start = int(sharding.to_local(state.step))
    if 0 < start < fc.steps:
      reporting.info(f"[finetune] resuming from step {start}")
    base_params = sharding.replicate_tree(problem.base_params, mesh)
    step_fn = training.make_finetune_step(guard_problem(problem), objective, optimizer, fc.batch_size, mesh,
                                          fc.ema_decay)
    writer = reporting.MetricsWriter(workdir, start_step=start)
    progress = reporting.Progress("finetune", fc.steps, start)
    watch = _reward_watch(cfg, problem)
    cfg_dict = cfg.to_dict()
    done = start
    t_loop = time.perf_counter()
    limit = sharding.InFlightLimit(mesh)  # several CPU host devices: bounded asynchronous dispatch (no deadlock)
    for s in range(start, fc.steps):
      with _blaming_nonfinite("finetune", s + 1, ckpt):
        state, m = step_fn(state, base_params)
        limit(m)  # the metrics: the state is donated to the next step
        done = s + 1
        ckpt.save(done, state, cfg_dict)
        if _log_step(done, fc.log_every, fc.steps, start):
          m = {k: float(v) for k, v in sharding.to_local(m).items()}
          skipped = skipped_steps(state)
          if skipped is not None:
            m["skipped_steps"] = skipped
          if watch is not None and (done % watch.every == 0 or done == fc.steps):
            m.update(watch(sharding.to_local(training.eval_params(state, fc.ema_decay)), done))
          extra = progress.tick(done, m)
          if _metrics_row(done, fc.log_every, fc.steps):
            writer.write(done, dict(m, **extra))
      if stop_after is not None and done >= stop_after:
        return {"step": done, "stopped_early": True}  # simulated crash: no final save; a rerun resumes
    loop_seconds = time.perf_counter() - t_loop
    if done > start and ckpt.latest_step() != done:
      ckpt.save(done, state, cfg_dict, force=True)
  summary = dict(done_summary or {}, step=done)
  if done > start:
    summary.update(finetune_loop_seconds=loop_seconds, finetune_steps_per_s=(done - start) / loop_seconds)
  skipped = skipped_steps(state)
  if skipped is not None:
    summary["skipped_steps"] = skipped
  if watch is not None:
    summary.update(watch.summary())
  if done >= fc.steps and done_summary is None and eval_at_end(cfg):
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

  def sample_and_report(p, which, diffusion):  # one program per setting (eager rewards: one per operation)
    x = problem.sample(p, k_x, n, diffusion, k_steps, cond, which)
    return x, jnp.all(jnp.isfinite(x)), problem.reward_report(x, cond)

  draw = jax.jit(sample_and_report, static_argnums=(1, 2))
  drawn = {"base_ode": draw(problem.base_params, "base", "ode"), "finetuned_ode": draw(params, "finetuned", "ode"),
           "finetuned_memoryless": draw(params, "finetuned", "memoryless")}
  samples = {name: x for name, (x, _, _) in drawn.items()}
  out = {}
  for name, (_, finite, report) in drawn.items():
    if not bool(finite):
      raise FloatingPointError(f"evaluation: {name} samples are not finite (diverged fine-tuning?).")
    for k, v in report.items():
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
           which: str = "finetuned", seed: int = 0, integrator: str = "euler") -> dict:
  """Samples the fine-tuned (or base) model of ``workdir``; writes ``samples_<which>_<diffusion>.npz/.json``
  (mean reward, sliced W1 to the exact target where known) and a scatter PNG for 2-D samples.  ``integrator``:
  'euler' (the training grid's scheme), 'exponential' or 'dpmpp_2m' (``sampling.sample``); a non-Euler integrator
  is part of the output file names (``samples_<which>_<diffusion>_<integrator>``)."""
  diffusion = parse_diffusion(str(diffusion))
  workdir = check_workdir(workdir)
  if num_samples <= 0 or num_steps < 0:
    raise ValueError(f"--num_samples={num_samples} must be > 0 and --num_steps={num_steps} >= 0.")
  if integrator not in sampling.SAMPLERS:
    raise ValueError(f"--integrator={integrator!r}: must be one of {', '.join(sampling.SAMPLERS)}.")
  if integrator != "euler" and diffusion not in ("ode", "memoryless"):
    raise ValueError(f"--integrator={integrator} needs --diffusion=ode or memoryless, got {diffusion!r}.")
  mesh = sharding.make_mesh(cfg.mesh.num_devices)
  if which == "base":
    problem, params = build_finetune_problem(_with_base(cfg, workdir), workdir, mesh), None
  else:
    problem, params = load_finetuned(cfg, workdir, mesh)
  k = num_steps or problem.config.num_steps
  key = jax.random.PRNGKey(seed)
  k_cond, _ = jax.random.split(key)
  cond = tuple(problem.cond_fn(k_cond, num_samples)) if problem.cond_fn is not None else ()

  def sample_and_report(p):  # one program (eager rewards: one per operation)
    x = problem.sample(p, key, num_samples, diffusion, k, cond=cond, which=which, integrator=integrator)
    return x, problem.reward_report(x, cond)

  xs, report = jax.jit(sample_and_report)(params)
  xs = np.asarray(xs)
  if not np.all(np.isfinite(xs)):
    raise FloatingPointError(f"sample: the {which} model produced non-finite samples.")
  out = {"which": which, "diffusion": str(diffusion), "num_steps": k, "integrator": integrator}
  out.update({f"{n}_mean" if n == "reward" else n: float(v) for n, v in report.items()})
  target = problem.exact_target
  if target is not None:
    ref = np.asarray(gmm_lib.sample(target, jax.random.PRNGKey(seed + 1), num_samples))
    out["to_target_sliced_w1"] = metrics_lib.sliced_wasserstein1(xs, ref)
  if jax.process_index() == 0:
    stem = os.path.join(workdir, f"samples_{which}_{diffusion}" + ("" if integrator == "euler" else f"_{integrator}"))
    np.savez_compressed(stem + ".npz", samples=xs)
    with open(stem + ".json", "w") as f:
      json.dump(out, f, indent=2)
    from am_jax import plots
    if xs.ndim == 2 and xs.shape[1] == 2:
      plots.scatter_one(stem + ".png", xs, f"{which}, {diffusion}, K={k}, {integrator}")
    elif xs.ndim == 4:
      plots.image_grid(stem + ".png", [(f"{which}, {diffusion}, K={k}, {integrator}", xs)])
  return out
