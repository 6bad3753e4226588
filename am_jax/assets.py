"""Pre-trained MNIST bases and reward classifiers shipped inside the package (``am_jax/assets``).

``ship(out_dir, ...)`` regenerates them: flow-matching pre-training of the 28x28 U-Net and DiT
(``configs/mnist.py``, ``am-jax pretrain``'s job) exported as EMA params (``checkpointing.save_params``), and the
reward classifier A (``small_cnn``, seed 1) with its held-out gold twin B (``wide_cnn``, seed 2) trained on the
MNIST training split.  ``manifest.json`` records, per asset, a parameter checksum (sum |w|, float64) and quality
numbers (held-out accuracy; for a base, classifier-B accuracy and diversity of class-conditional samples), so
``verify`` detects a corrupted file and a regenerated set can be compared with the shipped one within the
tolerances of ``TOLERANCES``.  Command: ``am-jax ship-assets --workdir=runs/assets [--out=am_jax/assets]``.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ARCHS", "TOLERANCES", "assets_dir", "checksum", "ship", "verify", "base_quality"]

ARCHS = ("unet", "dit")
# A regenerated asset "matches" the shipped one when its quality numbers are within these (absolute) bounds:
# training is not bit-reproducible across machines (GPU vs CPU reductions), its quality is.
TOLERANCES = {"heldout_accuracy": 0.02, "sample_accuracy_B": 0.08, "sample_diversity": 0.10}


def assets_dir() -> str:
  import importlib.resources
  return str(importlib.resources.files("am_jax") / "assets")


def checksum(params) -> float:
  """sum |w| over every leaf, in float64: changes with any corrupted or different weight."""
  return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(params)))


def _mnist_config(arch: str):
  from am_jax import launch
  return launch.load_config(f"mnist.py:arch={arch}")


def base_quality(cfg, apply_fn, params, classifier_dir: str, per_class: int = 20, seed: int = 0) -> dict:
  """Class-conditional ODE samples (``per_class`` per digit, 20 steps): accuracy under classifier B and
  diversity (mean within-class distance of B-features)."""
  from am_jax import builders, classifiers, sampling
  apply_b, feat_b, params_b, _ = builders.load_classifier(classifier_dir, "B")
  labels = jnp.repeat(jnp.arange(10, dtype=jnp.int32), per_class)
  schedule = builders.build_schedule(cfg)
  x = jax.jit(lambda p: sampling.sample(apply_fn, p, jax.random.PRNGKey(seed), (labels.shape[0], 28, 28, 1),
                                        schedule, "ode", 20, 0.5, noiseless_last_step=True, cond=(labels,)))(params)
  logits = jax.jit(apply_b)(params_b, x)
  feats = np.asarray(jax.jit(feat_b)(params_b, x))
  return {"sample_accuracy_B": float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(labels))),
          "sample_diversity": float(classifiers.diversity(feats, np.asarray(labels)))}


def ship(workdir: str, out_dir: Optional[str] = None, pretrain_steps: Optional[int] = None,
         classifier_steps: int = 3000, archs=ARCHS) -> dict:
  """Regenerates the assets into ``out_dir`` (default: the package's ``assets`` folder); returns the manifest."""
  from am_jax import builders, checkpointing, image_eval, jobs, launch, sharding, training
  out_dir = out_dir or assets_dir()
  os.makedirs(out_dir, exist_ok=True)
  manifest = {}
  # 1. Classifiers A (reward) and B (gold twin) on the MNIST training split.
  rc = launch.load_config("digits_reward")
  rc.data.name = "mnist"
  rc.train.steps = classifier_steps
  clf_dir = os.path.join(out_dir, "mnist_classifiers")
  shutil.rmtree(clf_dir, ignore_errors=True)
  summary = image_eval.train_reward_classifiers(rc, clf_dir)
  for name in ("A", "B"):
    _, _, params, info = builders.load_classifier(clf_dir, name)
    manifest[f"mnist_classifiers/{name}"] = {"arch": info["arch"], "seed": info["seed"],
                                             "heldout_accuracy": summary[f"{name}_test_accuracy"],
                                             "checksum": checksum(params)}
  # 2. Bases: pre-train, export the EMA params.
  for arch in archs:
    cfg = _mnist_config(arch)
    if pretrain_steps:
      cfg.pretrain.steps = int(pretrain_steps)
    run_dir = os.path.join(workdir, f"mnist_{arch}")
    jobs.pretrain(cfg, run_dir)
    apply_fn, params, _ = builders.load_pretrained(run_dir)
    dest = os.path.join(out_dir, f"mnist_{arch}")
    shutil.rmtree(dest, ignore_errors=True)
    checkpointing.save_params(dest, params)
    manifest[f"mnist_{arch}"] = {"model": cfg.model.to_dict(), "pretrain_steps": int(cfg.pretrain.steps),
                                 "checksum": checksum(params), **base_quality(cfg, apply_fn, params, clf_dir)}
  with open(os.path.join(out_dir, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2, default=list)
  return manifest


def verify(directory: Optional[str] = None) -> dict:
  """Loads every shipped asset and checks its checksum against ``manifest.json``; returns the manifest.

  ValueError naming the asset whose weights differ (a corrupted or replaced file).
  """
  from am_jax import builders, checkpointing
  directory = directory or assets_dir()
  with open(os.path.join(directory, "manifest.json")) as f:
    manifest = json.load(f)
  for key, entry in manifest.items():
    if key.startswith("mnist_classifiers/"):
      params = builders.load_classifier(os.path.join(directory, "mnist_classifiers"), key.split("/")[1])[2]
    else:
      cfg = _mnist_config(key.split("_", 1)[1])
      _, target = builders.build_velocity_model(cfg, (28, 28, 1), cfg.seed)
      params = checkpointing.load_params(os.path.join(directory, key), target)
    got = checksum(params)
    if not np.isclose(got, entry["checksum"], rtol=1e-9):
      raise ValueError(f"shipped asset {key}: checksum {got!r} != manifest {entry['checksum']!r} (corrupted?).")
  return manifest
