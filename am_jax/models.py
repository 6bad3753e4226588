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


class _ResBlock(nnx.Module):
  """GroupNorm-SiLU-Conv x2 with the (time + label) embedding added in between; 1x1 skip if needed."""

  def __init__(self, cin: int, cout: int, emb_dim: int, *, rngs: nnx.Rngs):
    self.norm1 = nnx.GroupNorm(cin, num_groups=min(8, cin), rngs=rngs)
    self.conv1 = nnx.Conv(cin, cout, (3, 3), rngs=rngs)
    self.emb = nnx.Linear(emb_dim, cout, rngs=rngs)
    self.norm2 = nnx.GroupNorm(cout, num_groups=min(8, cout), rngs=rngs)
    self.conv2 = nnx.Conv(cout, cout, (3, 3), rngs=rngs)
    self.skip = nnx.Conv(cin, cout, (1, 1), rngs=rngs) if cin != cout else None

  def __call__(self, x, emb):
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = h + self.emb(emb)[:, None, None, :]
    h = self.conv2(nnx.silu(self.norm2(h)))
    return h + (self.skip(x) if self.skip is not None else x)


class UNet(nnx.Module):
  """Small U-Net velocity net for images: (x (B, H, W, C), t (B,), [label (B,)]) -> (B, H, W, C).

  ``channels`` per resolution (each level but the last halves H and W, so H and W must be
  divisible by 2^(len(channels) - 1)); one residual block per level on the way down and up, with
  skip connections.  ``num_classes > 0`` adds a label embedding with a null label (index
  num_classes) for classifier-free guidance; ``label=None`` means the null label.
  """

  def __init__(self, in_channels: int = 1, channels: Sequence[int] = (32, 64), time_embed_dim: int = 64,
               num_classes: int = 0, zero_init_output: bool = False, *, rngs: nnx.Rngs):
    self.time_embed_dim, self.num_classes = time_embed_dim, num_classes
    self.levels = len(channels)
    self.t_mlp1 = nnx.Linear(time_embed_dim, 2 * time_embed_dim, rngs=rngs)
    self.t_mlp2 = nnx.Linear(2 * time_embed_dim, time_embed_dim, rngs=rngs)
    if num_classes:
      self.label_embed = nnx.Embed(num_classes + 1, time_embed_dim, rngs=rngs)
    self.stem = nnx.Conv(in_channels, channels[0], (3, 3), rngs=rngs)
    down, up = [], []
    cin = channels[0]
    for c in channels:
      down.append(_ResBlock(cin, c, time_embed_dim, rngs=rngs))
      cin = c
    self.mid = _ResBlock(cin, cin, time_embed_dim, rngs=rngs)
    for c in reversed(channels):
      up.append(_ResBlock(cin + c, c, time_embed_dim, rngs=rngs))
      cin = c
    as_list = nnx.List if hasattr(nnx, "List") else list
    self.down, self.up = as_list(down), as_list(up)
    self.out_norm = nnx.GroupNorm(cin, num_groups=min(8, cin), rngs=rngs)
    init = nnx.initializers.zeros_init() if zero_init_output else nnx.initializers.lecun_normal()
    self.out = nnx.Conv(cin, in_channels, (3, 3), kernel_init=init, bias_init=nnx.initializers.zeros_init(),
                        rngs=rngs)

  def __call__(self, x, t, label=None):
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    emb = self.t_mlp2(nnx.silu(self.t_mlp1(sinusoidal_embedding(t, self.time_embed_dim))))
    if self.num_classes:
      if label is None:
        label = jnp.full(x.shape[:1], self.num_classes, jnp.int32)
      emb = emb + self.label_embed(label)
    h = self.stem(x)
    skips = []
    for i, block in enumerate(self.down):
      h = block(h, emb)
      skips.append(h)
      if i < self.levels - 1:
        h = nnx.avg_pool(h, (2, 2), (2, 2))
    h = self.mid(h, emb)
    for i, block in enumerate(self.up):
      skip = skips[-1 - i]
      if h.shape[1] != skip.shape[1]:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
      h = block(jnp.concatenate([h, skip], axis=-1), emb)
    return self.out(nnx.silu(self.out_norm(h)))
