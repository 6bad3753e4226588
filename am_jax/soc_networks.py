"""The SOC-matching authors' control network, re-implemented in Flax NNX for equal-architecture comparisons.

Facts taken from the public SOC-matching code (Domingo-Enrich et al. 2023, facebookresearch/SOC-matching:
``SOC_matching/models.py`` ``FullyConnectedUNet``, ``method.py`` ``NeuralSDE.control``, ``configs/soc.yaml``,
``main.py``); the code here is written from that description, not copied:

* The net predicts grad V (not u) from the raw input (t, x) in R^{d+1} (no time embedding); the control is
  u(x, t) = -sigma(t)^T net(t, x).
* "Fully connected U-Net" with widths h = (h_0, ..., h_{n-1}) (theirs: (256, 128, 64)) and ReLU everywhere:

      r_0 = (t, x),   r_{i+1} = relu(D_i r_i)                          (down path, D_i: width_i -> h_i)
      o_n = r_n,      o_i = relu(U_i o_{i+1}) + S_i r_i,   i = n-1..0   (up path with linear skips)
      net(t, x) = o_0

  with U_i: h_i -> width_i and S_i: width_i -> width_i, where width_0 = d (the output) for U_0 / S_0
  (S_0: d+1 -> d) and width_i = h_{i-1} otherwise.  Note the ReLU on the last up layer: that branch of the
  output is non-negative, the linear skip S_0 of (t, x) carries the sign.
* Initialisation: PyTorch's ``nn.Linear`` default, weights and biases uniform on (-1/sqrt(fan_in),
  1/sqrt(fan_in)), all multiplied by ``scaling_factor`` (their ``scaling_factor_nabla_V``, 1 in the README
  runs).  So, unlike am_jax's zero-initialised nets, u != 0 at initialisation.
* Their optimiser (not in this module; ``configs/soc.py`` variant ``net=socm``): Adam, lr 1e-4, eps 1e-4,
  constant rate, no clipping; batch 64 (linear OU) / 128 (quadratic OU, double well).

FLOPs: 3 matmuls per level instead of 1, ~169k multiply-adds per sample at d = 10 against ~52k for
``models.MLP`` with the same widths (docs/soc.md).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["torch_default_linear", "SOCMatchingUNet", "param_count"]


def torch_default_linear(in_dim: int, out_dim: int, scale: float, rngs: nnx.Rngs) -> nnx.Linear:
  """nnx.Linear with PyTorch's default init (kernel and bias ~ U(+-1/sqrt(in_dim))) times ``scale``."""
  bound = scale / math.sqrt(in_dim)

  def uniform(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return nnx.Linear(in_dim, out_dim, kernel_init=uniform, bias_init=uniform, rngs=rngs)


class SOCMatchingUNet(nnx.Module):
  """grad V(t, x) network of SOC matching: (x (B, d), t (B,)) -> (B, d); formulas in the module docstring."""

  def __init__(self, dim: int, hidden: Sequence[int] = (256, 128, 64), scaling_factor: float = 1.0, *,
               rngs: nnx.Rngs):
    hidden = tuple(int(h) for h in hidden)
    if not hidden:
      raise ValueError("SOCMatchingUNet needs at least one hidden width (config.hidden).")
    self.dim = dim
    ins = (dim + 1,) + hidden[:-1]          # input width of each down layer = width of r_i
    outs = (dim,) + hidden[:-1]             # output width of each up / skip layer = width of o_i
    lin = lambda i, o: torch_default_linear(i, o, scaling_factor, rngs)  # noqa: E731
    # Same creation order as theirs (down, skip, up) so one seed gives one net; the order only fixes the keys.
    self.down = nnx.List([lin(i, h) for i, h in zip(ins, hidden)])
    self.skip = nnx.List([lin(i, o) for i, o in zip(ins, outs)])
    self.up = nnx.List([lin(h, o) for h, o in zip(hidden, outs)])

  def __call__(self, x, t):
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    rs = [jnp.concatenate([t[:, None], x], axis=-1)]
    for layer in self.down:
      rs.append(nnx.relu(layer(rs[-1])))
    out = rs[-1]
    for i in reversed(range(len(self.up))):
      out = nnx.relu(self.up[i](out)) + self.skip[i](rs[i])
    return out


def param_count(params) -> int:
  """Number of scalars in a parameter pytree."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
