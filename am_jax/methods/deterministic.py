"""Deterministic Adjoint Matching: ODE dynamics, a truncated lean adjoint and general regularisers.

The fixed point is NOT the tilted distribution: it is the push-forward of N(0, I) by the per-trajectory optimal
deterministic control (``deterministic_reference_samples`` solves it directly); docs/methods.md section 8.8.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from am_jax import adjoint as adjoint_lib
from am_jax import losses
from am_jax import sampling
from am_jax import sharding as sharding_lib
from am_jax import time_hints
from am_jax.dynamics import _bcast
from am_jax.methods import _common

__all__ = ["REGULARISERS", "Regulariser", "deterministic_am", "deterministic_reference_samples", "regulariser_cost",
           "regulariser_target"]

REGULARISERS = ("kl", "kinetic", "power")


class Regulariser(NamedTuple):
  """Running cost R(dv) of the velocity perturbation dv = v_ft - v_base:

    'kl'      |dv|^2 / eta_t / weight  (= |u|^2 / 2 of the memoryless SDE with the same velocities when weight = 1),
    'kinetic' |dv|^2 / (2 w)           (kinetic energy of the perturbation: a W2-type proximity term),
    'power'   |dv|^p / (p w^(p-1))     (p = ``power`` > 1: penalises large deviations harder),

  with w = ``weight`` (w = weight eta / 2 for 'kl').
  """

  kind: str = "kinetic"
  weight: float = 1.0
  power: float = 4.0


def _weight(reg: Regulariser, schedule, tau):
  """w(t) of R: weight * eta / 2 for 'kl' (R = |dv|^2 / (weight eta)), weight otherwise."""
  if reg.kind == "kl":
    return reg.weight * 0.5 * schedule.eta(tau)
  return reg.weight * jnp.ones_like(tau)


def regulariser_cost(reg: Regulariser, schedule, dv, tau):
  """R(dv) per sample: |dv|^2 / (2 w) ('kl', 'kinetic') or |dv|^p / (p w^(p-1)) ('power').  dv (N, ...), tau (N,)."""
  w = _weight(reg, schedule, tau)
  if reg.kind == "power":
    p = reg.power
    return (_common.sqnorm(dv) + 1e-12) ** (0.5 * p) / (p * w ** (p - 1.0))
  return 0.5 * _common.sqnorm(dv) / w


def regulariser_target(reg: Regulariser, schedule, a_next, tau):
  """The stationary control dv = grad R*(-a): -w a (quadratic), -w |a|^{(2-p)/(p-1)} a ('power')."""
  w = _bcast(_weight(reg, schedule, tau), a_next)
  if reg.kind == "power":
    p = reg.power
    norm = jnp.sqrt(_common.sqnorm(a_next) + 1e-12)
    return -w * _bcast(norm ** ((2.0 - p) / (p - 1.0)), a_next) * a_next
  return -w * a_next


def _window_start(num_steps: int, truncation: float) -> int:
  """First step of the window: the last ceil(truncation K) steps (at least one) get the adjoint and the loss."""
  return num_steps - max(1, min(num_steps, math.ceil(truncation * num_steps - 1e-6)))


def _check(method, config, truncation, regulariser, regulariser_weight, regulariser_power) -> Regulariser:
  _common.check_config(method, config)
  req = lambda ok, msg: _common.require(ok, method, msg)  # noqa: E731
  req(_common.is_real(truncation) and 0.0 < truncation <= 1.0, f"truncation must be in (0, 1], got {truncation!r}.")
  req(regulariser in REGULARISERS, f"regulariser must be one of {REGULARISERS}, got {regulariser!r}.")
  req(_common.is_real(regulariser_weight) and regulariser_weight > 0,
      f"regulariser_weight must be > 0, got {regulariser_weight!r}.")
  req(_common.is_real(regulariser_power) and regulariser_power > 1,
      f"regulariser_power must be > 1, got {regulariser_power!r}.")
  return Regulariser(regulariser, regulariser_weight, regulariser_power)


def deterministic_am(config: losses.AMConfig = losses.AMConfig(), truncation: float = 0.25,
                     regulariser: str = "kinetic", regulariser_weight: float = 1.0, regulariser_power: float = 4.0,
                     anchor_steps: int = 4) -> _common.Objective:
  """Deterministic Adjoint Matching: ODE dynamics dX = (v_base + dv) dt, cost sum_k h R(dv_k) - r(X_1).

  Pontryagin: for the discrete problem with open-loop controls the costate is the lean adjoint along the controlled
  path, a_k = a_{k+1} + h (grad_x v_base)^T a_{k+1}, a_K = -grad r(X_K), and stationarity is grad R(dv_k) = -a_{k+1},
  i.e. dv_k = grad R*(-a_{k+1}) (``regulariser_target``).  We regress dv(X_k, tau_k) = v_ft - v_base onto that
  target under the current policy:

      L = mean_{k in window, b} |dv_k - grad R*(-a_{k+1})|^2 / w_k  +  mean_{k in anchors, b} |dv_k|^2 / w_k.

  Truncation: only the last ceil(truncation K) steps get the adjoint (the backward pass stops there) and the
  regression; ``anchor_steps`` random earlier steps are regressed to dv = 0 so the field solves the truncated
  problem (control only on the window).  ``regulariser``, ``regulariser_weight``, ``regulariser_power``: R
  (``Regulariser``).  aux: loss, reward_mean, reward_std, regulariser_cost.
  """
  reg = _check("deterministic_am", config, truncation, regulariser, regulariser_weight, regulariser_power)
  _common.require(_common.is_int(anchor_steps) and anchor_steps >= 0, "deterministic_am",
                  f"anchor_steps must be an int >= 0, got {anchor_steps!r}.")
  schedule = config.schedule

  def objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape, cond=(), mesh=None):
    coeffs = _common.ode_coefficients(config)
    k_steps = coeffs.num_steps
    k_start = _window_start(k_steps, truncation)
    n_win = k_steps - k_start
    k0, ka = jax.random.split(key)
    x0 = sharding_lib.constrain_batch(jax.random.normal(k0, tuple(x_shape), jnp.float32), mesh, 0)
    ft_sg = jax.lax.stop_gradient(ft_params)
    traj = jax.lax.stop_gradient(sampling.simulate(lambda x, t: ft_apply_fn(ft_sg, x, t, *cond), x0,
                                                   jnp.zeros((k_steps,) + tuple(x_shape)), coeffs))
    traj = sharding_lib.constrain_batch(traj, mesh, 1)
    a1, rewards = adjoint_lib.terminal_adjoint(reward_fn, traj[-1], config.reward_multiplier, cond)
    window = _common.slice_coeffs(coeffs, k_start, k_steps)
    base_v = lambda x, t: base_apply_fn(base_params, x, t, *cond)  # noqa: E731
    adj = jax.lax.stop_gradient(adjoint_lib.lean_adjoint(base_v, traj[k_start:], a1, window))
    adj = sharding_lib.constrain_batch(adj, mesh, 1)

    batch = x0.shape[0]
    n_anchor = min(anchor_steps, k_start)
    idx = jnp.arange(k_start, k_steps)
    if n_anchor:
      idx = jnp.concatenate([jax.random.choice(ka, k_start, (n_anchor,), replace=False), idx])
    n = idx.shape[0]
    a_next = adj[1:].reshape((n_win * batch,) + traj.shape[2:])
    target = regulariser_target(reg, schedule, a_next, jnp.repeat(coeffs.tau[idx[n_anchor:]], batch))
    target = jnp.concatenate([jnp.zeros((n_anchor * batch,) + traj.shape[2:]), target], axis=0)
    # The network's rows device by device (sharding.rows_by_device; the plain reshape on one device): with a mesh
    # each device evaluates its own n B / G rows instead of all n B.  The target follows the same order.
    x = sharding_lib.rows_by_device(traj[idx], mesh)
    tau = sharding_lib.rows_per_step(coeffs.tau[idx], batch, mesh)
    cond_n = tuple(sharding_lib.rows_of_paths(c, n, mesh) for c in cond)
    target = sharding_lib.rows_by_device(target.reshape((n, batch) + traj.shape[2:]), mesh)
    blocks = n * sharding_lib.devices_of(mesh)
    with time_hints.rows_in_time_blocks(blocks):  # n blocks of B rows at tau_k (G n blocks of B / G with a mesh)
      dv = ft_apply_fn(ft_params, x, tau, *cond_n) - jax.lax.stop_gradient(base_apply_fn(base_params, x, tau,
                                                                                         *cond_n))
    loss = jnp.mean(_common.sqnorm(dv - target) / _weight(reg, schedule, tau))
    cost = jnp.sum(coeffs.dt[0] * regulariser_cost(reg, schedule, jax.lax.stop_gradient(dv), tau)) / batch
    return loss, {"loss": loss, "reward_mean": jnp.mean(rewards), "reward_std": jnp.std(rewards),
                  "regulariser_cost": cost}

  return objective


def deterministic_reference_samples(base_apply_fn: Callable, base_params, reward_fn: Callable, x0,
                                    config: losses.AMConfig = losses.AMConfig(), truncation: float = 0.25,
                                    regulariser: str = "kinetic", regulariser_weight: float = 1.0,
                                    regulariser_power: float = 4.0, *, iterations: int = 400,
                                    learning_rate: float = 0.05, cond=()):
  """What ``deterministic_am`` (same config and options) converges to: per-trajectory optimal open-loop controls.

  For each x0 (independently; the objective is a sum over trajectories) minimise
  sum_{k in window} h R(dv_k) - lambda reward(X_K) over dv_k in R^d with the base ODE on the same grid as
  ``deterministic_am``, by Adam on the per-trajectory controls (backprop through the ODE).  Its stationarity
  condition is exactly that method's regression target.  Returns X_K (B, ...).
  """
  reg = _check("deterministic_reference_samples", config, truncation, regulariser, regulariser_weight,
               regulariser_power)
  coeffs = _common.ode_coefficients(config)
  k_steps = coeffs.num_steps
  k_start = _window_start(k_steps, truncation)
  n_win = k_steps - k_start
  batch = x0.shape[0]
  base_v = lambda x, t: base_apply_fn(base_params, x, t, *cond)  # noqa: E731
  zeros = jnp.zeros((k_steps,) + x0.shape)
  x_start = sampling.simulate(base_v, x0, zeros[:k_start], _common.slice_coeffs(coeffs, 0, k_start))[-1]
  window = _common.slice_coeffs(coeffs, k_start, k_steps)

  def endpoint(controls):
    def body(x, k):
      t_k = sampling.step_time(window, k, batch)
      return x + window.dt[k] * (base_v(x, t_k) + controls[k]), None
    return jax.lax.scan(body, x_start, jnp.arange(n_win))[0]

  def objective(controls):
    tau = jnp.repeat(window.tau, batch)
    flat = controls.reshape((n_win * batch,) + x0.shape[1:])
    cost = jnp.sum(jnp.repeat(window.dt, batch) * regulariser_cost(reg, config.schedule, flat, tau))
    return cost - config.reward_multiplier * jnp.sum(reward_fn(endpoint(controls), *cond))

  opt = optax.adam(learning_rate)

  @jax.jit
  def solve(controls):
    def step(carry, _):
      c, s = carry
      g = jax.grad(objective)(c)
      upd, s = opt.update(g, s, c)
      return (optax.apply_updates(c, upd), s), None
    (c, _), _ = jax.lax.scan(step, (controls, opt.init(controls)), None, length=iterations)
    return endpoint(c)

  return solve(jnp.zeros((n_win,) + x0.shape))
