"""Forward simulation of the generative SDE family on a fixed time grid.

Discretisation (documented in BUILD_NOTES.md, "t = 0"): the grid is t_k = k / K, k = 0..K, and step
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
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import chex
import diffrax
import jax
import jax.numpy as jnp
import lineax as lx

from am_jax import schedules as schedules_lib
from am_jax.dynamics import _bcast

SOLVERS = ("scan", "diffrax")


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
  """

  t: jax.Array
  tau: jax.Array
  dt: jax.Array
  sigma: jax.Array
  drift_scale: jax.Array
  kappa: jax.Array
  loss_sigma: jax.Array
  loss_drift_scale: jax.Array

  @property
  def num_steps(self) -> int:
    return self.dt.shape[0]


def make_coefficients(schedule: schedules_lib.Schedule, diffusion="memoryless", num_steps: int = 40,
                      time_offset: float = 0.5, noiseless_last_step: bool = False) -> StepCoefficients:
  """Builds the per-step coefficients of a uniform K-step grid on [0, 1].

  Args:
    schedule: interpolation schedule.
    diffusion: anything ``schedules.get_diffusion`` accepts ('memoryless', 'ode', a float, ...).
    num_steps: K >= 1.
    time_offset: tau_k = t_k + time_offset * h, in (0, 1].  0 is refused: it evaluates the
      memoryless drift at t = 0 where it is infinite.
    noiseless_last_step: make the last step an ODE step (sigma = 0).
  """
  diffusion = schedules_lib.get_diffusion(diffusion)
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
  return StepCoefficients(t=t, tau=tau, dt=dt, sigma=sigma.astype(jnp.float32), drift_scale=c.astype(jnp.float32),
                          kappa=schedule.kappa(tau).astype(jnp.float32),
                          loss_sigma=nominal_sigma.astype(jnp.float32),
                          loss_drift_scale=nominal_c.astype(jnp.float32))


def step_drift(v, x, coeffs: StepCoefficients, k):
  """Drift of step k given the network velocity v = v(x, tau_k): v + c_k (v - kappa_k x)."""
  return v + coeffs.drift_scale[k] * (v - coeffs.kappa[k] * x)


def step_time(coeffs: StepCoefficients, k, batch: int):
  """tau_k broadcast to a (B,) vector, the time argument every apply_fn receives."""
  return jnp.full((batch,), coeffs.tau[k], dtype=jnp.float32)


def draw_noise(key, num_steps: int, x_shape, dtype=jnp.float32):
  """Standard normal increments xi of shape (K, B, ...), scaled by sqrt(h_k) inside the step."""
  return jax.random.normal(key, (num_steps,) + tuple(x_shape), dtype)


def _check_inputs(x0, noise, coeffs):
  chex.assert_rank(coeffs.t, 1)
  chex.assert_shape(noise, (coeffs.num_steps,) + x0.shape)
  chex.assert_type([x0, noise], float)


def _simulate_scan(velocity_fn, x0, noise, coeffs):
  batch = x0.shape[0]

  def body(x, k):
    v = velocity_fn(x, step_time(coeffs, k, batch))
    noise_k = noise[k] * jnp.sqrt(coeffs.dt[k])
    x_next = x + coeffs.dt[k] * step_drift(v, x, coeffs, k) + coeffs.sigma[k] * noise_k
    return x_next, x_next

  _, xs = jax.lax.scan(body, x0, jnp.arange(coeffs.num_steps))
  return jnp.concatenate([x0[None], xs], axis=0)


def _nearest_index(ts, t):
  return jnp.argmin(jnp.abs(ts - t))


def _simulate_diffrax(velocity_fn, x0, noise, coeffs):
  batch, ts, num_steps = x0.shape[0], coeffs.t, coeffs.num_steps

  def step_of(t):
    return jnp.minimum(_nearest_index(ts, t), num_steps - 1)

  def drift(t, x, args):
    k = step_of(t)
    return step_drift(velocity_fn(x, step_time(coeffs, k, batch)), x, coeffs, k)

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
    solver: 'scan' (lax.scan) or 'diffrax' (diffrax.Euler + StepTo); same numbers.

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
           return_trajectory: bool = False):
  """Draws samples X_1 from a velocity model with any diffusion coefficient (ODE included).

  ``apply_fn(params, x, t, *cond)``; x_shape = (B, ...).  Returns (B, ...) or the (K+1, B, ...) path.
  """
  coeffs = make_coefficients(schedule, diffusion, num_steps, time_offset, noiseless_last_step)
  k0, kn = jax.random.split(key)
  x0 = jax.random.normal(k0, tuple(x_shape), jnp.float32)
  noise = draw_noise(kn, num_steps, x_shape)
  traj = simulate(lambda x, t: apply_fn(params, x, t, *cond), x0, noise, coeffs, solver)
  return traj if return_trajectory else traj[-1]
