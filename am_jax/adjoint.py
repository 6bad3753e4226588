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
"""
from __future__ import annotations

from typing import Callable

import chex
import diffrax
import jax
import jax.numpy as jnp

from am_jax.dynamics import checked
from am_jax.sampling import StepCoefficients, _nearest_index, step_drift, step_time


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


def _adjoint_step_vjp(base_velocity_fn, traj, coeffs, k, a_next):
  """h_k (grad_x b_k(X_k))^T a_{k+1}: one VJP of the base drift of step k."""
  x_k = traj[k]
  t_k = step_time(coeffs, k, x_k.shape[0])
  _, vjp = jax.vjp(lambda x: step_drift(base_velocity_fn(x, t_k), x, coeffs, k), x_k)
  return coeffs.dt[k] * vjp(a_next)[0]


def _lean_adjoint_scan(base_velocity_fn, traj, a1, coeffs):
  def body(a_next, k):
    a_k = a_next + _adjoint_step_vjp(base_velocity_fn, traj, coeffs, k, a_next)
    return a_k, a_k

  _, a_rev = jax.lax.scan(body, a1, jnp.arange(coeffs.num_steps), reverse=True)
  return jnp.concatenate([a_rev, a1[None]], axis=0)


def _lean_adjoint_diffrax(base_velocity_fn, traj, a1, coeffs):
  ts, num_steps = coeffs.t, coeffs.num_steps

  def vector_field(t, a, args):
    # Reverse-time Euler from t_{k+1} to t_k multiplies this by (t_k - t_{k+1}) = -h_k, so
    # returning -grad b_k^T a gives a_k = a_{k+1} + h_k grad b_k^T a_{k+1} (the forward step's VJP).
    k = jnp.maximum(_nearest_index(ts, t) - 1, 0)
    x_k = traj[k]
    _, vjp = jax.vjp(lambda x: step_drift(base_velocity_fn(x, step_time(coeffs, k, x.shape[0])), x, coeffs, k), x_k)
    return -vjp(a)[0]

  sol = diffrax.diffeqsolve(diffrax.ODETerm(vector_field), diffrax.Euler(), t0=ts[-1], t1=ts[0], dt0=None, y0=a1,
                            stepsize_controller=diffrax.StepTo(ts=ts[::-1]),
                            saveat=diffrax.SaveAt(t0=True, steps=True), max_steps=num_steps, throw=False)
  return sol.ys[::-1]


def lean_adjoint(base_velocity_fn: Callable, traj, a1, coeffs: StepCoefficients, solver: str = "scan"):
  """Solves the lean adjoint backward over a stored trajectory.

  Args:
    base_velocity_fn: ``fn(x, t) -> v_base`` with x (B, ...), t (B,); params closed over.
    traj: (K+1, B, ...) forward trajectory (treated as constant).
    a1: (B, ...) terminal adjoint, from ``terminal_adjoint``.
    coeffs: the StepCoefficients that produced ``traj``.
    solver: 'scan' or 'diffrax' (identical numbers).

  Returns:
    (K+1, B, ...) adjoint states a_0 .. a_K (a_K = a1).
  """
  chex.assert_shape(traj, (coeffs.num_steps + 1,) + a1.shape)
  traj = jax.lax.stop_gradient(traj)
  if solver == "scan":
    return _lean_adjoint_scan(base_velocity_fn, traj, a1, coeffs)
  if solver == "diffrax":
    return _lean_adjoint_diffrax(base_velocity_fn, traj, a1, coeffs)
  raise ValueError(f"Unknown solver {solver!r}; expected 'scan' or 'diffrax'.")
