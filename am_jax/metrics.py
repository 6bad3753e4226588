"""Sample-based distances used to compare fine-tuned samples with exact targets (NumPy, host side)."""
from __future__ import annotations

import numpy as np


def wasserstein1_1d(x, y) -> float:
  """W1 between two 1-D empirical distributions (quantile coupling; sizes may differ)."""
  x = np.sort(np.asarray(x, np.float64).ravel())
  y = np.sort(np.asarray(y, np.float64).ravel())
  n = max(len(x), len(y))
  q = (np.arange(n) + 0.5) / n

  def quantile(sorted_z):  # inverted-CDF quantile by indexing: O(n) after the sort
    # (np.quantile with n query points partitions once per point: O(n^2), minutes at n = 20k.)
    idx = np.clip(np.ceil(q * len(sorted_z)).astype(np.int64) - 1, 0, len(sorted_z) - 1)
    return sorted_z[idx]

  return float(np.mean(np.abs(quantile(x) - quantile(y))))


def sliced_wasserstein1(x, y, num_projections: int = 256, seed: int = 0) -> float:
  """Mean over random unit directions of the 1-D W1 of the projections; x (n, d), y (m, d)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
  dirs = np.random.default_rng(seed).normal(size=(num_projections, x.shape[1]))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  return float(np.mean([wasserstein1_1d(x @ d, y @ d) for d in dirs]))


def mode_mass(x, means) -> np.ndarray:
  """Fraction of samples whose nearest component mean is each of ``means`` (J, d) -> (J,)."""
  x = np.asarray(x).reshape(len(x), -1)
  means = np.asarray(means).reshape(len(means), -1)
  nearest = np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), axis=1)
  return np.bincount(nearest, minlength=len(means)) / len(x)


def wasserstein1_to_cdf(x, cdf, num_grid: int = 20001, pad: float = 1.0) -> float:
  """W1 = int |F_n(z) - F(z)| dz between the samples x (1-D) and an exact CDF (vectorised callable).

  Only the sample noise of x remains (no second sample), so thresholds can be tighter.
  """
  x = np.sort(np.asarray(x, np.float64).ravel())
  grid = np.linspace(x[0] - pad, x[-1] + pad, num_grid)
  f_n = np.searchsorted(x, grid, side="right") / len(x)
  return float(np.trapezoid(np.abs(f_n - np.asarray(cdf(grid), np.float64)), grid))
