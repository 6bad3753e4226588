"""Minimal end-to-end fine-tune, with any method of ``am_jax.methods``, on an exact Gaussian-mixture base.

Base: the exact mixture velocity (``am_jax.gmm.velocity``), so every error is a fine-tuning error.
Fine-tuned: base + a small Flax MLP residual initialised to output zero.  Optimiser: optax Adam.
Each training step (sample trajectories, adjoint, loss, gradient, update) is one ``jax.jit``.
Used by the tests, by ``experiments/toy_figure.py`` / ``compare_toy.py`` and as a template for user code.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, NamedTuple, Optional

import jax
import numpy as np
import optax
from flax import nnx

from am_jax import dynamics
from am_jax import gmm as gmm_lib
from am_jax import losses
from am_jax import methods
from am_jax import metrics
from am_jax import models
from am_jax import parameterisation as parameterisation_lib
from am_jax import sampling

__all__ = ["LR_SCHEDULES", "TUNED_OPTIMISER", "ToyResult", "evaluate_against_target", "finetune_mixture",
           "learning_rate_schedule", "mixture_base"]

LR_SCHEDULES = ("constant", "cosine", "linear")
# The optimiser that reaches the exact tilt at the same budget (1000 steps): cosine decay to 0 from a 20x higher
# peak, evaluated with the EMA of the iterates (docs/maths.md section 7, ``python -m benchmarks.convergence
# --part=noise`` / ``--part=speed``).  The distance left at lr 1e-3 or 3e-3 was under-training (moving mass between
# modes is slow) plus the noise of a constant rate, not the K = 40 loss's discrete optimum.
# ``finetune_mixture(..., **toy.TUNED_OPTIMISER)``; the signature's defaults stay Adam 1e-3 constant, no EMA (the
# method tests and the golden runs were measured with them); ``experiments/toy_figure.py`` (Fig. 2) uses this.
TUNED_OPTIMISER = dict(learning_rate=2e-2, lr_schedule="cosine", ema_decay=0.99)


class ToyResult(NamedTuple):
  params: object            # residual params used for evaluation (pytree): the EMA when ema_decay > 0, else the last
  apply_fn: Callable        # fine-tuned velocity apply_fn(params, x, t)
  history: dict             # step -> diagnostics (floats) at logged steps
  seconds: float            # training wall-clock (without the compilation of the first step and without logging)
  config: losses.AMConfig   # the AMConfig it was trained with (its grid is the default sampling grid)
  cpu_seconds: float = 0.0  # process CPU time over the span of ``seconds`` (all threads; robust to a shared machine)


def mixture_base(gmm: gmm_lib.GaussianMixture, schedule, parameterisation: str = "velocity") -> Callable:
  """The exact mixture as a base ``apply_fn(params, x, t, *cond)`` (params = the mixture).

  'epsilon': eps(x, t) = ``dynamics.velocity_to_epsilon`` of the exact velocity, wrapped back by
  ``dynamics.epsilon_model_as_velocity`` -- the path an epsilon-prediction diffusion model takes.
  """
  vel = lambda p, x, t, *c: gmm_lib.velocity(p, x, t, schedule)  # noqa: E731
  if parameterisation == "velocity":
    return vel
  if parameterisation == "epsilon":
    eps = lambda p, x, t, *c: dynamics.velocity_to_epsilon(vel(p, x, t), x, t, schedule)  # noqa: E731
    return dynamics.epsilon_model_as_velocity(eps, schedule)
  raise ValueError(f"base parameterisation must be 'velocity' or 'epsilon', got {parameterisation!r}.")


def learning_rate_schedule(learning_rate: float, steps: int, lr_schedule: str = "constant"):
  """optax learning rate: 'constant', or 'cosine' / 'linear' decay from ``learning_rate`` to 0 over ``steps``.

  Decay to 0 is what removes the stationary noise of Adam at a constant rate (the iterate keeps a spread of
  order lr around the optimum; docs/maths.md section 7 measures it on the exact problems).
  """
  if lr_schedule not in LR_SCHEDULES:
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}.")
  if lr_schedule == "cosine":
    return optax.cosine_decay_schedule(learning_rate, max(steps, 1))
  if lr_schedule == "linear":
    return optax.linear_schedule(learning_rate, 0.0, max(steps, 1))
  return learning_rate


def finetune_mixture(gmm: gmm_lib.GaussianMixture, reward_fn: Callable, config: losses.AMConfig = losses.AMConfig(),
                     *, objective: Optional[methods.Objective] = None, steps: int = 1000, batch_size: int = 512,
                     learning_rate: float = 1e-3, lr_schedule: str = "constant", ema_decay: float = 0.0,
                     hidden=(64, 64), parameterisation: str = "control", seed: int = 0,
                     base: str = "velocity", init: Optional[gmm_lib.GaussianMixture] = None, log_every: int = 0,
                     eval_fn: Optional[Callable] = None, log_fn: Optional[Callable] = print) -> ToyResult:
  """Fine-tunes an exact mixture base toward p_base exp(lambda * reward) with any method's objective.

  Base: the exact mixture velocity (``mixture_base``); fine-tuned: base + zero-initialised MLP residual
  (``parameterisation.residual_model``: differentiable in x, as the methods that differentiate through states
  need); Adam; one ``jax.jit`` per step (sample, adjoint, loss, gradient, update).

  Args:
    gmm: exact base mixture (its closed-form velocity is the frozen base model).
    reward_fn: ``reward_fn(x (B, d)) -> (B,)``, the raw reward; lambda is ``config.reward_multiplier``.
    config: AMConfig: schedule, sampling grid of the result (``evaluate_against_target``), network_dtype of the
      residual MLP (the exact base stays float32) and, by default, the objective's config (keep the default
      ``loss_clip=None``: the paper's clip removes the informative heavy-tailed terms, docs/maths.md section 4).
    objective: an ``am_jax.methods`` objective, e.g. ``methods.eam(config, num_times=32)``; build it with the same
      ``config``.  Default: ``methods.am(config)`` (Adjoint Matching) with the network cast done here.
    steps, batch_size, learning_rate: Adam optimisation of the residual MLP (``hidden`` widths).
    lr_schedule: 'constant', 'cosine' or 'linear' (decay to 0 over ``steps``; ``learning_rate_schedule``).
    ema_decay: > 0: ``result.params`` (and ``eval_fn``) use the debiased EMA of the iterates (``optax.ema``) instead
      of the last iterate; 0: the last iterate.
    parameterisation: 'control' (net predicts u) or 'velocity' (``parameterisation.residual_model``).
    base: 'velocity' or 'epsilon' (``mixture_base``).
    init: start the fine-tuned model at the exact velocity of this mixture instead of the base
      (fixed-point experiments: does a method stay at / move away from a given distribution?).
    log_every: every this many steps (and at the last) ``history[step]`` gets the step's aux (floats),
      ``wall_s`` (training seconds so far) and ``eval_fn(apply_fn, params)`` (a dict; not timed); 0 = never.
    log_fn: prints a line per logged step (None: silent).

  Returns:
    ToyResult; ``result.apply_fn(result.params, x, t)`` is the fine-tuned velocity.
  """
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}.")
  schedule = config.schedule
  base_apply = mixture_base(gmm, schedule, base)
  net = models.MLP(gmm.dim, hidden=hidden, zero_init_output=True, rngs=nnx.Rngs(seed))
  net_apply, params = models.functional(net)
  # config.network_dtype applies to the residual MLP only: the exact mixture base is not a network
  # and stays float32 (the objective then runs with float32 for the apply_fns it is given).
  net_apply = parameterisation_lib.mixed_precision(net_apply, config.network_dtype)
  if objective is None:
    objective = methods.am(dataclasses.replace(config, network_dtype="float32"))
  start_apply, start_params = (base_apply, gmm) if init is None else (mixture_base(init, schedule, base), init)
  ft_apply = parameterisation_lib.residual_model(start_apply, start_params, net_apply, schedule, parameterisation)
  opt = optax.adam(learning_rate_schedule(learning_rate, steps, lr_schedule))
  # The EMA is an optax transformation applied to the params themselves (debiased: a weighted mean of the
  # iterates seen so far, no pull toward the zero initialisation).
  ema = optax.ema(ema_decay, debias=True) if ema_decay else None
  opt_state = (opt.init(params), ema.init(params) if ema else None)

  def eval_params(params, opt_state):
    """The debiased EMA (``optax.ema`` state: raw average ``ema`` after ``count`` updates), or the last iterate."""
    if not ema:
      return params
    state = opt_state[1]
    return jax.tree.map(lambda e: e / (1.0 - ema_decay ** state.count), state.ema)

  @jax.jit
  def train_step(params, opt_state, key):
    def loss_fn(p):
      return objective(ft_apply, p, base_apply, gmm, reward_fn, key, (batch_size, gmm.dim))
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, adam_state = opt.update(grads, opt_state[0], params)
    params = optax.apply_updates(params, updates)
    ema_state = ema.update(params, opt_state[1])[1] if ema else None
    return params, (adam_state, ema_state), dict(aux, loss=loss)

  key = jax.random.PRNGKey(seed)
  history, elapsed, cpu, start, cpu_start = {}, 0.0, 0.0, None, None
  for step in range(steps):
    key, sub = jax.random.split(key)
    params, opt_state, aux = train_step(params, opt_state, sub)
    if step == 0:
      jax.block_until_ready(params)
      start, cpu_start = time.perf_counter(), time.process_time()
    if log_every and (step % log_every == 0 or step == steps - 1):
      jax.block_until_ready(params)
      elapsed += time.perf_counter() - start
      cpu += time.process_time() - cpu_start
      entry = {k: float(v) for k, v in aux.items()}
      entry["wall_s"] = elapsed
      if eval_fn is not None:
        entry.update(eval_fn(ft_apply, eval_params(params, opt_state)))
      history[step] = entry
      if log_fn:
        log_fn(f"step {step:5d}  loss {entry['loss']:.4f}  reward {entry['reward_mean']:.4f}")
      start, cpu_start = time.perf_counter(), time.process_time()
  jax.block_until_ready(params)
  elapsed += time.perf_counter() - start
  cpu += time.process_time() - cpu_start
  return ToyResult(eval_params(params, opt_state), ft_apply, history, elapsed, config, cpu)


def evaluate_against_target(result: ToyResult, target: gmm_lib.GaussianMixture, schedule=None, *,
                            diffusion="ode", num_samples: int = 20000, num_steps=None, seed: int = 1) -> dict:
  """Samples the fine-tuned model and measures W1 (1-D) or sliced W1 (d > 1) to an exact target.

  ``num_steps=None`` samples on the training grid (same K and time offset).  The control net is
  only trained at the grid times tau_k; a memoryless SDE on a finer grid evaluates it at smaller
  t, where sigma(t) is largest, and measured 2-3x farther from the target (docs/maths.md section 2).
  Also reports the distance between two independent target samples of the same size (the noise
  floor) and, in 1-D, ``distance_to_cdf``: W1 to the exact target CDF (no second-sample noise).
  """
  schedule = result.config.schedule if schedule is None else schedule
  if num_steps is None:
    num_steps = result.config.num_steps
  offset = result.config.time_offset
  k_model, k_t1, k_t2 = jax.random.split(jax.random.PRNGKey(seed), 3)
  xs = jax.jit(lambda p, k: sampling.sample(result.apply_fn, p, k, (num_samples, target.dim), schedule, diffusion,
                                            num_steps, offset))(result.params, k_model)
  ref = gmm_lib.sample(target, k_t1, num_samples)
  ref2 = gmm_lib.sample(target, k_t2, num_samples)
  dist = metrics.wasserstein1_1d if target.dim == 1 else metrics.sliced_wasserstein1
  mass = metrics.mode_mass(xs, target.means)
  extra = {}
  if target.dim == 1:
    extra["distance_to_cdf"] = metrics.wasserstein1_to_cdf(xs, lambda z: np.asarray(gmm_lib.cdf_1d(target, z)))
  return {**extra, "distance": dist(xs, ref), "noise_floor": dist(ref2, ref), "mode_mass": mass.tolist(),
          "target_mass": [float(w) for w in target.weights], "samples": xs}
