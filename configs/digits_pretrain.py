r"""Pre-trains a class-conditional flow-matching U-Net on scikit-learn's 8x8 digits (bundled, offline).

    python -m experiments.pretrain --config=configs/digits_pretrain.py --workdir=runs/digits_base

Labels are dropped to the null label with probability ``pretrain.cond_drop_prob`` so classifier-free
guidance works.  The image fine-tuning workload (evaluation, rewards) is issue 4; this config
exercises the U-Net + image pre-training path of the training system.
"""
import ml_collections
from ml_collections import config_dict


def get_config():
  c = _ring_config()
  c.name = "digits"
  c.data = dict(name="digits", num_samples=1500)
  c.model = dict(kind="unet", channels=(32, 64), time_embed_dim=64, num_classes=10)
  c.pretrain = dict(
      steps=4000, batch_size=128, ema_decay=0.999, log_every=250, cond_drop_prob=0.1,
      optimizer=dict(name="adam", learning_rate=1e-3, warmup_steps=200, decay="cosine", grad_clip=1.0,
                     weight_decay=0.0),
      checkpoint=dict(every_steps=1000, max_to_keep=2))
  return ml_collections.ConfigDict(c)


def _ring_config():  # configs/gmm2d.py (kept self-contained: configs ship as package data)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.schedule = "linear"
  c.data = dict(name="ring", num_components=8, radius=2.0, std=0.25, num_samples=50_000)
  c.model = dict(kind="mlp", hidden=(128, 128, 128), time_embed_dim=32, num_classes=0)

  # Pre-training of the base (flow matching); used when base_checkpoint is empty.
  c.base_checkpoint = ""
  c.pretrain = dict(
      steps=3000, batch_size=512, ema_decay=0.999, log_every=500,
      optimizer=dict(name="adam", learning_rate=2e-3, warmup_steps=100, decay="cosine", grad_clip=1.0,
                     weight_decay=0.0),
      checkpoint=dict(every_steps=1000, max_to_keep=1))

  # Reward r(x) = -x^T A x / 2 + b^T x, with A = a I.
  c.reward = dict(name="quadratic", a=0.5, b=(1.0, 0.5), c=0.0)
  c.name = "gmm2d"

  # Adjoint Matching (paper values except loss_clip; docs/maths.md section 4).
  # chunk_loss=1: the loss one time step (B rows of the U-Net) at a time, the gradient accumulated per chunk: the
  # same loss and gradient, 1.1-1.6x faster steps on a 2-core CPU (docs/performance.md section 12.14); 0 (one
  # call at all M B points) reproduces runs made before 2026-11-27 bit for bit and may suit a GPU better.
  c.am = dict(reward_multiplier=1.0, num_steps=40, time_offset=0.5, noiseless_last_step=True,
              num_random_timesteps=10, random_timestep_fraction=0.75, num_last_timesteps=10,
              loss_clip=config_dict.placeholder(float), solver="scan", diffusion="memoryless",
              # Memory / precision options (docs/performance.md sections 12.3-12.4); the defaults store everything in float32.
              remat_segments=0, chunk_loss=1, reuse_base_velocity=True, network_dtype="float32",
              integrator="euler")  # or "exponential" (docs/maths.md section 6; method "am" only)

  # The fine-tuning method: am_jax.methods.build(name, AMConfig, **options) with name in am, eam, draft, refl, ...
  # and options as "key=value,key=value" (Python literals), e.g. --config.method.options="num_times=8,weights='exact'".
  c.method = dict(name="am", options="")

  c.finetune = dict(
      steps=1000, batch_size=256, parameterisation="control", hidden=(64, 64), lora_rank=4, ema_decay=0.0,
      log_every=100, cond="",
      on_nonfinite="halt",  # or 'skip': drop a non-finite update and count it
      optimizer=dict(name="adam", learning_rate=1e-3, warmup_steps=0, decay="constant", grad_clip=0.0,
                     weight_decay=0.0))
  c.checkpoint = dict(every_steps=250, max_to_keep=3, async_save=True, verify=True)
  # Fields allowed to differ from the run's stored config on resume ("a.b,c" or "all"; see jobs.check_resume).
  c.resume = dict(allow_changes="")
  c.mesh = dict(num_devices=-1)  # -1: every device of every host
  c.distributed = dict(enabled=False, coordinator_address="", num_processes=0, process_id=-1)
  # num_steps 0: the training grid (am.num_steps); every > 0: log the rewards on a fixed batch every N steps.
  c.eval = dict(num_samples=20_000, num_steps=0, every=0, watch_samples=256)
  return c
