"""The lean adjoint ODE (AM paper Eq. 23-24), solved backward over a stored trajectory.

Continuous time:  d a / dt = -a(t)^T grad_x b_base(X_t, t),   a(1) = -grad_x r(X_1),
where b_base is the base model's drift of the process that produced X (memoryless while
fine-tuning) and r = lambda * reward.  "Lean" means the control terms of the full adjoint
(-a^T grad (sigma u) - grad |u|^2 / 2) are dropped; in expectation the regression target is
unchanged (paper Prop. 6).

Discretisation.  The forward step k is X_{k+1} = X_k + h_k b_k(X_k) + sigma_k sqrt(h_k) xi_k with
b_k(x) = v_base(x, tau_k) + c_k (v_base(x, tau_k) - kappa_k x) (see ``sampling``).  Backward Euler
in reversed time, evaluating the Jacobian of *that* step,

    a_k = a_{k+1} + h_k * (grad_x b_k(X_k))^T a_{k+1},     (one VJP of the base net per step)

is exactly the chain rule a_k = (d X_{k+1} / d X_k)^T a_{k+1}.  So for the base process (u = 0)
the lean adjoint equals -d r(X_K) / d X_k of the discretised dynamics with the noise held fixed;
``tests/test_adjoint.py`` checks this against ``jax.grad`` to float tolerance.

Exponential integrator (``sampling.exponential_step``): the forward step is X_{k+1} = lin_k X_k +
gain_k v_base(X_k, tau_k) + noise_scale_k xi_k, so its exact VJP is

    a_k = lin_k a_{k+1} + gain_k (grad_x v_base(X_k, tau_k))^T a_{k+1}      (still one VJP per step),

written as the increment (lin_k - 1) a_{k+1} + gain_k J^T a_{k+1}; ``tests/test_integrators.py`` checks it
against ``jax.grad`` through the same map.
"""
from __future__ import annotations

from typing import Callable

import chex
import diffrax
import jax
import jax.numpy as jnp

from am_jax import time_hints
from am_jax.dynamics import checked
from am_jax.sampling import (Step, StepCoefficients, _nearest_index, advance, drift_of, per_step, segment_noise,
                             segment_steps, step_at, step_drift, step_time)


def terminal_adjoint(reward_fn: Callable, x1, reward_multiplier=1.0, cond=()):
  """a(1) = -lambda grad_x reward(X_1) and the rewards.

  Args:
    reward_fn: ``reward_fn(x, *cond) -> (B,)`` per-sample rewards; differentiable in x.
    x1: (B, ...) terminal states.
    reward_multiplier: lambda (the tilt is p_base exp(lambda * reward)).
    cond: extra arguments passed to reward_fn (e.g. class labels).

  Returns:
    (a1 of shape (B, ...), rewards of shape (B,)).  Raises (also under jit) if a reward or
    its gradient is not finite.
  """
  def total(x):
    r = reward_fn(x, *cond)
    chex.assert_shape(r, (x.shape[0],))
    return jnp.sum(r), r

  grad, rewards = jax.grad(total, has_aux=True)(x1)
  # Guard both outputs, so the check survives dead-code elimination when only one is used.
  grad, rewards = checked((grad, rewards), ~jnp.all(jnp.isfinite(rewards)),
                          "reward_fn returned a non-finite reward (NaN/inf).")
  grad, rewards = checked((grad, rewards), ~jnp.all(jnp.isfinite(grad)), "The reward gradient is not finite (NaN/inf).")
  return -reward_multiplier * grad, rewards


def _adjoint_vjp(base_velocity_fn, x_k, s: Step, a_next, with_velocity: bool = False):
  """a_k - a_{k+1} for the step with coefficients s: one VJP of the base model.

  Euler: h_k (grad_x b_k(X_k))^T a_{k+1}.  Exponential (s.gain set): (lin_k - 1) a_{k+1} + gain_k
  (grad_x v_base(X_k, tau_k))^T a_{k+1}.  with_velocity: also return the VJP's primal v_base(X_k, tau_k)
  (free: the VJP evaluates it anyway), as ``(increment, v_base)``.
  """
  t_k = jnp.full((x_k.shape[0],), s.tau, dtype=jnp.float32)
  with time_hints.batch_shares_time():  # every row at tau_k (models.MLP's shared-time path)
    if s.gain is not None:
      v, vjp = jax.vjp(lambda x: base_velocity_fn(x, t_k), x_k)
    else:
      # v rides along as aux: the VJP is of the same function as without it (bit-identical increments).
      _, vjp, v = jax.vjp(lambda x: (lambda v: (drift_of(v, x, s), v))(base_velocity_fn(x, t_k)), x_k, has_aux=True)
  if s.gain is not None:
    inc = (s.lin - 1.0) * a_next + s.gain * vjp(a_next)[0]
  else:
    inc = s.dt * vjp(a_next)[0]
  return (inc, v) if with_velocity else inc


def _adjoint_step_vjp(base_velocity_fn, traj, coeffs, k, a_next):
  return _adjoint_vjp(base_velocity_fn, traj[k], step_at(coeffs, k), a_next)


def scan_backward(increment_fn: Callable, a_last, inputs, with_outputs: bool = False):
  """The backward loop of every adjoint here: one reversed ``lax.scan`` of

      a_K = a_last,   a_k = a_{k+1} + increment_fn(a_{k+1}, inputs_k),   k = K-1 .. 0,

  with ``inputs`` a pytree of (K, ...) arrays (states X_k, step coefficients or times).  The increment
  holds the maths, usually one VJP of the step map: h_k (grad_x b_k(X_k))^T a_{k+1} for the lean adjoint
  of the generative SDE (``lean_adjoint``); plus h grad_x f(X_k, t_k) for the lean adjoint with a running
  cost of stochastic optimal control (``soc.lean_adjoint``); the full adjoint's control terms for the
  continuous adjoint method (``soc.full_adjoint_continuous``).

  Returns:
    (K+1, B, ...) adjoint a_0 .. a_K (a_K = a_last).  with_outputs: increment_fn returns (increment, y_k)
    and the result is (adjoint, ys) with ys the stacked y_0 .. y_{K-1}.
  """
  def body(a_next, inp):
    inc, y = increment_fn(a_next, inp) if with_outputs else (increment_fn(a_next, inp), ())
    a_k = a_next + inc
    return a_k, (a_k, y)

  _, (a_rev, ys) = jax.lax.scan(body, a_last, inputs, reverse=True)
  adj = jnp.concatenate([a_rev, a_last[None]], axis=0)
  return (adj, ys) if with_outputs else adj


def _lean_adjoint_scan(base_velocity_fn, traj, a1, coeffs, with_velocity=False):
  def increment(a_next, inp):
    s, k = inp
    x_k = jax.lax.dynamic_index_in_dim(traj, k, 0, keepdims=False)
    return _adjoint_vjp(base_velocity_fn, x_k, s, a_next, with_velocity)

  return scan_backward(increment, a1, (per_step(coeffs), jnp.arange(coeffs.num_steps)), with_velocity)


def _lean_adjoint_diffrax(base_velocity_fn, traj, a1, coeffs):
  ts, num_steps = coeffs.t, coeffs.num_steps

  def vector_field(t, a, args):
    # Reverse-time Euler from t_{k+1} to t_k multiplies this by (t_k - t_{k+1}) = -h_k, so
    # returning -grad b_k^T a gives a_k = a_{k+1} + h_k grad b_k^T a_{k+1} (the forward step's VJP).
    k = jnp.maximum(_nearest_index(ts, t) - 1, 0)
    x_k = traj[k]
    if coeffs.gain is not None:  # exponential: the increment of the exact step VJP, divided by -h_k
      return -_adjoint_vjp(base_velocity_fn, x_k, step_at(coeffs, k), a) / coeffs.dt[k]
    with time_hints.batch_shares_time():
      _, vjp = jax.vjp(lambda x: step_drift(base_velocity_fn(x, step_time(coeffs, k, x.shape[0])), x, coeffs, k), x_k)
    return -vjp(a)[0]

  sol = diffrax.diffeqsolve(diffrax.ODETerm(vector_field), diffrax.Euler(), t0=ts[-1], t1=ts[0], dt0=None, y0=a1,
                            stepsize_controller=diffrax.StepTo(ts=ts[::-1]),
                            saveat=diffrax.SaveAt(t0=True, steps=True), max_steps=num_steps, throw=False)
  return sol.ys[::-1]


def lean_adjoint(base_velocity_fn: Callable, traj, a1, coeffs: StepCoefficients, solver: str = "scan",
                 return_base_velocity: bool = False):
  """Solves the lean adjoint backward over a stored trajectory.

  Args:
    base_velocity_fn: ``fn(x, t) -> v_base`` with x (B, ...), t (B,); params closed over.
    traj: (K+1, B, ...) forward trajectory (treated as constant).
    a1: (B, ...) terminal adjoint, from ``terminal_adjoint``.
    coeffs: the StepCoefficients that produced ``traj``.
    solver: 'scan' or 'diffrax' (identical numbers).
    return_base_velocity: also return the base velocities v_base(X_k, tau_k), k < K, that the VJPs evaluate
      anyway (the loss needs them at its time steps: ``losses.AMBatch.base_velocity``); 'scan' only.

  Returns:
    (K+1, B, ...) adjoint states a_0 .. a_K (a_K = a1); with return_base_velocity, ``(adjoint, v_base)``
    with v_base (K, B, ...).
  """
  chex.assert_shape(traj, (coeffs.num_steps + 1,) + a1.shape)
  traj = jax.lax.stop_gradient(traj)
  if return_base_velocity and solver != "scan":
    raise ValueError(f"lean_adjoint(return_base_velocity=True) needs solver='scan', got {solver!r}.")
  if solver == "scan":
    return _lean_adjoint_scan(base_velocity_fn, traj, a1, coeffs, return_base_velocity)
  if solver == "diffrax":
    return _lean_adjoint_diffrax(base_velocity_fn, traj, a1, coeffs)
  raise ValueError(f"Unknown solver {solver!r}; expected 'scan' or 'diffrax'.")


def lean_adjoint_remat(velocity_fn: Callable, base_velocity_fn: Callable, checkpoints, noise, a1,
                       coeffs: StepCoefficients, idx):
  """The lean adjoint with the forward trajectory rematerialised segment by segment (bounded memory).

  Instead of a stored (K+1, B, ...) trajectory this takes the segment-start states of
  ``sampling.simulate_checkpoints`` and the noise; going backward over the segments it recomputes the
  L = K / S states of one segment with ``velocity_fn`` (the model that produced the trajectory; the
  same ``sampling.advance``), then runs the same backward recursion as ``lean_adjoint`` over them.
  Only the pairs the loss uses are kept.

  Args:
    velocity_fn: ``fn(x, t)`` of the model that produced the trajectory (fine-tuned, no gradient).
    base_velocity_fn: ``fn(x, t)`` of the base model (the adjoint's Jacobians).
    checkpoints: (S, B, ...) states X_0, X_L, ..., X_{(S-1)L}.
    noise: (K, B, ...) the standard normal draws of the forward simulation, or a function
      ``noise_segment(j)`` returning its rows [jL, (j+1)L) (``sampling.simulate_checkpoints``).
    a1: (B, ...) terminal adjoint.
    coeffs: StepCoefficients of the simulation.
    idx: (M,) distinct step indices in [0, K) (``losses.select_timesteps``).

  Returns:
    ``(x_sel, a_sel)``, both (M, B, ...): X_k and a_{k+1} for k in idx, equal (to float rounding) to
    ``traj[idx]`` and ``lean_adjoint(...)[idx + 1]``.  Live memory: O((S + L + M) B dim) (plus the
    noise if it is passed as an array) instead of O(K B dim) for the trajectory and the adjoint.
  """
  num_segments, k_steps = checkpoints.shape[0], coeffs.num_steps
  chex.assert_shape(checkpoints, (num_segments,) + a1.shape)
  if k_steps % num_segments:
    raise ValueError(f"{num_segments} segments do not divide the {k_steps} steps.")
  if not callable(noise):
    chex.assert_shape(noise, (k_steps,) + a1.shape)
    noise = jax.lax.stop_gradient(noise)
  noise_segment = segment_noise(noise, num_segments, k_steps)
  seg_len = k_steps // num_segments
  m = idx.shape[0]
  checkpoints = jax.lax.stop_gradient(checkpoints)
  # Slot of step k in the output buffers; steps the loss does not use write to a spare slot m.
  slot = jnp.full((k_steps,), m, jnp.int32).at[idx].set(jnp.arange(m, dtype=jnp.int32))
  buf = jnp.zeros((m + 1,) + a1.shape, a1.dtype)

  def segment(carry, inp):
    j, x_start = inp
    rows = noise_segment(j)
    steps = segment_steps(coeffs, j, seg_len)

    def forward(x, inp1):
      s, noise_k = inp1
      return advance(velocity_fn, x, noise_k, s), x

    _, xs = jax.lax.scan(forward, x_start, (steps, rows))  # xs[i] = X_{jL + i}

    def backward(c, inp2):
      a_next, bx, ba = c
      s, slot_k, x_k = inp2
      bx = jax.lax.dynamic_update_index_in_dim(bx, x_k, slot_k, 0)
      ba = jax.lax.dynamic_update_index_in_dim(ba, a_next, slot_k, 0)
      a_k = a_next + _adjoint_vjp(base_velocity_fn, x_k, s, a_next)
      return (a_k, bx, ba), None

    slots = jax.lax.dynamic_slice_in_dim(slot, j * seg_len, seg_len)
    carry, _ = jax.lax.scan(backward, carry, (steps, slots, xs), reverse=True)
    return carry, None

  (_, bx, ba), _ = jax.lax.scan(segment, (a1, buf, buf), (jnp.arange(num_segments), checkpoints), reverse=True)
  return bx[:m], ba[:m]
