"""Low-rank adapters (LoRA, Hu et al. 2021) for ANY params pytree, as pure functions.

A weight W of shape (d_1, ..., d_k, n) is read as the matrix W_mat (m x n), m = d_1 ... d_k, i.e. all
axes but the last are fan-in: exact for Flax ``Linear`` (in, out), ``Embed`` (num, features) and
``Conv`` kernels (kh, kw, cin, cout) -> (kh kw cin) x cout, the layout of the convolution as a matmul
on im2col patches.  The adapted weight is (LoRA Eq. 3)

    W' = W + scale * reshape(A @ B),   A: (m, r), B: (r, n),   B = 0 at init  =>  W' = W at init,

with the usual ``scale = alpha / r``.  ``init`` selects the leaves (default: every floating leaf with
ndim >= 2; biases and norm scales stay frozen), ``merge`` returns full params with the same structure
as the base (so the base's own ``apply_fn`` runs the adapted model, and sampling uses merged weights),
``apply_fn`` composes the two with the frozen base params passed in as an argument (not closed over,
so inside ``jit`` they are traced inputs, not constants baked into the HLO).  Only the adapters are
trained (``jax.grad`` w.r.t. the adapters) and checkpointed.

Adapters are a flat dict ``{name: {"a": A, "b": B}}`` keyed by the leaf's path ("down/0/conv1/kernel";
Flax NNX's trailing ``.value`` is dropped): a plain pytree for optax, Orbax and sharding.

Why not ``nnx.LoRA`` / ``nnx.LoRALinear``: they wrap ``nnx.Linear`` only (no ``Conv``, no ``Embed``, so
the U-Net's convolutions cannot be adapted), they need module surgery (a different module tree, so the
base checkpoint's state no longer matches the model and every architecture needs its own rewrite), and
they keep the unmerged x @ A @ B path.  Working on the params pytree covers Linear, Conv, attention
and embedding kernels of any model (NNX, Linen, Equinox, plain dicts) with one ``merge``; the cost of
rebuilding W' each network call is 2 m n r flops per kernel, negligible next to a batched forward
pass.  A is initialised like ``nnx.LoRA`` (He uniform), B with zeros.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["default_filter", "match", "init", "merge", "delta", "apply_fn", "param_counts", "leaf_name"]


def leaf_name(path) -> str:
  """'/'-joined key path of a pytree leaf; Flax NNX's trailing ``.value`` attribute is dropped."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  if len(parts) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
    parts.pop()
  return "/".join(parts)


def default_filter(name: str, leaf) -> bool:
  """Adapt every floating-point leaf with ndim >= 2 (kernels and embedding tables, not biases/norms)."""
  del name
  return hasattr(leaf, "ndim") and leaf.ndim >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)


def match(*patterns: str) -> Callable:
  """Filter: ``default_filter`` AND the leaf name matches one of the regexes (``re.search``).

  E.g. ``match(r"qkv", r"proj")`` adapts only the transformer's attention projections.
  """
  if not patterns:
    raise ValueError("lora.match needs at least one pattern.")
  compiled = [re.compile(p) for p in patterns]
  return lambda name, leaf: default_filter(name, leaf) and any(c.search(name) for c in compiled)


def _matrix_shape(shape) -> tuple[int, int]:
  return int(np.prod(shape[:-1])), int(shape[-1])


def _check_rank(rank) -> int:
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"lora rank must be an integer >= 1, got {rank!r}.")
  return int(rank)


def init(base_params, rank: int, key, filter: Optional[Callable] = None) -> dict:
  """Adapters ``{name: {"a": (m, r'), "b": (r', n)}}`` for every leaf selected by ``filter(name, leaf)``.

  r' = min(rank, m, n): a rank above the matrix's own rank adds parameters and no expressiveness (the
  U-Net's output conv (3, 3, C, 1) gets r' = 1).  A ~ U(-sqrt(6 / m), sqrt(6 / m)) (He uniform, the
  ``nnx.LoRA`` default), drawn for all leaves in one ``jax.random.uniform`` call from ``key`` (one small
  compiled op instead of one per kernel shape); B = 0, so the adapted model equals the base at init.
  Adapters are float32 whatever the base dtype.
  """
  rank = _check_rank(rank)
  filter = default_filter if filter is None else filter
  selected = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(base_params):
    name = leaf_name(path)
    if filter(name, leaf):
      if getattr(leaf, "ndim", 0) < 2:
        raise ValueError(f"lora filter selected {name!r} of shape {getattr(leaf, 'shape', ())}; only leaves with "
                         f"ndim >= 2 can be adapted.")
      selected.append((name, leaf.shape))
  if not selected:
    raise ValueError("lora filter selected no leaf of base_params (need floating leaves with ndim >= 2).")
  names = [n for n, _ in selected]
  if len(set(names)) != len(names):
    raise ValueError(f"lora leaf names are not unique: {sorted(n for n in names if names.count(n) > 1)[:3]}.")
  dims = []
  for _, shape in selected:
    m, n = _matrix_shape(shape)
    dims.append((m, min(rank, m, n), n))
  u = np.asarray(jax.random.uniform(key, (sum(m * r for m, r, _ in dims),), jnp.float32, -1.0, 1.0))
  adapters, offset = {}, 0
  for name, (m, r, n) in zip(names, dims):
    a = u[offset:offset + m * r].reshape(m, r) * np.float32(np.sqrt(6.0 / m))
    offset += m * r
    adapters[name] = {"a": jnp.asarray(a), "b": jnp.asarray(np.zeros((r, n), np.float32))}  # no per-shape compile
  return adapters


def delta(adapter: dict, shape, scale: float = 1.0):
  """scale * A @ B reshaped to the kernel's ``shape``."""
  return (scale * (adapter["a"] @ adapter["b"])).reshape(shape)


def merge(base_params, adapters: dict, scale: float = 1.0):
  """Full params with W + scale * reshape(A @ B) for every adapted leaf; same structure as ``base_params``.

  Pure and jittable; gradients flow to both the adapters and (if differentiated) the base.
  """
  used = set()

  def leaf_fn(path, w):
    name = leaf_name(path)
    ad = adapters.get(name)
    if ad is None:
      return w
    m, n = _matrix_shape(w.shape)
    if ad["a"].shape[0] != m or ad["b"].shape[1] != n or ad["a"].shape[1] != ad["b"].shape[0]:
      raise ValueError(f"lora adapter {name!r}: A {ad['a'].shape} @ B {ad['b'].shape} does not fit the "
                       f"kernel {w.shape} read as ({m}, {n}).")
    used.add(name)
    return w + delta(ad, w.shape, scale).astype(w.dtype)

  out = jax.tree_util.tree_map_with_path(leaf_fn, base_params)
  missing = sorted(set(adapters) - used)
  if missing:
    raise ValueError(f"lora adapters {missing[:3]} name no leaf of base_params (built for another model?).")
  return out


def apply_fn(base_apply_fn: Callable, scale: float = 1.0) -> Callable:
  """``apply(adapters, x, t, *cond, base_params)`` = ``base_apply_fn(merge(base_params, adapters), x, t, *cond)``.

  The frozen base params are a keyword argument, so a jitted step passes them as traced inputs and
  differentiates w.r.t. the adapters only, e.g. inside the step:
  ``ft_apply = functools.partial(lora.apply_fn(base_apply), base_params=base_params)``.
  """

  def apply(adapters, x, t, *cond, base_params):
    return base_apply_fn(merge(base_params, adapters, scale), x, t, *cond)

  return apply


def param_counts(base_params, adapters: dict) -> dict:
  """Sizes for the LoRA-vs-full table: parameter counts and bytes of the adapters and of the full params."""
  def size(tree):
    leaves = jax.tree.leaves(tree)
    return sum(int(np.prod(x.shape)) for x in leaves), sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)

  n_ad, b_ad = size(adapters)
  n_full, b_full = size(base_params)
  return {"adapter_params": n_ad, "full_params": n_full, "adapter_bytes": b_ad, "full_bytes": b_full,
          "fraction": n_ad / n_full, "num_adapted": len(adapters)}
