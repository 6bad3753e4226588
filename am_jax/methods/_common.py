"""Pieces shared by the method families: the objective signature, option checks, grids and batch helpers.

Notation as in ``schedules``/``dynamics``: kappa = alphadot/alpha, eta = beta (kappa beta - betadot), memoryless
sigma = sqrt(2 eta), r = lambda * reward.  Step k of a grid has size h, evaluation time tau_k, drift
b_k(x) = v(x, tau_k) + c_k (v - kappa_k x), so the fine-tuned drift is b_base + sigma u with the control
u_k = (1 + c_k)(v_ft - v_base) / sigma_k (2 (v_ft - v_base) / sigma when memoryless; paper Eq. 18).
"""
from __future__ import annotations

import numbers
from typing import Callable, Optional, Protocol

import jax
import jax.numpy as jnp

from am_jax import losses
from am_jax import sampling
from am_jax import schedules as schedules_lib
from am_jax import sharding as sharding_lib

__all__ = ["Objective"]


class Objective(Protocol):
  """What every factory of ``am_jax.methods`` returns.

  ``ft_apply_fn(params, x, t, *cond) -> v`` (x (N, ...), t (N,)); only ``ft_params`` is trained (differentiate
  with ``jax.grad(..., has_aux=True)``).  ``reward_fn(x, *cond) -> (B,)`` is the RAW reward: lambda is the
  config's ``reward_multiplier``.  ``x_shape`` = (B, ...) is static; ``cond`` holds arrays with leading axis B;
  ``mesh`` (``am_jax.sharding.make_mesh``) constrains every batch-axis intermediate to the data axis.
  Returns (loss scalar, aux) with aux holding at least ``loss`` and ``reward_mean`` (mean raw reward of the
  terminal samples of the step).
  """

  def __call__(self, ft_apply_fn: Callable, ft_params, base_apply_fn: Callable, base_params, reward_fn: Callable,
               key: jax.Array, x_shape: tuple, cond: tuple = (), mesh: Optional[jax.sharding.Mesh] = None
               ) -> tuple[jax.Array, dict]:
    ...


def check_config(method: str, config) -> losses.AMConfig:
  """``config`` itself; one-line TypeError naming the factory otherwise."""
  if not isinstance(config, losses.AMConfig):
    raise TypeError(f"methods.{method}: config must be a losses.AMConfig, got {type(config).__name__}.")
  return config


def require(ok: bool, method: str, message: str):
  """One-line ValueError ``methods.<method>: <message>`` unless ``ok``."""
  if not ok:
    raise ValueError(f"methods.{method}: {message}")


def is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_stochastic(method: str, config: losses.AMConfig):
  """The control u = (1 + c)(v_ft - v_base) / sigma needs sigma > 0 at every step: no ODE diffusion."""
  require(not isinstance(schedules_lib.get_diffusion(config.diffusion), schedules_lib.ZeroDiffusion), method,
          f"needs a stochastic diffusion (sigma > 0), got config.diffusion={config.diffusion!r} (an ODE).")


def sqnorm(x):
  """Per-sample squared norm: (N, ...) -> (N,)."""
  return jnp.sum((x**2).reshape(x.shape[0], -1), axis=-1)


def slice_coeffs(coeffs: sampling.StepCoefficients, start: int, stop: int) -> sampling.StepCoefficients:
  """Steps start..stop-1 of a grid (nodes start..stop), for simulating or adjoining a segment."""
  per_step = {f: getattr(coeffs, f)[start:stop] for f in ("tau", "dt", "sigma", "drift_scale", "kappa",
                                                          "loss_sigma", "loss_drift_scale")}
  # The exponential integrator's per-step coefficients (None for Euler).
  per_step.update({f: getattr(coeffs, f)[start:stop] for f in ("lin", "gain", "noise_scale")
                   if getattr(coeffs, f) is not None})
  return coeffs._replace(t=coeffs.t[start:stop + 1], **per_step)


def ode_coefficients(config: losses.AMConfig, num_steps: Optional[int] = None) -> sampling.StepCoefficients:
  """The probability-flow ODE on the config's grid (or a ``num_steps`` grid with the same time offset)."""
  return sampling.make_coefficients(config.schedule, "ode", num_steps or config.num_steps, config.time_offset)


def initial_state(key, x_shape, num_steps: int, mesh=None):
  """X_0 ~ N(0, I) (B, ...) and the Brownian increments (K, B, ...), split exactly as ``losses.make_am_batch``."""
  k0, kn = jax.random.split(key)
  x0 = sharding_lib.constrain_batch(jax.random.normal(k0, tuple(x_shape), jnp.float32), mesh, 0)
  return x0, sharding_lib.constrain_batch(sampling.draw_noise(kn, num_steps, x_shape), mesh, 1)


def constrain_rows(x, mesh, copies: int):
  """Batch sharding of a (copies * B, ...) stack of ``copies`` blocks of B rows: axis B of each block is sharded.

  A plain row sharding of the stack would put whole blocks on one device; this keeps every device on its own
  slice of the batch in each block.  A no-op (no reshape) without a mesh.
  """
  if mesh is None:
    return x
  blocks = x.reshape((copies, x.shape[0] // copies) + x.shape[1:])
  return sharding_lib.constrain_batch(blocks, mesh, 1).reshape(x.shape)


def flat_steps(traj, coeffs: sampling.StepCoefficients, cond, mesh=None):
  """Stacks steps 0..K-1 into one batch: x (K B, ...), t (K B,), per-row step coefficients and cond.

  The rows go device by device (``sharding.rows_by_device``; the plain K-major stack on one device), so with a mesh
  each device evaluates its own paths; the plain reshape made XLA gather the K B rows onto every device.
  """
  k_steps, b = coeffs.num_steps, traj.shape[1]
  per_row = lambda v: sharding_lib.rows_per_step(v, b, mesh)  # noqa: E731
  fields = ("dt", "drift_scale", "kappa", "loss_sigma", "loss_drift_scale")
  return (sharding_lib.rows_by_device(traj[:-1], mesh), per_row(coeffs.tau),
          {f: per_row(getattr(coeffs, f)) for f in fields},
          tuple(sharding_lib.rows_of_paths(c, k_steps, mesh) for c in cond))
