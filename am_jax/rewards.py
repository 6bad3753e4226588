"""Reward functions ``reward_fn(x, *cond) -> (B,)`` for the exact test problems.

The tilted target is p_base(x) exp(lambda * reward(x)); lambda (``reward_multiplier``) is applied
by the adjoint, not here, so the same reward serves every lambda.
"""
from __future__ import annotations

import jax.numpy as jnp


def _flat(x):
  return x.reshape(x.shape[0], -1)


def linear_reward(c):
  """reward(x) = c^T x.  c: (d,) or scalar (broadcast)."""
  c = jnp.asarray(c, jnp.float32)

  def reward_fn(x, *cond):
    return jnp.sum(_flat(x) * c, axis=-1)

  return reward_fn


def quadratic_reward(a_mat, b_vec=0.0):
  """reward(x) = -x^T A x / 2 + b^T x.  A: (d, d) (or scalar * I), b: (d,) or scalar."""
  a_mat = jnp.asarray(a_mat, jnp.float32)
  b_vec = jnp.asarray(b_vec, jnp.float32)

  def reward_fn(x, *cond):
    xf = _flat(x)
    ax = xf @ a_mat if a_mat.ndim == 2 else a_mat * xf
    return -0.5 * jnp.sum(xf * ax, axis=-1) + jnp.sum(xf * b_vec, axis=-1)

  return reward_fn
