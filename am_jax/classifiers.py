"""Digit classifiers (Flax NNX), reward functions built from them, and sample-quality metrics.

Two architectures so the fine-tuning reward (classifier A) and the held-out "gold" evaluator
(classifier B) do not share weights, inductive biases or seeds -- a fine-tuned model that merely
exploits A's blind spots shows up as a gap between A's and B's scores.  Both take ``image_size``
(8: sklearn digits, the original layers exactly; 28: MNIST, ``am_jax.data.mnist``):

* ``SmallCNN`` (A): conv3x3(16) - conv3x3(32) - avgpool2 [- avgpool2 while the side is > 8] -
  dense(64) [features] - dense(10).  8x8 -> 4x4x32; 28x28 -> 7x7x32.
* ``WideCNN`` (B): conv3x3(32) - conv3x3(32) - avgpool2 - conv3x3(64) - avgpool2 - dense(128)
  [features] - dense(10), LayerNorm'd features.  8x8 -> 2x2x64; 28x28 -> 7x7x64.

Both are used through ``functional(model) -> (apply_fn, features_fn, params)`` with ``apply_fn(params, x)
-> logits (B, 10)`` and ``features_fn(params, x) -> (B, F)`` (penultimate layer) built from the same
graphdef.  Images are (B, S, S, 1) in [-1, 1] (``am_jax.data.digits`` / ``am_jax.data.mnist``).

Rewards are pure ``reward_fn(x, *cond) -> (B,)`` (the signature of ``losses.AMConfig`` users); they
work for any image size the classifier was built for.  Metrics: Fréchet distance between Gaussian
fits of two feature sets (matrix square root via ``eigh`` of symmetric PSD matrices, no scipy) and
within-condition diversity.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["NUM_CLASSES", "ARCHS", "SmallCNN", "WideCNN", "build", "functional", "cross_entropy",
           "target_class_reward", "prompt_consistency_reward", "ink_reward", "centring_reward",
           "frechet_distance_gaussians", "frechet_distance", "diversity"]

NUM_CLASSES = 10
ARCHS = ("small_cnn", "wide_cnn")


def _check_size(image_size) -> int:
  if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 4:
    raise ValueError(f"classifier image_size must be an integer >= 4, got {image_size!r}.")
  return int(image_size)


def _check_input(x, image_size: int):
  if x.ndim != 4 or x.shape[1:] != (image_size, image_size, 1):
    raise ValueError(f"classifier built for images ({image_size}, {image_size}, 1), got x of shape {x.shape}.")


class SmallCNN(nnx.Module):
  """(B, S, S, 1) -> logits (B, 10); ``features`` is the 64-d penultimate activation."""

  def __init__(self, image_size: int = 8, *, rngs: nnx.Rngs):
    self.image_size = _check_size(image_size)
    side, self.num_pools = image_size // 2, 1
    while side > 8:  # 28 -> 14 -> 7: keeps the dense layer small on MNIST; 8x8 digits pool once as before
      side, self.num_pools = side // 2, self.num_pools + 1
    self.c1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.c2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
    self.d1 = nnx.Linear(side * side * 32, 64, rngs=rngs)
    self.out = nnx.Linear(64, NUM_CLASSES, rngs=rngs)

  def features(self, x):
    _check_input(x, self.image_size)
    h = nnx.silu(self.c2(nnx.silu(self.c1(x))))
    for _ in range(self.num_pools):
      h = nnx.avg_pool(h, (2, 2), (2, 2))  # (B, 4, 4, 32) on 8x8, (B, 7, 7, 32) on 28x28
    return nnx.silu(self.d1(h.reshape(h.shape[0], -1)))

  def __call__(self, x):
    return self.out(self.features(x))


class WideCNN(nnx.Module):
  """(B, S, S, 1) -> logits (B, 10); ``features`` is the 128-d (LayerNorm'd) penultimate activation."""

  def __init__(self, image_size: int = 8, *, rngs: nnx.Rngs):
    self.image_size = _check_size(image_size)
    side = image_size // 2 // 2
    self.c1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
    self.c2 = nnx.Conv(32, 32, (3, 3), rngs=rngs)
    self.c3 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
    self.d1 = nnx.Linear(side * side * 64, 128, rngs=rngs)
    self.norm = nnx.LayerNorm(128, rngs=rngs)
    self.out = nnx.Linear(128, NUM_CLASSES, rngs=rngs)

  def features(self, x):
    _check_input(x, self.image_size)
    h = nnx.gelu(self.c2(nnx.gelu(self.c1(x))))
    h = nnx.avg_pool(h, (2, 2), (2, 2))  # (B, 4, 4, 32) on 8x8, (B, 14, 14, 32) on 28x28
    h = nnx.avg_pool(nnx.gelu(self.c3(h)), (2, 2), (2, 2))  # (B, 2, 2, 64) on 8x8, (B, 7, 7, 64) on 28x28
    return self.norm(nnx.gelu(self.d1(h.reshape(h.shape[0], -1))))

  def __call__(self, x):
    return self.out(self.features(x))


def build(arch: str, seed: int, image_size: int = 8) -> nnx.Module:
  """Classifier ``arch`` (one of ``ARCHS``) for (S, S, 1) images, S = ``image_size``, initialised from ``seed``."""
  if arch == "small_cnn":
    return SmallCNN(image_size, rngs=nnx.Rngs(seed))
  if arch == "wide_cnn":
    return WideCNN(image_size, rngs=nnx.Rngs(seed))
  raise ValueError(f"classifier arch must be one of {ARCHS}, got {arch!r}.")


def functional(model: nnx.Module):
  """(apply_fn, features_fn, params): apply_fn(params, x) -> (B, 10) logits, features_fn -> (B, F)."""
  graphdef, params = nnx.split(model)

  def apply_fn(params, x):
    return nnx.merge(graphdef, params)(x)

  def features_fn(params, x):
    return nnx.merge(graphdef, params).features(x)

  return apply_fn, features_fn, params


def cross_entropy(apply_fn: Callable, params, x, y):
  """Mean softmax cross-entropy; x (B, S, S, 1), y (B,) int."""
  logp = jax.nn.log_softmax(apply_fn(params, x))
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


# ----------------------------------------------------------------------------------------- rewards


def target_class_reward(apply_fn: Callable, params, target: int) -> Callable:
  """r(x) = log p(target | x), (B,): unconditional generation steered to one digit.

  Extra conditioning arguments (labels) are ignored, so it also works for a conditional base.
  """

  def reward_fn(x, *cond):
    del cond
    return jax.nn.log_softmax(apply_fn(params, x))[:, target]

  return reward_fn


def prompt_consistency_reward(apply_fn: Callable, params) -> Callable:
  """r(x, label) = log p(label | x), (B,): agreement of a sample with its conditioning label.

  The null label (index 10, classifier-free guidance) has no prompt; there the reward is the log
  probability of the most likely class (rewards confident, clean digits).
  """

  def reward_fn(x, label):
    logp = jax.nn.log_softmax(apply_fn(params, x))
    lab = jnp.clip(label, 0, NUM_CLASSES - 1)
    lp = jnp.take_along_axis(logp, lab[:, None], axis=-1)[:, 0]
    return jnp.where(label < NUM_CLASSES, lp, jnp.max(logp, axis=-1))

  return reward_fn


def ink_reward(x, *cond):
  """Stroke-thickness reward: mean ink in [0, 1] per image, (B,).  Differentiable, classifier-free.

  Pixels are in [-1, 1] with -1 = blank, so ink = (x + 1) / 2 averaged over the pixels.  It grows with
  the digit's size as well as its stroke width; ``rewards.stroke_thickness`` measures width only.
  """
  del cond
  return jnp.mean((x + 1.0) * 0.5, axis=tuple(range(1, x.ndim)))


def centring_reward(x, *cond):
  """-|ink centroid - image centre|^2 in pixels^2, (B,): rewards centred digits."""
  del cond
  w = jax.nn.relu((x[..., 0] + 1.0) * 0.5) + 1e-6  # (B, H, W) non-negative ink mass
  h, wd = x.shape[1], x.shape[2]
  ii, jj = jnp.meshgrid(jnp.arange(h, dtype=x.dtype), jnp.arange(wd, dtype=x.dtype), indexing="ij")
  mass = jnp.sum(w, axis=(1, 2))
  ci = jnp.sum(w * ii, axis=(1, 2)) / mass - (h - 1) / 2
  cj = jnp.sum(w * jj, axis=(1, 2)) / mass - (wd - 1) / 2
  return -(ci**2 + cj**2)


# ----------------------------------------------------------------------------------------- metrics


def _sqrt_psd(m):
  """Symmetric PSD square root via eigh (negative round-off eigenvalues clipped to 0)."""
  w, v = np.linalg.eigh(0.5 * (m + m.T))
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_gaussians(mu1, cov1, mu2, cov2) -> float:
  """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2)  (float64).

  (C1 C2)^1/2 has the same trace as (C1^1/2 C2 C1^1/2)^1/2, which is symmetric PSD, so two eigh
  calls replace scipy's general sqrtm and its complex round-off.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  s1 = _sqrt_psd(cov1)
  mid = s1 @ cov2 @ s1
  tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (mid + mid.T)), 0.0, None)))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)


def frechet_distance(feats1, feats2) -> float:
  """Fréchet distance between Gaussian fits of feature sets (N1, F) and (N2, F)."""
  f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
  return frechet_distance_gaussians(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


def diversity(feats, labels=None) -> float:
  """Mean pairwise Euclidean feature distance between distinct samples of the same label.

  feats (N, F); labels (N,) or None (one group).  Averaged over groups with >= 2 samples.
  """
  f = np.asarray(feats, np.float64)
  labels = np.zeros(len(f), np.int64) if labels is None else np.asarray(labels)
  out = []
  for c in np.unique(labels):
    g = f[labels == c]
    n = len(g)
    if n < 2:
      continue
    sq = np.sum(g**2, 1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2.0 * g @ g.T, 0.0, None)
    out.append(np.sum(np.sqrt(d2)) / (n * (n - 1)))  # diagonal is 0
  return float(np.mean(out)) if out else float("nan")
