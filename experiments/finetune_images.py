r"""Adjoint Matching fine-tuning of the digits U-Net with a classifier reward, one run per lambda.

    python -m experiments.finetune_images --config=configs/digits_finetune.py --workdir=runs/digits_ft

Loads the base from ``config.base_checkpoint`` (an ``experiments.pretrain`` workdir) and classifier
A from ``config.reward_checkpoint`` (``experiments.train_reward``).  The fine-tuned model is a full
copy of the base U-Net (``residual=None``); every step (label draw by ``cond_fn``, memoryless
trajectories, lean adjoint, AM loss, Adam update) is one jit (``training.make_finetune_step``).
For each lambda in ``config.lambdas`` writes ``<workdir>/lam_<lambda>/``: ``checkpoints/`` (Orbax
TrainState + config), ``metrics.jsonl`` and ``metrics.json``.  ``experiments.evaluate`` compares
them with the base.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from am_jax import builders, checkpointing, classifiers, sharding, training
from experiments import common, finetune, pretrain, train_reward

NUM_CLASSES = classifiers.NUM_CLASSES


def lam_dir(workdir: str, lam: float) -> str:
  return os.path.join(workdir, f"lam_{float(lam):g}")


def build_reward(cfg):
  """reward_fn(x, label) -> (B,) from classifier A, per ``cfg.reward.name``."""
  apply_a, _, params_a, _ = train_reward.load_classifier(cfg.reward_checkpoint, "A")
  name = builders.require(cfg, "reward.name", lambda v: v in ("prompt", "target_class", "ink"),
                          "'prompt', 'target_class' or 'ink'")
  if name == "prompt":
    return classifiers.prompt_consistency_reward(apply_a, params_a)
  if name == "target_class":
    return classifiers.target_class_reward(apply_a, params_a, int(cfg.reward.target_class))
  return classifiers.ink_reward


def label_cond_fn(key, batch: int):
  """cond_fn of make_finetune_step: uniformly drawn digit labels, a 1-tuple of (B,) int32."""
  return (jax.random.randint(key, (batch,), 0, NUM_CLASSES, jnp.int32),)


def finetune_one(cfg, lam: float, workdir: str, base_apply, base_params, reward_fn, mesh) -> dict:
  """Fine-tunes a full copy of the base with reward multiplier ``lam``; returns the summary."""
  fc = cfg.finetune
  am_config = dataclasses.replace(builders.build_am_config(cfg), reward_multiplier=float(lam))
  optimizer = builders.build_optimizer(cfg, "finetune.optimizer", fc.steps)
  params = jax.tree.map(jnp.copy, pretrain.to_local(base_params))
  state = sharding.replicate_tree(training.init_state(params, optimizer, cfg.seed), mesh)
  x_shape = (fc.batch_size, 8, 8, 1)
  step_fn = training.make_finetune_step(base_apply, base_apply, reward_fn, am_config, optimizer, x_shape, mesh,
                                        fc.ema_decay, cond_fn=label_cond_fn, residual=None)
  writer = common.MetricsWriter(workdir)
  progress = common.Progress(f"finetune lam={lam:g}", fc.steps)
  t0 = time.perf_counter()
  for s in range(fc.steps):
    state, m = step_fn(state, base_params)
    if (s + 1) % fc.log_every == 0 or s == 0 or s + 1 == fc.steps:
      m = {k: float(v) for k, v in pretrain.to_local(m).items()}
      m["steps_per_s"] = progress.tick(s + 1, m)
      writer.write(s + 1, m)
  seconds = time.perf_counter() - t0
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), 1, 1)
  ckpt.save(fc.steps, state, dict(cfg.to_dict(), reward_multiplier=float(lam)), force=True)
  ckpt.close()
  summary = {"lambda": float(lam), "steps": fc.steps, "seconds": seconds, "steps_per_s": fc.steps / seconds}
  writer.final(summary)
  return summary


def load_finetuned(workdir: str, lam: float, base_apply, base_params, cfg, mesh=None):
  """Params of the fine-tuned model saved by ``finetune_one`` (EMA params when EMA was on)."""
  optimizer = builders.build_optimizer(cfg, "finetune.optimizer", cfg.finetune.steps)
  target = training.init_state(pretrain.to_local(base_params), optimizer, cfg.seed)
  ckpt = checkpointing.Checkpointer(os.path.join(lam_dir(workdir, lam), "checkpoints"))
  state = ckpt.restore(None, target, mesh)
  ckpt.close()
  return pretrain.to_local(state.ema_params if cfg.finetune.ema_decay else state.params)


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  mesh = sharding.make_mesh(cfg.mesh.num_devices)
  base_apply, base_params, base_cfg = finetune.load_base(cfg.base_checkpoint, mesh)
  if base_cfg.schedule != cfg.schedule or base_cfg.model.num_classes != NUM_CLASSES:
    raise builders.ConfigError(f"config.base_checkpoint={cfg.base_checkpoint!r}: needs a digits U-Net with "
                               f"{NUM_CLASSES} classes and schedule {cfg.schedule!r}.")
  reward_fn = build_reward(cfg)
  out = {}
  for lam in cfg.lambdas:
    out[f"lam_{float(lam):g}"] = finetune_one(cfg, lam, lam_dir(workdir, lam), base_apply, base_params, reward_fn,
                                              mesh)
  return out


def main(argv):
  del argv
  print(run(flags.FLAGS.config, flags.FLAGS.workdir))


if __name__ == "__main__":
  common.define_flags()
  app.run(main)
