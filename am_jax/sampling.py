"""Forward simulation of the generative SDE family on a fixed time grid.

Discretisation (documented in docs/maths.md section 2, "t = 0"): the grid is t_k = k / K, k = 0..K, and step
k (from t_k to t_{k+1}, size h_k) is one Euler-Maruyama step whose coefficients are evaluated at
tau_k = t_k + offset * h_k (default offset = 1/2, the step midpoint):

    X_{k+1} = X_k + h_k [v(X_k, tau_k) + c_k (v(X_k, tau_k) - kappa_k X_k)] + sigma_k sqrt(h_k) xi_k,

with c_k = sigma(tau_k)^2 / (2 eta(tau_k)) (c = 1 memoryless, 0 ODE) and xi_k ~ N(0, I) drawn up
front.  Since tau_k > 0 the 1/t singularity of the memoryless drift at t = 0 is never evaluated.
Optionally the last step is noiseless (sigma = c = 0: an ODE step), as in AM paper App. G.

Two interchangeable solvers apply exactly this map: ``'diffrax'`` (diffrax.Euler on a
MultiTerm(ODETerm, ControlTerm) with StepTo over the grid, SaveAt every step, and the pre-drawn
increments as the control) and ``'scan'`` (a ``lax.scan`` of the same step: same noise, same grid,
same arithmetic).  ``tests/test_sampling.py`` checks they agree to float tolerance.

``integrator='exponential'`` (docs/maths.md section 6; memoryless or ODE diffusion) replaces the Euler step by
the exact solution of the step's linear SDE with the network's data prediction D = E[X_1 | x] held fixed:

    X_{k+1} = lin_k X_k + gain_k v(X_k, tau_k) + noise_scale_k xi_k

(DDPM ancestral / DDIM eta = 1 for the VP schedule, DDIM for the ODE).  Its coefficients are the optional
fields ``lin``, ``gain``, ``noise_scale`` of ``StepCoefficients`` (None for Euler, whose arithmetic is
unchanged); every stepping function here dispatches on them (``advance``).  The diffrax path uses the custom
solver ``am_jax.integrators.ExponentialIntegrator``.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import chex
import diffrax
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from am_jax import schedules as schedules_lib
from am_jax import time_hints
from am_jax.dynamics import _bcast

SOLVERS = ("scan", "diffrax")
INTEGRATORS = ("euler", "exponential")
SAMPLERS = INTEGRATORS + ("dpmpp_2m",)  # ``sample`` only: the multistep sampler has no training path


class StepCoefficients(NamedTuple):
  """Per-step constants of a discretised process (all float32 arrays).

  Attributes:
    t: (K+1,) grid nodes t_0 = 0 < ... < t_K = 1 (solver time).
    tau: (K,) evaluation time of step k (t_k + offset h_k).
    dt: (K,) step sizes h_k.
    sigma: (K,) diffusion coefficient of step k (0 on a noiseless last step).
    drift_scale: (K,) sigma^2 / (2 eta) at tau_k (0 on a noiseless last step).
    kappa: (K,) alphadot / alpha at tau_k.
    loss_sigma: (K,) nominal sigma(tau_k) of the diffusion (not zeroed on a noiseless last step):
      the weight of the Adjoint Matching loss.
    loss_drift_scale: (K,) nominal c(tau_k); the control of step k is u = (1 + c) (v_ft - v_base) / sigma.
    lin, gain, noise_scale: (K,) the exponential integrator's step X_{k+1} = lin_k X_k + gain_k v(X_k, tau_k)
      + noise_scale_k xi_k, or None (Euler, the default).  With them set, sigma / drift_scale / kappa keep their
      nominal (Euler) values and loss_sigma / loss_drift_scale hold that scheme's loss coefficients
      (``exponential_loss_coefficients``).
  """

  t: jax.Array
  tau: jax.Array
  dt: jax.Array
  sigma: jax.Array
  drift_scale: jax.Array
  kappa: jax.Array
  loss_sigma: jax.Array
  loss_drift_scale: jax.Array
  lin: Optional[jax.Array] = None
  gain: Optional[jax.Array] = None
  noise_scale: Optional[jax.Array] = None

  @property
  def num_steps(self) -> int:
    return self.dt.shape[0]

  @property
  def integrator(self) -> str:
    return "euler" if self.gain is None else "exponential"


def exponential_step(schedule: schedules_lib.Schedule, s, t, tau, memoryless: bool = True):
  """Coefficients (lin, gain, noise_scale) of one exponential-integrator step from time s to t (docs/maths.md sec. 6).

  The network is evaluated once, at (X_s, tau); its data prediction D = E[X_1 | X_s] = p v + q X_s (exact
  conversion at tau: p = beta / den, q = -betadot / den, den = alphadot beta - alpha betadot) is held fixed and
  the memoryless SDE  dX = [(2 betadot / beta - kappa) X + 2 (eta alpha / beta^2) D] dt + sqrt(2 eta) dB  is solved
  exactly over [s, t].  With rho = SNR_s / SNR_t (SNR = alpha^2 / beta^2):

      X_t = rho (alpha_t / alpha_s) X_s + alpha_t (1 - rho) D + beta_t sqrt(1 - rho) xi,     (memoryless)
      X_t = (beta_t / beta_s) X_s + (alpha_t - alpha_s beta_t / beta_s) D,                   (ODE: DDIM)

  i.e. X_t = c_x X_s + c_d D + noise_scale xi, so lin = c_x + c_d q and gain = c_d p.  For the VP schedule the first
  line is the DDPM posterior q(x_t | x_s, x_1 = D) (ancestral sampling, DDIM eta = 1).  No coefficient is singular:
  rho (alpha_t / alpha_s) = alpha_s beta_t^2 / (alpha_t beta_s^2) -> 0 as alpha_s -> 0 (t = 0 of a flow), and at
  t = 1 (beta_1 = 0) the step is noiseless, X_1 = D.  Elementwise in s, t, tau (arrays or scalars).
  """
  a_s, a_t = schedule.alpha(s), schedule.alpha(t)
  b2_s, b2_t = schedule.beta(s) ** 2, schedule.beta(t) ** 2
  a_tau, b_tau = schedule.alpha(tau), schedule.beta(tau)
  ad_tau, bd_tau = schedule.alpha_dot(tau), schedule.beta_dot(tau)
  den = ad_tau * b_tau - a_tau * bd_tau  # = eta alpha / beta > 0
  p, q = b_tau / den, -bd_tau / den
  at_end = t >= 1.0  # beta_1 = 0 exactly: noiseless (cosine's float32 beta(1) is -4e-8, not 0)
  if memoryless:
    c_x = jnp.where(at_end, 0.0, a_s * b2_t / (a_t * b2_s))
    one_minus_rho = jnp.clip(1.0 - (a_s * a_s * b2_t) / (a_t * a_t * b2_s), 0.0, 1.0)
    noise_scale = jnp.where(at_end, 0.0, jnp.sqrt(b2_t * one_minus_rho))
  else:
    c_x = jnp.where(at_end, 0.0, jnp.sqrt(b2_t / b2_s))
    noise_scale = jnp.zeros_like(c_x)
  c_d = a_t - a_s * c_x
  return c_x + c_d * q, c_d * p, noise_scale


def exponential_loss_coefficients(dt, gain, noise_scale, nominal_sigma, nominal_drift_scale):
  """(loss_sigma, loss_drift_scale) of the exponential scheme (docs/maths.md section 6).

  The fine-tuned step shifts the base step's mean by gain (v_ft - v_base) at noise scale noise_scale, a KL of
  |w|^2 / 2 with w = gain (v_ft - v_base) / noise_scale; the discrete optimality condition is
  w_k = -noise_scale_k E[a_{k+1} | X_k].  In the loss's units (u = w / sqrt(h), so Euler's u is unchanged):
  u = (1 + c) (v_ft - v_base) / sigma_L and target -sigma_L a_{k+1} with sigma_L = noise_scale / sqrt(h) and
  1 + c = gain / h.  Where noise_scale = 0 (the last step, noiseless in the exact scheme) the nominal memoryless
  coefficients are kept, as for Euler's noiseless last step.
  """
  noisy = noise_scale > 0
  loss_sigma = jnp.where(noisy, noise_scale / jnp.sqrt(dt), nominal_sigma)
  loss_c = jnp.where(noisy, gain / dt - 1.0, nominal_drift_scale)
  return loss_sigma, loss_c


def make_coefficients(schedule: schedules_lib.Schedule, diffusion="memoryless", num_steps: int = 40,
                      time_offset: float = 0.5, noiseless_last_step: bool = False,
                      integrator: str = "euler") -> StepCoefficients:
  """Builds the per-step coefficients of a uniform K-step grid on [0, 1].

  Args:
    schedule: interpolation schedule.
    diffusion: anything ``schedules.get_diffusion`` accepts ('memoryless', 'ode', a float, ...).
    num_steps: K >= 1.
    time_offset: tau_k = t_k + time_offset * h, in (0, 1].  0 is refused: it evaluates the
      memoryless drift at t = 0 where it is infinite.
    noiseless_last_step: make the last step an ODE step (sigma = 0).  No effect with the exponential
      integrator, whose exact last step is already noiseless and equal to the ODE step (beta_1 = 0).
    integrator: 'euler' (Euler-Maruyama) or 'exponential' (``exponential_step``; memoryless or ODE diffusion).
  """
  diffusion = schedules_lib.get_diffusion(diffusion)
  if integrator not in INTEGRATORS:
    raise ValueError(f"integrator must be one of {INTEGRATORS}, got {integrator!r}.")
  if integrator == "exponential" and not isinstance(diffusion, (schedules_lib.Memoryless,
                                                                schedules_lib.ZeroDiffusion)):
    raise ValueError(f"integrator='exponential' needs diffusion 'memoryless' or 'ode', got {diffusion!r}.")
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps must be a positive integer, got {num_steps}.")
  if not 0.0 < time_offset <= 1.0:
    raise ValueError(f"time_offset must be in (0, 1] (fraction of a step), got {time_offset}.")
  t = jnp.linspace(0.0, 1.0, num_steps + 1, dtype=jnp.float32)
  dt = t[1:] - t[:-1]
  # Clamp away from t = 1 where beta = 0 makes some coefficients 0/0 (VP betadot, constant-sigma c).
  tau = jnp.minimum(t[:-1] + time_offset * dt, 1.0 - 1e-4)
  sigma = nominal_sigma = diffusion.sigma(schedule, tau)
  c = nominal_c = diffusion.drift_scale(schedule, tau)
  if noiseless_last_step:
    sigma = sigma.at[-1].set(0.0)
    c = c.at[-1].set(0.0)
  if integrator == "exponential":
    lin, gain, noise_scale = exponential_step(schedule, t[:-1], t[1:], tau,
                                              isinstance(diffusion, schedules_lib.Memoryless))
    loss_sigma, loss_c = exponential_loss_coefficients(dt, gain, noise_scale, nominal_sigma, nominal_c)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return StepCoefficients(t=t, tau=tau, dt=dt, sigma=f32(sigma), drift_scale=f32(c), kappa=f32(schedule.kappa(tau)),
                            loss_sigma=f32(loss_sigma), loss_drift_scale=f32(loss_c), lin=f32(lin), gain=f32(gain),
                            noise_scale=f32(noise_scale))
  return StepCoefficients(t=t, tau=tau, dt=dt, sigma=sigma.astype(jnp.float32), drift_scale=c.astype(jnp.float32),
                          kappa=schedule.kappa(tau).astype(jnp.float32),
                          loss_sigma=nominal_sigma.astype(jnp.float32),
                          loss_drift_scale=nominal_c.astype(jnp.float32))


class Step(NamedTuple):
  """The coefficients of one step (scalars; (K,) arrays in ``per_step``, sliced by ``lax.scan``)."""

  tau: jax.Array
  dt: jax.Array
  sigma: jax.Array
  drift_scale: jax.Array
  kappa: jax.Array
  lin: Optional[jax.Array] = None
  gain: Optional[jax.Array] = None
  noise_scale: Optional[jax.Array] = None


def per_step(coeffs: StepCoefficients) -> Step:
  """The per-step coefficients as scan inputs (``lax.scan(body, init, (per_step(coeffs), ...))``).

  Scanning over them instead of indexing ``coeffs.dt[k]`` with the loop counter removes several small
  index-normalising gathers per step: 20-30 us per step on XLA:CPU, ~10% of a 2-D sampling step
  (docs/performance.md section 12.2).  The arithmetic is unchanged.
  """
  return Step(coeffs.tau, coeffs.dt, coeffs.sigma, coeffs.drift_scale, coeffs.kappa, coeffs.lin, coeffs.gain,
              coeffs.noise_scale)


def step_at(coeffs: StepCoefficients, k) -> Step:
  return jax.tree.map(lambda a: a[k], per_step(coeffs))


def drift_of(v, x, s: Step):
  """Drift of a step given the network velocity v = v(x, tau): v + c (v - kappa x)."""
  return v + s.drift_scale * (v - s.kappa * x)


def step_drift(v, x, coeffs: StepCoefficients, k):
  """Drift of step k given the network velocity v = v(x, tau_k): v + c_k (v - kappa_k x)."""
  return drift_of(v, x, step_at(coeffs, k))


def step_time(coeffs: StepCoefficients, k, batch: int):
  """tau_k broadcast to a (B,) vector, the time argument every apply_fn receives."""
  return jnp.full((batch,), coeffs.tau[k], dtype=jnp.float32)


def standard_normal(key, shape, dtype=jnp.float32):
  """``jax.random.normal(key, shape, dtype)``, the same values, drawn flat and reshaped (much faster to compile).

  Same values: a threefry draw (partitionable or not) generates the bits of prod(shape) elements in
  row-major order and reshapes them, so the flat draw reshaped is the same array (checked bit for bit in
  ``tests/test_soc.py``).  Why: XLA:CPU compiles the normal transform of a rank >= 2 shape with a small
  minor dimension several times more slowly (jax 0.10.2, 2-core CPU: (20, 256, 10) 4.1 s vs 0.4 s flat,
  (100, 64, 10) 4.7 s vs 0.5 s, (40, 64, 28, 28, 1) 2.9 s vs 0.6 s), and every jitted objective draws such
  noise.  Other PRNG implementations (typed keys, rbg) get ``jax.random.normal`` unchanged.
  """
  shape = tuple(shape)
  raw_threefry_key = (getattr(key, "shape", None) == (2,) and jnp.issubdtype(key.dtype, jnp.uint32)
                      and jax.config.jax_default_prng_impl == "threefry2x32")
  if not raw_threefry_key:
    return jax.random.normal(key, shape, dtype)
  return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def draw_noise(key, num_steps: int, x_shape, dtype=jnp.float32):
  """Standard normal increments xi of shape (K, B, ...), scaled by sqrt(h_k) inside the step."""
  return standard_normal(key, (num_steps,) + tuple(x_shape), dtype)


def noise_rows(key, start, length: int, num_steps: int, x_shape, dtype=jnp.float32):
  """Rows [start, start + length) of ``draw_noise(key, num_steps, x_shape)``, without drawing the rest.

  Bit-identical to slicing the full draw when ``jax_threefry_partitionable`` is on (``am_jax.sharding``
  turns it on): each element of a partitionable threefry draw is a function of the key and of its
  linear index only, so the rows are regenerated from their indices (threefry2x32 on the (hi, lo)
  halves of the 64-bit index, then jax.random's uniform -> normal transform).  ``start`` may be traced.
  Otherwise (typed or non-threefry keys, dtypes other than float32, >= 2^32 elements) it slices the
  full draw (same values, O(K B dim) memory).
  Tested against ``draw_noise`` (tests/test_sampling.py): if a future jax changed its sampler,
  that test fails; the values would still be valid N(0, 1) draws.
  """
  x_shape = tuple(x_shape)
  per_row = math.prod(x_shape)
  total = num_steps * per_row
  raw_threefry_key = (getattr(key, "shape", None) == (2,) and jnp.issubdtype(key.dtype, jnp.uint32)
                      and jax.config.jax_default_prng_impl == "threefry2x32")
  if (not raw_threefry_key or not jax.config.jax_threefry_partitionable or jnp.dtype(dtype) != jnp.float32
      or total >= 2**32):
    return jax.lax.dynamic_slice_in_dim(draw_noise(key, num_steps, x_shape, dtype), start, length)
  from jax.extend.random import threefry2x32_p  # pylint: disable=g-import-not-at-top
  k1, k2 = jnp.asarray(key, jnp.uint32)
  shape = (length,) + x_shape
  lo = (jnp.asarray(start, jnp.uint32) * jnp.uint32(per_row)
        + jax.lax.iota(jnp.uint32, length * per_row).reshape(shape))  # linear index < 2^32: hi = 0
  hi = jnp.zeros(shape, jnp.uint32)
  bits1, bits2 = threefry2x32_p.bind(k1, k2, hi, lo)
  bits = bits1 ^ bits2
  # jax.random.uniform(key, shape, float32, nextafter(-1, 0), 1) then sqrt(2) erfinv (jax.random.normal).
  floats = jax.lax.bitcast_convert_type((bits >> jnp.uint32(9)) | jnp.uint32(0x3F800000), jnp.float32) - 1.0
  minval = jnp.float32(np.nextafter(np.float32(-1.0), np.float32(0.0)))
  u = jnp.maximum(minval, floats * (jnp.float32(1.0) - minval) + minval)
  return jnp.float32(np.sqrt(2)) * jax.lax.erf_inv(u)


def _check_inputs(x0, noise, coeffs):
  chex.assert_rank(coeffs.t, 1)
  chex.assert_shape(noise, (coeffs.num_steps,) + x0.shape)
  chex.assert_type([x0, noise], float)


def euler(velocity_fn, x, noise_k, s: Step):
  """One Euler-Maruyama step with coefficients s and the standard normal draw noise_k."""
  with time_hints.batch_shares_time():
    v = velocity_fn(x, jnp.full((x.shape[0],), s.tau, dtype=jnp.float32))
  return x + s.dt * drift_of(v, x, s) + s.sigma * (noise_k * jnp.sqrt(s.dt))


def exponential(velocity_fn, x, noise_k, s: Step):
  """One exponential-integrator step: lin x + gain v(x, tau) + noise_scale xi (``exponential_step``)."""
  with time_hints.batch_shares_time():
    v = velocity_fn(x, jnp.full((x.shape[0],), s.tau, dtype=jnp.float32))
  return s.lin * x + s.gain * v + s.noise_scale * noise_k


def advance(velocity_fn, x, noise_k, s: Step):
  """One step of the scheme the coefficients s belong to: ``exponential`` if s.gain is set, else ``euler``."""
  if s.gain is None:
    return euler(velocity_fn, x, noise_k, s)
  return exponential(velocity_fn, x, noise_k, s)


def euler_step(velocity_fn, x, noise_k, coeffs: StepCoefficients, k):
  """X_{k+1} from X_k = x: one step (Euler-Maruyama, or exponential if coeffs has it) with the draw noise_k."""
  return advance(velocity_fn, x, noise_k, step_at(coeffs, k))


def scan_steps(step_fn: Callable, x0, inputs, carry=()):
  """The forward loop of every discretised SDE here: one ``lax.scan`` over the K steps, storing the states.

      X_{k+1}, c_{k+1}, y_k = step_fn(X_k, c_k, inputs_k),   k = 0 .. K-1,

  where ``inputs`` is a pytree of (K, ...) arrays (the step's coefficients and noise draws), ``carry``
  c an accumulator (e.g. the running cost of a path) and y_k a per-step output (e.g. the control u_k).
  The step's maths is the caller's: ``euler`` for the generative SDE (``simulate``), the controlled SDE
  with a general drift, a sigma matrix and a running cost for stochastic optimal control (``soc.rollout``).

  Returns:
    ``(traj, carry, ys)``: traj (K+1, B, ...) = X_0 .. X_K (traj[0] = x0), the final carry, and the
    stacked outputs y (K, ...).
  """
  def body(state, inp):
    x, c = state
    x_next, c_next, y = step_fn(x, c, inp)
    return (x_next, c_next), (x_next, y)

  (_, carry), (xs, ys) = jax.lax.scan(body, (x0, carry), inputs)
  return jnp.concatenate([x0[None], xs], axis=0), carry, ys


def _simulate_scan(velocity_fn, x0, noise, coeffs):
  def step(x, carry, inp):
    s, noise_k = inp
    return advance(velocity_fn, x, noise_k, s), carry, ()

  return scan_steps(step, x0, (per_step(coeffs), noise))[0]


def segment_steps(coeffs: StepCoefficients, j, seg_len: int) -> Step:
  """``per_step(coeffs)`` of steps [j L, (j+1) L)."""
  return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, j * seg_len, seg_len), per_step(coeffs))


def segment_noise(noise, num_segments: int, num_steps: int):
  """``noise_segment(j) -> (L, B, ...)`` rows [jL, (j+1)L) of a (K, B, ...) array, or the callable itself."""
  if callable(noise):
    return noise
  seg_len = num_steps // num_segments
  return lambda j: jax.lax.dynamic_slice_in_dim(noise, j * seg_len, seg_len)


def simulate_checkpoints(velocity_fn: Callable, x0, noise, coeffs: StepCoefficients, num_segments: int):
  """The ``'scan'`` simulation keeping only the states at segment starts (bounded memory).

  The K steps are split into ``num_segments`` segments of L = K / num_segments steps (must divide K).
  ``noise`` is the (K, B, ...) array of ``draw_noise`` or a function ``noise_segment(j) -> (L, B, ...)``
  returning its rows [jL, (j+1)L) (e.g. ``noise_rows``: then no (K, B, ...) array is ever held).
  Returns ``(checkpoints, x_K)``: checkpoints (num_segments, B, ...) holds X_0, X_L, X_2L, ...; x_K is
  X_1.  Same arithmetic as ``simulate(..., solver='scan')`` (``euler_step``); used with
  ``adjoint.lean_adjoint_remat``, which recomputes each segment's states during the backward pass.
  """
  k_steps = coeffs.num_steps
  if num_segments < 1 or k_steps % num_segments:
    raise ValueError(f"num_segments = {num_segments} must be >= 1 and divide the number of steps ({k_steps}).")
  if not callable(noise):
    _check_inputs(x0, noise, coeffs)
  seg_len = k_steps // num_segments
  noise_segment = segment_noise(noise, num_segments, k_steps)

  def segment(x, j):
    rows = noise_segment(j)
    chex.assert_shape(rows, (seg_len,) + x0.shape)

    def body(x, inp):
      s, noise_k = inp
      return advance(velocity_fn, x, noise_k, s), None

    x_end, _ = jax.lax.scan(body, x, (segment_steps(coeffs, j, seg_len), rows))
    return x_end, x

  x_end, checkpoints = jax.lax.scan(segment, x0, jnp.arange(num_segments))
  return checkpoints, x_end


def _nearest_index(ts, t):
  return jnp.argmin(jnp.abs(ts - t))


def _simulate_diffrax_exponential(velocity_fn, x0, noise, coeffs):
  from am_jax.integrators import ExponentialIntegrator  # pylint: disable=g-import-not-at-top
  batch, ts, num_steps = x0.shape[0], coeffs.t, coeffs.num_steps

  def velocity(t, x, args):
    with time_hints.batch_shares_time():
      return velocity_fn(x, jnp.full((batch,), t, dtype=jnp.float32))

  def increments(t0, t1):
    return noise[jnp.minimum(_nearest_index(ts, t0), num_steps - 1)] * jnp.sqrt(t1 - t0)

  terms = diffrax.MultiTerm(diffrax.ODETerm(velocity),
                            diffrax.ControlTerm(lambda t, x, args: jnp.ones((), x.dtype), increments))
  sol = diffrax.diffeqsolve(terms, ExponentialIntegrator(coeffs=coeffs), t0=ts[0], t1=ts[-1], dt0=None, y0=x0,
                            stepsize_controller=diffrax.StepTo(ts=ts), saveat=diffrax.SaveAt(t0=True, steps=True),
                            max_steps=num_steps, throw=False)
  return sol.ys


def _simulate_diffrax(velocity_fn, x0, noise, coeffs):
  if coeffs.gain is not None:
    return _simulate_diffrax_exponential(velocity_fn, x0, noise, coeffs)
  batch, ts, num_steps = x0.shape[0], coeffs.t, coeffs.num_steps

  def step_of(t):
    return jnp.minimum(_nearest_index(ts, t), num_steps - 1)

  def drift(t, x, args):
    k = step_of(t)
    with time_hints.batch_shares_time():
      v = velocity_fn(x, step_time(coeffs, k, batch))
    return step_drift(v, x, coeffs, k)

  def diffusion(t, x, args):
    return lx.DiagonalLinearOperator(jnp.broadcast_to(coeffs.sigma[step_of(t)], x.shape).astype(x.dtype))

  def increments(t0, t1):
    return noise[step_of(t0)] * jnp.sqrt(t1 - t0)

  terms = diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, increments))
  sol = diffrax.diffeqsolve(terms, diffrax.Euler(), t0=ts[0], t1=ts[-1], dt0=None, y0=x0,
                            stepsize_controller=diffrax.StepTo(ts=ts), saveat=diffrax.SaveAt(t0=True, steps=True),
                            max_steps=num_steps, throw=False)
  return sol.ys


def simulate(velocity_fn: Callable, x0, noise, coeffs: StepCoefficients, solver: str = "scan"):
  """Simulates X_0 -> X_1 on the grid of ``coeffs``.

  Args:
    velocity_fn: ``velocity_fn(x, t) -> v`` with x (B, ...), t (B,).  Close over params.
    x0: (B, ...) initial states (N(0, I) for a generative process).
    noise: (K, B, ...) standard normal draws (``draw_noise``); ignored where sigma_k = 0.
    coeffs: from ``make_coefficients``.
    solver: 'scan' (lax.scan) or 'diffrax' (diffrax.Euler + StepTo, or ``integrators.ExponentialIntegrator`` for
      exponential coefficients); same numbers.

  Returns:
    (K+1, B, ...) trajectory including X_0 and X_K = X_1.
  """
  _check_inputs(x0, noise, coeffs)
  if solver == "scan":
    return _simulate_scan(velocity_fn, x0, noise, coeffs)
  if solver == "diffrax":
    return _simulate_diffrax(velocity_fn, x0, noise, coeffs)
  raise ValueError(f"Unknown solver {solver!r}; expected one of {SOLVERS}.")


def sample(apply_fn: Callable, params, key, x_shape, schedule, diffusion="memoryless", num_steps: int = 40,
           time_offset: float = 0.5, noiseless_last_step: bool = False, cond=(), solver: str = "scan",
           return_trajectory: bool = False, integrator: str = "euler"):
  """Draws samples X_1 from a velocity model with any diffusion coefficient (ODE included).

  ``apply_fn(params, x, t, *cond)``; x_shape = (B, ...).  Returns (B, ...) or the (K+1, B, ...) path.
  ``integrator``: 'euler' or 'exponential' (memoryless or ODE diffusion; ``make_coefficients``), or 'dpmpp_2m'
  (``multistep.dpm_solver_2m``: second order, its own grid, memoryless or ODE diffusion, solver 'scan'; sampling only:
  at K = 10 the ODE is as close to the data as Euler at K = 40 on the exact mixtures).
  """
  if integrator not in SAMPLERS:
    raise ValueError(f"integrator must be one of {SAMPLERS}, got {integrator!r}.")
  k0, kn = jax.random.split(key)
  x0 = jax.random.normal(k0, tuple(x_shape), jnp.float32)
  if integrator == "dpmpp_2m":
    from am_jax import multistep  # pylint: disable=g-import-not-at-top
    if not (isinstance(diffusion, str) and diffusion in ("ode", "memoryless")):
      raise ValueError(f"integrator='dpmpp_2m' needs diffusion 'ode' or 'memoryless', got {diffusion!r}.")
    if solver != "scan":
      raise ValueError(f"integrator='dpmpp_2m' runs on solver='scan' only, got {solver!r}.")
    return multistep.dpm_solver_2m(lambda x, t: apply_fn(params, x, t, *cond), x0, kn, schedule, num_steps,
                                   diffusion == "memoryless", return_trajectory=return_trajectory)
  coeffs = make_coefficients(schedule, diffusion, num_steps, time_offset, noiseless_last_step, integrator)
  noise = draw_noise(kn, num_steps, x_shape)
  traj = simulate(lambda x, t: apply_fn(params, x, t, *cond), x0, noise, coeffs, solver)
  return traj if return_trajectory else traj[-1]
