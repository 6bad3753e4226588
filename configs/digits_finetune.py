r"""Adjoint Matching on the 8x8 digits U-Net: class-conditional prompt consistency.

    am-jax pretrain --config=configs/digits_pretrain.py --config.pretrain.steps=3000 --workdir=runs/digits_base
    am-jax train-reward --config=configs/digits_reward.py --workdir=runs/digits_reward
    am-jax finetune --config=configs/digits_finetune.py --config.am.reward_multiplier=2 --workdir=runs/digits_lam2
    am-jax finetune --config=configs/digits_finetune.py --config.am.reward_multiplier=8 --workdir=runs/digits_lam8
    am-jax evaluate --config=configs/digits_finetune.py --workdir=runs/digits_eval \
        --runs=runs/digits_lam2,runs/digits_lam8

The fine-tuned model is a full copy of the base U-Net (``finetune.parameterisation='full'``; 'lora' trains
low-rank adapters only); labels are drawn uniformly (``finetune.cond=''`` with a class-conditional base);
the reward is r(x, y) = log p_A(y | x) of classifier A (``reward.name='prompt'``; 'target_class' and 'ink'
are the other choices); lambda = ``am.reward_multiplier``.

Measured (2-core CPU, shared, 2026-11-25, before the one-launcher redesign; docs/images.md): pre-training
3000 steps ~9.5 min; classifiers 70 s (test accuracy A 0.9966, B 0.9966); fine-tuning 300 steps ~3.3 min
per lambda (1.5-1.6 steps/s); evaluation 69 s.  ODE, no guidance, 500 samples: reward_A (train) base -0.073 ->
lambda 2: -0.025 -> lambda 8: -0.0086; reward_B (held out) -0.067 -> -0.018 -> -0.0098; diversity 7.71 ->
7.18 -> 6.90; FD to test digits 3.99 -> 4.19 -> 4.32 (real-data floor at this sample size 4.06).
"""
import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "digits"
  c.seed = 0
  c.schedule = "linear"  # must match the base
  c.data = dict(name="digits", num_samples=1500)
  c.model = dict(kind="unet", channels=(32, 64), time_embed_dim=64, num_classes=10)
  c.base_checkpoint = "runs/digits_base"
  c.reward = dict(name="prompt", target_class=0, checkpoint="runs/digits_reward", classifier="A")
  # chunk_loss=1: the loss one time step (B rows of the U-Net) at a time, the gradient accumulated per chunk: the
  # same loss and gradient, 1.1-1.6x faster steps on a 2-core CPU (docs/performance.md section 12.14); 0 (one
  # call at all M B points) reproduces runs made before 2026-11-27 bit for bit and may suit a GPU better.
  c.am = dict(reward_multiplier=2.0, num_steps=20, time_offset=0.5, noiseless_last_step=True,
              num_random_timesteps=4, random_timestep_fraction=0.75, num_last_timesteps=4,
              loss_clip=config_dict.placeholder(float), solver="scan", diffusion="memoryless",
              remat_segments=0, chunk_loss=1, reuse_base_velocity=True, network_dtype="float32",
              integrator="euler")  # or "exponential" (docs/maths.md section 6; method "am" only)
  c.method = dict(name="am", options="")
  c.finetune = dict(steps=300, batch_size=32, parameterisation="full", hidden=(64,), lora_rank=4, ema_decay=0.0,
                    log_every=50, cond="",
                    on_nonfinite="halt",  # or 'skip': drop a non-finite update and count it
                    optimizer=dict(name="adam", learning_rate=1e-4, warmup_steps=10, decay="constant",
                                   grad_clip=1.0, weight_decay=0.0))
  c.checkpoint = dict(every_steps=100, max_to_keep=1, async_save=True, verify=True)
  # Fields allowed to differ from the run's stored config on resume ("a.b,c" or "all"; see jobs.check_resume).
  c.resume = dict(allow_changes="")
  c.mesh = dict(num_devices=1)
  c.distributed = dict(enabled=False, coordinator_address="", num_processes=0, process_id=-1)
  c.eval = dict(num_samples=100, num_steps=20, every=0, watch_samples=64, samples_per_class=50, guidance=2.0,
                grid_per_class=8, at_end=True)
  return c
