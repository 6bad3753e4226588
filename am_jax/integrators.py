"""The exponential integrator of the memoryless SDE (and of the probability-flow ODE) as a diffrax solver.

``ExponentialIntegrator`` is a ``diffrax.AbstractSolver``: each step from t0 to t1 evaluates the velocity model
once, at (y0, tau) with tau = t0 + time_offset (t1 - t0), holds its data prediction D = E[X_1 | y0] fixed, and
applies the exact solution of the remaining linear SDE (``sampling.exponential_step``, docs/maths.md section 6):

    y1 = lin y0 + gain v(y0, tau) + noise_scale * dW / sqrt(t1 - t0).

For the VP schedule this is DDPM ancestral sampling (DDIM eta = 1); with ``memoryless=False`` it is DDIM.
Usage (any grid, any Brownian path; the diffusion term's vector field is not used: the step's exact noise scale
multiplies the standardised increment, so the noise is exact in law per step)::

    terms = diffrax.MultiTerm(diffrax.ODETerm(lambda t, x, args: velocity(x, t)),
                              diffrax.ControlTerm(lambda t, x, args: 1.0, brownian_path))
    diffrax.diffeqsolve(terms, ExponentialIntegrator(schedule), t0=0.0, t1=1.0, dt0=1 / 40, y0=x0)

The velocity's time argument is the scalar tau (the am_jax ``velocity_fn(x, t)`` convention takes a (B,) vector:
wrap it).  ``coeffs`` (a ``sampling.StepCoefficients`` of the exponential integrator) makes the solver read the
step's coefficients from that grid instead of recomputing them: ``sampling.simulate(..., solver='diffrax')`` uses
it so that both solvers apply the same numbers.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import diffrax
import equinox as eqx
import jax.numpy as jnp
from diffrax._local_interpolation import LocalLinearInterpolation  # pylint: disable=protected-access

from am_jax import sampling
from am_jax import schedules as schedules_lib


class ExponentialIntegrator(diffrax.AbstractSolver):
  """Exact-in-the-linear-part step of the memoryless SDE (or ODE) with the data prediction held fixed.

  Attributes:
    schedule: the interpolation schedule of the velocity model.
    memoryless: True (memoryless SDE, needs the MultiTerm(drift, noise) form) or False (ODE / DDIM: one ODETerm,
      or a MultiTerm whose noise term is ignored).
    time_offset: the network is evaluated at tau = t0 + time_offset (t1 - t0), clamped to <= 1 - 1e-4.
    coeffs: optional exponential ``StepCoefficients``: read (tau, lin, gain, noise_scale) of the grid step whose
      start is nearest t0 instead of computing them (the grid must be the solver's step grid).
  """

  schedule: schedules_lib.Schedule = eqx.field(static=True, default_factory=schedules_lib.LinearSchedule)
  memoryless: bool = eqx.field(static=True, default=True)
  time_offset: float = eqx.field(static=True, default=0.5)
  coeffs: Optional[sampling.StepCoefficients] = None

  term_structure: ClassVar = diffrax.AbstractTerm
  interpolation_cls: ClassVar = LocalLinearInterpolation

  def order(self, terms):
    return 1

  def strong_order(self, terms):
    return 0.5

  def init(self, terms, t0, t1, y0, args):
    return None

  def _coefficients(self, t0, t1):
    if self.coeffs is not None:
      c = self.coeffs
      k = jnp.minimum(jnp.argmin(jnp.abs(c.t - t0)), c.num_steps - 1)
      return c.tau[k], c.lin[k], c.gain[k], c.noise_scale[k]
    tau = jnp.minimum(t0 + self.time_offset * (t1 - t0), 1.0 - 1e-4)
    return (tau,) + tuple(sampling.exponential_step(self.schedule, t0, t1, tau, self.memoryless))

  def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
    del solver_state, made_jump
    if isinstance(terms, diffrax.MultiTerm):
      drift, noise_term = terms.terms[0], terms.terms[1]
    else:
      drift, noise_term = terms, None
    tau, lin, gain, noise_scale = self._coefficients(t0, t1)
    v = drift.vf(tau, y0, args)
    y1 = lin * y0 + gain * v
    if self.memoryless:
      if noise_term is None:
        raise ValueError("ExponentialIntegrator(memoryless=True) needs terms = MultiTerm(ODETerm, noise term).")
      y1 = y1 + noise_scale * (noise_term.contr(t0, t1) / jnp.sqrt(t1 - t0))
    return y1, None, dict(y0=y0, y1=y1), None, diffrax.RESULTS.successful

  def func(self, terms, t0, y0, args):
    drift = terms.terms[0] if isinstance(terms, diffrax.MultiTerm) else terms
    return drift.vf(t0, y0, args)
