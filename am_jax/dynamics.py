"""Drifts, controls and exact parameterisation conversions, as pure functions.

Notation (see ``schedules``): kappa_t = alphadot_t / alpha_t, eta_t = beta_t (kappa_t beta_t - betadot_t).

* Family of generative processes sharing the reference marginals (AM paper Eq. 5):
      b_sigma(x, t) = v(x, t) + sigma(t)^2 / (2 eta_t) * (v(x, t) - kappa_t x),   dX = b dt + sigma dB.
* Memoryless drift (sigma^2 = 2 eta, paper Eq. 8):  b(x, t) = 2 v(x, t) - kappa_t x.
* Control (paper Eq. 17-18): the fine-tuned memoryless drift is b_base + sigma u, so
      u = 2 (v_ft - v_base) / sigma,   v_ft = v_base + sigma u / 2.
* Parameterisations.  With x = beta eps + alpha x1 (x1 is the clean sample, called x0 in DDPM
  notation) and v = alphadot x1 + betadot eps:
      v = kappa x - (eta / beta) eps,     x1 = (x - beta eps) / alpha,
      score = -eps / beta = (v - kappa x) / eta.
  These are exact identities, so an epsilon-, data- or score-parameterised model is turned
  into a velocity model (and back) without approximation.

Shapes: ``x`` and ``v`` are ``(B, ...)``; ``t`` is a scalar or ``(B,)`` and is broadcast over
the trailing axes of ``x``.
"""
from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from am_jax import schedules as schedules_lib


def _bcast(coef, x):
  """Reshapes a per-sample coefficient (scalar or (B,)) to broadcast against x of shape (B, ...)."""
  coef = jnp.asarray(coef, dtype=x.dtype)
  if coef.ndim == 0:
    return coef
  return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def checked(tree, bad, msg: str):
  """Returns ``tree``, raising ``msg`` (eagerly, or at run time under jit) when the scalar ``bad`` is true.

  Only a scalar goes through the runtime check (``eqx.error_if``); the arrays are tied to it by
  adding a zero, so the check survives dead-code elimination and the arrays keep their
  shardings (routing a sharded array through the check gathers it to one device).
  """
  zero = eqx.error_if(jnp.zeros((), jnp.float32), bad, msg)
  return jax.tree.map(lambda x: x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)


def validate_time(t):
  """Returns t, raising (eagerly or at run time under jit) if any entry is outside [0, 1] or NaN."""
  t = jnp.asarray(t)
  return checked(t, ~jnp.all((t >= 0.0) & (t <= 1.0)), "time t must lie in [0, 1] (t = 0 noise, t = 1 data).")


def family_drift(v, x, t, schedule: schedules_lib.Schedule, diffusion: schedules_lib.Diffusion):
  """b_sigma(x, t) = v + sigma^2/(2 eta) (v - kappa x): drift with marginals of the reference flow."""
  c = _bcast(diffusion.drift_scale(schedule, t), x)
  kappa = _bcast(schedule.kappa(t), x)
  return v + c * (v - kappa * x)


def memoryless_drift(v, x, t, schedule: schedules_lib.Schedule):
  """b(x, t) = 2 v(x, t) - kappa_t x (paper Eq. 8); singular like 1/t at t = 0 for flows."""
  return 2.0 * v - _bcast(schedule.kappa(t), x) * x


def control_from_velocities(v_ft, v_base, sigma):
  """u = 2 (v_ft - v_base) / sigma; ``sigma`` scalar or (B,)."""
  return 2.0 * (v_ft - v_base) / _bcast(sigma, v_ft)


def velocity_from_control(v_base, u, sigma):
  """v_ft = v_base + sigma u / 2 (inverse of ``control_from_velocities``)."""
  return v_base + 0.5 * _bcast(sigma, v_base) * u


def epsilon_to_velocity(eps, x, t, schedule):
  """v = kappa x - (eta / beta) eps."""
  return _bcast(schedule.kappa(t), x) * x - _bcast(schedule.eta(t) / schedule.beta(t), x) * eps


def velocity_to_epsilon(v, x, t, schedule):
  """eps = (beta / eta) (kappa x - v)."""
  return _bcast(schedule.beta(t) / schedule.eta(t), x) * (_bcast(schedule.kappa(t), x) * x - v)


def data_to_velocity(x1, x, t, schedule):
  """Velocity from a clean-data prediction x1 ("x0-prediction" in DDPM notation).

  eps = (x - alpha x1) / beta, then v = alphadot x1 + betadot eps.
  """
  eps = (x - _bcast(schedule.alpha(t), x) * x1) / _bcast(schedule.beta(t), x)
  return _bcast(schedule.alpha_dot(t), x) * x1 + _bcast(schedule.beta_dot(t), x) * eps


def velocity_to_data(v, x, t, schedule):
  """Clean-data prediction x1 = (x - beta eps) / alpha with eps from ``velocity_to_epsilon``."""
  eps = velocity_to_epsilon(v, x, t, schedule)
  return (x - _bcast(schedule.beta(t), x) * eps) / _bcast(schedule.alpha(t), x)


def score_to_velocity(score, x, t, schedule):
  """v = kappa x + eta * score."""
  return _bcast(schedule.kappa(t), x) * x + _bcast(schedule.eta(t), x) * score


def velocity_to_score(v, x, t, schedule):
  """score = (v - kappa x) / eta."""
  return (v - _bcast(schedule.kappa(t), x) * x) / _bcast(schedule.eta(t), x)


def epsilon_model_as_velocity(eps_apply_fn: Callable, schedule) -> Callable:
  """Wraps ``eps_apply_fn(params, x, t, *cond)`` (an epsilon-prediction diffusion model) into a
  velocity model ``apply_fn(params, x, t, *cond)`` usable everywhere in am_jax.

  For a VP (DDPM) schedule the memoryless process of this velocity is the DDPM ancestral
  sampler, so fine-tuning an epsilon model goes through the same code as a flow model.
  """

  def apply_fn(params, x, t, *cond):
    return epsilon_to_velocity(eps_apply_fn(params, x, t, *cond), x, t, schedule)

  return apply_fn


def prediction_as_velocity(apply_fn: Callable, prediction: str, schedule) -> Callable:
  """A network predicting ``prediction`` ('velocity' | 'epsilon' | 'x0') as a velocity model.

  'velocity' returns ``apply_fn`` itself; 'epsilon' uses ``epsilon_to_velocity``; 'x0' (data prediction)
  uses ``data_to_velocity``.
  """
  if prediction == "velocity":
    return apply_fn
  if prediction == "epsilon":
    return epsilon_model_as_velocity(apply_fn, schedule)
  if prediction == "x0":
    return lambda params, x, t, *cond: data_to_velocity(apply_fn(params, x, t, *cond), x, t, schedule)
  raise ValueError(f"prediction must be 'velocity', 'epsilon' or 'x0', got {prediction!r}.")
