"""How a network becomes a velocity: mixed-precision evaluation and residual fine-tuned models.

Framework-free (no Flax): an ``apply_fn(params, x, t, *cond) -> v`` of any library goes in, a function
of the same signature comes out.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from am_jax.dynamics import _bcast

__all__ = ["NETWORK_DTYPES", "guided", "mixed_precision", "residual_difference", "residual_model"]


NETWORK_DTYPES = ("float32", "bfloat16")


def mixed_precision(apply_fn: Callable, dtype="float32") -> Callable:
  """``apply_fn(params, x, t, *cond)`` evaluated in ``dtype``, returning float32.

  Floating-point leaves of ``params`` and ``x`` are cast to ``dtype`` (bfloat16: the network's matmuls
  and convolutions run in bf16); ``t`` and the conditions are passed unchanged (the models compute the
  time embedding in float32 and cast it to x's dtype); the output is cast back to float32, so the SDE
  state, the adjoint and the loss stay float32.  Gradients flow through the casts (float32 in, float32
  out).  For float32 this returns ``apply_fn`` itself (no cast anywhere).
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return apply_fn

  def cast(a):
    return a.astype(dtype) if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) else a

  def wrapped(params, x, t, *cond):
    return apply_fn(jax.tree.map(cast, params), cast(x), t, *cond).astype(jnp.float32)

  wrapped.__wrapped__ = apply_fn  # lets ``residual_difference`` recognise the same base in another precision
  return wrapped


def residual_model(base_apply_fn: Callable, base_params, net_apply_fn: Callable, schedule,
                   parameterisation: str = "control") -> Callable:
  """Fine-tuned velocity ``apply_fn(net_params, x, t, *cond)`` = frozen base + trainable residual."""
  if parameterisation not in ("control", "velocity"):
    raise ValueError(f"parameterisation must be 'control' or 'velocity', got {parameterisation!r}.")

  def difference(net_params, x, t, *cond):
    """The fine-tuned minus the base velocity: the residual alone (no base evaluation)."""
    out = net_apply_fn(net_params, x, t, *cond)
    if parameterisation == "control":
      out = 0.5 * _bcast(schedule.memoryless_sigma(t), x) * out
    return out

  def apply_fn(net_params, x, t, *cond):
    # Freeze the base *parameters* only: gradients w.r.t. x must still flow through the base, or
    # methods that differentiate through the states (discrete adjoint, DRaFT) get wrong Jacobians.
    v_base = base_apply_fn(jax.lax.stop_gradient(base_params), x, t, *cond)
    return v_base + difference(net_params, x, t, *cond)

  apply_fn.residual_of = (base_apply_fn, base_params, difference)  # read by ``residual_difference``
  return apply_fn


def residual_difference(ft_apply_fn: Callable, base_apply_fn: Callable, base_params) -> Callable | None:
  """``difference(net_params, x, t, *cond)`` = ft - base without evaluating the base, or None.

  Not None only when ``ft_apply_fn`` is a ``residual_model`` around this very base: ``base_apply_fn`` (or the same
  function in another precision, ``mixed_precision``) with the same ``base_params`` object (inside a jitted step:
  the step's own argument).  A loss that already holds v_base(x, t) (``AMConfig.reuse_base_velocity``) then needs
  only the residual network where it computed ft(x, t) - v_base(x, t), a base forward per loss point less; the
  result agrees to float rounding (ft - v_base rounds the sum first).  A residual model around another base
  (e.g. ``toy.finetune_mixture(init=...)``) or any other model gives None: the caller evaluates ft itself.
  """
  parts = getattr(ft_apply_fn, "residual_of", None)
  if parts is None:
    return None
  base_fn, params, difference = parts
  same_fn = base_fn is base_apply_fn or getattr(base_fn, "__wrapped__", None) is base_apply_fn
  return difference if same_fn and params is base_params else None


def guided(apply_fn: Callable, weight: float, null_label: int) -> Callable:
  """Classifier-free guided velocity ``apply(params, x, t, label)`` = v_null + w (v_label - v_null).

  w = 1 is the plain conditional model (returned unchanged).  Both branches run in one batched call (2B),
  so the network is traced once per step.
  """
  if weight == 1.0:
    return apply_fn

  def fn(params, x, t, label):
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    v = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                 jnp.concatenate([label, jnp.full_like(label, null_label)]))
    v_c, v_u = v[:b], v[b:]
    return v_u + weight * (v_c - v_u)

  return fn
