r"""Fine-tunes a flow-matching base with Adjoint Matching: the project's main job.

    python -m experiments.finetune --config=configs/gmm2d.py --workdir=runs/gmm2d

1. Base: loads ``config.base_checkpoint`` (an ``experiments.pretrain`` workdir) or, when empty,
   pre-trains one into ``<workdir>/base`` (resuming it if it exists).
2. Fine-tunes with one jitted, sharded step per iteration (``am_jax.training.make_finetune_step``),
   checkpointing with Orbax into ``<workdir>/checkpoints`` (rerun the same command to resume).
3. Samples the fine-tuned model with the ODE and the memoryless SDE and writes ``metrics.json``
   (sliced W1 to the exact tilted target when the data is an exact mixture) and ``scatter.png``.

Multi-host: add ``--config.distributed.enabled=True`` (TPU pods / SLURM discover the rest; on bare
machines also set coordinator_address, num_processes, process_id).  See README "Launching".
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx

from am_jax import parameterisation
from am_jax import builders, checkpointing, gmm as gmm_lib, metrics as metrics_lib, models
from am_jax import sampling, sharding, training
from experiments import common, pretrain



def load_base(base_dir: str, mesh):
  """(apply_fn, params, config) of a pre-trained base saved by ``experiments.pretrain``."""
  ckpt = checkpointing.Checkpointer(os.path.join(base_dir, "checkpoints"))
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f"config.base_checkpoint={base_dir!r} holds no checkpoint.")
  cfg = ml_collections.ConfigDict(ckpt.restore_config())
  apply_fn, params = builders.build_model(cfg, builders.data_shape(cfg), cfg.seed)
  optimizer = builders.build_optimizer(cfg, "pretrain.optimizer", cfg.pretrain.steps)
  state = ckpt.restore(None, training.init_state(params, optimizer, cfg.seed), mesh)
  ckpt.close()
  return apply_fn, pretrain.base_params(state, cfg.pretrain.ema_decay), cfg


def build_finetuned(cfg, base_apply, base_params):
  """(net_apply, init_params, residual) of the fine-tuned model for cfg.finetune.parameterisation."""
  param = cfg.finetune.parameterisation
  if param == "full":  # fine-tune every weight, starting from the base
    return base_apply, jax.tree.map(jnp.copy, base_params), None
  net = models.MLP(2, hidden=tuple(cfg.finetune.hidden), time_embed_dim=cfg.model.time_embed_dim,
                   zero_init_output=True, rngs=nnx.Rngs(cfg.seed + 1))
  net_apply, params = models.functional(net)
  return net_apply, params, param


def run(cfg: ml_collections.ConfigDict, workdir: str, stop_after: int | None = None, return_state: bool = False):
  """Runs (or resumes) the whole job; returns the summary written to ``metrics.json``.

  ``stop_after``: stop abruptly after that many steps (no final save; used to test resuming).
  ``return_state``: also return the final TrainState (``(summary, state)``).
  """
  t_start = time.perf_counter()
  builders.validate_finetune(cfg)
  mesh = sharding.make_mesh(cfg.mesh.num_devices)
  base_dir = cfg.base_checkpoint or os.path.join(workdir, "base")
  if not cfg.base_checkpoint:
    pretrain.run(cfg, base_dir)
  base_apply, base_params, base_cfg = load_base(base_dir, mesh)
  am_config = builders.build_am_config(cfg)
  reward_fn, tilt = builders.build_reward(cfg, 2)
  fc = cfg.finetune
  net_apply, params, residual = build_finetuned(cfg, base_apply, pretrain.to_local(base_params))
  optimizer = builders.build_optimizer(cfg, "finetune.optimizer", fc.steps)
  state = training.init_state(params, optimizer, cfg.seed)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint.max_to_keep,
                                    cfg.checkpoint.every_steps, cfg.checkpoint.get("async_save", True))
  if ckpt.latest_step() is not None:
    state = ckpt.restore(None, state, mesh)
  else:
    state = sharding.replicate_tree(state, mesh)
  start = int(pretrain.to_local(state.step))
  step_fn = training.make_finetune_step(net_apply, base_apply, reward_fn, am_config, optimizer, (fc.batch_size, 2),
                                        mesh, fc.ema_decay, residual=residual)
  writer = common.MetricsWriter(workdir)
  progress = common.Progress("finetune", fc.steps, start)
  cfg_dict = cfg.to_dict()
  done = start
  t_loop = time.perf_counter()
  for s in range(start, fc.steps):
    state, m = step_fn(state, base_params)
    done = s + 1
    ckpt.save(done, state, cfg_dict)
    if done % fc.log_every == 0 or done == fc.steps or done == start + 1:
      m = {k: float(v) for k, v in pretrain.to_local(m).items()}
      m["steps_per_s"] = progress.tick(done, m)
      writer.write(done, m)
    if stop_after is not None and done >= stop_after:
      # Simulated crash (tests): leave without the final save; a rerun resumes from the last
      # committed checkpoint and replays the lost steps with the same keys.
      ckpt.close()
      return {"step": done, "stopped_early": True}
  loop_seconds = time.perf_counter() - t_loop
  if done > start and ckpt.latest_step() != done:
    ckpt.save(done, state, cfg_dict, force=True)
  ckpt.close()
  summary = {"step": done, "finetune_loop_seconds": loop_seconds,
             "finetune_steps_per_s": (done - start) / loop_seconds if done > start else None}
  final_params = pretrain.to_local(state.ema_params if fc.ema_decay else state.params)
  if done >= fc.steps:
    summary.update(evaluate(cfg, workdir, base_apply, pretrain.to_local(base_params), net_apply, residual,
                            final_params, reward_fn, tilt))
  summary["total_seconds"] = time.perf_counter() - t_start
  writer.final(summary)
  return (summary, state) if return_state else summary


def evaluate(cfg, workdir, base_apply, base_params, net_apply, residual, params, reward_fn, tilt) -> dict:
  """Samples base and fine-tuned models; distances to the exact tilted target; scatter plot."""
  schedule = builders.build_schedule(cfg)
  n = cfg.eval.num_samples
  k_steps = cfg.eval.num_steps or cfg.am.num_steps
  if residual is None:
    ft_apply = net_apply
  else:
    ft_apply = parameterisation.residual_model(base_apply, base_params, net_apply, schedule, residual)
  draw = lambda fn, p, diffusion: np.asarray(jax.jit(lambda p_, k: sampling.sample(  # noqa: E731
      fn, p_, k, (n, 2), schedule, diffusion, k_steps, cfg.am.time_offset))(p, jax.random.PRNGKey(cfg.seed + 99)))
  samples = {"base_ode": draw(base_apply, base_params, "ode"), "finetuned_ode": draw(ft_apply, params, "ode"),
             "finetuned_memoryless": draw(ft_apply, params, "memoryless")}
  out = {f"reward_mean_{k}": float(jnp.mean(reward_fn(jnp.asarray(v)))) for k, v in samples.items()}
  exact = builders.exact_data_mixture(cfg)
  target_samples = None
  if exact is not None:
    target = tilt(exact)
    target_samples = np.asarray(gmm_lib.sample(target, jax.random.PRNGKey(cfg.seed + 5), n))
    ref2 = np.asarray(gmm_lib.sample(target, jax.random.PRNGKey(cfg.seed + 6), n))
    out["target_noise_floor_sliced_w1"] = metrics_lib.sliced_wasserstein1(ref2, target_samples)
    out["exact_target_reward_mean"] = float(jnp.mean(reward_fn(jnp.asarray(target_samples))))
    for k, v in samples.items():
      out[f"{k}_to_target_sliced_w1"] = metrics_lib.sliced_wasserstein1(v, target_samples)
  if jax.process_index() == 0:
    _scatter(os.path.join(workdir, "scatter.png"), samples, target_samples, out)
  return out


def _scatter(path, samples, target_samples, out):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = [("base (ODE)", samples["base_ode"], "base_ode"),
            ("fine-tuned (ODE)", samples["finetuned_ode"], "finetuned_ode"),
            ("fine-tuned (memoryless SDE)", samples["finetuned_memoryless"], "finetuned_memoryless")]
  if target_samples is not None:
    panels.append(("exact tilted target", target_samples, None))
  fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), sharex=True, sharey=True)
  for ax, (title, xs, key) in zip(axes, panels):
    ax.scatter(xs[:4000, 0], xs[:4000, 1], s=1, alpha=0.4)
    if key and f"{key}_to_target_sliced_w1" in out:
      title += f"\nSW1 to target {out[f'{key}_to_target_sliced_w1']:.3f}"
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  cfg = flags.FLAGS.config
  common.maybe_initialize_distributed(cfg)
  summary = run(cfg, flags.FLAGS.workdir)
  print({k: v for k, v in summary.items()})


if __name__ == "__main__":
  common.define_flags()
  app.run(main)
