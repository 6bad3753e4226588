"""The Adjoint Matching loss (AM paper Algorithm 1, Eq. 25) as a jittable pure function.

Given trajectories X of the fine-tuned model under the memoryless schedule (no gradient) and
the lean adjoint a (``am_jax.adjoint``), the loss regresses the control onto -sigma a:

    L(theta) = E sum_{k in S} | 2 / sigma(tau_k) (v_ft(X_k, tau_k; theta) - v_base(X_k, tau_k)) + sigma(tau_k) a_{k+1} |^2

(a_{k+1}, the adjoint after step k, is the exact discrete-time target; BUILD_NOTES.md.)  For a
non-memoryless diffusion (the biased baseline of paper Fig. 2) the control is
u = (1 + c)(v_ft - v_base) / sigma with c = sigma^2 / (2 eta), which is 2 (v_ft - v_base) / sigma when
memoryless.

The gradient flows only through v_ft.  Practical choices of the paper (App. G, as attributed by
public reproductions; each is an ``AMConfig`` field, see BUILD_NOTES.md for the checks):

* ``num_steps = 40`` uniform Euler-Maruyama steps; the coefficients of step k are evaluated at
  tau_k = t_k + time_offset * h so t = 0 is never evaluated.  The paper offsets by h
  (time_offset = 1); we default to 1/2, measured 2x closer to the data (BUILD_NOTES.md).
* ``noiseless_last_step``: the last step is an ODE step, so the reward gradient is taken at a
  noise-free X_1 (the adjoint passes through the same ODE step).
* Loss time steps S: ``num_random_timesteps`` (10) drawn without replacement from the first
  ``random_timestep_fraction`` (3/4) of the grid, plus the last ``num_last_timesteps`` (10) always.
  Each term is an independent regression with the same minimiser, so a subset changes the
  variance, not the fixed point.
* ``loss_clip``: each (sample, time) term is clipped at loss_clip * lambda^2 (1.6 lambda^2); a
  clipped term gives no gradient.  ``None`` disables it.

The per-term loss is the squared norm summed over data dimensions and averaged over the batch
and the selected times.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from am_jax import adjoint as adjoint_lib
from am_jax import sampling
from am_jax import schedules as schedules_lib
from am_jax import sharding as sharding_lib
from am_jax.dynamics import _bcast


@dataclasses.dataclass(frozen=True)
class AMConfig:
  """Static configuration of Adjoint Matching (hashable: safe as a jit static argument)."""

  schedule: schedules_lib.Schedule = dataclasses.field(default_factory=schedules_lib.LinearSchedule)
  reward_multiplier: float = 1.0
  num_steps: int = 40
  time_offset: float = 0.5
  noiseless_last_step: bool = True
  num_random_timesteps: int = 10
  random_timestep_fraction: float = 0.75
  num_last_timesteps: int = 10
  loss_clip: Optional[float] = 1.6
  solver: str = "scan"
  # Diffusion used to sample the fine-tuning trajectories.  Must be 'memoryless' to reach the
  # tilted distribution (Thm. 1); other values exist to reproduce the bias of paper Fig. 2.
  diffusion: object = "memoryless"

  def __post_init__(self):
    if self.num_steps < 1:
      raise ValueError(f"AMConfig.num_steps must be >= 1, got {self.num_steps}.")
    if not 0.0 < self.time_offset <= 1.0:
      raise ValueError(f"AMConfig.time_offset must be in (0, 1], got {self.time_offset}.")
    if not 0.0 < self.random_timestep_fraction <= 1.0:
      raise ValueError(f"AMConfig.random_timestep_fraction must be in (0, 1], got {self.random_timestep_fraction}.")
    if self.num_random_timesteps < 0 or self.num_last_timesteps < 0:
      raise ValueError("AMConfig.num_random_timesteps and num_last_timesteps must be >= 0.")
    if self.num_random_timesteps + self.num_last_timesteps == 0:
      raise ValueError("AMConfig selects no loss time step: set num_random_timesteps or num_last_timesteps > 0.")
    if self.loss_clip is not None and self.loss_clip <= 0:
      raise ValueError(f"AMConfig.loss_clip must be positive or None, got {self.loss_clip}.")
    if self.solver not in sampling.SOLVERS:
      raise ValueError(f"AMConfig.solver must be one of {sampling.SOLVERS}, got {self.solver!r}.")
    if not isinstance(self.schedule, schedules_lib.Schedule):
      raise TypeError(f"AMConfig.schedule must be a Schedule, got {self.schedule!r}.")
    schedules_lib.get_diffusion(self.diffusion)

  def coefficients(self) -> sampling.StepCoefficients:
    return sampling.make_coefficients(self.schedule, self.diffusion, self.num_steps, self.time_offset,
                                      self.noiseless_last_step)


class AMBatch(NamedTuple):
  """What one Adjoint Matching update regresses on (all without gradient).

  traj: (K+1, B, ...) states; adjoint: (K+1, B, ...) lean adjoint; rewards: (B,) raw rewards of X_1.
  """

  traj: jax.Array
  adjoint: jax.Array
  rewards: jax.Array


def select_timesteps(key, config: AMConfig):
  """Indices (M,) of the loss time steps: random ones from the early grid plus the last ones."""
  k_steps = config.num_steps
  n_last = min(config.num_last_timesteps, k_steps)
  pool = min(int(config.random_timestep_fraction * k_steps), k_steps - n_last)
  n_rand = min(config.num_random_timesteps, pool)
  last = jnp.arange(k_steps - n_last, k_steps, dtype=jnp.int32)
  if n_rand == 0:
    return last
  if n_rand == pool:
    rand = jnp.arange(pool, dtype=jnp.int32)
  else:
    rand = jax.random.choice(key, pool, (n_rand,), replace=False).astype(jnp.int32)
  return jnp.concatenate([jnp.sort(rand), last])


def make_am_batch(ft_apply_fn: Callable, ft_params, base_apply_fn: Callable, base_params, reward_fn: Callable,
                  key, x_shape, config: AMConfig, cond=(), mesh=None) -> AMBatch:
  """Samples fine-tuned memoryless trajectories and solves the lean adjoint (Alg. 1, lines 2-4).

  Args:
    ft_apply_fn, ft_params: fine-tuned model, ``ft_apply_fn(ft_params, x, t, *cond) -> v``.
    base_apply_fn, base_params: frozen base model, same signature.
    reward_fn: ``reward_fn(x, *cond) -> (B,)``.
    key: PRNG key for X_0 and the Brownian increments.
    x_shape: (B, ...) shape of a batch of samples.
    config: AMConfig.
    cond: tuple of conditioning arrays with leading batch axis B (e.g. labels), or ().
    mesh: optional ``jax.sharding.Mesh``; the batch axis of the noise, trajectories and adjoints
      is then constrained to the mesh's data axis (``am_jax.sharding``).
  """
  coeffs = config.coefficients()
  k0, kn = jax.random.split(key)
  x0 = sharding_lib.constrain_batch(jax.random.normal(k0, tuple(x_shape), jnp.float32), mesh, 0)
  noise = sharding_lib.constrain_batch(sampling.draw_noise(kn, config.num_steps, x_shape), mesh, 1)
  ft_params = jax.lax.stop_gradient(ft_params)
  traj = sampling.simulate(lambda x, t: ft_apply_fn(ft_params, x, t, *cond), x0, noise, coeffs, config.solver)
  traj = sharding_lib.constrain_batch(jax.lax.stop_gradient(traj), mesh, 1)
  a1, rewards = adjoint_lib.terminal_adjoint(reward_fn, traj[-1], config.reward_multiplier, cond)
  adj = adjoint_lib.lean_adjoint(lambda x, t: base_apply_fn(base_params, x, t, *cond), traj, a1, coeffs,
                                 config.solver)
  adj = sharding_lib.constrain_batch(jax.lax.stop_gradient(adj), mesh, 1)
  return AMBatch(traj, adj, rewards)


def _tile_cond(cond, m):
  return tuple(jnp.concatenate([c] * m, axis=0) for c in cond)


def adjoint_matching_loss(ft_apply_fn: Callable, ft_params, base_apply_fn: Callable, base_params, batch: AMBatch,
                          key, config: AMConfig = AMConfig(), cond=()):
  """Adjoint Matching regression loss (paper Eq. 25) on a subset of time steps.

  Args:
    ft_apply_fn: ``ft_apply_fn(params, x, t, *cond) -> v`` with x (N, ...), t (N,).  Any pytree
      params and any framework (Flax, Equinox, plain functions).
    ft_params: parameters being trained (the only thing differentiated).
    base_apply_fn, base_params: frozen base velocity model (gradient stopped).
    batch: AMBatch from ``make_am_batch`` (or your own trajectory/adjoint of shape (K+1, B, ...)).
    key: PRNG key for the random loss time steps.
    config: AMConfig (static).
    cond: conditioning arrays with leading axis B.

  Returns:
    (loss scalar, diagnostics dict): ``loss_unclipped``, ``clip_fraction``, ``reward_mean``,
    ``reward_std``, ``control_norm`` (mean |u|^2 at the loss times), ``target_norm`` (mean |sigma a|^2).
  """
  traj, adj = jax.lax.stop_gradient(batch.traj), jax.lax.stop_gradient(batch.adjoint)
  chex.assert_equal_shape([traj, adj])
  chex.assert_axis_dimension(traj, 0, config.num_steps + 1)
  coeffs = config.coefficients()
  idx = select_timesteps(key, config)
  m, b = idx.shape[0], traj.shape[1]
  x = traj[idx].reshape((m * b,) + traj.shape[2:])
  # The control of step k moves X_{k+1} (d X_{k+1} / d u_k = h sigma_k), so the discrete-time
  # optimality condition is u_k = -sigma_k E[a_{k+1} | X_k]: pair X_k with a_{k+1}.  (With a_k
  # instead, the stiff first memoryless step, whose Jacobian is 1 - h kappa(tau_0), can flip the
  # sign of the target; see BUILD_NOTES.md.)
  a = adj[idx + 1].reshape((m * b,) + traj.shape[2:])
  t = jnp.repeat(coeffs.tau[idx], b)
  sig = jnp.repeat(coeffs.loss_sigma[idx], b)
  one_plus_c = jnp.repeat(1.0 + coeffs.loss_drift_scale[idx], b)
  cond_m = _tile_cond(cond, m)
  v_ft = ft_apply_fn(ft_params, x, t, *cond_m)
  v_base = jax.lax.stop_gradient(base_apply_fn(base_params, x, t, *cond_m))
  chex.assert_equal_shape([v_ft, v_base, x])
  u = _bcast(one_plus_c / sig, x) * (v_ft - v_base)
  target = -_bcast(sig, x) * a
  terms = jnp.sum(((u - target) ** 2).reshape(m * b, -1), axis=-1)
  if config.loss_clip is not None:
    thresh = config.loss_clip * config.reward_multiplier**2
    clipped = jnp.minimum(terms, thresh)
    clip_fraction = jnp.mean(terms > thresh)
  else:
    clipped, clip_fraction = terms, jnp.zeros(())
  loss = jnp.mean(clipped)
  aux = {
      "loss_unclipped": jnp.mean(terms),
      "clip_fraction": clip_fraction,
      "reward_mean": jnp.mean(batch.rewards),
      "reward_std": jnp.std(batch.rewards),
      "control_norm": jnp.mean(jnp.sum((u**2).reshape(m * b, -1), -1)),
      "target_norm": jnp.mean(jnp.sum((target**2).reshape(m * b, -1), -1)),
  }
  return loss, aux


def adjoint_matching_objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape,
                               config: AMConfig = AMConfig(), cond=(), mesh=None):
  """One call: ``make_am_batch`` then ``adjoint_matching_loss``.  Differentiate w.r.t. ft_params."""
  k_batch, k_loss = jax.random.split(key)
  batch = make_am_batch(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, k_batch, x_shape, config, cond,
                        mesh)
  return adjoint_matching_loss(ft_apply_fn, ft_params, base_apply_fn, base_params, batch, k_loss, config, cond)


def flow_matching_loss(apply_fn: Callable, params, x1, key, schedule: schedules_lib.Schedule, cond=(),
                       t_range=(0.0, 1.0)):
  """Conditional flow-matching loss for pre-training a base velocity model.

  X_t = beta_t X_0 + alpha_t X_1 with X_0 ~ N(0, I), t ~ U(t_range); the regression target is the
  conditional velocity alphadot_t X_1 + betadot_t X_0, whose conditional mean is v(x, t)
  (AM_NOTES conventions).  Returns the mean over the batch of the squared error summed over dims.

  Args:
    apply_fn: ``apply_fn(params, x, t, *cond) -> v`` (B, ...).
    x1: (B, ...) data batch.  cond: conditioning arrays with leading axis B.
  """
  k_t, k_0 = jax.random.split(key)
  b = x1.shape[0]
  t = jax.random.uniform(k_t, (b,), jnp.float32, *t_range)
  x0 = jax.random.normal(k_0, x1.shape, x1.dtype)
  xt = _bcast(schedule.beta(t), x1) * x0 + _bcast(schedule.alpha(t), x1) * x1
  target = _bcast(schedule.alpha_dot(t), x1) * x1 + _bcast(schedule.beta_dot(t), x1) * x0
  v = apply_fn(params, xt, t, *cond)
  chex.assert_equal_shape([v, x1])
  return jnp.mean(jnp.sum(((v - target) ** 2).reshape(b, -1), axis=-1))
