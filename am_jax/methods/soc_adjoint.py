"""The adjoint methods of stochastic optimal control: the full adjoint (paper Eq. 20), the continuous adjoint method
(paper Eq. 20-21) and the discrete adjoint (backpropagation through the discretised SDE; Han & E, paper Sec. 4).

Both objectives minimise J = E[sum_k h_k |u_k(X_k)|^2 / 2 - r(X_K)] over the fine-tuned process
X_{k+1} = X_k + h_k b^ft_k(X_k) + sigma_k sqrt(h_k) xi_k, b^ft_k = b^base_k + sigma_k u_k.  They differentiate
through the states, so ``ft_apply_fn`` must be differentiable in x, including its base-model part
(``parameterisation.residual_model`` stops the gradient of the base *parameters* only).
"""
from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from am_jax import adjoint as adjoint_lib
from am_jax import losses
from am_jax import sampling
from am_jax import sharding as sharding_lib
from am_jax import time_hints
from am_jax.dynamics import _bcast
from am_jax.methods import _common

__all__ = ["continuous_adjoint", "discrete_adjoint", "full_adjoint", "full_adjoint_batch"]


def full_adjoint(ft_velocity_fn: Callable, base_velocity_fn: Callable, traj, a1, coeffs: sampling.StepCoefficients):
  """Adjoint of the controlled process with running cost |u|^2 / 2 (paper Eq. 20), backward over ``traj``.

  The pathwise gradient a_k = dJ/dX_k (noise and params fixed) of the discrete cost is

      a_K = -grad r(X_K),   a_k = a_{k+1} + h_k [ (grad_x b^ft_k)^T a_{k+1} + (grad_x u_k)^T u_k ],

  the Euler discretisation of da/dt = -(grad_x (b + sigma u))^T a - grad_x |u|^2 / 2 that is exact for the
  discrete dynamics (one VJP of (b^ft_k, u_k) with cotangent (a_{k+1}, u_k) per step).

  Args:
    ft_velocity_fn, base_velocity_fn: ``fn(x, t) -> v`` (params closed over; ft must be differentiable in x).
    traj: (K+1, B, ...) trajectory of the fine-tuned process (treated as constant).
    a1: (B, ...) terminal adjoint -lambda grad reward(X_K).
    coeffs: the grid that produced ``traj``.

  Returns:
    (K+1, B, ...) adjoint a_0..a_K.
  """
  chex.assert_shape(traj, (coeffs.num_steps + 1,) + a1.shape)
  traj = jax.lax.stop_gradient(traj)
  batch = a1.shape[0]

  def body(a_next, k):
    t_k = sampling.step_time(coeffs, k, batch)

    def drift_and_control(x):
      v_ft, v_base = ft_velocity_fn(x, t_k), base_velocity_fn(x, t_k)
      u = (1.0 + coeffs.loss_drift_scale[k]) * (v_ft - v_base) / coeffs.loss_sigma[k]
      return sampling.step_drift(v_ft, x, coeffs, k), u

    (_, u), vjp = jax.vjp(drift_and_control, traj[k])
    a_k = a_next + coeffs.dt[k] * vjp((a_next, u))[0]
    return a_k, a_k

  _, a_rev = jax.lax.scan(body, a1, jnp.arange(coeffs.num_steps), reverse=True)
  return jnp.concatenate([a_rev, a1[None]], axis=0)


def full_adjoint_batch(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape,
                       config: losses.AMConfig, cond=(), mesh=None):
  """Fine-tuned trajectories on the config's (stochastic) grid, without gradient, and their full adjoint.

  Same X_0 / noise draws as ``losses.make_am_batch``.  Returns (coeffs, traj (K+1, B, ...), adjoint, rewards (B,)).
  """
  coeffs = config.coefficients()
  x0, noise = _common.initial_state(key, x_shape, config.num_steps, mesh)
  ft_sg = jax.lax.stop_gradient(ft_params)
  ft_v = lambda x, t: ft_apply_fn(ft_sg, x, t, *cond)  # noqa: E731
  base_v = lambda x, t: base_apply_fn(base_params, x, t, *cond)  # noqa: E731
  traj = jax.lax.stop_gradient(sampling.simulate(ft_v, x0, noise, coeffs, config.solver))
  traj = sharding_lib.constrain_batch(traj, mesh, 1)
  a1, rewards = adjoint_lib.terminal_adjoint(reward_fn, traj[-1], config.reward_multiplier, cond)
  adj = jax.lax.stop_gradient(full_adjoint(ft_v, base_v, traj, a1, coeffs))
  return coeffs, traj, sharding_lib.constrain_batch(adj, mesh, 1), rewards


def _control_and_drift(ft_apply_fn, params, base_apply_fn, base_params, traj, coeffs, cond, mesh=None):
  """Per-step (u_k, b^ft_k, h_k) at X_k for all k in one batched call: shapes (K B, ...)."""
  x, t, c, cond_k = _common.flat_steps(traj, coeffs, cond, mesh)
  with time_hints.rows_in_time_blocks(coeffs.num_steps * sharding_lib.devices_of(mesh)):  # K blocks of B rows at tau_k (G K of B / G)
    v_ft = ft_apply_fn(params, x, t, *cond_k)
    v_base = jax.lax.stop_gradient(base_apply_fn(base_params, x, t, *cond_k))
  u = _bcast((1.0 + c["loss_drift_scale"]) / c["loss_sigma"], x) * (v_ft - v_base)
  drift = v_ft + _bcast(c["drift_scale"], x) * (v_ft - _bcast(c["kappa"], x) * x)
  return u, drift, c["dt"]


def continuous_adjoint(config: losses.AMConfig = losses.AMConfig()) -> _common.Objective:
  """The adjoint method (paper Eq. 20-21) as a surrogate loss.

  With a the full adjoint (``full_adjoint``, trajectory and params stopped), the gradient of J is

      dJ/dtheta = E sum_k h [ (d b^ft_k / dtheta)^T a_{k+1} + (d u_k / dtheta)^T u_k ]
                = E sum_k h (d u_k / dtheta)^T (sigma_k a_{k+1} + u_k)       (d b^ft_k / dtheta = sigma_k du_k/dtheta),

  i.e. paper Eq. 21 discretised.  The surrogate S(theta) = E sum_k h [<b^ft_k(X_k; theta), a_{k+1}> + |u_k|^2 / 2]
  has exactly this gradient (also on a noiseless last step, where d b/dtheta uses that step's own coefficients).
  The loss has the value of J and the gradient of S: J + S - stopgrad(S).  Because the adjoint is the exact chain
  rule of the Euler scheme, this equals the discrete-adjoint gradient to float precision (tested); it needs O(K)
  stored states, not the K network activations.  aux: loss (= J), control_cost, reward_mean, reward_std.
  """
  _common.check_config("continuous_adjoint", config)
  _common.check_stochastic("continuous_adjoint", config)

  def objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape, cond=(), mesh=None):
    coeffs, traj, adj, rewards = full_adjoint_batch(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn,
                                                    key, x_shape, config, cond, mesh)
    b = traj.shape[1]
    u, drift, dt = _control_and_drift(ft_apply_fn, ft_params, base_apply_fn, base_params, traj, coeffs, cond, mesh)
    a_next = sharding_lib.rows_by_device(adj[1:], mesh)  # the rows of flat_steps (a plain reshape without a mesh)
    per_row = dt * (jnp.sum((drift * a_next).reshape(drift.shape[0], -1), -1) + 0.5 * _common.sqnorm(u))
    surrogate = jnp.sum(per_row) / b
    control_cost = jnp.sum(dt * 0.5 * _common.sqnorm(jax.lax.stop_gradient(u))) / b
    value = control_cost - config.reward_multiplier * jnp.mean(rewards)
    loss = value + surrogate - jax.lax.stop_gradient(surrogate)
    return loss, {"loss": value, "control_cost": control_cost, "reward_mean": jnp.mean(rewards),
                  "reward_std": jnp.std(rewards)}

  return objective


def discrete_adjoint(config: losses.AMConfig = losses.AMConfig()) -> _common.Objective:
  """J = mean_b [sum_k h |u_k(X_k)|^2 / 2 - lambda reward(X_K)] simulated with live params (lax.scan).

  ``jax.grad`` backpropagates through every Euler-Maruyama step with the noise held fixed (the discrete adjoint
  method of Han & E; paper Sec. 4).  Memory grows with K (all activations stored).  Same X_0 / noise draws as
  ``losses.make_am_batch``.  aux: loss, control_cost, reward_mean, reward_std.
  """
  _common.check_config("discrete_adjoint", config)
  _common.check_stochastic("discrete_adjoint", config)

  def objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape, cond=(), mesh=None):
    coeffs = config.coefficients()
    x0, noise = _common.initial_state(key, x_shape, config.num_steps, mesh)
    batch = x0.shape[0]
    base_sg = jax.lax.stop_gradient(base_params)

    def simulate(params, x0, noise, cond):  # any number of paths: each device's own with a mesh
      def body(x, k):
        t_k = sampling.step_time(coeffs, k, x.shape[0])
        v_ft = ft_apply_fn(params, x, t_k, *cond)
        v_base = base_apply_fn(base_sg, x, t_k, *cond)
        u = (1.0 + coeffs.loss_drift_scale[k]) * (v_ft - v_base) / coeffs.loss_sigma[k]
        x_next = (x + coeffs.dt[k] * sampling.step_drift(v_ft, x, coeffs, k)
                  + coeffs.sigma[k] * jnp.sqrt(coeffs.dt[k]) * noise[k])
        return x_next, coeffs.dt[k] * 0.5 * _common.sqnorm(u)
      return jax.lax.scan(body, x0, jnp.arange(coeffs.num_steps))

    # Each device backpropagates through its own paths (sharding.grad_by_device: one all-reduce of the gradient, not
    # one per step of the backward loop); conditioning is per path (axis 0).
    x1, costs = sharding_lib.grad_by_device(simulate, mesh, (0, 1, 0), out_axes=(0, 1))(ft_params, x0, noise, cond)
    rewards = reward_fn(x1, *cond)
    chex.assert_shape(rewards, (batch,))
    control_cost = jnp.mean(jnp.sum(costs, axis=0))
    loss = control_cost - config.reward_multiplier * jnp.mean(rewards)
    return loss, {"loss": loss, "control_cost": control_cost, "reward_mean": jnp.mean(rewards),
                  "reward_std": jnp.std(rewards)}

  return objective
