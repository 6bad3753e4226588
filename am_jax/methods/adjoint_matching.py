"""Adjoint Matching (lean adjoint), its biased constant-sigma variant, and basic AM (full adjoint).

  am              paper Alg. 1, Eq. 25: ``losses.adjoint_matching_objective``.
  am_const_sigma  AM sampled with a constant sigma: the biased baseline of paper Fig. 2.
  basic_am        paper Eq. 22: the same regression with the full adjoint of the controlled process (Eq. 20).
"""
from __future__ import annotations

import dataclasses

import jax

from am_jax import losses
from am_jax.methods import _common
from am_jax.methods import soc_adjoint

__all__ = ["am", "am_const_sigma", "basic_am"]


def am(config: losses.AMConfig = losses.AMConfig()) -> _common.Objective:
  """Adjoint Matching (paper Alg. 1, Eq. 25) with every option of ``config`` (remat, chunked loss, precision).

  The objective is ``losses.adjoint_matching_objective(..., config, cond, mesh)`` with ``loss`` added to aux
  (aux: loss, loss_unclipped, clip_fraction, reward_mean, reward_std, control_norm, target_norm).
  """
  _common.check_config("am", config)
  _common.check_stochastic("am", config)  # an ODE config would weight the loss by 1/sigma = inf

  def objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape, cond=(), mesh=None):
    loss, aux = losses.adjoint_matching_objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key,
                                                  x_shape, config, cond, mesh)
    return loss, dict(aux, loss=loss)

  return objective


def am_const_sigma(config: losses.AMConfig = losses.AMConfig(), sigma: float = 1.0) -> _common.Objective:
  """AM whose trajectories and adjoint use the constant diffusion sigma(t) = ``sigma`` instead of the memoryless one.

  Drift b = v + c (v - kappa x), c = sigma^2 / (2 eta) (paper Eq. 5), control u = (1 + c)(v_ft - v_base) / sigma.
  The SOC optimum then carries the initial-value-function bias of paper Eq. 17, so X_1 is NOT
  p_base exp(r) / Z (paper Thm. 1, Fig. 2): the biased baseline.  0.2 and 1.0 are the paper's Fig. 2 values.
  """
  _common.check_config("am_const_sigma", config)
  _common.require(_common.is_real(sigma) and sigma > 0, "am_const_sigma",
                  f"sigma must be a number > 0, got {sigma!r}.")
  return am(dataclasses.replace(config, diffusion=float(sigma)))


def basic_am(config: losses.AMConfig = losses.AMConfig()) -> _common.Objective:
  """Basic Adjoint Matching (paper Eq. 22): regress u(X_k) onto -sigma_k a_{k+1} with the FULL adjoint.

  L = mean_{k in S, b} |u_k(X_k; theta) + sigma_k a_{k+1}|^2 (same time steps S, weights and clipping as
  ``am``; only the adjoint differs: ``soc_adjoint.full_adjoint``).  Its gradient is 2 (du/dtheta)^T (u + sigma a):
  with every step selected it is 2 / (K h) = 2 times the adjoint-method gradient (paper Prop. 2; tested).
  Needs ``ft_apply_fn`` differentiable in x (the full adjoint differentiates the fine-tuned drift).
  """
  _common.check_config("basic_am", config)
  _common.check_stochastic("basic_am", config)

  def objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape, cond=(), mesh=None):
    k_batch, k_loss = jax.random.split(key)
    _, traj, adj, rewards = soc_adjoint.full_adjoint_batch(ft_apply_fn, ft_params, base_apply_fn, base_params,
                                                           reward_fn, k_batch, x_shape, config, cond, mesh)
    loss, aux = losses.adjoint_matching_loss(ft_apply_fn, ft_params, base_apply_fn, base_params,
                                             losses.AMBatch(traj, adj, rewards), k_loss, config, cond, mesh)
    return loss, dict(aux, loss=loss)

  return objective
