"""Interpolation schedules and diffusion-coefficient families.

Conventions (Adjoint Matching paper, Sec. 2): time ``t`` in [0, 1], ``t = 0`` is noise and
``t = 1`` is data. The reference flow is

    Xbar_t = beta_t * Xbar_0 + alpha_t * Xbar_1,   Xbar_0 ~ N(0, I),  Xbar_1 ~ data,

with alpha_0 = 0, alpha_1 = 1, beta_0 = 1, beta_1 = 0 (the VP schedule only reaches these up to
exp(-5)).  From a schedule we derive

    kappa_t = alphadot_t / alpha_t,
    eta_t   = beta_t * (kappa_t * beta_t - betadot_t)              (paper Eq. 7)
    sigma_memoryless(t) = sqrt(2 * eta_t)                          (paper Prop. 1 / Eq. 8)

All methods are pure ``jnp`` functions of an array ``t`` of any shape and broadcast elementwise,
so they work under ``jit``, ``vmap`` and ``grad``.  Schedules and diffusion coefficients are frozen
dataclasses (hashable), so they can be passed as static arguments to ``jax.jit``.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Callable

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Schedule(abc.ABC):
  """Base class: subclasses define ``alpha``, ``beta`` and their time derivatives."""

  @abc.abstractmethod
  def alpha(self, t):
    ...

  @abc.abstractmethod
  def beta(self, t):
    ...

  @abc.abstractmethod
  def alpha_dot(self, t):
    ...

  @abc.abstractmethod
  def beta_dot(self, t):
    ...

  def kappa(self, t):
    """alphadot_t / alpha_t: the coefficient of x in the memoryless drift."""
    return self.alpha_dot(t) / self.alpha(t)

  def eta(self, t):
    """eta_t = beta_t (kappa_t beta_t - betadot_t) >= 0; the score is (v - kappa x) / eta."""
    b = self.beta(t)
    return b * (self.kappa(t) * b - self.beta_dot(t))

  def memoryless_sigma(self, t):
    """sigma(t) = sqrt(2 eta_t): the only diffusion coefficient for which X_0 and X_1 are independent."""
    return jnp.sqrt(2.0 * self.eta(t))


@dataclasses.dataclass(frozen=True)
class LinearSchedule(Schedule):
  """Rectified flow / conditional OT: alpha_t = t, beta_t = 1 - t.  eta_t = (1 - t) / t."""

  def alpha(self, t):
    return jnp.asarray(t)

  def beta(self, t):
    return 1.0 - jnp.asarray(t)

  def alpha_dot(self, t):
    return jnp.ones_like(jnp.asarray(t, dtype=jnp.result_type(float)))

  def beta_dot(self, t):
    return -jnp.ones_like(jnp.asarray(t, dtype=jnp.result_type(float)))

  def kappa(self, t):
    return 1.0 / jnp.asarray(t)

  def eta(self, t):
    t = jnp.asarray(t)
    return (1.0 - t) / t


@dataclasses.dataclass(frozen=True)
class CosineSchedule(Schedule):
  """alpha_t = sin(pi t / 2), beta_t = cos(pi t / 2) (variance preserving, cosine path)."""

  def alpha(self, t):
    return jnp.sin(0.5 * jnp.pi * jnp.asarray(t))

  def beta(self, t):
    return jnp.cos(0.5 * jnp.pi * jnp.asarray(t))

  def alpha_dot(self, t):
    return 0.5 * jnp.pi * jnp.cos(0.5 * jnp.pi * jnp.asarray(t))

  def beta_dot(self, t):
    return -0.5 * jnp.pi * jnp.sin(0.5 * jnp.pi * jnp.asarray(t))


@dataclasses.dataclass(frozen=True)
class VPSchedule(Schedule):
  """Variance-preserving diffusion with the DDPM linear-beta schedule, in continuous time.

  With diffusion time s = 1 - t, the DDPM noise rate is b(s) = beta_min + (beta_max - beta_min) s,
  abar(s) = exp(-(beta_min s + (beta_max - beta_min) s^2 / 2)), alpha_t = sqrt(abar(1 - t)),
  beta_t = sqrt(1 - abar(1 - t)).  Defaults (0.1, 20) are the continuous limit of DDPM's
  betas linspace(1e-4, 0.02, 1000).  Because alpha^2 + beta^2 = 1, eta_t = kappa_t = b(1 - t) / 2,
  so the memoryless sigma(t)^2 = b(1 - t): the DDPM (ancestral) sampler *is* the memoryless
  schedule of the DDIM ODE (AM paper, Sec. 4).
  """

  beta_min: float = 0.1
  beta_max: float = 20.0

  def _log_abar(self, t):
    s = 1.0 - jnp.asarray(t)
    return -(self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2)

  def noise_rate(self, t):
    """DDPM's b(s) at s = 1 - t."""
    return self.beta_min + (self.beta_max - self.beta_min) * (1.0 - jnp.asarray(t))

  def alpha(self, t):
    return jnp.exp(0.5 * self._log_abar(t))

  def beta(self, t):
    return jnp.sqrt(-jnp.expm1(self._log_abar(t)))

  def alpha_dot(self, t):
    return 0.5 * self.noise_rate(t) * self.alpha(t)

  def beta_dot(self, t):
    return -self.alpha(t) * self.alpha_dot(t) / self.beta(t)

  def kappa(self, t):
    return 0.5 * self.noise_rate(t)

  def eta(self, t):
    return 0.5 * self.noise_rate(t)


SCHEDULES = {"linear": LinearSchedule, "cosine": CosineSchedule, "vp": VPSchedule}


def get_schedule(name: str, **kwargs) -> Schedule:
  """Returns a schedule by name: 'linear', 'cosine' or 'vp'."""
  if name not in SCHEDULES:
    raise ValueError(f"Unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}.")
  return SCHEDULES[name](**kwargs)


# ---------------------------------------------------------------------------------------------
# Diffusion coefficients sigma(t).
#
# The family of generative processes (paper Eq. 5) sharing the reference marginals is
#   dX = [v + sigma^2 / (2 eta) (v - kappa x)] dt + sigma dB.
# Each coefficient exposes sigma(schedule, t) and drift_scale(schedule, t) = sigma^2 / (2 eta),
# so the memoryless case returns the exact constant 1 (no 0/0 at t = 1) and the ODE returns 0.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Diffusion(abc.ABC):
  """Base class of diffusion coefficients sigma(t)."""

  @abc.abstractmethod
  def sigma(self, schedule: Schedule, t):
    ...

  def drift_scale(self, schedule: Schedule, t):
    """sigma(t)^2 / (2 eta_t): weight of (v - kappa x) in the drift of the family."""
    return self.sigma(schedule, t) ** 2 / (2.0 * schedule.eta(t))


@dataclasses.dataclass(frozen=True)
class Memoryless(Diffusion):
  """sigma(t) = sqrt(2 eta_t): the fine-tuning schedule (paper Thm. 1)."""

  def sigma(self, schedule, t):
    return schedule.memoryless_sigma(t)

  def drift_scale(self, schedule, t):
    return jnp.ones_like(jnp.asarray(t, dtype=jnp.result_type(float)))


@dataclasses.dataclass(frozen=True)
class ZeroDiffusion(Diffusion):
  """sigma = 0: the Flow Matching / DDIM ODE."""

  def sigma(self, schedule, t):
    return jnp.zeros_like(jnp.asarray(t, dtype=jnp.result_type(float)))

  def drift_scale(self, schedule, t):
    return jnp.zeros_like(jnp.asarray(t, dtype=jnp.result_type(float)))


@dataclasses.dataclass(frozen=True)
class ConstantDiffusion(Diffusion):
  """sigma(t) = value for all t (biased if used for fine-tuning; paper Fig. 2)."""

  value: float = 1.0

  def sigma(self, schedule, t):
    return jnp.full(jnp.shape(t), self.value, dtype=jnp.result_type(float))


@dataclasses.dataclass(frozen=True)
class CallableDiffusion(Diffusion):
  """A user function ``fn(t) -> sigma(t)`` (jnp, elementwise)."""

  fn: Callable = None

  def sigma(self, schedule, t):
    return jnp.asarray(self.fn(t), dtype=jnp.result_type(float))


def get_diffusion(spec) -> Diffusion:
  """Builds a diffusion from a spec: a Diffusion, 'memoryless', 'ode'/'zero', a float, or a callable."""
  if isinstance(spec, Diffusion):
    return spec
  if isinstance(spec, str):
    if spec == "memoryless":
      return Memoryless()
    if spec in ("ode", "zero"):
      return ZeroDiffusion()
    raise ValueError(f"Unknown diffusion {spec!r}; expected 'memoryless', 'ode', a float or a callable.")
  if isinstance(spec, (int, float)):
    if spec < 0:
      raise ValueError(f"A constant diffusion coefficient must be >= 0, got {spec}.")
    return ZeroDiffusion() if spec == 0 else ConstantDiffusion(float(spec))
  if callable(spec):
    return CallableDiffusion(spec)
  raise TypeError(f"Cannot build a diffusion coefficient from {spec!r}.")
