r"""Pre-trains a base velocity model with conditional flow matching and saves it with Orbax.

    python -m experiments.pretrain --config=configs/gmm2d.py --workdir=runs/base_ring

Uses the ``data``, ``model``, ``schedule`` and ``pretrain`` sections of the config.  The result
(``<workdir>/checkpoints/<step>/``: TrainState + config JSON) is what
``--config.base_checkpoint=<workdir>`` of ``experiments.finetune`` loads as the frozen base.
Rerunning the same command resumes from the latest checkpoint.
"""
from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import app, flags

from am_jax import builders, checkpointing, data as data_lib, gmm as gmm_lib, metrics as metrics_lib
from am_jax import sampling, sharding, training
from experiments import common



def to_local(tree):
  """Host NumPy copy of a replicated global pytree (works when it spans several processes)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def dataset(cfg) -> tuple:
  """(x,) for the 2-D toys, (x, labels) for labelled images."""
  d = cfg.data
  if d.name == "digits":
    return data_lib.digits("train")
  kwargs = {k: d[k] for k in ("num_components", "radius", "std") if k in d}
  return (data_lib.toy_2d(d.name, d.num_samples, seed=cfg.seed, **kwargs),)


def run(cfg: ml_collections.ConfigDict, workdir: str, stop_after: int | None = None) -> dict:
  """Trains (or resumes) the base model; returns the summary written to ``metrics.json``."""
  builders.validate_pretrain(cfg)
  mesh = sharding.make_mesh(cfg.mesh.num_devices)
  schedule = builders.build_schedule(cfg)
  pc = cfg.pretrain
  data = dataset(cfg)
  apply_fn, params = builders.build_model(cfg, data[0].shape[1:], cfg.seed)
  optimizer = builders.build_optimizer(cfg, "pretrain.optimizer", pc.steps)
  state = training.init_state(params, optimizer, cfg.seed)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), pc.checkpoint.max_to_keep,
                                    pc.checkpoint.every_steps)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(None, state, mesh)
  else:
    state = sharding.replicate_tree(state, mesh)
  start = int(to_local(state.step))
  labelled = len(data) > 1 and cfg.model.num_classes > 0
  step_fn = training.make_pretrain_step(apply_fn, schedule, optimizer, pc.batch_size, mesh, pc.ema_decay,
                                        cond_drop_prob=pc.get("cond_drop_prob", 0.0) if labelled else 0.0,
                                        null_label=cfg.model.num_classes)
  data_dev = sharding.replicate_tree(data if labelled else data[:1], mesh)
  writer = common.MetricsWriter(workdir)
  progress = common.Progress("pretrain", pc.steps, start)
  cfg_dict = cfg.to_dict()
  done = start
  for s in range(start, pc.steps):
    state, m = step_fn(state, data_dev)
    done = s + 1
    ckpt.save(done, state, cfg_dict)
    if done % pc.log_every == 0 or done == pc.steps or done == start + 1:
      m = {k: float(v) for k, v in to_local(m).items()}
      m["steps_per_s"] = progress.tick(done, m)
      writer.write(done, m)
    if stop_after is not None and done >= stop_after:
      # Simulated crash (tests): leave without the final save; a rerun resumes from the last
      # committed checkpoint and replays the lost steps with the same keys.
      ckpt.close()
      return {"step": done, "stopped_early": True}
  if done > start and ckpt.latest_step() != done:
    ckpt.save(done, state, cfg_dict, force=True)
  ckpt.close()
  summary = {"step": done}
  if done >= pc.steps and data[0].ndim == 2:
    summary.update(evaluate_base(cfg, apply_fn, to_local(base_params(state, pc.ema_decay)), schedule))
  writer.final(summary)
  return summary


def base_params(state: training.TrainState, ema_decay: float):
  return state.ema_params if ema_decay else state.params


def evaluate_base(cfg, apply_fn, params, schedule, num_samples: int = 20_000) -> dict:
  """Sliced W1 between ODE samples of the base (training grid of cfg.am) and fresh data samples."""
  xs = jax.jit(lambda p, k: sampling.sample(apply_fn, p, k, (num_samples, 2), schedule, "ode", cfg.am.num_steps,
                                            cfg.am.time_offset))(params, jax.random.PRNGKey(cfg.seed + 123))
  xs = np.asarray(xs)
  exact = builders.exact_data_mixture(cfg)
  if exact is not None:
    ref = np.asarray(gmm_lib.sample(exact, jax.random.PRNGKey(cfg.seed + 7), num_samples))
    ref2 = np.asarray(gmm_lib.sample(exact, jax.random.PRNGKey(cfg.seed + 8), num_samples))
  else:
    d = cfg.data
    ref = data_lib.toy_2d(d.name, num_samples, seed=cfg.seed + 7, std=d.get("std", 0.05))
    ref2 = data_lib.toy_2d(d.name, num_samples, seed=cfg.seed + 8, std=d.get("std", 0.05))
  return {"base_to_data_sliced_w1": metrics_lib.sliced_wasserstein1(xs, ref),
          "data_noise_floor_sliced_w1": metrics_lib.sliced_wasserstein1(ref2, ref)}


def main(argv):
  del argv
  cfg = flags.FLAGS.config
  common.maybe_initialize_distributed(cfg)
  summary = run(cfg, flags.FLAGS.workdir)
  print(summary)


if __name__ == "__main__":
  common.define_flags()
  app.run(main)
