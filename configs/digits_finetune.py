r"""Adjoint Matching on the 8x8 digits U-Net: class-conditional prompt consistency (issue 4).

    python -m experiments.pretrain --config=configs/digits_pretrain.py --config.pretrain.steps=3000 \
        --workdir=runs/digits_base
    python -m experiments.train_reward --config=configs/digits_reward.py --workdir=runs/digits_reward
    python -m experiments.finetune_images --config=configs/digits_finetune.py --workdir=runs/digits_ft
    python -m experiments.evaluate --config=configs/digits_finetune.py --workdir=runs/digits_ft

The fine-tuned model is a full copy of the base U-Net (``residual=None``); labels are drawn
uniformly by ``cond_fn``; the reward is r(x, y) = log p_A(y | x) of classifier A
(``reward.name='prompt'``; 'target_class' and 'ink' are the other choices).  One run per entry of
``lambdas`` (the reward multiplier), each in ``<workdir>/lam_<lambda>``.

Measured (2-core CPU, shared, 2026-11-25; full table in BUILD_NOTES.md section 11): pre-training 3000 steps
~9.5 min; classifiers 70 s (test accuracy A 0.9966, B 0.9966); fine-tuning 2 x 300 steps 6 min 41 s
(1.5-1.6 steps/s); evaluation 69 s.  ODE, no guidance, 500 samples:
reward_A (train) base -0.073 -> lambda 2: -0.025 -> lambda 8: -0.0086; reward_B (held out) -0.067 ->
-0.018 -> -0.0098; diversity 7.71 -> 7.18 -> 6.90 (-7 % / -10 %); FD to test digits 3.99 -> 4.19 -> 4.32
(real-data floor at this sample size 4.06).
"""
import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.schedule = "linear"  # must match the base
  c.base_checkpoint = "runs/digits_base"
  c.reward_checkpoint = "runs/digits_reward"
  c.reward = dict(name="prompt", target_class=0)
  c.lambdas = (2.0, 8.0)
  c.am = dict(reward_multiplier=1.0, num_steps=20, time_offset=0.5, noiseless_last_step=True,
              num_random_timesteps=4, random_timestep_fraction=0.75, num_last_timesteps=4,
              loss_clip=config_dict.placeholder(float), solver="scan", diffusion="memoryless")
  c.finetune = dict(steps=300, batch_size=32, ema_decay=0.0, log_every=50,
                    optimizer=dict(name="adam", learning_rate=1e-4, warmup_steps=10, decay="constant",
                                   grad_clip=1.0, weight_decay=0.0))
  c.mesh = dict(num_devices=1)
  c.eval = dict(samples_per_class=50, num_steps=20, guidance=2.0, grid_per_class=8)
  return c
