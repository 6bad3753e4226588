r"""Trains the digit classifiers used as reward (A) and held-out evaluator (B); saves them with Orbax.

    python -m experiments.train_reward --config=configs/digits_reward.py --workdir=runs/digits_reward

Writes ``<workdir>/<name>/params`` (Orbax, the NNX parameter state), ``<workdir>/<name>/config.json``
(arch, seed, test accuracy) and ``<workdir>/metrics.json``.  ``load_classifier(workdir, name)``
rebuilds ``(apply_fn, features_fn, params)``.  Each step (batch draw, noise augmentation, AdamW
update) is one jit over the on-device training set.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags
from ml_collections import config_flags

from am_jax import classifiers, data as data_lib


def train_classifier(arch: str, seed: int, tc, x_train, y_train, x_test, y_test):
  """Trains one classifier; returns (apply_fn, features_fn, params, test_accuracy, seconds)."""
  apply_fn, features_fn, params = classifiers.functional(classifiers.build(arch, seed))
  opt = optax.adamw(optax.cosine_decay_schedule(tc.learning_rate, tc.steps), weight_decay=tc.weight_decay)
  opt_state = opt.init(params)
  xs, ys = jnp.asarray(x_train), jnp.asarray(y_train)

  @jax.jit
  def step(params, opt_state, key):
    k_idx, k_noise = jax.random.split(key)
    idx = jax.random.randint(k_idx, (tc.batch_size,), 0, xs.shape[0])
    # Noise augmentation: generated images are slightly off the data manifold; the reward's input
    # gradient should still point toward cleaner digits there.
    noise_scale = tc.noise_std * jax.random.uniform(k_noise, (tc.batch_size, 1, 1, 1))
    x = xs[idx] + noise_scale * jax.random.normal(jax.random.fold_in(k_noise, 1), xs[idx].shape)
    loss, grads = jax.value_and_grad(lambda p: classifiers.cross_entropy(apply_fn, p, x, ys[idx]))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  key = jax.random.PRNGKey(seed)
  t0 = time.perf_counter()
  for s in range(tc.steps):
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, s))
    if (s + 1) % tc.log_every == 0 or s + 1 == tc.steps:
      print(f"[{arch}] step {s + 1}/{tc.steps} loss {float(loss):.4f}", flush=True)
  seconds = time.perf_counter() - t0
  logits = jax.jit(apply_fn)(params, jnp.asarray(x_test))
  acc = float(np.mean(np.argmax(np.asarray(logits), -1) == y_test))
  return apply_fn, features_fn, params, acc, seconds


def save_classifier(workdir: str, name: str, params, info: dict):
  d = os.path.abspath(os.path.join(workdir, name))
  os.makedirs(d, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(d, "params"), params, force=True)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(info, f, indent=2)


def load_classifier(workdir: str, name: str):
  """(apply_fn, features_fn, params, info) of a classifier saved by ``run``."""
  d = os.path.abspath(os.path.join(workdir, name))
  with open(os.path.join(d, "config.json")) as f:
    info = json.load(f)
  apply_fn, features_fn, params = classifiers.functional(classifiers.build(info["arch"], info["seed"]))
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(d, "params"), params)
  return apply_fn, features_fn, params, info


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  x_train, y_train = data_lib.digits("train")
  x_test, y_test = data_lib.digits("test")
  summary = {}
  for name in ("A", "B"):
    cc = cfg.classifiers[name]
    _, _, params, acc, seconds = train_classifier(cc.arch, cc.seed, cfg.train, x_train, y_train, x_test, y_test)
    info = dict(arch=cc.arch, seed=cc.seed, test_accuracy=acc, train_seconds=seconds, train=cfg.train.to_dict())
    save_classifier(workdir, name, params, info)
    summary[f"{name}_test_accuracy"] = acc
    summary[f"{name}_train_seconds"] = seconds
    print(f"classifier {name} ({cc.arch}): test accuracy {acc:.4f} ({seconds:.1f} s)", flush=True)
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def main(argv):
  del argv
  print(run(flags.FLAGS.config, flags.FLAGS.workdir))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Path to the config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
