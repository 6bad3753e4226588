"""Datasets that ship with the code or its dependencies (nothing is downloaded at run time).

2-D toys: ``ring`` (exact Gaussian mixture, so fine-tuning has an exact tilted target) and
``moons`` (scikit-learn generator).  Arrays are float32 NumPy, (N, 2).
"""
from __future__ import annotations

import jax
import numpy as np

from am_jax import gmm as gmm_lib


def toy_2d(name: str, num_samples: int, seed: int = 0, **kwargs) -> np.ndarray:
  """(num_samples, 2) samples of a 2-D toy distribution.

  ring: ``gmm.ring_2d(num_components, radius, std)``.  moons: sklearn ``make_moons`` with Gaussian
  noise ``std`` (default 0.05), centred and scaled to unit-order coordinates.
  """
  if name == "ring":
    mix = gmm_lib.ring_2d(kwargs.get("num_components", 8), kwargs.get("radius", 2.0), kwargs.get("std", 0.25))
    return np.asarray(gmm_lib.sample(mix, jax.random.PRNGKey(seed), num_samples), np.float32)
  if name == "moons":
    from sklearn.datasets import make_moons  # only needed for this dataset
    x, _ = make_moons(num_samples, noise=kwargs.get("std", 0.05), random_state=seed)
    return ((x - np.array([0.5, 0.25])) * 1.5).astype(np.float32)
  raise ValueError(f"Unknown 2-D dataset {name!r}; expected 'ring' or 'moons'.")


def digits(split: str = "train", num_test: int = 297):
  """scikit-learn's 1,797 8x8 handwritten digits (bundled with the package).

  Returns (x (N, 8, 8, 1) float32 scaled to [-1, 1], labels (N,) int32).  The split is fixed: the
  last ``num_test`` images (after a seeded shuffle) are the held-out test set.
  """
  from sklearn.datasets import load_digits
  d = load_digits()
  perm = np.random.default_rng(0).permutation(len(d.target))
  x = (d.images[perm].astype(np.float32) / 8.0 - 1.0)[..., None]
  y = d.target[perm].astype(np.int32)
  if split == "train":
    return x[:-num_test], y[:-num_test]
  if split == "test":
    return x[-num_test:], y[-num_test:]
  raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
