"""Training and evaluation of a control network on an SOC problem: the library behind ``experiments/soc.py``.

Each method of ``soc.METHODS`` (``am``, ``discrete_adjoint``, ``continuous_adjoint``) trains the same control
net: ``models.MLP`` on (x, time_scale * t) with the config's widths and a zero-initialised output layer, so
every method starts at u = 0 (``control_net`` 'grad_g': ``GradGControl``; 'socm': the SOC-matching authors' net,
``soc_networks.SOCMatchingUNet``, PyTorch-default init, for equal-architecture runs).  Optimiser: optax Adam
(eps ``adam_eps``) with a cosine (to ``lr_final_fraction`` of the rate) or constant learning rate and optional
global-norm clipping; ``ema_decay`` > 0 evaluates an exponential moving average of the parameters.  One training step (sampling, adjoint, loss,
gradient, update) is one ``jax.jit`` call.  Every ``eval_every`` iterations the control is evaluated on a
fixed batch of ``eval_batch_size`` paths, with the same key for every evaluation and every method (common
random numbers): the L2 error E int |u - u*|^2 dt and the control objective E[J], with standard errors
(``soc.evaluate_control``).

A run is described by a ``ml_collections.ConfigDict`` with the fields of ``CONFIG_FIELDS`` (``configs/soc.py``
has the four benchmarks); ``run(config)`` trains every method and returns the records and a summary.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from am_jax import models, soc, soc_networks
from am_jax import sharding as sharding_lib

__all__ = ["CONFIG_FIELDS", "LR_SCHEDULES", "CONTROL_NETS", "TIME_FEATURES", "validate_config", "make_optimizer",
           "GradGControl", "time_input", "init_control", "method_objective", "control_from_config",
           "problem_from_config", "mesh_from_config", "make_train_step", "make_evaluator", "train_method", "reference_values",
           "summarise", "aggregate", "run"]

LR_SCHEDULES = ("cosine", "constant")

# Every field a run reads (configs/soc.py documents them).
CONFIG_FIELDS = ("problem", "methods", "num_iterations", "batch_size", "learning_rate", "lr_schedule",
                 "lr_final_fraction", "grad_clip", "hidden", "time_scale", "seed", "eval_seed", "eval_every",
                 "eval_batch_size", "l2_target", "time_budget_s", "num_steps", "control_net", "time_feature",
                 "td_lambda", "num_seeds", "adam_eps", "init_scale", "ema_decay")

CONTROL_NETS = ("mlp", "grad_g", "socm")
TIME_FEATURES = ("linear", "log_time_to_go")


def validate_config(config) -> None:
  """Checks a run's config completely before any work; one-line ValueError naming the field."""
  missing = [f for f in CONFIG_FIELDS if f not in config]
  if missing:
    raise ValueError(f"config.{missing[0]}: missing (an SOC run needs the fields {', '.join(CONFIG_FIELDS)}).")
  if config.problem not in soc.PROBLEMS:
    raise ValueError(f"config.problem = {config.problem!r}: expected one of {soc.PROBLEMS}.")
  if isinstance(config.methods, str) or not config.methods:
    raise ValueError(f"config.methods = {config.methods!r}: expected a non-empty tuple of {tuple(soc.METHODS)}.")
  for name in config.methods:
    if name not in soc.METHODS:
      raise ValueError(f"config.methods: unknown SOC method {name!r}; expected some of {tuple(soc.METHODS)}.")
  for field in ("num_iterations", "batch_size", "eval_every"):
    if int(config[field]) != config[field] or config[field] < 1:
      raise ValueError(f"config.{field} = {config[field]!r}: must be a positive integer.")
  if int(config.eval_batch_size) != config.eval_batch_size or config.eval_batch_size < 2:
    raise ValueError(f"config.eval_batch_size = {config.eval_batch_size!r}: must be an integer >= 2 "
                     "(standard errors need two paths).")
  if config.lr_schedule not in LR_SCHEDULES:
    raise ValueError(f"config.lr_schedule = {config.lr_schedule!r}: expected one of {LR_SCHEDULES}.")
  for field in ("learning_rate", "time_scale", "l2_target"):
    if not config[field] > 0:
      raise ValueError(f"config.{field} = {config[field]!r}: must be > 0.")
  if not 0.0 <= config.lr_final_fraction <= 1.0:
    raise ValueError(f"config.lr_final_fraction = {config.lr_final_fraction!r}: must be in [0, 1].")
  if config.grad_clip < 0 or config.time_budget_s < 0:
    raise ValueError("config.grad_clip and config.time_budget_s must be >= 0 (0 disables them).")
  if not config.hidden or any(int(w) != w or w < 1 for w in config.hidden):
    raise ValueError(f"config.hidden = {config.hidden!r}: expected a tuple of positive layer widths.")
  if config.control_net not in CONTROL_NETS:
    raise ValueError(f"config.control_net = {config.control_net!r}: expected one of {CONTROL_NETS}.")
  if config.time_feature not in TIME_FEATURES:
    raise ValueError(f"config.time_feature = {config.time_feature!r}: expected one of {TIME_FEATURES}.")
  if not 0.0 <= config.td_lambda <= 1.0:
    raise ValueError(f"config.td_lambda = {config.td_lambda!r}: must be in [0, 1] (1 = plain AM).")
  if int(config.num_steps) != config.num_steps or config.num_steps < 0:
    raise ValueError(f"config.num_steps = {config.num_steps!r}: must be an integer >= 0 (0: the problem's K).")
  if int(config.num_seeds) != config.num_seeds or config.num_seeds < 1:
    raise ValueError(f"config.num_seeds = {config.num_seeds!r}: must be a positive integer.")
  for field in ("adam_eps", "init_scale"):
    if not config[field] > 0:
      raise ValueError(f"config.{field} = {config[field]!r}: must be > 0.")
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f"config.ema_decay = {config.ema_decay!r}: must be in [0, 1) (0: no parameter EMA).")
  chunk = config.get("chunk_loss", 0)
  if isinstance(chunk, bool) or int(chunk) != chunk or chunk < 0:
    raise ValueError(f"config.chunk_loss = {chunk!r}: must be an integer >= 0 (at most that many time steps per "
                     "chunk of the AM loss; 0: one call).")
  devices = config.get("num_devices", 1)
  if isinstance(devices, bool) or int(devices) != devices or not (devices == -1 or 1 <= devices <= jax.device_count()):
    hint = sharding_lib.host_devices_hint(int(devices)) if isinstance(devices, int) else ""
    raise ValueError(f"config.num_devices = {devices!r}: must be -1 (all devices) or in [1, {jax.device_count()}] "
                     f"(the devices the batch of paths is sharded over){hint}.")
  n = jax.device_count() if devices == -1 else int(devices)
  for field in ("batch_size", "eval_batch_size"):
    if config[field] % n:
      raise ValueError(f"config.{field} = {config[field]}: must be divisible by the {n} devices of "
                       "config.num_devices.")


def mesh_from_config(config) -> Optional[jax.sharding.Mesh]:
  """The ``('data',)`` mesh of ``config.num_devices`` devices (-1: all) the paths are sharded over; None for one
  device (no sharding constraint: the programs of single-device runs are unchanged)."""
  devices = int(config.get("num_devices", 1))
  if devices == 1 or (devices == -1 and jax.device_count() == 1):
    return None
  return sharding_lib.make_mesh(devices)


def make_optimizer(config) -> optax.GradientTransformation:
  """Adam (eps ``adam_eps``) with a cosine-decay (to lr_final_fraction * learning_rate) or constant rate;
  global-norm clipping if ``grad_clip`` > 0."""
  if config.lr_schedule == "cosine":
    lr = optax.cosine_decay_schedule(config.learning_rate, config.num_iterations, alpha=config.lr_final_fraction)
  elif config.lr_schedule == "constant":
    lr = config.learning_rate
  else:
    raise ValueError(f"config.lr_schedule = {config.lr_schedule!r}: expected one of {LR_SCHEDULES}.")
  chain = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip else []
  return optax.chain(*chain, optax.adam(lr, eps=config.adam_eps))


class GradGControl(nnx.Module):
  """Control net with the terminal control as input and gate (``control_net = 'grad_g'``).

      q = sigma(t)^T grad g(x)   (u*(T, x) = -q),   z = MLP(x, q, emb(s)),   u = head_1(z) - head_2(z) * q,

  head_1, head_2: (B, d) halves of one zero-initialised output layer (so u = 0 at initialisation), s the time
  input (``init_control``), emb the sinusoidal embedding of ``models.MLP``.  Only problem data (g, sigma) is
  used, never u*: the gate lets the net represent controls of the form -gamma(t, x) * sigma^T grad g(x),
  exact for the quadratic problems (u* = -2 F(t) x, grad g = 2 Q x) and close to the double-well control near
  T, where it is large and changes on the scale of a few steps (docs/soc.md).
  """

  def __init__(self, dim: int, hidden, time_embed_dim: int = 32, *, rngs: nnx.Rngs):
    self.dim, self.time_embed_dim = dim, time_embed_dim
    layers, in_dim = [], 2 * dim + time_embed_dim
    for width in hidden:
      layers.append(nnx.Linear(in_dim, width, rngs=rngs))
      in_dim = width
    self.hidden = nnx.List(layers) if hasattr(nnx, "List") else layers
    zeros = nnx.initializers.zeros_init()
    self.out = nnx.Linear(in_dim, 2 * dim, kernel_init=zeros, bias_init=zeros, rngs=rngs)

  def __call__(self, x, q, s):
    h = jnp.concatenate([x, q, models.sinusoidal_embedding(s, self.time_embed_dim).astype(x.dtype)], axis=-1)
    for layer in self.hidden:
      h = nnx.silu(layer(h))
    out = self.out(h)
    return out[:, :self.dim] - out[:, self.dim:] * q


def time_input(problem: soc.SOCProblem, time_feature: str, time_scale: float):
  """s(t) (B,) -> (B,), the time the net sees: ``time_scale * t`` ('linear') or, for 'log_time_to_go',

      s(t) = time_scale * log((T - t + h) / (T + h)) / log(h / (T + h))   (0 at t = 0, time_scale at t = T),

  which spreads the last steps (where the double-well control lives) over most of the feature range.
  """
  if time_feature == "linear":
    return lambda t: time_scale * t
  if time_feature == "log_time_to_go":
    T, h = problem.T, problem.dt
    return lambda t: time_scale * jnp.log((T - t + h) / (T + h)) / math.log(h / (T + h))
  raise ValueError(f"config.time_feature = {time_feature!r}: expected one of {TIME_FEATURES}.")


def init_control(problem: soc.SOCProblem, hidden, seed: int, time_scale: float = 1.0, *, control_net: str = "mlp",
                 time_feature: str = "linear", init_scale: float = 1.0):
  """The control net ``apply_fn(params, x (B, d), t (B,)) -> (B, d)`` and its initial params (u = 0, except
  for 'socm').

  ``models.MLP`` embeds t with sinusoids of 1000 t (DDPM step-index scale); time_scale < 1 makes the time
  features smooth over [0, T] (right for the OU problems), 1 keeps the sharp ones (double well: u* varies on
  the scale of one step just before T).  ``control_net``: 'mlp' (``models.MLP`` on (x, s(t))) or 'grad_g'
  (``GradGControl``) or 'socm' (the SOC-matching authors' net, ``soc_networks.SOCMatchingUNet``: it predicts
  grad V from (s(t), x), u = -sigma(t)^T grad V, PyTorch-default init times ``init_scale``, so u != 0 at
  initialisation); ``time_feature``: s(t) of ``time_input``.
  """
  s_of_t = time_input(problem, time_feature, time_scale)
  if control_net == "mlp":
    net = models.MLP(problem.dim, hidden=tuple(hidden), zero_init_output=True, rngs=nnx.Rngs(seed))
    net_apply, params = models.functional(net)

    def apply_fn(p, x, t):
      return net_apply(p, x, s_of_t(t))

    return apply_fn, params
  if control_net == "grad_g":
    net_apply, params = models.functional(GradGControl(problem.dim, tuple(hidden), rngs=nnx.Rngs(seed)))
    q_fn = soc.terminal_control(problem)

    def apply_fn(p, x, t):
      # Row by row: sigma may depend on t, and am_loss passes all (k, b) pairs of the grid in one call.
      q = jax.vmap(lambda xi, ti: q_fn(xi[None], ti)[0])(x, t)
      return net_apply(p, x, q, s_of_t(t))

    return apply_fn, params
  if control_net == "socm":
    net_apply, params = models.functional(
        soc_networks.SOCMatchingUNet(problem.dim, tuple(hidden), init_scale, rngs=nnx.Rngs(seed)))

    def sigma_t(v, ti):
      # u = -sigma(t)^T grad V, row by row (sigma may depend on t; am_loss passes every (k, b) pair at once).
      sig = problem.sigma(ti)
      return sig * v if sig.ndim == 1 else v @ sig

    def apply_fn(p, x, t):
      return -jax.vmap(sigma_t)(net_apply(p, x, s_of_t(t)), t)

    return apply_fn, params
  raise ValueError(f"config.control_net = {control_net!r}: expected one of {CONTROL_NETS}.")


def method_objective(method: str, config) -> Callable:
  """``soc.METHODS[method]`` with the config's method options (``td_lambda``, ``chunk_loss`` for 'am')."""
  objective = soc.get_method(method)
  options = {}
  if method == "am" and config.td_lambda != 1.0:
    options["td_lambda"] = float(config.td_lambda)
  if method == "am" and config.get("chunk_loss", 0):
    options["chunk_steps"] = int(config.chunk_loss)
  return functools.partial(objective, **options) if options else objective


def control_from_config(problem: soc.SOCProblem, config, seed: Optional[int] = None):
  """``init_control`` with the config's net (hidden, time_scale, control_net, time_feature, init_scale) and seed."""
  return init_control(problem, config.hidden, config.seed if seed is None else seed, config.time_scale,
                      control_net=config.control_net, time_feature=config.time_feature,
                      init_scale=config.init_scale)


def problem_from_config(config) -> soc.SOCProblem:
  """The benchmark ``config.problem`` with K = ``config.num_steps`` (0: the problem's default K)."""
  return soc.get_problem(config.problem, **({"num_steps": int(config.num_steps)} if config.num_steps else {}))


def make_train_step(objective: Callable, problem: soc.SOCProblem, apply_fn: Callable,
                    optimizer: optax.GradientTransformation, batch_size: int, mesh=None):
  """``step(params, opt_state, key) -> (params, opt_state, loss)``: one jitted update of a ``soc.METHODS`` objective.

  mesh: shards the batch of paths over its devices (params and optimizer state replicated: ``replicate_tree``
  them; the gradient's batch mean becomes an all-reduce); None: one device.
  """
  if mesh is not None:
    sharding_lib.check_batch_divisible(batch_size, mesh, "config.batch_size")
  kw = {} if mesh is None else {"mesh": mesh}

  @jax.jit
  def step(params, opt_state, key):
    (loss, _), grads = jax.value_and_grad(
        lambda p: objective(apply_fn, p, problem, key, batch_size, **kw), has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def make_evaluator(problem: soc.SOCProblem, apply_fn: Callable, eval_seed: int, eval_batch_size: int, mesh=None):
  """``evaluate(params) -> dict of scalars`` (``soc.evaluate_control`` on fixed paths), jitted; mesh shards the
  paths over its devices (the same paths and values)."""
  key = jax.random.PRNGKey(eval_seed)
  return jax.jit(lambda params: soc.evaluate_control(problem, apply_fn, params, problem.u_star, key, eval_batch_size,
                                                     mesh))


def train_method(method: str, problem: soc.SOCProblem, config, on_record: Optional[Callable] = None, *,
                 control=None, evaluate: Optional[Callable] = None, seed: Optional[int] = None,
                 step: Optional[Callable] = None) -> list:
  """Trains the control with one method; returns its evaluation records (one dict per evaluation).

  A record holds method, iteration, train_seconds (excluding compilation and evaluation), the last training
  loss and the ``soc.evaluate_control`` statistics; after training every record also gets compile_seconds
  (the first step's time).  ``on_record(record)`` is called after each evaluation (progress, metrics files).
  Training stops after ``num_iterations`` or, if ``time_budget_s`` > 0, at the first evaluation past it.
  ``control`` = (apply_fn, initial params) and ``evaluate`` (``make_evaluator`` of that apply_fn) default to
  new ones from the config; ``run`` passes the same to every method, so the evaluation compiles once.
  ``seed`` (default ``config.seed``) draws the training noise (key seed + 1) and is stored in the records;
  ``step`` (``make_train_step`` of this method, config and apply_fn) lets ``run`` reuse one compilation
  across seeds.
  """
  seed = config.seed if seed is None else int(seed)
  mesh = mesh_from_config(config)
  apply_fn, params = control or control_from_config(problem, config, seed)
  evaluate = evaluate or make_evaluator(problem, apply_fn, config.eval_seed, config.eval_batch_size, mesh)
  optimizer = make_optimizer(config)
  opt_state = optimizer.init(params)
  if mesh is not None:
    params, opt_state = sharding_lib.replicate_tree((params, opt_state), mesh)
  step = step or make_train_step(method_objective(method, config), problem, apply_fn, optimizer, config.batch_size,
                                 mesh)
  records, key = [], jax.random.PRNGKey(seed + 1)
  train_seconds, compile_seconds, loss = 0.0, 0.0, math.nan
  budget = config.time_budget_s or math.inf
  # Parameter EMA (ema_decay > 0): evaluated instead of the raw params; its update is part of the training clock.
  ema = params if config.ema_decay else None
  ema_update = jax.jit(lambda e, p: optax.incremental_update(p, e, 1.0 - config.ema_decay))

  def log_eval(it):
    stats = {k: float(v) for k, v in evaluate(params if ema is None else ema).items()}
    rec = dict(method=method, seed=seed, iteration=it, train_seconds=train_seconds, loss=float(loss), **stats)
    records.append(rec)
    if on_record is not None:
      on_record(rec)

  log_eval(0)
  it = 0
  limit = sharding_lib.InFlightLimit(mesh)  # several CPU host devices: bounded asynchronous dispatch (no deadlock)
  while it < config.num_iterations and train_seconds < budget:
    segment = min(config.eval_every - it % config.eval_every, config.num_iterations - it)
    start = time.perf_counter()
    for _ in range(segment):
      key, sub = jax.random.split(key)
      params, opt_state, loss = step(params, opt_state, sub)
      limit(loss)  # not the params: they may be donated to the next step
      if ema is not None:
        ema = ema_update(ema, params)
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


def reference_values(problem: soc.SOCProblem, eval_seed: int, eval_batch_size: int) -> dict:
  """``soc.evaluate_control`` of the exact control u* and of u = 0 on the evaluation paths (floats)."""
  key = jax.random.PRNGKey(eval_seed)
  out = {}
  for name, control in [("u_star", soc.reference_as_control(problem.u_star)), ("zero", soc.zero_control)]:
    stats = jax.jit(lambda: soc.evaluate_control(problem, control, None, problem.u_star, key, eval_batch_size))()
    out[name] = {k: float(v) for k, v in stats.items()}
  return out


def summarise(records: list, target: float) -> dict:
  """Final, best and first-below-``target`` L2 error of one method's records, with iterations and times."""
  last = records[-1]
  best = min(records, key=lambda r: r["l2_error"])
  hit = next((r for r in records if r["l2_error"] <= target), None)
  n_trained = max(last["iteration"] - 1, 1)
  return {
      "final_iteration": last["iteration"], "final_l2_error": last["l2_error"],
      "final_l2_error_se": last["l2_error_se"], "final_objective": last["objective"],
      "final_objective_se": last["objective_se"], "best_l2_error": best["l2_error"],
      "best_iteration": best["iteration"], "best_train_seconds": best["train_seconds"], "l2_target": target,
      "reached_target": hit is not None, "target_iteration": hit["iteration"] if hit else None,
      "target_train_seconds": hit["train_seconds"] if hit else None, "train_seconds": last["train_seconds"],
      "compile_seconds": last["compile_seconds"], "seconds_per_iteration": last["train_seconds"] / n_trained,
  }


def aggregate(records: list) -> list:
  """Per (method, iteration): the L2 error and objective across seeds (mean, std with ddof 1 (0 for one seed),
  min, max) and the mean training seconds; rows sorted by method order of appearance, then iteration."""
  groups = {}
  for r in records:
    groups.setdefault((r["method"], r["iteration"]), []).append(r)
  order = list(dict.fromkeys(r["method"] for r in records))
  rows = []
  for (method, it), rs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
    l2 = np.array([r["l2_error"] for r in rs])
    obj = np.array([r["objective"] for r in rs])
    rows.append({"method": method, "iteration": it, "num_seeds": len(rs),
                 "l2_mean": float(l2.mean()), "l2_std": float(l2.std(ddof=1)) if len(rs) > 1 else 0.0,
                 "l2_min": float(l2.min()), "l2_max": float(l2.max()),
                 "objective_mean": float(obj.mean()),
                 "objective_std": float(obj.std(ddof=1)) if len(rs) > 1 else 0.0,
                 "train_seconds_mean": float(np.mean([r["train_seconds"] for r in rs]))})
  return rows


def run(config, on_record: Optional[Callable] = None, on_problem: Optional[Callable] = None):
  """Builds the problem, evaluates u* and u = 0, trains every method of ``config.methods`` for each of the
  ``num_seeds`` seeds ``seed, seed + 1, ...`` (network init and training noise; the evaluation paths are the
  same for every seed and method).

  Args:
    config: the run's ConfigDict (``validate_config`` is called first).
    on_record: called with each evaluation record of every method (``train_method``).
    on_problem: called as ``on_problem(problem, setup_seconds, reference)`` before training (for a log line).

  Returns:
    ``(summary, records_by_method)``: summary has problem, num_steps, config, setup_seconds (problem and
    reference solve), reference (``reference_values``), methods ({method: ``summarise`` of the first seed,
    plus 'seeds': {seed: ``summarise``} and final_l2_mean / _std / _min / _max, seconds_per_iteration_mean
    across seeds}), devices, total_seconds; records_by_method[method] holds the records of every seed.
  """
  validate_config(config)
  t0 = time.perf_counter()
  problem = problem_from_config(config)
  setup_seconds = time.perf_counter() - t0
  reference = reference_values(problem, config.eval_seed, config.eval_batch_size)
  if on_problem is not None:
    on_problem(problem, setup_seconds, reference)
  seeds = [config.seed + i for i in range(config.num_seeds)]
  apply_fn = control_from_config(problem, config)[0]  # same function for every seed: one compilation
  mesh = mesh_from_config(config)
  evaluate = make_evaluator(problem, apply_fn, config.eval_seed, config.eval_batch_size, mesh)
  optimizer = make_optimizer(config)
  records_by_method, methods = {}, {}
  for method in config.methods:
    step = make_train_step(method_objective(method, config), problem, apply_fn, optimizer, config.batch_size, mesh)
    records_by_method[method], per_seed = [], {}
    for seed in seeds:
      control = (apply_fn, control_from_config(problem, config, seed)[1])
      recs = train_method(method, problem, config, on_record, control=control, evaluate=evaluate, seed=seed,
                          step=step)
      records_by_method[method] += recs
      per_seed[seed] = summarise(recs, config.l2_target)
    finals = np.array([v["final_l2_error"] for v in per_seed.values()])
    methods[method] = dict(per_seed[seeds[0]], seeds=per_seed, final_l2_mean=float(finals.mean()),
                           final_l2_std=float(finals.std(ddof=1)) if len(seeds) > 1 else 0.0,
                           final_l2_min=float(finals.min()), final_l2_max=float(finals.max()),
                           seconds_per_iteration_mean=float(np.mean(
                               [v["seconds_per_iteration"] for v in per_seed.values()])))
  summary = {"problem": problem.name, "num_steps": problem.num_steps, "config": config.to_dict(),
             "setup_seconds": setup_seconds, "reference": reference, "methods": methods,
             "devices": str(jax.devices()), "total_seconds": time.perf_counter() - t0}
  return summary, records_by_method
