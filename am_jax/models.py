"""Flax NNX velocity networks, exposed as pure ``apply_fn(params, x, t, *cond)`` functions.

The training state stays a plain pytree: ``graphdef, params = nnx.split(model)`` once, then
``apply_fn(params, x, t) = nnx.merge(graphdef, params)(x, t)`` inside jitted code.  optax,
Orbax and ``jax.sharding`` then only ever see arrays.

Fine-tuned models are built as base + residual (``residual_model``).  Two parameterisations:
* ``'control'``  (default): v_ft = v_base + sigma(t) / 2 * net(x, t), i.e. the net predicts the
  control u directly (paper Eq. 18).  The optimal velocity correction is -eta_t a(t), which is
  O(eta_t) and large near t = 0; predicting u = -sigma a keeps the net's target O(1).
* ``'velocity'``: v_ft = v_base + net(x, t).
Both start at v_ft = v_base because the last layer is zero-initialised.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from am_jax.dynamics import _bcast


def sinusoidal_embedding(t, dim: int, max_period: float = 10000.0):
  """Fourier features of t (B,) -> (B, dim); t in [0, 1] is scaled by 1000 like DDPM step indices."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class MLP(nnx.Module):
  """MLP velocity net for low-dimensional data: (x (B, d), t (B,), [label (B,)]) -> (B, d).

  ``num_classes > 0`` adds a label embedding with one extra "null" label (index num_classes)
  for classifier-free guidance.
  """

  def __init__(self, dim: int, hidden: Sequence[int] = (128, 128), time_embed_dim: int = 32,
               num_classes: int = 0, zero_init_output: bool = False, *, rngs: nnx.Rngs):
    self.dim, self.time_embed_dim, self.num_classes = dim, time_embed_dim, num_classes
    in_dim = dim + time_embed_dim + (time_embed_dim if num_classes else 0)
    if num_classes:
      self.label_embed = nnx.Embed(num_classes + 1, time_embed_dim, rngs=rngs)
    layers = []
    for width in hidden:
      layers.append(nnx.Linear(in_dim, width, rngs=rngs))
      in_dim = width
    self.hidden = nnx.List(layers) if hasattr(nnx, "List") else layers
    init = nnx.initializers.zeros_init() if zero_init_output else nnx.initializers.lecun_normal()
    self.out = nnx.Linear(in_dim, dim, kernel_init=init, bias_init=nnx.initializers.zeros_init(), rngs=rngs)

  def __call__(self, x, t, label=None):
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    h = [x, sinusoidal_embedding(t, self.time_embed_dim)]
    if self.num_classes:
      if label is None:
        label = jnp.full(x.shape[:1], self.num_classes, jnp.int32)
      h.append(self.label_embed(label))
    h = jnp.concatenate(h, axis=-1)
    for layer in self.hidden:
      h = nnx.silu(layer(h))
    return self.out(h)


def functional(model: nnx.Module):
  """Splits an NNX module into (apply_fn, params): apply_fn(params, x, t, *cond) is pure."""
  graphdef, params = nnx.split(model)

  def apply_fn(params, x, t, *cond):
    return nnx.merge(graphdef, params)(x, t, *cond)

  return apply_fn, params


def residual_model(base_apply_fn: Callable, base_params, net_apply_fn: Callable, schedule,
                   parameterisation: str = "control") -> Callable:
  """Fine-tuned velocity ``apply_fn(net_params, x, t, *cond)`` = frozen base + trainable residual."""
  if parameterisation not in ("control", "velocity"):
    raise ValueError(f"parameterisation must be 'control' or 'velocity', got {parameterisation!r}.")

  def apply_fn(net_params, x, t, *cond):
    v_base = jax.lax.stop_gradient(base_apply_fn(base_params, x, t, *cond))
    out = net_apply_fn(net_params, x, t, *cond)
    if parameterisation == "control":
      out = 0.5 * _bcast(schedule.memoryless_sigma(t), x) * out
    return v_base + out

  return apply_fn
