r"""Samples a fine-tuned (or base) model from its workdir with any diffusion coefficient.

    python -m experiments.sample --config=configs/gmm2d.py --workdir=runs/gmm2d \
        --diffusion=ode --num_samples=10000 --num_steps=40

Loads the latest fine-tuning checkpoint of ``--workdir`` (``--which=base`` samples the frozen base
instead), draws samples with ``--diffusion`` ('ode', 'memoryless' or a constant such as '0.5'),
and writes ``samples_<which>_<diffusion>.npz`` and a scatter PNG (2-D data) to the workdir, plus
the mean reward and, when the data is an exact mixture, the sliced W1 to the exact tilted target
in ``samples_<which>_<diffusion>.json``.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from am_jax import parameterisation
from am_jax import builders, checkpointing, gmm as gmm_lib, metrics as metrics_lib, models, sampling, sharding
from am_jax import training
from experiments import common, finetune, pretrain

flags.DEFINE_string("diffusion", "ode", "'ode', 'memoryless' or a constant sigma, e.g. '0.5'.")
flags.DEFINE_integer("num_samples", 10_000, "How many samples.")
flags.DEFINE_integer("num_steps", 0, "Sampler steps; 0 = the training grid (config.am.num_steps).")
flags.DEFINE_enum("which", "finetuned", ["finetuned", "base"], "Which model to sample.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
FLAGS = flags.FLAGS


def run(cfg, workdir, diffusion="ode", num_samples=10_000, num_steps=0, which="finetuned", seed=0) -> dict:
  builders.validate_finetune(cfg)
  try:
    diffusion = float(diffusion)
  except ValueError:
    pass
  mesh = sharding.make_mesh(cfg.mesh.num_devices)
  base_dir = cfg.base_checkpoint or os.path.join(workdir, "base")
  base_apply, base_params, _ = finetune.load_base(base_dir, mesh)
  base_params = pretrain.to_local(base_params)
  schedule = builders.build_schedule(cfg)
  if which == "base":
    apply_fn, params = base_apply, base_params
  else:
    net_apply, params0, residual = finetune.build_finetuned(cfg, base_apply, base_params)
    optimizer = builders.build_optimizer(cfg, "finetune.optimizer", cfg.finetune.steps)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"No fine-tuning checkpoint in {workdir}/checkpoints.")
    state = ckpt.restore(None, training.init_state(params0, optimizer, cfg.seed), mesh)
    ckpt.close()
    params = pretrain.to_local(state.ema_params if cfg.finetune.ema_decay else state.params)
    apply_fn = net_apply if residual is None else parameterisation.residual_model(base_apply, base_params, net_apply,
                                                                        schedule, residual)
  k = num_steps or cfg.am.num_steps
  shape = (num_samples,) + builders.data_shape(cfg)
  xs = np.asarray(jax.jit(lambda p, key: sampling.sample(apply_fn, p, key, shape, schedule, diffusion, k,
                                                         cfg.am.time_offset))(params, jax.random.PRNGKey(seed)))
  reward_fn, tilt = builders.build_reward(cfg, shape[-1])
  out = {"which": which, "diffusion": str(diffusion), "num_steps": k, "reward_mean": float(jnp.mean(reward_fn(xs)))}
  exact = builders.exact_data_mixture(cfg)
  if exact is not None:
    ref = np.asarray(gmm_lib.sample(tilt(exact), jax.random.PRNGKey(seed + 1), num_samples))
    out["to_target_sliced_w1"] = metrics_lib.sliced_wasserstein1(xs, ref)
  if jax.process_index() == 0:
    stem = os.path.join(workdir, f"samples_{which}_{diffusion}")
    np.savez_compressed(stem + ".npz", samples=xs)
    with open(stem + ".json", "w") as f:
      json.dump(out, f, indent=2)
    if xs.ndim == 2 and xs.shape[1] == 2:
      import matplotlib
      matplotlib.use("Agg")
      import matplotlib.pyplot as plt
      fig, ax = plt.subplots(figsize=(4, 4))
      ax.scatter(xs[:5000, 0], xs[:5000, 1], s=1, alpha=0.4)
      ax.set_title(f"{which}, {diffusion}, K={k}", fontsize=9)
      ax.set_aspect("equal")
      fig.savefig(stem + ".png", dpi=100)
      plt.close(fig)
  return out


def main(argv):
  del argv
  cfg = FLAGS.config
  common.maybe_initialize_distributed(cfg)
  print(run(cfg, FLAGS.workdir, FLAGS.diffusion, FLAGS.num_samples, FLAGS.num_steps, FLAGS.which, FLAGS.seed))


if __name__ == "__main__":
  common.define_flags()
  app.run(main)
