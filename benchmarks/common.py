"""Shared pieces of the benchmarks: the problem of a config, timers, the network-work floor.

A *problem* is what ``experiments/finetune.py`` builds for a config, with a freshly initialised base
(no pre-training: timings do not depend on the weights):

* MLP configs (``configs/gmm2d.py``): base MLP ``cfg.model``, residual MLP ``cfg.finetune.hidden``
  (``cfg.finetune.parameterisation`` 'control' / 'velocity') or the base copy ('full'); the config's reward.
* U-Net configs (``configs/digits_pretrain.py``): base U-Net on (8, 8, 1), class-conditional with
  labels drawn per step; fine-tuned = copy of the base ('full') or a zero-initialised residual U-Net of
  the same architecture ('control' / 'velocity'); reward = mean pixel value (linear, differentiable).

The *floor* of a train step is the network work it cannot avoid, with no solver around it: K forward
passes of the fine-tuned velocity at batch B (a ``lax.scan`` carrying x <- x + v / K so XLA cannot
drop or batch them), K VJPs of the base velocity (a reverse ``lax.scan`` carrying the cotangent), and
value_and_grad of a squared error of the fine-tuned net minus a base forward at M * B points (M loss
time steps).  Every result is returned, so nothing is dead code.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from am_jax import builders, losses, methods, models, parameterisation, profiling, sampling, sharding, training
from am_jax.problem import Problem
from am_jax import adjoint as adjoint_lib


class Bench(NamedTuple):
  """A benchmark setting: the library ``Problem`` (built by ``builders.build_problem``) + batch and optimizer."""

  cfg: ml_collections.ConfigDict
  problem: Bench
  batch: int
  optimizer: object

  @property
  def am_config(self) -> losses.AMConfig:
    return self.problem.config

  @property
  def x_shape(self) -> tuple:
    return self.problem.x_shape(self.batch)

  @property
  def params(self):
    return self.problem.init_params

  @property
  def base_params(self):
    return self.problem.base_params

  @property
  def reward_fn(self):
    return self.problem.reward_fn

  @property
  def cond_fn(self):
    return self.problem.cond_fn

  def ft_apply(self, base_params=None):
    """Fine-tuned velocity in ``am_config.network_dtype``, as the train step evaluates it."""
    return parameterisation.mixed_precision(self.problem.finetuned_apply(base_params), self.am_config.network_dtype)

  def base_net(self):
    """The base velocity ``apply(base_params, x, t, *cond)`` in ``am_config.network_dtype``."""
    return parameterisation.mixed_precision(self.problem.base_apply, self.am_config.network_dtype)

  def num_loss_steps(self) -> int:
    return int(losses.select_timesteps(jax.random.PRNGKey(0), self.am_config).shape[0])


def jax_host_devices(n: int) -> int:
  """Makes jax see ``n`` devices: on a CPU, ``n`` XLA host devices (``--xla_force_host_platform_device_count``, set
  here before jax starts its backend unless XLA_FLAGS already sets it); returns ``jax.device_count()``.

  Raises ValueError naming ``--jax_devices`` if n < 1 or jax has fewer than n devices.
  """
  if n < 1:
    raise ValueError(f"--jax_devices={n}: must be >= 1.")
  flags_env = os.environ.get("XLA_FLAGS", "")
  if n > 1 and "xla_force_host_platform_device_count" not in flags_env:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if xla_bridge.backends_are_initialized():
      raise ValueError(f"--jax_devices={n}: jax's backend is already started; set XLA_FLAGS="
                       f"--xla_force_host_platform_device_count={n} before the process starts.")
    os.environ["XLA_FLAGS"] = f"{flags_env} --xla_force_host_platform_device_count={n}".strip()
  count = jax.device_count()
  if count < n:
    raise ValueError(f"--jax_devices={n}: jax has {count} {jax.default_backend()} device(s).")
  return count


def _unet_without_fast_vjp(cfg, shape, seed, zero_init_output=False):
  m = cfg.model  # JAX's own conv VJPs (for before/after timings)
  return models.functional(models.UNet(shape[-1], tuple(m.channels), m.time_embed_dim, m.num_classes,
                                       zero_init_output, fast_conv_vjp=False, rngs=nnx.Rngs(seed)))


def build_problem(cfg, batch_size: int = 0, num_steps: int = 0, fast_conv_vjp: bool = True,
                  **am_overrides) -> Bench:
  """The fine-tuning problem of ``cfg`` (a configs/*.py ConfigDict) with a randomly initialised base;
  0 keeps the config's value.  ``fast_conv_vjp=False`` builds U-Nets with JAX's own convolution VJPs;
  ``am_overrides`` replace AMConfig fields.
  """
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  if batch_size:
    cfg.finetune.batch_size = int(batch_size)
  if num_steps:
    cfg.am.num_steps = int(num_steps)
  if cfg.model.kind == "mlp" and cfg.reward.name not in ("linear", "quadratic"):
    raise ValueError("benchmarks: MLP configs need a linear or quadratic reward.")
  if cfg.model.kind != "mlp":  # images: the mean pixel value (a cheap linear reward)
    cfg.reward = dict(name="linear", c=1.0 / float(np.prod(builders.data_shape(cfg))), a=0.0, b=0.0)
  cfg.base_checkpoint = "(random init)"
  shape = builders.data_shape(cfg)
  unet_slow = cfg.model.kind == "unet" and not fast_conv_vjp
  base_apply, base_params = (_unet_without_fast_vjp(cfg, shape, cfg.seed) if unet_slow
                             else builders.build_velocity_model(cfg, shape, cfg.seed))
  problem = builders.build_problem(cfg, base_apply, base_params)
  if unet_slow and problem.parameterisation != "full":
    net_apply, params = _unet_without_fast_vjp(cfg, shape, cfg.seed + 1, True)
    problem = problem.replace(net_apply=net_apply, init_params=params)
  elif unet_slow:
    problem = problem.replace(net_apply=base_apply)
  if am_overrides:
    problem = problem.with_config(**am_overrides)
  optimizer = builders.build_optimizer(cfg, "finetune.optimizer", cfg.finetune.steps)
  return Bench(cfg, problem, int(cfg.finetune.batch_size), optimizer)


def make_step(bench: Bench, mesh=None, config: Optional[losses.AMConfig] = None, donate: bool = True):
  """The jitted fine-tune step of ``am-jax finetune`` (``training.make_finetune_step``) with AM."""
  problem = bench.problem if config is None else bench.problem.replace(config=config)
  return training.make_finetune_step(problem, methods.am(problem.config), bench.optimizer, bench.batch, mesh,
                                     float(bench.cfg.finetune.ema_decay), donate=donate)


def init_state(bench: Bench, mesh=None):
  state = training.init_state(bench.params, bench.optimizer, bench.cfg.seed)
  if mesh is not None:
    return sharding.replicate_tree(state, mesh), sharding.replicate_tree(bench.base_params, mesh)
  return state, jax.tree.map(jnp.asarray, bench.base_params)


per_row_time = models.per_row_time  # the code before models.MLP's shared-time path (issue 17)


@contextlib.contextmanager
def _swapped(module, name: str, value):
  """``module.name = value`` while the block runs (programs traced inside see it)."""
  original = getattr(module, name)
  setattr(module, name, value)
  try:
    yield
  finally:
    setattr(module, name, original)


def base_in_loss():
  """Steps traced inside evaluate the whole fine-tuned model at the loss points (ft - v_base), as before the loss
  took the residual network alone (``parameterisation.residual_difference``, issue 17): the step before it."""
  return _swapped(parameterisation, "residual_difference", lambda *args: None)


def per_row_loss_time():
  """Programs traced inside evaluate ``models.MLP`` per row at the loss points (the losses' time-block hint
  ignored, ``time_hints.rows_in_time_blocks``), as before the time-block path (issue 17): the numerics before it,
  with the sampler / adjoint shared-time path kept (unlike ``per_row_time``)."""
  return _swapped(models, "_time_blocks", lambda: None)


def compile_timed(jitted, *args):
  """(compiled, seconds of lower + compile)."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def median_time(run: Callable, warm: int = 3, iters: int = 20) -> dict:
  """Median / min / max seconds of ``run()`` (blocked) after ``warm`` untimed calls."""
  for _ in range(warm):
    jax.block_until_ready(run())
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    ts.append(time.perf_counter() - t0)
  return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "iters": iters}


def interleaved(runs: dict, rounds: int = 5, iters: int = 10, warm: int = 2) -> dict:
  """Median seconds of each ``runs[name]()``, measured in interleaved rounds (robust on a shared machine).

  Every round times each function ``iters`` times (after ``warm`` calls in the first round); the result
  per name is the median of the round medians, with the spread of the round medians.
  """
  per = {name: [] for name in runs}
  for r in range(rounds):
    for name, run in runs.items():
      per[name].append(median_time(run, warm if r == 0 else 0, iters)["median_s"])
  return {name: {"median_s": statistics.median(v), "round_medians_s": v, "rounds": rounds, "iters": iters}
          for name, v in per.items()}


def step_runner(step, state, base_params):
  """(run, compile_s, compiled): ``run()`` advances a donating ``step(state, base_params)`` by one step."""
  compiled, t_compile = compile_timed(step, state, base_params)
  holder = [state]

  def run():
    holder[0], m = compiled(holder[0], base_params)
    return m["loss"]

  return run, t_compile, compiled


def time_train_step(step, state, base_params, warm: int = 3, iters: int = 20) -> dict:
  """Compile time + median warm step time of a (donating) ``step(state, base_params)``."""
  run, t_compile, compiled = step_runner(step, state, base_params)
  out = median_time(run, warm, iters)
  out["compile_s"] = t_compile
  out["memory"] = memory_stats(compiled)
  return out


memory_stats = profiling.memory_stats  # (moved to the library: the comparison uses it too)


# ----------------------------------------------------------------------------------------------
# The pieces of one step, jitted separately with the step's shapes


def make_pieces(problem: Bench, config: Optional[losses.AMConfig] = None):
  """Jitted (sample, adjoint, loss_update) with exactly the work of the corresponding step parts.

  sample(params, base_params, key, cond) -> traj; adjoint(traj, base_params, cond) -> (adj, rewards);
  loss_update(state, base_params, traj, adj, rewards, key, cond) -> (state, loss).
  """
  config = config or problem.am_config
  coeffs = config.coefficients()
  x_shape = problem.x_shape

  def sample(params, base_params, key, cond):
    ft = problem.ft_apply(base_params)
    k0, kn = jax.random.split(key)
    x0 = jax.random.normal(k0, x_shape, jnp.float32)
    noise = sampling.draw_noise(kn, config.num_steps, x_shape)
    return sampling.simulate(lambda x, t: ft(params, x, t, *cond), x0, noise, coeffs, config.solver)

  def adjoint(traj, base_params, cond):
    a1, r = adjoint_lib.terminal_adjoint(problem.reward_fn, traj[-1], config.reward_multiplier, cond)
    adj = adjoint_lib.lean_adjoint(lambda x, t: problem.base_net()(base_params, x, t, *cond), traj, a1, coeffs,
                                   config.solver)
    return adj, r

  def loss_update(state, base_params, traj, adj, rew, key, cond):
    ft = problem.ft_apply(base_params)
    batch = losses.AMBatch(traj, adj, rew)

    def loss_fn(p):
      return losses.adjoint_matching_loss(ft, p, problem.base_net(), base_params, batch, key, config, cond)

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return training._apply_update(state, grads, problem.optimizer, float(problem.cfg.finetune.ema_decay)), loss

  return jax.jit(sample), jax.jit(adjoint), jax.jit(loss_update)


def piece_runners(problem: Bench, state, base_params, config=None) -> dict:
  """{'sample', 'adjoint', 'loss_update'} -> zero-argument runners of the compiled pieces."""
  sample, adjoint, loss_update = make_pieces(problem, config)
  key = jax.random.PRNGKey(1)
  cond = problem.cond_fn(jax.random.PRNGKey(2), problem.batch) if problem.cond_fn else ()
  traj = sample(state.params, base_params, key, cond)
  adj, rew = adjoint(traj, base_params, cond)
  return {"sample": lambda: sample(state.params, base_params, key, cond),
          "adjoint": lambda: adjoint(traj, base_params, cond),
          "loss_update": lambda: loss_update(state, base_params, traj, adj, rew, key, cond)[1]}


def time_pieces(problem: Bench, state, base_params, config=None, warm: int = 3, iters: int = 20) -> dict:
  return {k: median_time(r, warm, iters) for k, r in piece_runners(problem, state, base_params, config).items()}


# ----------------------------------------------------------------------------------------------
# The floor


def make_floor(problem: Bench, num_steps: Optional[int] = None, num_loss_steps: Optional[int] = None,
               parts=("forward", "vjp", "loss")):
  """Jitted ``floor(params, base_params, x0, cond) -> outputs``: the network work of one step, no solver.

  parts: any of 'forward' (K fine-tuned forwards at batch B), 'vjp' (K base VJPs at batch B; needs the
  forward states, so without 'forward' they are fed x0 each step) and 'loss' (fine-tuned
  value_and_grad + base forward at M * B points).
  """
  k_steps = num_steps or problem.am_config.num_steps
  m = num_loss_steps or problem.num_loss_steps()
  b = problem.batch
  ts = jnp.linspace(0.5 / k_steps, 1.0 - 0.5 / k_steps, k_steps, dtype=jnp.float32)
  h = 1.0 / k_steps

  def floor(params, base_params, x0, cond):
    ft = problem.ft_apply(base_params)
    outs = {}
    if "forward" in parts:
      def fwd(x, t):
        x = x + h * ft(params, x, jnp.full((b,), t), *cond)
        return x, x

      x_end, xs = jax.lax.scan(fwd, x0, ts)
      outs["x_end"] = x_end
    else:
      xs = jnp.broadcast_to(x0, (k_steps,) + x0.shape)
    if "vjp" in parts:
      def bwd(a, inp):
        x, t = inp
        _, vjp = jax.vjp(lambda y: problem.base_net()(base_params, y, jnp.full((b,), t), *cond), x)
        a = a + h * vjp(a)[0]
        return a, a

      a0, adj = jax.lax.scan(bwd, xs[-1], (xs, ts), reverse=True)
      outs["a0"] = a0
    else:
      adj = xs
    if "loss" in parts:
      idx = (jnp.arange(m) * k_steps) // m
      xl = xs[idx].reshape((m * b,) + x0.shape[1:])
      al = adj[idx].reshape((m * b,) + x0.shape[1:])
      tl = jnp.repeat(ts[idx], b)
      cond_m = tuple(jnp.concatenate([c] * m) for c in cond)

      def loss(p):
        v = ft(p, xl, tl, *cond_m) - jax.lax.stop_gradient(problem.base_net()(base_params, xl, tl, *cond_m))
        return jnp.mean((v + al) ** 2)

      outs["loss"], outs["grads"] = jax.value_and_grad(loss)(params)
    return outs

  return jax.jit(floor)


def floor_runner(problem: Bench, params, base_params, **kw):
  """(run, compile_s) of the floor (``make_floor`` keyword arguments)."""
  floor = make_floor(problem, **kw)
  x0 = jax.random.normal(jax.random.PRNGKey(3), problem.x_shape, jnp.float32)
  cond = problem.cond_fn(jax.random.PRNGKey(2), problem.batch) if problem.cond_fn else ()
  compiled, t_compile = compile_timed(floor, params, base_params, x0, cond)
  return (lambda: compiled(params, base_params, x0, cond)), t_compile


def time_floor(problem: Bench, params, base_params, warm: int = 3, iters: int = 20, **kw) -> dict:
  run, t_compile = floor_runner(problem, params, base_params, **kw)
  out = median_time(run, warm, iters)
  out["compile_s"] = t_compile
  return out


# ----------------------------------------------------------------------------------------------
# Output


def cpu_model() -> str:
  """The host CPU as /proc/cpuinfo names it, with its family ('AMD EPYC (family 26)'); '' where unreadable.

  Recorded because ratios against torch depend on it: torch's (MKL) dots ran at about XLA's rate per core on the
  machine of 2026-11-26 and at half of it on the AMD EPYC family 26 of 2026-11-27 (docs/performance.md 12.14).
  """
  fields = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    return platform.processor()
  name = fields.get("model name", "")
  return f"{name} (family {fields['cpu family']})" if name and "cpu family" in fields else name


def machine_info() -> dict:
  if jax.default_backend() == "cpu":
    machine = f"{platform.machine()} CPU, {len(os.sched_getaffinity(0))} cores usable"
  else:
    machine = jax.devices()[0].device_kind
  return {"date": time.strftime("%Y-%m-%d"), "machine": machine, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
          "python": platform.python_version()}


def load_config(path: str):
  """A configs/*.py file's get_config() (for scripts that do not use absl config flags)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench_cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def write_json(path: str, obj: dict):
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, default=float)
  print(f"wrote {path}")
