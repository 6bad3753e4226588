"""Errors a user can act on; the launchers print them as one line (``am_jax.launch``)."""
from __future__ import annotations

__all__ = ["ConfigError", "ShapeError"]


class ConfigError(ValueError):
  """An invalid configuration value; the message names the field (``config.a.b = value: must be ...``)."""


class ShapeError(ConfigError):
  """A model, reward or condition sampler of a problem returns the wrong shape; the message names it."""
