r"""Reward / evaluator classifiers for the 8x8 digits (issue 4).

    python -m experiments.train_reward --config=configs/digits_reward.py --workdir=runs/digits_reward

Classifier A (``small_cnn``, seed 1) is the fine-tuning reward; classifier B (``wide_cnn``, seed 2,
different architecture) is held out for evaluation (held-out reward, accuracy, Fréchet distance and
diversity features).  Both train on ``data.digits('train')`` (1,500 images) with light Gaussian-noise
augmentation so their input gradients are informative off the data manifold too.  Measured
(2-core CPU, shared, 2026-11-25): 70 s in total; test accuracy A 0.9966, B 0.9966 (docs/images.md).
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(name="digits")  # or "mnist" (28x28)
  c.classifiers = dict(
      A=dict(arch="small_cnn", seed=1),
      B=dict(arch="wide_cnn", seed=2))
  c.train = dict(steps=1500, batch_size=128, learning_rate=2e-3, weight_decay=1e-4, noise_std=0.15, log_every=500)
  return c
