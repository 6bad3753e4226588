"""SiT/DiT-style class-conditional velocity transformer (Flax NNX), same interface as ``models.UNet``.

DiT (Peebles & Xie 2023) as used by SiT (Ma et al. 2024) for flow matching -- the architecture family of
the deterministic-AM paper:

* patchify: (B, H, W, C) -> (B, N, p p C) tokens (N = HW / p^2) -> Linear to ``width`` (the same as
  DiT's stride-p convolution, written as a reshape and a matmul);
* positional embedding: fixed 2-D sin-cos (DiT Sec. 3.2; a constant, not a parameter) or learned;
* conditioning c = MLP(Fourier(t)) + Embed(label): ``num_classes > 0`` adds a label table with one extra
  null label (index ``num_classes``) for classifier-free guidance; ``label=None`` means the null label;
* ``depth`` blocks with adaLN-Zero (DiT Sec. 3.2): (shift, scale, gate) x 2 = Linear(SiLU(c)), zero
  initialised so every block starts as the identity;
      h <- h + gate_1 * Attn(LN(h) (1 + scale_1) + shift_1),  h <- h + gate_2 * MLP(LN(h) (1 + scale_2) + shift_2);
  attention with one fused qkv Linear and an output Linear (2-D kernels, so ``lora`` adapts them as
  matrices exactly);
* final layer: adaLN (shift, scale; zero init), Linear to p p C, unpatchify.  ``zero_init_output`` zero
  initialises that Linear (DiT does; needed when the net is a residual on top of a base).

Use through ``models.functional(net) -> (apply_fn, params)``, ``apply_fn(params, x, t, label)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from am_jax.models import sinusoidal_embedding

__all__ = ["DiT", "sincos_2d"]

POS_EMBEDS = ("sincos", "learned")


def sincos_2d(grid: int, dim: int) -> np.ndarray:
  """(grid^2, dim) fixed 2-D sin-cos positional embedding (MAE/DiT): half the channels per axis."""
  if dim % 4:
    raise ValueError(f"width must be divisible by 4 for the 2-D sincos embedding, got {dim}.")
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
  ii, jj = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

  def axis(pos):
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([axis(ii), axis(jj)], axis=1).astype(np.float32)


def _modulate(h, shift, scale):
  return h * (1.0 + scale[:, None, :]) + shift[:, None, :]


class _Block(nnx.Module):
  """One adaLN-Zero transformer block (pre-norm attention + MLP, gated residuals)."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.norm1 = nnx.LayerNorm(width, epsilon=1e-6, use_scale=False, use_bias=False, rngs=rngs)
    self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
    self.proj = nnx.Linear(width, width, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, epsilon=1e-6, use_scale=False, use_bias=False, rngs=rngs)
    hidden = int(width * mlp_ratio)
    self.fc1 = nnx.Linear(width, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, width, rngs=rngs)
    zeros = nnx.initializers.zeros_init()
    self.ada = nnx.Linear(width, 6 * width, kernel_init=zeros, bias_init=zeros, rngs=rngs)

  def __call__(self, h, c):
    b, n, w = h.shape
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.ada(nnx.silu(c)), 6, axis=-1)
    q, k, v = jnp.split(self.qkv(_modulate(self.norm1(h), shift1, scale1)), 3, axis=-1)
    heads = lambda a: a.reshape(b, n, self.num_heads, w // self.num_heads)  # noqa: E731
    att = jax.nn.dot_product_attention(heads(q), heads(k), heads(v)).reshape(b, n, w)
    h = h + gate1[:, None, :] * self.proj(att)
    m = self.fc2(nnx.gelu(self.fc1(_modulate(self.norm2(h), shift2, scale2)), approximate=True))
    return h + gate2[:, None, :] * m


class DiT(nnx.Module):
  """Velocity transformer: (x (B, H, W, C), t (B,), [label (B,)]) -> (B, H, W, C).

  Defaults (patch 4, width 96, depth 4, 4 heads; 49 tokens on 28x28) are small enough to pre-train on
  a CPU.  ``image_size`` must be divisible by ``patch_size`` and ``width`` by ``num_heads`` (and by 4
  for the sincos embedding).
  """

  def __init__(self, image_size: int = 28, in_channels: int = 1, patch_size: int = 4, width: int = 96,
               depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0, time_embed_dim: int = 64,
               num_classes: int = 0, pos_embed: str = "sincos", zero_init_output: bool = False, *,
               rngs: nnx.Rngs):
    if image_size % patch_size:
      raise ValueError(f"image_size {image_size} must be divisible by patch_size {patch_size}.")
    if width % num_heads:
      raise ValueError(f"width {width} must be divisible by num_heads {num_heads}.")
    if pos_embed not in POS_EMBEDS:
      raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}.")
    if depth < 1:
      raise ValueError(f"depth must be >= 1, got {depth}.")
    self.image_size, self.in_channels, self.patch_size = image_size, in_channels, patch_size
    self.time_embed_dim, self.num_classes, self.pos_embed = time_embed_dim, num_classes, pos_embed
    self.grid = image_size // patch_size
    patch_dim = patch_size * patch_size * in_channels
    self.patch = nnx.Linear(patch_dim, width, rngs=rngs)
    if pos_embed == "learned":
      self.pos = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (self.grid * self.grid, width)))
    else:
      sincos_2d(self.grid, width)  # validates width % 4 at construction, not at the first call
    self.t_mlp1 = nnx.Linear(time_embed_dim, width, rngs=rngs)
    self.t_mlp2 = nnx.Linear(width, width, rngs=rngs)
    if num_classes:
      self.label_embed = nnx.Embed(num_classes + 1, width, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    as_list = nnx.List if hasattr(nnx, "List") else list
    self.blocks = as_list([_Block(width, num_heads, mlp_ratio, rngs=rngs) for _ in range(depth)])
    zeros = nnx.initializers.zeros_init()
    self.final_norm = nnx.LayerNorm(width, epsilon=1e-6, use_scale=False, use_bias=False, rngs=rngs)
    self.final_ada = nnx.Linear(width, 2 * width, kernel_init=zeros, bias_init=zeros, rngs=rngs)
    init = zeros if zero_init_output else nnx.initializers.lecun_normal()
    self.out = nnx.Linear(width, patch_dim, kernel_init=init, bias_init=zeros, rngs=rngs)

  def _patchify(self, x):
    b, p, g, c = x.shape[0], self.patch_size, self.grid, self.in_channels
    x = x.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)  # (B, gi, gj, pi, pj, C)
    return x.reshape(b, g * g, p * p * c)

  def _unpatchify(self, tokens):
    b, p, g, c = tokens.shape[0], self.patch_size, self.grid, self.in_channels
    x = tokens.reshape(b, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)  # (B, gi, pi, gj, pj, C)
    return x.reshape(b, g * p, g * p, c)

  def __call__(self, x, t, label=None):
    if x.shape[1:] != (self.image_size, self.image_size, self.in_channels):
      raise ValueError(f"DiT built for images {(self.image_size, self.image_size, self.in_channels)}, "
                       f"got x of shape {x.shape}.")
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    c = self.t_mlp2(nnx.silu(self.t_mlp1(sinusoidal_embedding(t, self.time_embed_dim).astype(x.dtype))))
    if self.num_classes:
      if label is None:
        label = jnp.full(x.shape[:1], self.num_classes, jnp.int32)
      c = c + self.label_embed(label).astype(c.dtype)
    h = self.patch(self._patchify(x))
    pos = self.pos[...] if self.pos_embed == "learned" else sincos_2d(self.grid, h.shape[-1])
    h = h + jnp.asarray(pos, h.dtype)[None]
    for block in self.blocks:
      h = block(h, c)
    shift, scale = jnp.split(self.final_ada(nnx.silu(c)), 2, axis=-1)
    return self._unpatchify(self.out(_modulate(self.final_norm(h), shift, scale)))
