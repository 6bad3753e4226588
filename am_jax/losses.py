"""The Adjoint Matching loss (AM paper Algorithm 1, Eq. 25) as a jittable pure function.

Given trajectories X of the fine-tuned model under the memoryless schedule (no gradient) and
the lean adjoint a (``am_jax.adjoint``), the loss regresses the control onto -sigma a:

    L(theta) = E sum_{k in S} | 2 / sigma(tau_k) (v_ft(X_k, tau_k; theta) - v_base(X_k, tau_k)) + sigma(tau_k) a_{k+1} |^2

(a_{k+1}, the adjoint after step k, is the exact discrete-time target; docs/maths.md section 3.)  For a
non-memoryless diffusion (the biased baseline of paper Fig. 2) the control is
u = (1 + c)(v_ft - v_base) / sigma with c = sigma^2 / (2 eta), which is 2 (v_ft - v_base) / sigma when
memoryless.

The gradient flows only through v_ft.  Practical choices of the paper (App. G, as attributed by
public reproductions; each is an ``AMConfig`` field, see docs/maths.md section 4 for the checks):

* ``num_steps = 40`` uniform Euler-Maruyama steps; the coefficients of step k are evaluated at
  tau_k = t_k + time_offset * h so t = 0 is never evaluated.  The paper offsets by h
  (time_offset = 1); we default to 1/2, measured 2x closer to the data (docs/maths.md section 2).
* ``noiseless_last_step``: the last step is an ODE step, so the reward gradient is taken at a
  noise-free X_1 (the adjoint passes through the same ODE step).
* Loss time steps S: ``num_random_timesteps`` (10) drawn without replacement from the first
  ``random_timestep_fraction`` (3/4) of the grid, plus the last ``num_last_timesteps`` (10) always.
  Each term is an independent regression with the same minimiser, so a subset changes the
  variance, not the fixed point.
* ``loss_clip``: each (sample, time) term is clipped at loss_clip * lambda^2; a clipped term gives no
  gradient.  Default ``None`` (off): the paper's 1.6 lambda^2 removes the heavy-tailed terms that carry the
  mode-mass signal and leaves the exact problems untrained (docs/maths.md section 4); opt in explicitly.

The per-term loss is the squared norm summed over data dimensions and averaged over the batch
and the selected times.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp

from am_jax import chunked
from am_jax import errors
from am_jax import parameterisation
from am_jax import adjoint as adjoint_lib
from am_jax import sampling
from am_jax import schedules as schedules_lib
from am_jax import sharding as sharding_lib
from am_jax import time_hints
from am_jax.dynamics import _bcast


# Validation bounds of AMConfig (docs/training_system.md, "Reliability").
MAX_REWARD_MULTIPLIER = 1e18  # lambda^2 (loss scale, clip threshold) stays finite in float32
MIN_TIME_OFFSET = 0.1  # memoryless first step multiplies X_0 by ~ 1 - 1/time_offset


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
  # Per-term clip at loss_clip * lambda^2 (None: off, the default).  The paper's 1.6 lambda^2 leaves the exact
  # problems untrained (docs/maths.md section 4): opt in with loss_clip=1.6 where large heavy-tailed terms hurt.
  loss_clip: Optional[float] = None
  solver: str = "scan"
  # Diffusion used to sample the fine-tuning trajectories.  Must be 'memoryless' to reach the
  # tilted distribution (Thm. 1); other values exist to reproduce the bias of paper Fig. 2.
  diffusion: object = "memoryless"
  # Memory (docs/performance.md section 12.3).  remat_segments = S > 0: ``adjoint_matching_objective`` keeps only S
  # segment-start states of the trajectory (S must divide num_steps) and recomputes each segment during
  # the backward adjoint, keeping only the states/adjoints of the loss time steps: O((S + K/S + M) B dim)
  # instead of O(K B dim), for K more forward passes of the fine-tuned model.  0 = off (store everything).
  remat_segments: int = 0
  # chunk_loss: evaluate the loss in chunks of n selected time steps (n = int(chunk_loss): True is 1; n must
  # divide the M loss steps), a lax.scan over the M / n chunks that takes each chunk's VJP at once and
  # accumulates the gradient in the fine-tuned params (``chunked.separable_loss_in_chunks``): the activations of
  # n * B rows live at a time instead of M * B, with no recomputation.  Same value and gradient to float
  # rounding; only ft_params are differentiated.  On a CPU it is also faster once the M * B rows' activations
  # outgrow the cache (docs/performance.md section 12.14: 1.1-1.6x faster steps on 2 CPU cores); False / 0: one
  # call at all M * B points.  On a multi-device mesh each device accumulates its own part of the gradient and
  # the parts are summed once a step (given the objective's mesh), not once per chunk.
  chunk_loss: Union[bool, int] = False
  # reuse_base_velocity: keep the base velocities v_base(X_k, tau_k) that the adjoint's VJPs evaluate anyway
  # (``AMBatch.base_velocity``) and use them in the loss instead of a second base forward at the M * B loss
  # points (solver 'scan', remat_segments = 0).  Same loss and gradient to float rounding (the base network then
  # runs at batch B instead of M * B, which XLA may round differently); False reproduces the older programs
  # bit for bit (tests/test_golden.py).
  reuse_base_velocity: bool = True
  # Mixed precision: dtype of the network evaluations (params and x cast, output back to float32;
  # ``parameterisation.mixed_precision``).  The SDE state, the adjoint and the loss stay float32.
  network_dtype: str = "float32"
  # Time integrator of the fine-tuning SDE, its lean adjoint and the loss target (docs/maths.md section 6):
  # 'euler' (Euler-Maruyama) or 'exponential' (exact linear part and noise with the data prediction held fixed;
  # DDPM ancestral for VP; memoryless or ODE diffusion only).
  integrator: str = "euler"

  def __post_init__(self):
    lam = self.reward_multiplier
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam <= 0:
      raise ValueError(f"AMConfig.reward_multiplier (lambda) must be a finite number > 0, got {lam!r}.")
    if lam > MAX_REWARD_MULTIPLIER:
      raise ValueError(f"AMConfig.reward_multiplier (lambda) = {lam!r}: must be <= {MAX_REWARD_MULTIPLIER:.0e} "
                       "(lambda^2 scales the loss and its clip threshold and overflows float32 above ~1.8e19).")
    for name in ("num_steps", "num_random_timesteps", "num_last_timesteps"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"AMConfig.{name} must be an integer, got {value!r}.")
    if self.num_steps < 1:
      raise ValueError(f"AMConfig.num_steps must be >= 1, got {self.num_steps}.")
    t0 = self.time_offset
    if isinstance(t0, bool) or not isinstance(t0, numbers.Real) or not 0.0 < t0 <= 1.0:
      raise ValueError(f"AMConfig.time_offset must be in (0, 1], got {t0!r}.")
    if t0 < MIN_TIME_OFFSET and isinstance(schedules_lib.get_diffusion(self.diffusion), schedules_lib.Memoryless):
      raise ValueError(f"AMConfig.time_offset = {t0!r}: must be in [{MIN_TIME_OFFSET}, 1] with the memoryless "
                       f"diffusion: its drift -kappa x has kappa ~ 1/t, so the first step multiplies X_0 by about "
                       f"1 - 1/time_offset ({1 - 1 / t0:.3g} here; -1 at the default 0.5).")
    if not 0.0 < self.random_timestep_fraction <= 1.0:
      raise ValueError(f"AMConfig.random_timestep_fraction must be in (0, 1], got {self.random_timestep_fraction}.")
    if self.num_random_timesteps < 0 or self.num_last_timesteps < 0:
      raise ValueError("AMConfig.num_random_timesteps and num_last_timesteps must be >= 0.")
    if self.num_random_timesteps + self.num_last_timesteps == 0:
      raise ValueError("AMConfig selects no loss time step: set num_random_timesteps or num_last_timesteps > 0.")
    clip = self.loss_clip
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not math.isfinite(clip)
                             or clip <= 0):
      raise ValueError(f"AMConfig.loss_clip must be a finite number > 0 or None (no clipping), got {clip!r}.")
    if self.solver not in sampling.SOLVERS:
      raise ValueError(f"AMConfig.solver must be one of {sampling.SOLVERS}, got {self.solver!r}.")
    if (not isinstance(self.remat_segments, int) or isinstance(self.remat_segments, bool)
        or self.remat_segments < 0 or (self.remat_segments and self.num_steps % self.remat_segments)):
      raise ValueError(f"AMConfig.remat_segments must be 0 (off) or a positive divisor of num_steps = "
                       f"{self.num_steps}, got {self.remat_segments!r}.")
    if self.remat_segments and self.solver != "scan":
      raise ValueError(f"AMConfig.remat_segments > 0 needs solver = 'scan', got solver = {self.solver!r}.")
    if not isinstance(self.chunk_loss, numbers.Integral) or self.chunk_loss < 0:
      raise TypeError(f"AMConfig.chunk_loss must be a bool or a number of loss time steps per chunk >= 0, got "
                      f"{self.chunk_loss!r}.")
    if self.chunk_loss and self.num_loss_timesteps % int(self.chunk_loss):
      raise ValueError(f"AMConfig.chunk_loss = {int(self.chunk_loss)} time steps per chunk must divide the "
                       f"{self.num_loss_timesteps} loss time steps (num_random_timesteps + num_last_timesteps).")
    if not isinstance(self.reuse_base_velocity, bool):
      raise TypeError(f"AMConfig.reuse_base_velocity must be a bool, got {self.reuse_base_velocity!r}.")
    if self.network_dtype not in parameterisation.NETWORK_DTYPES:
      raise ValueError(f"AMConfig.network_dtype must be one of {parameterisation.NETWORK_DTYPES}, got {self.network_dtype!r}.")
    if not isinstance(self.schedule, schedules_lib.Schedule):
      raise TypeError(f"AMConfig.schedule must be a Schedule, got {self.schedule!r}.")
    schedules_lib.get_diffusion(self.diffusion)
    if self.integrator not in sampling.INTEGRATORS:
      raise errors.ConfigError(f"AMConfig.integrator must be one of {sampling.INTEGRATORS}, got {self.integrator!r}.")
    if self.integrator == "exponential" and not isinstance(
        schedules_lib.get_diffusion(self.diffusion), (schedules_lib.Memoryless, schedules_lib.ZeroDiffusion)):
      raise errors.ConfigError(f"AMConfig.integrator = 'exponential' needs diffusion 'memoryless' (or 'ode'), "
                               f"got diffusion = {self.diffusion!r}.")

  @property
  def num_loss_timesteps(self) -> int:
    """M: how many time steps ``select_timesteps`` picks (random + last, bounded by the grid)."""
    n_rand, n_last, _ = _loss_timestep_counts(self)
    return n_rand + n_last

  def coefficients(self) -> sampling.StepCoefficients:
    return sampling.make_coefficients(self.schedule, self.diffusion, self.num_steps, self.time_offset,
                                      self.noiseless_last_step, self.integrator)


class AMBatch(NamedTuple):
  """What one Adjoint Matching update regresses on (all without gradient).

  traj: (K+1, B, ...) states; adjoint: (K+1, B, ...) lean adjoint; rewards: (B,) raw rewards of X_1;
  base_velocity: (K, B, ...) v_base(X_k, tau_k), the primal outputs of the adjoint's VJPs, so that the loss
  does not evaluate the base network again at its time steps (None: the loss evaluates it).
  """

  traj: jax.Array
  adjoint: jax.Array
  rewards: jax.Array
  base_velocity: Optional[jax.Array] = None


def _loss_timestep_counts(config: AMConfig):
  """(number of random, number of last, size of the random pool) of ``select_timesteps``."""
  k_steps = config.num_steps
  n_last = min(config.num_last_timesteps, k_steps)
  pool = min(int(config.random_timestep_fraction * k_steps), k_steps - n_last)
  return min(config.num_random_timesteps, pool), n_last, pool


def select_timesteps(key, config: AMConfig):
  """Indices (M,) of the loss time steps: random ones from the early grid plus the last ones."""
  k_steps = config.num_steps
  n_rand, n_last, pool = _loss_timestep_counts(config)
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
  ft_apply_fn = parameterisation.mixed_precision(ft_apply_fn, config.network_dtype)
  base_apply_fn = parameterisation.mixed_precision(base_apply_fn, config.network_dtype)
  k0, kn = jax.random.split(key)
  x0 = sharding_lib.constrain_batch(jax.random.normal(k0, tuple(x_shape), jnp.float32), mesh, 0)
  noise = sharding_lib.constrain_batch(sampling.draw_noise(kn, config.num_steps, x_shape), mesh, 1)
  ft_params = jax.lax.stop_gradient(ft_params)
  traj = sampling.simulate(lambda x, t: ft_apply_fn(ft_params, x, t, *cond), x0, noise, coeffs, config.solver)
  traj = sharding_lib.constrain_batch(jax.lax.stop_gradient(traj), mesh, 1)
  a1, rewards = adjoint_lib.terminal_adjoint(reward_fn, traj[-1], config.reward_multiplier, cond)
  base_v = lambda x, t: base_apply_fn(base_params, x, t, *cond)  # noqa: E731
  if config.solver == "scan" and config.reuse_base_velocity:  # the VJPs' primal outputs are free: keep them
    adj, v_base = adjoint_lib.lean_adjoint(base_v, traj, a1, coeffs, "scan", return_base_velocity=True)
    v_base = sharding_lib.constrain_batch(jax.lax.stop_gradient(v_base), mesh, 1)
  else:
    adj, v_base = adjoint_lib.lean_adjoint(base_v, traj, a1, coeffs, config.solver), None
  adj = sharding_lib.constrain_batch(jax.lax.stop_gradient(adj), mesh, 1)
  return AMBatch(traj, adj, rewards, v_base)


def _tile_cond(cond, m):
  return tuple(jnp.concatenate([c] * m, axis=0) for c in cond)


def adjoint_matching_loss(ft_apply_fn: Callable, ft_params, base_apply_fn: Callable, base_params, batch: AMBatch,
                          key, config: AMConfig = AMConfig(), cond=(), mesh=None):
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
    mesh: the mesh the batch is sharded over, or None (``loss_at_timesteps``).

  Returns:
    (loss scalar, diagnostics dict): ``loss_unclipped``, ``clip_fraction``, ``reward_mean``,
    ``reward_std``, ``control_norm`` (mean |u|^2 at the loss times), ``target_norm`` (mean |sigma a|^2).
  """
  traj, adj = jax.lax.stop_gradient(batch.traj), jax.lax.stop_gradient(batch.adjoint)
  chex.assert_equal_shape([traj, adj])
  chex.assert_axis_dimension(traj, 0, config.num_steps + 1)
  idx = select_timesteps(key, config)
  # The control of step k moves X_{k+1} (d X_{k+1} / d u_k = h sigma_k), so the discrete-time
  # optimality condition is u_k = -sigma_k E[a_{k+1} | X_k]: pair X_k with a_{k+1}.  (With a_k
  # instead, the stiff first memoryless step, whose Jacobian is 1 - h kappa(tau_0), can flip the
  # sign of the target; see docs/maths.md section 3.)
  v_base = None if batch.base_velocity is None else jax.lax.stop_gradient(batch.base_velocity)[idx]
  return loss_at_timesteps(ft_apply_fn, ft_params, base_apply_fn, base_params, traj[idx], adj[idx + 1], idx,
                           batch.rewards, config, cond, v_base, mesh)


def loss_at_timesteps(ft_apply_fn: Callable, ft_params, base_apply_fn: Callable, base_params, x_sel, a_sel, idx,
                      rewards, config: AMConfig = AMConfig(), cond=(), v_base_sel=None, mesh=None):
  """The loss of ``adjoint_matching_loss`` given the selected pairs: x_sel = X_k, a_sel = a_{k+1}, k in idx.

  x_sel, a_sel: (M, B, ...); idx: (M,) step indices; rewards: (B,) (diagnostics only).  With
  ``config.chunk_loss`` = n the M time steps are evaluated n at a time, the gradient accumulated chunk by chunk
  (``_chunked_loss``, ``chunked.separable_loss_in_chunks``).
  v_base_sel: optional (M, B, ...) base velocities v_base(X_k, tau_k) already computed (by the adjoint's
  VJPs, ``AMBatch.base_velocity``); None evaluates the base network here.
  mesh: the mesh the batch is sharded over (or None); with ``chunk_loss`` each device then accumulates its own
  part of the gradient and the parts are summed once (``chunked.separable_loss_in_chunks``), instead of one
  all-reduce per chunk.
  """
  x_sel, a_sel = jax.lax.stop_gradient(x_sel), jax.lax.stop_gradient(a_sel)
  chex.assert_equal_shape([x_sel, a_sel])
  if v_base_sel is not None:
    v_base_sel = jax.lax.stop_gradient(v_base_sel)
    chex.assert_equal_shape([x_sel, v_base_sel])
  chex.assert_axis_dimension(x_sel, 0, idx.shape[0])
  # With the base velocities in hand and a residual fine-tuned model around this base, ft - v_base is the residual
  # network alone: the base forward inside ft at the M * B loss points is skipped (to float rounding).
  difference = None if v_base_sel is None else parameterisation.residual_difference(ft_apply_fn, base_apply_fn,
                                                                                     base_params)
  if difference is not None:
    difference = parameterisation.mixed_precision(difference, config.network_dtype)
  ft_apply_fn = parameterisation.mixed_precision(ft_apply_fn, config.network_dtype)
  base_apply_fn = parameterisation.mixed_precision(base_apply_fn, config.network_dtype)
  coeffs = config.coefficients()
  m, b = idx.shape[0], x_sel.shape[1]
  thresh = None if config.loss_clip is None else config.loss_clip * config.reward_multiplier**2
  if config.chunk_loss:
    loss, terms, u_sq, target_sq = _chunked_loss(ft_apply_fn, ft_params, base_apply_fn, base_params, x_sel, a_sel,
                                                 idx, coeffs, cond, v_base_sel, difference, int(config.chunk_loss),
                                                 thresh, mesh)
  else:
    # Rows device by device (sharding.rows_by_device): each device evaluates its own M (B / G) rows; the plain
    # (M B)-row reshape (what it is on one device) made XLA gather them all onto every device.
    rows = lambda z: sharding_lib.rows_by_device(z, mesh)  # noqa: E731  (M, B, ...) -> (M B, ...)
    per_row = lambda v: sharding_lib.rows_per_step(v, b, mesh)  # noqa: E731  (M,) -> (M B,)
    x, a = rows(x_sel), rows(a_sel)
    t, sig, one_plus_c = per_row(coeffs.tau[idx]), per_row(coeffs.loss_sigma[idx]), per_row(
        1.0 + coeffs.loss_drift_scale[idx])
    v_base = None if v_base_sel is None else rows(v_base_sel)
    cond_rows = tuple(sharding_lib.rows_of_paths(c, m, mesh) for c in cond)
    # t = M blocks of B rows at one time (G M blocks of B / G on G devices): models.MLP embeds once per block
    with time_hints.rows_in_time_blocks(m * sharding_lib.devices_of(mesh)):
      diff = _ft_minus_base(ft_apply_fn, ft_params, base_apply_fn, base_params, difference, x, t, cond_rows, v_base)
    u = _bcast(one_plus_c / sig, x) * diff
    target = -_bcast(sig, x) * a
    terms = jnp.sum(((u - target) ** 2).reshape(m * b, -1), axis=-1)
    u_sq = jnp.sum((u**2).reshape(m * b, -1), -1)
    target_sq = jnp.sum((target**2).reshape(m * b, -1), -1)
    loss = jnp.mean(terms if thresh is None else jnp.minimum(terms, thresh))
  clip_fraction = jnp.zeros(()) if thresh is None else jnp.mean(terms > thresh)
  aux = {
      "loss_unclipped": jnp.mean(terms),
      "clip_fraction": clip_fraction,
      "reward_mean": jnp.mean(rewards),
      "reward_std": jnp.std(rewards),
      "control_norm": jnp.mean(u_sq),
      "target_norm": jnp.mean(target_sq),
  }
  return loss, aux


def _ft_minus_base(ft_apply_fn, ft_params, base_apply_fn, base_params, difference, x, t, cond, v_base):
  """ft(x, t) - v_base(x, t): the residual network alone when ``difference`` is given
  (``parameterisation.residual_difference``), else ft minus ``v_base`` (the base evaluated here when None)."""
  if difference is not None:
    diff = difference(ft_params, x, t, *cond)
  else:
    v_ft = ft_apply_fn(ft_params, x, t, *cond)
    if v_base is None:
      v_base = jax.lax.stop_gradient(base_apply_fn(base_params, x, t, *cond))
    chex.assert_equal_shape([v_ft, v_base])
    diff = v_ft - v_base
  chex.assert_equal_shape([diff, x])
  return diff


def _chunked_loss(ft_apply_fn, ft_params, base_apply_fn, base_params, x_sel, a_sel, idx, coeffs, cond,
                  v_base_sel, difference, steps_per_chunk: int, clip_threshold: Optional[float], mesh=None):
  """The clipped mean loss and the per-term losses, |u|^2, |target|^2 (M * B,), with ``steps_per_chunk`` = n loss
  time steps (n B rows) per ``lax.scan`` iteration and the gradient in ``ft_params`` accumulated chunk by chunk.

  The loss is a mean of per-term losses, each clipped on its own, so d loss / d term = [term < threshold] / (M B)
  is known as soon as a chunk's terms are (``chunked.separable_loss_in_chunks``: each chunk's VJP inside its
  iteration, no recomputation).  Only ``ft_params`` get a gradient; the diagnostics (terms, |u|^2, |target|^2)
  carry none.  ``difference``: ft - base without the base (``parameterisation.residual_difference``), used when
  given (with ``v_base_sel``).
  """
  m, b = idx.shape[0], x_sel.shape[1]
  s, rows = steps_per_chunk, m * b
  if m % s:
    raise ValueError(f"AMConfig.chunk_loss = {s} time steps per chunk must divide the {m} loss time steps.")
  chunks = lambda z: None if z is None else z.reshape((m // s, s) + z.shape[1:])  # noqa: E731
  data = tuple(chunks(z) for z in (x_sel, a_sel, coeffs.tau[idx], coeffs.loss_sigma[idx],
                                   1.0 + coeffs.loss_drift_scale[idx], v_base_sel))

  def chunk_terms(params, consts, chunk):
    base_p, cond = consts
    x, a, tau, sig, one_plus_c, v_base = chunk
    b = x.shape[1]  # B, or B / G paths on each of G devices (separable_loss_in_chunks with a mesh)
    flat_rows = lambda z: z.reshape((s * b,) + z.shape[2:])  # noqa: E731  (n, B, ...) -> (n B, ...)
    x, a = flat_rows(x), flat_rows(a)
    v_base = None if v_base is None else flat_rows(v_base)
    with time_hints.rows_in_time_blocks(s):  # n blocks of B rows, one time each
      diff = _ft_minus_base(ft_apply_fn, params, base_apply_fn, base_p, difference, x, jnp.repeat(tau, b),
                            _tile_cond(cond, s), v_base)
    u = _bcast(jnp.repeat(one_plus_c / sig, b).astype(x.dtype), x) * diff
    target = -_bcast(jnp.repeat(sig, b).astype(x.dtype), x) * a
    flat = lambda z: z.reshape(s * b, -1)  # noqa: E731
    return jnp.sum(flat(u - target) ** 2, -1), (jnp.sum(flat(u) ** 2, -1), jnp.sum(flat(target) ** 2, -1))

  def clipped_mean(terms):
    return jnp.mean(terms if clip_threshold is None else jnp.minimum(terms, clip_threshold))

  def term_weight(terms):
    return (jnp.ones_like(terms) if clip_threshold is None else (terms < clip_threshold).astype(terms.dtype)) / rows

  # Batch axes for the per-device gradient on a mesh: a chunk's x, a, v_base are (n, B, ...), cond (B, ...).
  batch_axes = ((None, 0), (1, 1, None, None, None, None if v_base_sel is None else 1))
  loss, terms, (u_sq, target_sq) = chunked.separable_loss_in_chunks(chunk_terms, ft_params, data, clipped_mean,
                                                                    term_weight, consts=(base_params, cond),
                                                                    mesh=mesh, batch_axes=batch_axes)
  return loss, terms, u_sq.reshape(rows), target_sq.reshape(rows)


def make_am_selection(ft_apply_fn: Callable, ft_params, base_apply_fn: Callable, base_params, reward_fn: Callable,
                      key, x_shape, idx, config: AMConfig, cond=(), mesh=None):
  """Bounded-memory ``make_am_batch``: only the pairs (X_k, a_{k+1}), k in idx, and the rewards.

  Same noise and arithmetic as ``make_am_batch`` + indexing, but the trajectory is kept at
  ``config.remat_segments`` segment starts (``sampling.simulate_checkpoints``) and rematerialised
  during the backward adjoint (``adjoint.lean_adjoint_remat``), and the noise is regenerated segment
  by segment (``sampling.noise_rows``, bit-identical rows).  Returns (x_sel, a_sel, rewards).
  """
  if not config.remat_segments:
    raise ValueError("make_am_selection needs AMConfig.remat_segments > 0.")
  coeffs = config.coefficients()
  ft_apply_fn = parameterisation.mixed_precision(ft_apply_fn, config.network_dtype)
  base_apply_fn = parameterisation.mixed_precision(base_apply_fn, config.network_dtype)
  k0, kn = jax.random.split(key)
  x0 = sharding_lib.constrain_batch(jax.random.normal(k0, tuple(x_shape), jnp.float32), mesh, 0)
  seg_len = config.num_steps // config.remat_segments

  def noise(j):  # rows [j L, (j+1) L) of make_am_batch's noise, regenerated (never the whole (K, B, ...))
    rows = sampling.noise_rows(kn, j * seg_len, seg_len, config.num_steps, x_shape)
    return sharding_lib.constrain_batch(rows, mesh, 1)

  ft_params = jax.lax.stop_gradient(ft_params)
  ft_v = lambda x, t: ft_apply_fn(ft_params, x, t, *cond)  # noqa: E731
  checkpoints, x1 = sampling.simulate_checkpoints(ft_v, x0, noise, coeffs, config.remat_segments)
  checkpoints = sharding_lib.constrain_batch(jax.lax.stop_gradient(checkpoints), mesh, 1)
  x1 = sharding_lib.constrain_batch(jax.lax.stop_gradient(x1), mesh, 0)
  a1, rewards = adjoint_lib.terminal_adjoint(reward_fn, x1, config.reward_multiplier, cond)
  x_sel, a_sel = adjoint_lib.lean_adjoint_remat(ft_v, lambda x, t: base_apply_fn(base_params, x, t, *cond),
                                                checkpoints, noise, a1, coeffs, idx)
  x_sel = sharding_lib.constrain_batch(jax.lax.stop_gradient(x_sel), mesh, 1)
  a_sel = sharding_lib.constrain_batch(jax.lax.stop_gradient(a_sel), mesh, 1)
  return x_sel, a_sel, rewards


def adjoint_matching_objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape,
                               config: AMConfig = AMConfig(), cond=(), mesh=None):
  """One call: ``make_am_batch`` then ``adjoint_matching_loss``.  Differentiate w.r.t. ft_params.

  With ``config.remat_segments > 0`` the bounded-memory path (``make_am_selection`` +
  ``loss_at_timesteps``) gives the same value and gradient (same keys, same noise) to float rounding.
  """
  k_batch, k_loss = jax.random.split(key)
  if config.remat_segments:
    idx = select_timesteps(k_loss, config)
    x_sel, a_sel, rewards = make_am_selection(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, k_batch,
                                              x_shape, idx, config, cond, mesh)
    return loss_at_timesteps(ft_apply_fn, ft_params, base_apply_fn, base_params, x_sel, a_sel, idx, rewards, config,
                             cond, mesh=mesh)
  batch = make_am_batch(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, k_batch, x_shape, config, cond,
                        mesh)
  return adjoint_matching_loss(ft_apply_fn, ft_params, base_apply_fn, base_params, batch, k_loss, config, cond, mesh)


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
