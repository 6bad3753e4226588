"""am_jax: reward fine-tuning of flow-matching and diffusion models with Adjoint Matching, in JAX.

Fine-tunes a pre-trained model so that it samples the tilted distribution p*(x) ~ p_base(x) exp(lambda r(x))
(Domingo-Enrich et al., ICLR 2025, Eq. 1).  Every function works with any
``apply_fn(params, x, t, *cond) -> velocity`` (Flax, Equinox or plain functions) and any differentiable
``reward_fn(x, *cond) -> (B,)``.

The problem and the methods::

    am_jax.Problem             everything a fine-tuning run needs (base / fine-tuned model, reward, schedule)
    am_jax.build_problem       a Problem from an ml_collections config (validated first)
    am_jax.AMConfig            sampling grid, lambda (reward_multiplier), solver, loss-time selection
    am_jax.methods             objectives as factories: am_jax.methods.am(config), .eam(config, num_times=16), ...
    am_jax.adjoint_matching_loss / adjoint_matching_objective / flow_matching_loss

Building blocks::

    am_jax.schedules (Schedule, LinearSchedule, CosineSchedule, VPSchedule, get_schedule), am_jax.sampling
    (sample), am_jax.multistep (dpm_solver_2m: second-order sampling, K = 10), am_jax.adjoint (lean_adjoint), am_jax.dynamics, am_jax.parameterisation (residual_model,
    mixed_precision), am_jax.gmm (GaussianMixture: exact velocities and exact tilted targets),
    am_jax.rewards, am_jax.metrics

Training runs::

    am_jax.training (TrainState, make_finetune_step, make_pretrain_step), am_jax.checkpointing
    (Checkpointer), am_jax.sharding (make_mesh), am_jax.jobs (whole pre-training / fine-tuning runs),
    am_jax.reporting (MetricsWriter), am_jax.launch (flags, one-line errors), the ``am-jax`` command

Submodules and names are imported on first use, so ``import am_jax`` does not import JAX.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public submodules (imported on first attribute access).
_SUBMODULES = (
    "adjoint", "builders", "checkpointing", "chunked", "classifiers", "data", "dynamics", "gmm", "jobs", "launch",
    "lora", "losses", "methods", "metrics", "models", "monitor", "multistep", "parameterisation", "problem",
    "reporting", "rewards", "sampling", "schedules", "sharding", "soc", "time_hints", "training",
)

# Top-level names -> the submodule that defines them.
_ATTRIBUTES = {
    "Problem": "problem",
    "build_problem": "builders",
    "ConfigError": "builders",
    "AMConfig": "losses",
    "adjoint_matching_loss": "losses",
    "adjoint_matching_objective": "losses",
    "flow_matching_loss": "losses",
    "Schedule": "schedules",
    "LinearSchedule": "schedules",
    "CosineSchedule": "schedules",
    "VPSchedule": "schedules",
    "get_schedule": "schedules",
    "sample": "sampling",
    "lean_adjoint": "adjoint",
    "ExponentialIntegrator": "integrators",
    "dpm_solver_2m": "multistep",
    "residual_model": "parameterisation",
    "mixed_precision": "parameterisation",
    "GaussianMixture": "gmm",
    "TrainState": "training",
    "make_finetune_step": "training",
    "make_pretrain_step": "training",
    "Checkpointer": "checkpointing",
    "make_mesh": "sharding",
    "MetricsWriter": "reporting",
}

__all__ = [
    "__version__",
    # the problem and the methods
    "Problem", "build_problem", "ConfigError", "AMConfig", "methods", "adjoint_matching_loss",
    "adjoint_matching_objective", "flow_matching_loss",
    # building blocks
    "Schedule", "LinearSchedule", "CosineSchedule", "VPSchedule", "get_schedule", "sample", "lean_adjoint",
    "ExponentialIntegrator", "dpm_solver_2m", "residual_model", "mixed_precision", "GaussianMixture",
    # training runs
    "TrainState", "make_finetune_step", "make_pretrain_step", "Checkpointer", "make_mesh", "MetricsWriter",
    # submodules
    "adjoint", "builders", "checkpointing", "chunked", "classifiers", "data", "dynamics", "gmm", "jobs", "launch",
    "lora", "losses", "metrics", "models", "monitor", "multistep", "parameterisation", "problem", "reporting",
    "rewards", "sampling", "schedules", "sharding", "soc", "time_hints", "training",
]

if TYPE_CHECKING:  # static analysers and IDEs see the real objects
  from am_jax import (adjoint, builders, checkpointing, chunked, classifiers, data, dynamics, gmm, jobs, launch, lora,
                      losses, methods, metrics, models, monitor, multistep, parameterisation, problem, reporting,
                      rewards, sampling, schedules, sharding, soc, time_hints, training)
  from am_jax.adjoint import lean_adjoint
  from am_jax.builders import ConfigError, build_problem
  from am_jax.checkpointing import Checkpointer
  from am_jax.gmm import GaussianMixture
  from am_jax.integrators import ExponentialIntegrator
  from am_jax.multistep import dpm_solver_2m
  from am_jax.losses import AMConfig, adjoint_matching_loss, adjoint_matching_objective, flow_matching_loss
  from am_jax.parameterisation import mixed_precision, residual_model
  from am_jax.problem import Problem
  from am_jax.reporting import MetricsWriter
  from am_jax.sampling import sample
  from am_jax.schedules import CosineSchedule, LinearSchedule, Schedule, VPSchedule, get_schedule
  from am_jax.sharding import make_mesh
  from am_jax.training import TrainState, make_finetune_step, make_pretrain_step


def __getattr__(name: str) -> Any:
  """PEP 562: imports a submodule or a re-exported name on first access (keeps ``import am_jax`` fast)."""
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  if name in _ATTRIBUTES:
    value = getattr(importlib.import_module(f"{__name__}.{_ATTRIBUTES[name]}"), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
