"""Errors a user can act on; the launchers print them as one line (``am_jax.launch``)."""
from __future__ import annotations

__all__ = ["ConfigError", "ShapeError", "ConfigDriftError", "NonFiniteError"]


class ConfigError(ValueError):
  """An invalid configuration value; the message names the field (``config.a.b = value: must be ...``)."""


class ShapeError(ConfigError):
  """A model, reward or condition sampler of a problem returns the wrong shape; the message names it."""


class ConfigDriftError(ConfigError):
  """A run resumed with a config whose maths differs from the one stored with its checkpoints; the message
  lists each changed field (old -> new) and how to start fresh or allow the change."""


class NonFiniteError(FloatingPointError):
  """A training step produced a NaN/inf; the message names the step and the source (trajectory, label, reward,
  adjoint, loss, gradient, parameters) and says what was (not) saved."""
