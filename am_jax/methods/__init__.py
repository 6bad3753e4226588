"""Reward fine-tuning methods as optax-style factories: ``methods.eam(config, num_times=32)`` returns an objective.

Every objective has one signature (``Objective``)::

    objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape, cond=(), mesh=None)
        -> (loss scalar, aux dict with at least 'loss' and 'reward_mean')

``config`` (``losses.AMConfig``) is the shared sampling/target configuration: schedule, lambda
(``reward_multiplier``; the reward_fn is the RAW reward), grid (num_steps, time_offset, noiseless_last_step),
diffusion, solver, loss time steps and loss_clip (AM family).  Each method's own options are keyword arguments of its
factory, checked when the objective is built (one-line ValueError naming the argument).  Every objective applies
``sharding.constrain_batch`` to its batch-axis intermediates when given a mesh.  Build by name with ``build``.

Methods (derivations and measurements: docs/methods.md, docs/comparisons.md; families are the submodules):

  am                  (``adjoint_matching``) Adjoint Matching, lean adjoint (paper Alg. 1, Eq. 25).
  am_const_sigma      (``adjoint_matching``) AM sampled with a constant sigma (the biased baseline of paper Fig. 2).
  basic_am            (``adjoint_matching``) basic AM (paper Eq. 22): that regression with the full adjoint (Eq. 20).
  continuous_adjoint  (``soc_adjoint``) the adjoint method (paper Eq. 20-21) as a surrogate loss.
  discrete_adjoint    (``soc_adjoint``) backprop through the discretised SDE (noise fixed).
  draft               (``reward_gradient``) DRaFT-K: ODE sampling, reward gradient through the last k steps, no KL.
  refl                (``reward_gradient``) ReFL: one-step prediction from a random late ODE node, no KL.
  eam                 (``efficient_am``) Efficient AM: Gaussian reference base with a linear drift, closed-form adjoint,
                      few-step ODE sampling, importance weights p_base e^r / p_n.
  deterministic_am    (``deterministic``) ODE dynamics, truncated lean adjoint, regulariser 'kl' | 'kinetic' | 'power'.

Methods that differentiate through the states (basic_am, continuous_adjoint, discrete_adjoint, draft, refl) need
``ft_apply_fn`` differentiable in x including its base-model part: ``parameterisation.residual_model`` stops the
gradient of the base *parameters* only, so d v_base / dx flows.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Callable

from am_jax import losses
from am_jax.methods import adjoint_matching, deterministic, efficient_am, reward_gradient, soc_adjoint
from am_jax.methods._common import Objective
from am_jax.methods.adjoint_matching import am, am_const_sigma, basic_am
from am_jax.methods.deterministic import (REGULARISERS, Regulariser, deterministic_am, deterministic_reference_samples,
                                          regulariser_cost, regulariser_target)
from am_jax.methods.efficient_am import (base_data_score, eam, linear_reference, log_ratio_rate,
                                         ode_sample_with_log_ratio, self_normalised_weights, weight_mode)
from am_jax.methods.reward_gradient import draft, refl
from am_jax.methods.soc_adjoint import continuous_adjoint, discrete_adjoint, full_adjoint

__all__ = [
    "METHODS", "Objective", "REGULARISERS", "Regulariser", "am", "am_const_sigma", "base_data_score", "basic_am",
    "build", "continuous_adjoint", "deterministic_am", "deterministic_reference_samples", "discrete_adjoint", "draft",
    "eam", "full_adjoint", "linear_reference", "log_ratio_rate", "ode_sample_with_log_ratio", "options", "refl",
    "regulariser_cost", "regulariser_target", "self_normalised_weights", "weight_mode",
]

METHODS: dict[str, Callable[..., Objective]] = {
    "am": am,
    "am_const_sigma": am_const_sigma,
    "basic_am": basic_am,
    "continuous_adjoint": continuous_adjoint,
    "discrete_adjoint": discrete_adjoint,
    "draft": draft,
    "refl": refl,
    "eam": eam,
    "deterministic_am": deterministic_am,
}


def _closest(word: str, choices) -> str:
  match = difflib.get_close_matches(word, list(choices), n=1)
  return f" (did you mean {match[0]!r}?)" if match else ""


def options(name: str, **overrides) -> dict:
  """All options of method ``name`` with their values: the factory's defaults updated by ``overrides``.

  One-line ValueError naming an unknown method or option and the closest match.
  """
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}{_closest(name, METHODS)}; choose from {sorted(METHODS)}.")
  params = {k: p.default for k, p in inspect.signature(METHODS[name]).parameters.items() if k != "config"}
  for key in overrides:
    if key not in params:
      known = f"its options are {sorted(params)}" if params else "it takes no options"
      raise ValueError(f"method {name!r} has no option {key!r}{_closest(key, params)}; {known}.")
  return {**params, **overrides}


def build(name: str, config: losses.AMConfig = losses.AMConfig(), **overrides) -> Objective:
  """``METHODS[name](config, **overrides)``: the objective of a method chosen by name (e.g. from a config file).

  >>> objective = build("eam", losses.AMConfig(reward_multiplier=4.0), num_times=32)
  """
  options(name, **overrides)  # one-line errors for unknown names before the factory's own checks
  if getattr(config, "integrator", "euler") != "euler" and name not in INTEGRATOR_METHODS:
    raise ValueError(f"AMConfig.integrator = {config.integrator!r} is implemented for {INTEGRATOR_METHODS} only; "
                     f"method {name!r} integrates with 'euler'.")
  return METHODS[name](config, **overrides)


# Methods whose rollout, adjoint and loss follow ``AMConfig.integrator`` (the others use the Euler step).
INTEGRATOR_METHODS = ("am",)
