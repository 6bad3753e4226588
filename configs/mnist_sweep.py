r"""Seeded reward–diversity sweep on 28x28 MNIST: lambda x seeds x {am (LoRA and full), eam, draft, refl}.

    am-jax sweep --config=mnist_sweep --workdir=runs/sweep_tiny                    # tiny: 2-core CPU smoke run
    am-jax sweep --config=mnist_sweep.py:size=full --workdir=runs/sweep            # the full grid on one GPU
    am-jax sweep --config=mnist_sweep.py:size=full,reward=thickness --workdir=runs/sweep_thickness

Variants by argument (``key=value`` pairs separated by commas):

* ``size``: ``tiny`` (default: DiT, 2 lambdas x 2 seeds, 3 steps of batch 4 on a 6-step grid; the whole pipeline,
  numbers meaningless: 2-4 min on 2 shared CPU cores) or ``full`` (U-Net, lambda in {1, 2, 4, 8} x 3 seeds, 200
  steps of batch 32, K = 20, 256 evaluation samples: 20 programs x 3 seeds; seeds vmapped in one program, compiles
  in 8 background threads; measured 6 min 50 s on one H200, 2026-11-25).
* ``size=cpu``: the full grid of lambdas, seeds and methods shrunk for 2 CPU cores (DiT, 25 steps of batch 8,
  K = 10, 128 evaluation samples): the sweep's shape with early-training numbers.
* ``arch``: ``unet`` or ``dit`` (default: per size), the shipped pre-trained bases (``shipped:mnist_<arch>``).
* ``guidance``: the classifier-free guidance weight w (default 1 = none).  w != 1 compares the two guidance
  modes with AM / LoRA: 'base' fine-tunes toward the tilt of the guided base v_null + w (v_c - v_null) and samples
  without guidance; 'sampling' fine-tunes the conditional base and samples with guidance w.  Needs conditional
  samples (``reward=thickness``): ``am-jax sweep --config=mnist_sweep.py:size=full,reward=thickness,guidance=2``.
* ``reward``: ``class`` (default) = log p_A(target | x) generated from the UNCONDITIONAL (null-label) model, target
  ``reward.target_class`` = 3, gold twin classifier B; ``thickness`` = the soft stroke width on uniform labels,
  gold twin the distance-transform width; ``combo`` = class + 0.3 thickness from the null label.

lambda lives in ``sweep.lambdas`` (each setting's ``AMConfig.reward_multiplier``); ``am.reward_multiplier`` is not
read.  Every field may be overridden: ``--config.sweep.lambdas='(1.0, 4.0, 16.0, 64.0)'``,
``--config.sweep.methods='("am", "refl")'``, ``--config.finetune.steps=500``.  ``am_jax/sweep.py`` describes the
metrics and outputs.
"""
import ml_collections
from ml_collections import config_dict

ARCHS = {
    "unet": dict(kind="unet", channels=(32, 64, 64), time_embed_dim=64, num_classes=10),
    "dit": dict(kind="transformer", patch_size=4, width=96, depth=4, num_heads=4, time_embed_dim=64, num_classes=10),
}
REWARDS = {
    "class": dict(name="target_class", terms="", cond="null"),
    "thickness": dict(name="thickness", terms="", cond=""),
    "combo": dict(name="weighted", terms="class:1.0,thickness:0.3", cond="null"),
}
# size -> (arch, lambdas, seeds, steps, batch, K, eval samples, watch every, parallel seeds, compile threads)
TINY = dict(arch="dit", lambdas=(1.0, 4.0), seeds=(0, 1), steps=3, batch_size=4, num_steps=6, eval_samples=32,
            watch_every=0, parallel_seeds=False, compile_threads=1)
FULL = dict(arch="unet", lambdas=(1.0, 2.0, 4.0, 8.0), seeds=(0, 1, 2), steps=200, batch_size=32, num_steps=20,
            eval_samples=256, watch_every=20, parallel_seeds=True, compile_threads=8)
CPU = dict(arch="dit", lambdas=(1.0, 2.0, 4.0, 8.0), seeds=(0, 1, 2), steps=25, batch_size=8, num_steps=10,
           eval_samples=128, watch_every=0, parallel_seeds=True, compile_threads=1)
SIZES = {"tiny": TINY, "cpu": CPU, "full": FULL}


def _parse(arg: str) -> dict:
  out = dict(size="tiny", arch="", reward="class", guidance="1")
  for item in [s for s in (arg or "").split(",") if s]:
    key, sep, value = item.partition("=")
    if not sep or key not in out:
      raise ValueError(f"configs/mnist_sweep.py:{arg}: expected key=value pairs with keys {sorted(out)}, got {item!r}.")
    out[key] = value
  if out["size"] not in SIZES:
    raise ValueError(f"configs/mnist_sweep.py: size must be one of {sorted(SIZES)}, got {out['size']!r}.")
  out["arch"] = out["arch"] or SIZES[out["size"]]["arch"]
  if out["arch"] not in ARCHS:
    raise ValueError(f"configs/mnist_sweep.py: arch must be one of {sorted(ARCHS)}, got {out['arch']!r}.")
  if out["reward"] not in REWARDS:
    raise ValueError(f"configs/mnist_sweep.py: reward must be one of {sorted(REWARDS)}, got {out['reward']!r}.")
  try:
    out["guidance"] = float(out["guidance"])
  except ValueError:
    raise ValueError(f"configs/mnist_sweep.py: guidance must be a number, got {out['guidance']!r}.") from None
  if out["guidance"] != 1.0 and REWARDS[out["reward"]]["cond"] == "null":
    raise ValueError(f"configs/mnist_sweep.py: guidance needs class-conditional samples; reward={out['reward']} "
                     "samples the null label (use reward=thickness).")
  return out


def get_config(arg: str = ""):
  a = _parse(arg)
  size, r = SIZES[a["size"]], REWARDS[a["reward"]]
  c = ml_collections.ConfigDict()
  c.name = f"mnist_sweep_{a['size']}_{a['arch']}_{a['reward']}"
  c.seed = 0
  c.schedule = "linear"
  c.data = dict(name="mnist", num_samples=4000)
  c.model = dict(ARCHS[a["arch"]])
  c.base_checkpoint = f"shipped:mnist_{a['arch']}"
  c.reward = dict(name=r["name"], terms=r["terms"], target_class=3, checkpoint="shipped:mnist_classifiers",
                  classifier="A", gold=True)
  # reward_multiplier is replaced by each of sweep.lambdas.
  # chunk_loss=1: the loss one time step (B rows of the U-Net) at a time, the gradient accumulated per chunk: the
  # same loss and gradient, 1.1-1.6x faster steps on a 2-core CPU (docs/performance.md section 12.14); 0 (one
  # call at all M B points) reproduces runs made before 2026-11-27 bit for bit and may suit a GPU better.
  c.am = dict(reward_multiplier=1.0, num_steps=size["num_steps"], time_offset=0.5, noiseless_last_step=True,
              num_random_timesteps=4, random_timestep_fraction=0.75, num_last_timesteps=4,
              loss_clip=config_dict.placeholder(float), solver="scan", diffusion="memoryless",
              remat_segments=0, chunk_loss=1, reuse_base_velocity=True, network_dtype="float32",
              integrator="euler")  # or "exponential" (docs/maths.md section 6; method "am" only)
  # parameterisation: that of every method but AM (AM runs with each of sweep.am_params); the learning rate is
  # sweep.learning_rates[parameterisation].
  c.finetune = dict(steps=size["steps"], batch_size=size["batch_size"], parameterisation="lora", hidden=(64,),
                    lora_rank=8, lora_scale=1.0, ema_decay=0.0, log_every=50, cond=r["cond"],
                    guidance=a["guidance"], guidance_mode="sampling",
                    optimizer=dict(name="adam", learning_rate=1e-3, warmup_steps=10, decay="constant", grad_clip=1.0,
                                   weight_decay=0.0))
  guided = a["guidance"] != 1.0
  c.sweep = dict(
      # With guidance: AM with LoRA in both guidance modes (the comparison of issue 13 item 6).
      methods=("am",) if guided else ("am", "eam", "draft", "refl"),
      am_params=("lora",) if guided else ("lora", "full"),
      guidance_modes=("base", "sampling") if guided else (),
      lambdas=size["lambdas"],
      seeds=size["seeds"],
      # Factory options per method (methods.build): EAM reads the data score at t_s = 0.9, as in
      # comparison.classifier_task (the velocity at t -> 1 gives a useless score on images).
      options=dict(am="", eam="score_time=0.9", draft="", refl=""),
      learning_rates=dict(lora=1e-3, full=1e-4),
      eval_samples=size["eval_samples"], eval_steps=0, grid_samples=16 if a["size"] == "tiny" else 32,
      watch_every=size["watch_every"], watch_samples=64,
      confidence=0.95, parallel_seeds=size["parallel_seeds"], compile_threads=size["compile_threads"],
      replot=False)  # True: only rebuild sweep.md / sweep.png from the workdir's sweep.json
  # The reward-hacking monitor of the watched runs (sweep.watch_every > 0): monitor.HackingMonitor's settings,
  # in the reward's own units (log-probability, or pixels for thickness).  The margins keep AM's plateau quiet: in
  # the full class sweep on 64 watch samples its gold reward wobbled by up to -0.19 while the trained one crept
  # up by up to +0.43 (seed noise), which margin = min_rise = 0 flagged in 6 of 24 AM runs.
  c.eval = dict(monitor=dict(window=4, margin=0.25, min_rise=0.1))
  # Read by the fine-tuning config checks only (the sweep writes no checkpoints).
  c.checkpoint = dict(every_steps=1000, max_to_keep=1, async_save=False)
  c.mesh = dict(num_devices=1)
  return c
