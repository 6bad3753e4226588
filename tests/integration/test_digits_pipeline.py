"""The digits workload through the one launcher: pretrain -> reward classifiers -> finetune (two lambdas,
full and LoRA) -> evaluate, each on a shrunk config (one step or a few: flax lm1b ``train_test`` style)."""
import json
import os

import jax.numpy as jnp
import numpy as np

from am_jax import builders, image_eval, jobs
from configs import digits_finetune, digits_pretrain, digits_reward


def test_tiny_digits_pipeline(tmp_path):
  pc = digits_pretrain.get_config()
  pc.model.channels = (8, 16)
  pc.model.time_embed_dim = 16
  pc.pretrain.steps = 6
  pc.pretrain.batch_size = 16
  pc.pretrain.log_every = 3
  pc.pretrain.checkpoint.every_steps = 3
  pc.mesh.num_devices = 1
  base_dir = str(tmp_path / "base")
  jobs.pretrain(pc, base_dir)

  rc = digits_reward.get_config()
  rc.train.steps = 5
  rc.train.batch_size = 16
  rc.train.log_every = 5
  reward_dir = str(tmp_path / "reward")
  summary = image_eval.train_reward_classifiers(rc, reward_dir)
  assert 0.0 <= summary["A_test_accuracy"] <= 1.0
  apply_b, _, params_b, info = builders.load_classifier(reward_dir, "B")
  assert info["arch"] == "wide_cnn" and apply_b(params_b, jnp.zeros((2, 8, 8, 1))).shape == (2, 10)

  fc = digits_finetune.get_config()
  fc.model.channels, fc.model.time_embed_dim = (8, 16), 16
  fc.base_checkpoint, fc.reward.checkpoint = base_dir, reward_dir
  fc.am.num_steps = 4
  fc.am.num_random_timesteps = 1
  fc.am.num_last_timesteps = 1
  fc.finetune.steps = 2
  fc.finetune.batch_size = 4
  fc.finetune.log_every = 1
  fc.eval.num_samples = 8
  fc.eval.samples_per_class = 3
  fc.eval.num_steps = 4
  fc.eval.grid_per_class = 2
  runs = []
  for lam, param in ((1.0, "full"), (3.0, "lora")):
    fc.am.reward_multiplier = lam
    fc.finetune.parameterisation = param
    run_dir = str(tmp_path / f"lam{lam:g}_{param}")
    out = jobs.finetune(fc, run_dir)
    assert out["step"] == 2 and np.isfinite(out["reward_mean_finetuned_ode"])
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert rows[-1]["step"] == 2 and all(np.isfinite(r["loss"]) for r in rows)
    assert os.path.getsize(os.path.join(run_dir, "grid.png")) > 0
    runs.append(run_dir)

  eval_dir = str(tmp_path / "eval")
  metrics = image_eval.evaluate(fc, eval_dir, runs)
  names = [os.path.basename(r) for r in runs]
  assert set(metrics) >= {"real_data", "base", *names}
  settings = {"ode_w1", "ode_w2", "memoryless_w1", "memoryless_w2"}
  for name in ["base"] + names:
    assert set(metrics[name]) == settings
    for m in metrics[name].values():
      assert all(np.isfinite(v) for v in m.values()), m
  for s in settings:
    assert os.path.getsize(os.path.join(eval_dir, f"grid_{s}.png")) > 0
  assert "| base |" in image_eval.table(metrics)
