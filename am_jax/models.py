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

The U-Net's convolutions use ``conv_general_dilated_fast_vjp``: the same convolution, whose input
gradient is computed with an explicitly flipped and transposed (HWIO) kernel.  Inside a ``lax.scan``
(the lean adjoint: one VJP of the base per step) XLA:CPU otherwise runs JAX's transposed convolution
(kernel dims ``01oi``) on a slow path, 4x slower than outside a loop (docs/performance.md section 12.2).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from am_jax import time_hints



def sinusoidal_embedding(t, dim: int, max_period: float = 10000.0):
  """Fourier features of t (B,) -> (B, dim); t in [0, 1] is scaled by 1000 like DDPM step indices."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def shared_time_default() -> bool:
  """Whether models take the shared-time path by default: on XLA:CPU, where it was measured (docs/performance.md
  section 12.10).  On accelerators the branch's predicate would be read by the host once per network call."""
  return jax.default_backend() == "cpu"


@contextlib.contextmanager
def per_row_time():
  """Programs traced inside run ``MLP``'s per-row time embedding whatever ``shared_time_default`` and the time
  hints say (the code before the shared-time and time-block paths): for timing "before" beside "after"
  (``benchmarks.train_step``) and for the golden test's bit-identical programs.  Swaps the module's defaults while
  the block runs."""
  global shared_time_default, _time_blocks
  saved = shared_time_default, _time_blocks
  shared_time_default = lambda: False  # noqa: E731
  _time_blocks = lambda: None  # noqa: E731
  try:
    yield
  finally:
    shared_time_default, _time_blocks = saved


_time_blocks = time_hints.time_blocks  # swapped by ``per_row_time``


class MLP(nnx.Module):
  """MLP velocity net for low-dimensional data: (x (B, d), t (B,), [label (B,)]) -> (B, d).

  ``num_classes > 0`` adds a label embedding with one extra "null" label (index num_classes)
  for classifier-free guidance.

  Shared time: when every row of t is the same time (a sampler or adjoint step), the time embedding and its product
  with the first layer's time rows are computed once and broadcast instead of per row: x W_x + (emb(t_0) W_t + b)
  instead of [x, emb(t)] W + b.  A ``lax.cond`` on ``all(t == t_0)`` picks the path at run time, so any t is valid
  input (rows at different times take the per-row path, bit-identical to the model without it); the shared path
  agrees to float rounding.  ``shared_time``: True = always guarded, False = never, None (default) = on CPU
  (``shared_time_default``) inside the library's sampler / adjoint steps (``time_hints.batch_shares_time``), where
  the cond is free; per-row calls (pre-training, SOC rollouts) run the per-row code with no cond.  Measured: a 40-step
  rollout of the 3x128 net at B = 256, 1.2x faster on a 2-core CPU (``python -m benchmarks.time_embedding``).

  Time blocks: inside ``time_hints.rows_in_time_blocks(M)`` (the losses' M B points, M blocks of B rows at one time
  each) the embedding and its first-layer product are computed once per block, with no branch (the caller's
  promise, checked on the device: NaN where a block's rows differ in time); any backend, unless ``shared_time`` is
  False.  Agrees with the per-row code to float rounding.  Measured: value_and_grad of a (64, 64) net at 40 x 512
  rows, 2.8x faster on a 2-core CPU (docs/performance.md section 12.12).
  """

  def __init__(self, dim: int, hidden: Sequence[int] = (128, 128), time_embed_dim: int = 32,
               num_classes: int = 0, zero_init_output: bool = False, shared_time=None, *, rngs: nnx.Rngs):
    self.dim, self.time_embed_dim, self.num_classes = dim, time_embed_dim, num_classes
    self.shared_time = shared_time
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
    label_emb = ()
    if self.num_classes:
      if label is None:
        label = jnp.full(x.shape[:1], self.num_classes, jnp.int32)
      label_emb = (self.label_embed(label).astype(x.dtype),)
    first, rest = self.hidden[0], self.hidden[1:]

    def per_row(_):
      h = jnp.concatenate([x, sinusoidal_embedding(t, self.time_embed_dim).astype(x.dtype), *label_emb], axis=-1)
      return first(h)

    def in_blocks(num_blocks):
      """x W_x + (emb(t_block) W_t + b): one embedding per block of rows at one time (all rows: one block)."""
      kernel, d, e = first.kernel[...], self.dim, self.time_embed_dim
      per_block = t.reshape(num_blocks, -1)
      # The layout is the caller's promise (time_hints); a block whose rows differ gives NaN, never a wrong number
      # (behind the shared-time cond the check always passes: adding 0.0 is exact).
      poison = jnp.where(jnp.all(per_block == per_block[:, :1]), 0.0, jnp.nan).astype(x.dtype)
      emb = sinusoidal_embedding(per_block[:, 0], e).astype(x.dtype)
      t_part = emb @ kernel[d:d + e] + first.bias[...] + poison  # (num_blocks, width)
      h = (x @ kernel[:d]).reshape(num_blocks, -1, kernel.shape[-1]) + t_part[:, None]
      h = h.reshape(x.shape[0], kernel.shape[-1])
      return h + label_emb[0] @ kernel[d + e:] if label_emb else h

    num_blocks = _time_blocks() if self.shared_time is not False else None
    use_shared = (shared_time_default() and time_hints.shares_time()) if self.shared_time is None else self.shared_time
    if num_blocks is not None and x.shape[0] % num_blocks == 0 and x.shape[0] > num_blocks:
      h = in_blocks(num_blocks)
    elif use_shared and x.shape[0] > 1:
      h = jax.lax.cond(jnp.all(t == t[0]), lambda _: in_blocks(1), per_row, None)
    else:
      h = per_row(None)
    h = nnx.silu(h)
    for layer in rest:
      h = nnx.silu(layer(h))
    return self.out(h)


def functional(model: nnx.Module):
  """Splits an NNX module into (apply_fn, params): apply_fn(params, x, t, *cond) is pure."""
  graphdef, params = nnx.split(model)

  def apply_fn(params, x, t, *cond):
    return nnx.merge(graphdef, params)(x, t, *cond)

  return apply_fn, params


def _canonical_dims(ndim: int):
  """Dimension numbers of an N-spatial-dim conv with NH..WC inputs and H..WIO kernels (flax layout)."""
  spatial = tuple(range(1, ndim - 1))
  return lax.ConvDimensionNumbers(lhs_spec=(0, ndim - 1) + spatial,
                                  rhs_spec=(ndim - 1, ndim - 2) + tuple(range(ndim - 2)),
                                  out_spec=(0, ndim - 1) + spatial)


def conv_general_dilated_fast_vjp(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                                  dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """``lax.conv_general_dilated`` with a custom VJP written with convolutions in canonical dims.

  Same forward.  The input cotangent is ``conv(g, swap_io(flip(w)))`` with padding k - 1 - p and the
  weight cotangent a VALID convolution of the padded input (channels as batch) with g (batch as
  features), both with explicit transposes: exactly what JAX's transpose rules compute (bit-identical
  on CPU, tested), but JAX's rules emit convolutions with permuted dimension numbers (``01oi`` kernels,
  ``f01b`` inputs), which XLA:CPU runs on a slow path inside loops (4x for the input VJP in the lean
  adjoint's ``lax.scan``, 25x for the weight gradient in the chunked loss; docs/performance.md section 12.2).  Applies to
  stride-1, undilated, ungrouped convolutions with non-negative padding in flax's NH..WC / H..WIO
  layout (everything else falls back to ``lax.conv_general_dilated``).  Forward-mode AD (``jax.jvp``) is not available through a custom VJP:
  build the U-Net with ``fast_conv_vjp=False`` for that.
  """
  n = lhs.ndim - 2
  plain = lambda x, w, pads: lax.conv_general_dilated(  # noqa: E731
      x, w, window_strides, pads, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, precision=precision, **kwargs)
  dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  simple = (all(s == 1 for s in window_strides) and not any(d != 1 for d in (lhs_dilation or ()))
            and not any(d != 1 for d in (rhs_dilation or ())) and feature_group_count == 1 and not kwargs.get(
                "preferred_element_type") and kwargs.get("out_sharding") is None and dims == _canonical_dims(lhs.ndim))
  if not simple:
    return plain(lhs, rhs, padding)
  ksize = rhs.shape[:n]
  pads = (lax.padtype_to_pads(lhs.shape[1:-1], ksize, (1,) * n, padding) if isinstance(padding, str)
          else tuple(padding))
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  tpads = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(ksize, pads))
  if any(p < 0 for pair in tpads + pads for p in pair):
    return plain(lhs, rhs, padding)
  kwargs = {k: v for k, v in kwargs.items() if v is not None}

  def conv(x, w, p):
    return lax.conv_general_dilated(x, w, (1,) * n, p, dimension_numbers=dims, precision=precision, **kwargs)

  @jax.custom_vjp
  def f(x, w):
    return conv(x, w, pads)

  def f_fwd(x, w):
    return conv(x, w, pads), (x, w)

  def f_bwd(res, g):
    x, w = res
    w_t = jnp.swapaxes(jnp.flip(w, tuple(range(n))), -1, -2)  # H..W O I -> the HWIO kernel of the transpose
    dx = conv(g, w_t, tpads).astype(x.dtype)
    # dw[k.., i, o] = sum_{b, s..} x_pad[b, s.. + k.., i] g[b, s.., o]: a convolution of x (padded as in
    # the forward) with channels as batch and batch as features, with explicit transposes (canonical dims).
    lhs = jnp.transpose(x, (n + 1,) + tuple(range(1, n + 1)) + (0,))  # (I, S.., B)
    rhs = jnp.transpose(g, tuple(range(1, n + 1)) + (0, n + 1))  # (S_out.., B, O)
    dw = conv(lhs, rhs.astype(lhs.dtype), pads)  # (I, K.., O)
    dw = jnp.transpose(dw, tuple(range(1, n + 1)) + (0, n + 1)).astype(w.dtype)
    return dx, dw

  f.defvjp(f_fwd, f_bwd)
  return f(lhs, rhs)


def _conv(cin, cout, kernel, fast_vjp: bool, **kw):
  if fast_vjp:
    kw["conv_general_dilated"] = conv_general_dilated_fast_vjp
  return nnx.Conv(cin, cout, kernel, **kw)


class _ResBlock(nnx.Module):
  """GroupNorm-SiLU-Conv x2 with the (time + label) embedding added in between; 1x1 skip if needed."""

  def __init__(self, cin: int, cout: int, emb_dim: int, fast_conv_vjp: bool = True, *, rngs: nnx.Rngs):
    self.norm1 = nnx.GroupNorm(cin, num_groups=min(8, cin), rngs=rngs)
    self.conv1 = _conv(cin, cout, (3, 3), fast_conv_vjp, rngs=rngs)
    self.emb = nnx.Linear(emb_dim, cout, rngs=rngs)
    self.norm2 = nnx.GroupNorm(cout, num_groups=min(8, cout), rngs=rngs)
    self.conv2 = _conv(cout, cout, (3, 3), fast_conv_vjp, rngs=rngs)
    self.skip = _conv(cin, cout, (1, 1), fast_conv_vjp, rngs=rngs) if cin != cout else None

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
  ``fast_conv_vjp`` (default): convolutions via ``conv_general_dilated_fast_vjp`` (same numbers, 4x
  faster input VJPs inside scans on CPU; no forward-mode AD).  It changes no parameter.
  """

  def __init__(self, in_channels: int = 1, channels: Sequence[int] = (32, 64), time_embed_dim: int = 64,
               num_classes: int = 0, zero_init_output: bool = False, fast_conv_vjp: bool = True, *,
               rngs: nnx.Rngs):
    self.time_embed_dim, self.num_classes = time_embed_dim, num_classes
    self.levels = len(channels)
    self.t_mlp1 = nnx.Linear(time_embed_dim, 2 * time_embed_dim, rngs=rngs)
    self.t_mlp2 = nnx.Linear(2 * time_embed_dim, time_embed_dim, rngs=rngs)
    if num_classes:
      self.label_embed = nnx.Embed(num_classes + 1, time_embed_dim, rngs=rngs)
    self.stem = _conv(in_channels, channels[0], (3, 3), fast_conv_vjp, rngs=rngs)
    down, up = [], []
    cin = channels[0]
    for c in channels:
      down.append(_ResBlock(cin, c, time_embed_dim, fast_conv_vjp, rngs=rngs))
      cin = c
    self.mid = _ResBlock(cin, cin, time_embed_dim, fast_conv_vjp, rngs=rngs)
    for c in reversed(channels):
      up.append(_ResBlock(cin + c, c, time_embed_dim, fast_conv_vjp, rngs=rngs))
      cin = c
    as_list = nnx.List if hasattr(nnx, "List") else list
    self.down, self.up = as_list(down), as_list(up)
    self.out_norm = nnx.GroupNorm(cin, num_groups=min(8, cin), rngs=rngs)
    init = nnx.initializers.zeros_init() if zero_init_output else nnx.initializers.lecun_normal()
    self.out = _conv(cin, in_channels, (3, 3), fast_conv_vjp, kernel_init=init,
                     bias_init=nnx.initializers.zeros_init(), rngs=rngs)

  def __call__(self, x, t, label=None):
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    emb = self.t_mlp2(nnx.silu(self.t_mlp1(sinusoidal_embedding(t, self.time_embed_dim).astype(x.dtype))))
    if self.num_classes:
      if label is None:
        label = jnp.full(x.shape[:1], self.num_classes, jnp.int32)
      emb = emb + self.label_embed(label).astype(emb.dtype)
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
