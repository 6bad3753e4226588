"""Reward-gradient baselines: DRaFT-K and ReFL (ODE sampling, loss -lambda reward, no KL term).

Neither has a KL (or any proximity) term, so their optimum is reward maximisation -- for an unbounded reward no
optimum at all; on the exact problems they run past the tilted target (tested).  Both differentiate through the
network in x, so ``ft_apply_fn`` must be differentiable in x.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from am_jax import dynamics
from am_jax import losses
from am_jax import sampling
from am_jax import sharding as sharding_lib
from am_jax.methods import _common

__all__ = ["draft", "refl"]


def draft(config: losses.AMConfig = losses.AMConfig(), k: int = 1) -> _common.Objective:
  """DRaFT-K: loss = -lambda mean reward(X_1), X_1 from the fine-tuned ODE (``config.num_steps`` Euler steps).

  The first num_steps - k steps run with stopped params and the state is stopped before the last ``k`` steps,
  so the gradient is the truncated backpropagation of DRaFT-K (1 <= k <= num_steps).
  aux: loss, reward_mean, reward_std.
  """
  _common.check_config("draft", config)
  _common.require(_common.is_int(k) and 1 <= k <= config.num_steps, "draft",
                  f"k must be an int in [1, config.num_steps={config.num_steps}], got {k!r}.")

  def objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape, cond=(), mesh=None):
    coeffs = _common.ode_coefficients(config)
    k_steps = coeffs.num_steps
    x0 = sharding_lib.constrain_batch(jax.random.normal(key, tuple(x_shape), jnp.float32), mesh, 0)
    zeros = jnp.zeros((k_steps,) + tuple(x_shape), jnp.float32)
    ft_sg = jax.lax.stop_gradient(ft_params)
    head = _common.slice_coeffs(coeffs, 0, k_steps - k)
    if head.num_steps:
      x_mid = sampling.simulate(lambda x, t: ft_apply_fn(ft_sg, x, t, *cond), x0, zeros[:head.num_steps], head)[-1]
    else:
      x_mid = x0
    x_mid = sharding_lib.constrain_batch(jax.lax.stop_gradient(x_mid), mesh, 0)
    tail = _common.slice_coeffs(coeffs, k_steps - k, k_steps)

    def last_steps(params, x, zeros, cond):  # any number of paths: each device's own with a mesh
      return sampling.simulate(lambda y, t: ft_apply_fn(params, y, t, *cond), x, zeros, tail)[-1]

    # Each device backpropagates through its own paths (sharding.grad_by_device: one all-reduce of the gradient, not
    # one per step of the backward loop); conditioning is per path (axis 0).
    x1 = sharding_lib.grad_by_device(last_steps, mesh, (0, 1, 0))(ft_params, x_mid, zeros[head.num_steps:], cond)
    rewards = reward_fn(x1, *cond)
    loss = -config.reward_multiplier * jnp.mean(rewards)
    return loss, {"loss": loss, "reward_mean": jnp.mean(rewards), "reward_std": jnp.std(rewards)}

  return objective


def _refl_nodes(k_steps: int, t_range) -> tuple[int, int]:
  """First and last interior node of a k_steps grid inside t_range."""
  lo = max(1, math.ceil(t_range[0] * k_steps - 1e-6))
  hi = min(k_steps - 1, math.floor(t_range[1] * k_steps + 1e-6))
  return lo, hi


def refl(config: losses.AMConfig = losses.AMConfig(), t_range: tuple = (0.75, 0.975)) -> _common.Objective:
  """ReFL: loss = -lambda mean reward(x1_hat), x1_hat = (x_t - beta_t eps_hat) / alpha_t (one-step prediction).

  The ODE (no gradient) runs to a grid node t_k drawn uniformly (per sample) among the interior nodes in
  ``t_range`` = (t_min, t_max); the only gradient is through v_ft(X_{t_k}, t_k) in ``dynamics.velocity_to_data``.
  aux: loss, reward_mean (of the full ODE sample X_1), reward_std, predicted_reward_mean, t_mean.
  """
  _common.check_config("refl", config)
  _common.require(len(t_range) == 2 and 0.0 < t_range[0] <= t_range[1] < 1.0, "refl",
                  f"t_range must be (t_min, t_max) with 0 < t_min <= t_max < 1, got {t_range!r}.")
  lo, hi = _refl_nodes(config.num_steps, t_range)
  _common.require(lo <= hi, "refl", f"t_range={t_range!r} contains no interior node of the "
                                    f"config.num_steps={config.num_steps} grid.")

  def objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape, cond=(), mesh=None):
    coeffs = _common.ode_coefficients(config)
    k_steps = coeffs.num_steps
    k0, kk = jax.random.split(key)
    x0 = sharding_lib.constrain_batch(jax.random.normal(k0, tuple(x_shape), jnp.float32), mesh, 0)
    ft_sg = jax.lax.stop_gradient(ft_params)
    traj = jax.lax.stop_gradient(sampling.simulate(lambda x, t: ft_apply_fn(ft_sg, x, t, *cond), x0,
                                                   jnp.zeros((k_steps,) + tuple(x_shape)), coeffs))
    traj = sharding_lib.constrain_batch(traj, mesh, 1)
    batch = x0.shape[0]
    node = sharding_lib.constrain_batch(jax.random.randint(kk, (batch,), lo, hi + 1), mesh, 0)
    x_t = sharding_lib.constrain_batch(traj[node, jnp.arange(batch)], mesh, 0)
    t = coeffs.t[node]
    x1_hat = dynamics.velocity_to_data(ft_apply_fn(ft_params, x_t, t, *cond), x_t, t, config.schedule)
    pred_rewards = reward_fn(x1_hat, *cond)
    rewards = reward_fn(traj[-1], *cond)
    loss = -config.reward_multiplier * jnp.mean(pred_rewards)
    return loss, {"loss": loss, "reward_mean": jnp.mean(rewards), "reward_std": jnp.std(rewards),
                  "predicted_reward_mean": jnp.mean(pred_rewards), "t_mean": jnp.mean(t)}

  return objective
