"""The digits workload through the library jobs behind the launchers: pretrain -> reward classifiers -> finetune ->
evaluate, each on a shrunk config (one step or a few: flax lm1b ``train_test`` style), with the smallest U-Net.

One fine-tune ('full', lambda 1): LoRA through the same job is tests/integration/test_mnist_pipeline.py (DiT), LoRA
on a U-Net tests/test_lora.py; reloading a run takes the config stored with its checkpoints (checked here)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from am_jax import builders, image_eval, jobs
from configs import digits_finetune, digits_pretrain, digits_reward

UNET = {"channels": (8,), "time_embed_dim": 8}  # one level: the cheapest U-Net to compile


def test_tiny_digits_pipeline(tmp_path):
  pc = digits_pretrain.get_config()
  pc.model.update(UNET)
  pc.pretrain.steps, pc.pretrain.batch_size, pc.pretrain.log_every, pc.pretrain.checkpoint.every_steps = 2, 16, 1, 1
  pc.mesh.num_devices = 1
  base_dir = str(tmp_path / "base")
  assert jobs.pretrain(pc, base_dir)["step"] == 2

  rc = digits_reward.get_config()
  rc.train.steps, rc.train.batch_size, rc.train.log_every = 3, 16, 3
  reward_dir = str(tmp_path / "reward")
  summary = image_eval.train_reward_classifiers(rc, reward_dir)
  assert 0.0 <= summary["A_test_accuracy"] <= 1.0
  apply_b, _, params_b, info = builders.load_classifier(reward_dir, "B")
  # (jitted: one program; eagerly every convolution compiles on its own)
  assert info["arch"] == "wide_cnn" and jax.jit(apply_b)(params_b, jnp.zeros((2, 8, 8, 1))).shape == (2, 10)

  fc = digits_finetune.get_config()
  fc.model.update(UNET)
  fc.base_checkpoint, fc.reward.checkpoint = base_dir, reward_dir
  fc.am.num_steps, fc.am.num_random_timesteps, fc.am.num_last_timesteps = 4, 1, 1
  fc.finetune.steps, fc.finetune.batch_size, fc.finetune.log_every = 2, 4, 1
  fc.finetune.parameterisation, fc.am.reward_multiplier = "full", 1.0
  fc.eval.num_samples, fc.eval.samples_per_class, fc.eval.num_steps, fc.eval.grid_per_class = 8, 3, 4, 2
  run_dir = str(tmp_path / "lam1_full")
  out = jobs.finetune(fc, run_dir)
  assert out["step"] == 2 and np.isfinite(out["reward_mean_finetuned_ode"])
  rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
  assert os.path.getsize(os.path.join(run_dir, "grid.png")) > 0

  # Reloading the run takes ITS config (stored with the checkpoints), whatever config the caller holds.
  other = fc.copy_and_resolve_references()
  other.finetune.parameterisation, other.am.reward_multiplier = "lora", 8.0
  problem, params = jobs.load_finetuned(other, run_dir)
  assert problem.parameterisation == "full" and problem.lam == 1.0
  assert {k for k in params} == {k for k in problem.base_params}

  eval_dir = str(tmp_path / "eval")
  metrics = image_eval.evaluate(other, eval_dir, [run_dir])
  assert set(metrics) >= {"real_data", "real_test", "base", "lam1_full"}
  settings = {"ode_w1", "ode_w2", "memoryless_w1", "memoryless_w2"}
  for name in ("base", "lam1_full"):
    assert set(metrics[name]) == settings
    for m in metrics[name].values():
      assert all(np.isfinite(v) for v in m.values()), m
  for s in settings:
    assert os.path.getsize(os.path.join(eval_dir, f"grid_{s}.png")) > 0
  assert "| base |" in image_eval.table(metrics) and os.path.isfile(os.path.join(eval_dir, "eval.json"))
