"""Figures of a run: 2-D scatter panels and image grids (matplotlib, Agg backend, imported lazily)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["scatter", "image_grid", "class_grid"]


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def scatter(path: str, samples: dict, target_samples: Optional[np.ndarray], metrics: dict, max_points: int = 4000):
  """Base / fine-tuned (ODE, memoryless SDE) / exact-target 2-D scatter panels with their sliced W1."""
  plt = _pyplot()
  panels = [("base (ODE)", samples["base_ode"], "base_ode"),
            ("fine-tuned (ODE)", samples["finetuned_ode"], "finetuned_ode"),
            ("fine-tuned (memoryless SDE)", samples["finetuned_memoryless"], "finetuned_memoryless")]
  if target_samples is not None:
    panels.append(("exact tilted target", target_samples, None))
  fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), sharex=True, sharey=True)
  for ax, (title, xs, key) in zip(axes, panels):
    ax.scatter(xs[:max_points, 0], xs[:max_points, 1], s=1, alpha=0.4)
    if key and f"{key}_to_target_sliced_w1" in metrics:
      title += f"\nSW1 to target {metrics[f'{key}_to_target_sliced_w1']:.3f}"
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _tile(imgs: np.ndarray, cols: int) -> np.ndarray:
  """(n, H, W) -> one (rows*(H+2), cols*(W+2)) mosaic with a blank (-1) border around each image."""
  n, h, w = imgs.shape
  rows = -(-n // cols)
  pad = np.full((rows * cols - n, h, w), -1.0, imgs.dtype)
  imgs = np.pad(np.concatenate([imgs, pad]), ((0, 0), (1, 1), (1, 1)), constant_values=-1)
  return imgs.reshape(rows, cols, h + 2, w + 2).transpose(0, 2, 1, 3).reshape(rows * (h + 2), cols * (w + 2))


def _mosaic_panels(path: str, mosaics: Sequence, figsize, title: str = ""):
  """Side-by-side grey panels [(name, 2-D mosaic in [-1, 1])] saved to ``path``."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(mosaics), figsize=figsize, squeeze=False)
  for ax, (name, mosaic) in zip(axes[0], mosaics):
    ax.imshow(mosaic, cmap="gray_r", vmin=-1, vmax=1)
    ax.set_title(name, fontsize=8)
    ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def image_grid(path: str, panels: Sequence, cols: int = 8, max_images: int = 64, title: str = ""):
  """Side-by-side grids of images in [-1, 1] (first channel): ``panels`` = [(name, (N, H, W, C)), ...]."""
  mosaics = [(name, _tile(np.asarray(x)[:max_images, ..., 0], cols)) for name, x in panels]
  _mosaic_panels(path, mosaics, (2.6 * len(panels), 2.9), title)


def class_grid(path: str, panels: Sequence, labels, per_class: int, num_classes: int = 10, title: str = ""):
  """One row per class (``labels`` of the samples), ``per_class`` images each, for each panel."""
  labels = np.asarray(labels)
  mosaics = [(name, np.concatenate([_tile(np.asarray(x)[labels == c][:per_class, ..., 0], per_class)
                                    for c in range(num_classes)], axis=0)) for name, x in panels]
  _mosaic_panels(path, mosaics, (2.2 * len(panels) * per_class / 8, 2.6), title)


def scatter_one(path: str, xs: np.ndarray, title: str, max_points: int = 5000):
  """One 2-D scatter panel."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(4, 4))
  ax.scatter(xs[:max_points, 0], xs[:max_points, 1], s=1, alpha=0.4)
  ax.set_title(title, fontsize=9)
  ax.set_aspect("equal")
  fig.savefig(path, dpi=100)
  plt.close(fig)
