"""Training system: sharded step = single-device step, kill-and-resume, multi-process, configs, base quality."""
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from am_jax import builders, checkpointing, gmm, jobs, losses, methods, models, rewards, schedules, sharding, training
from am_jax.problem import Problem
from tests import launch_helpers

S = schedules.LinearSchedule()


def _leaves(tree):
  return [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(tree)]


def test_sharded_step_matches_single_device():
  """8 forced CPU devices vs 1: same loss and parameters after 3 steps (tolerance 1e-5 relative:
  only the order of the batch reductions differs; the noise is identical by construction)."""
  assert jax.device_count() == 8
  base = gmm.ring_2d(4, 1.5, 0.3)
  base_apply = lambda p, x, t: gmm.velocity(p, x, t, S)  # noqa: E731
  net_apply, params = models.functional(models.MLP(2, hidden=(32, 32), rngs=nnx.Rngs(0)))
  opt = training.make_optimizer("adam", 1e-3, warmup_steps=2)
  config = losses.AMConfig(num_steps=10, loss_clip=None)
  problem = Problem(base_apply=base_apply, base_params=base, net_apply=net_apply, init_params=params,
                    parameterisation="control", config=config, reward_fn=rewards.linear_reward(jnp.array([1.0, 0.0])),
                    sample_shape=(2,))
  out = {}
  for n in (1, 8):
    mesh = sharding.make_mesh(n)
    state = sharding.replicate_tree(training.init_state(params, opt, 0), mesh)
    step = training.make_finetune_step(problem, methods.am(config), opt, 64, mesh, ema_decay=0.9)
    bp = sharding.replicate_tree(base, mesh)
    history = []
    for _ in range(3):
      state, m = step(state, bp)
      history.append(float(m["loss"]))
    assert state.params is not None and int(state.step) == 3
    out[n] = (history, _leaves(state.params), _leaves(state.ema_params))
  np.testing.assert_allclose(out[1][0], out[8][0], rtol=1e-5)
  for a, b in zip(out[1][1] + out[1][2], out[8][1] + out[8][2]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="batch_size"):
    training.make_finetune_step(problem, methods.am(config), opt, 60, sharding.make_mesh(8))


def test_kill_and_resume_gives_identical_parameters(tmp_path, tiny_base_dir):
  cfg = launch_helpers.tiny_config(**{"mesh.num_devices": 2, "base_checkpoint": tiny_base_dir})
  _, ref, _ = jobs.finetune(cfg, str(tmp_path / "uninterrupted"), return_state=True)
  # Crash after step 8 (last committed checkpoint: step 5), then rerun the same command.
  out = jobs.finetune(cfg, str(tmp_path / "killed"), stop_after=8)
  assert out.get("stopped_early")
  summary, resumed, _ = jobs.finetune(cfg, str(tmp_path / "killed"), return_state=True)
  assert summary["step"] == cfg.finetune.steps
  for a, b in zip(_leaves(ref) , _leaves(resumed)):
    np.testing.assert_array_equal(a, b)  # bit-identical on CPU
  rows = [json.loads(l) for l in open(tmp_path / "killed" / "metrics.jsonl")]
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), steps  # no duplicate rows after the resume
  assert rows[-1]["step"] == cfg.finetune.steps and "steps_per_s" in rows[-1]
  final = json.load(open(tmp_path / "killed" / "metrics.json"))
  assert "finetuned_ode_to_target_sliced_w1" in final
  assert os.path.exists(tmp_path / "killed" / "scatter.png")
  # A rerun of the finished job says so and leaves its metrics intact.
  again = jobs.finetune(cfg, str(tmp_path / "killed"))
  assert again == final and json.load(open(tmp_path / "killed" / "metrics.json")) == final
  out = jobs.sample(cfg, str(tmp_path / "killed"), diffusion="0.5", num_samples=256)
  assert np.isfinite(out["reward_mean"]) and out["num_steps"] == cfg.am.num_steps
  assert np.load(tmp_path / "killed" / "samples_finetuned_0.5.npz")["samples"].shape == (256, 2)


def test_sigkill_during_run_then_resume(tmp_path, tiny_base_dir):
  """A real SIGKILL of the launcher at an arbitrary point after the first checkpoint, then a rerun
  of the same command: the final parameters equal an uninterrupted (in-process) run bit for bit."""
  base_dir = tiny_base_dir
  cfg = launch_helpers.tiny_config(**{"mesh.num_devices": 1, "base_checkpoint": base_dir, "finetune.steps": 150,
                                      "checkpoint.every_steps": 10, "finetune.log_every": 10})
  workdir = str(tmp_path / "run")
  overrides = ["--config.finetune.steps=150", "--config.checkpoint.every_steps=10", "--config.finetune.log_every=10",
               f"--config.base_checkpoint={base_dir}", "--config.mesh.num_devices=1",
               "--config.data.num_samples=4000", "--config.model.hidden=(32,32)", "--config.am.num_steps=8",
               "--config.am.num_random_timesteps=2", "--config.am.num_last_timesteps=2",
               "--config.finetune.batch_size=32", "--config.finetune.hidden=(16,)", "--config.finetune.ema_decay=0.9",
               "--config.eval.num_samples=512"]
  cmd = ["-m", "experiments.finetune", "--config=configs/gmm2d.py", f"--workdir={workdir}"] + overrides
  proc = launch_helpers.python(cmd, 1, stdout_file=open(tmp_path / "killed.log", "w"))  # a file: a full pipe would stall it
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = []
  try:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
      if steps and max(steps) >= 30:
        break
      time.sleep(0.1)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
  assert steps and max(steps) < 150, f"the run was not interrupted (checkpoints {steps})"
  proc = launch_helpers.python(cmd, 1)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  resumed = json.load(open(os.path.join(workdir, "metrics.json")))
  assert resumed["step"] == 150
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  _, ref, _ = jobs.finetune(cfg, str(tmp_path / "ref"), return_state=True)
  got = ckpt.restore(None, ref, sharding.make_mesh(1))
  ckpt.close()
  for a, b in zip(_leaves(ref), _leaves(got)):
    np.testing.assert_array_equal(a, b)


def test_two_processes_jax_distributed(tmp_path):
  """Two processes x 2 CPU devices (gloo): sharded fine-tuning + Orbax save/restore; matches 1 process x 4."""
  port = launch_helpers.free_port()
  workdir = str(tmp_path / "dist")
  # Output goes to files, not pipes: reading one worker's pipes while the other fills its own
  # (glog is chatty) would block that worker inside a collective and deadlock both.
  logs = [open(tmp_path / f"worker{i}.log", "w+") for i in range(2)]
  procs = [launch_helpers.python(["tests/distributed_worker.py", str(port), str(i), workdir], 2,
                                 stdout_file=logs[i]) for i in range(2)]
  results = []
  try:
    for p, log in zip(procs, logs):
      p.wait(timeout=400)
      log.seek(0)
      text = log.read()
      assert p.returncode == 0, text[-4000:]
      results.append(json.loads([l for l in text.splitlines() if l.startswith("RESULT ")][-1][7:]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  r0, r1 = sorted(results, key=lambda r: r["pid"])
  assert r0["step"] == r1["step"] == 12
  assert r0["restored_equals_final"] and r1["restored_equals_final"]
  assert r0["checksum"] == r1["checksum"]  # replicated params agree across hosts
  assert r0["local_noise_sum"] != r1["local_noise_sum"]  # hosts hold different slices of the noise
  # The same job on one process with 4 devices.
  cfg = launch_helpers.tiny_config(**{"mesh.num_devices": 4})
  _, state, _ = jobs.finetune(cfg, str(tmp_path / "single"), return_state=True)
  checksum = float(sum(np.sum(np.abs(x)) for x in _leaves(state.params)))
  np.testing.assert_allclose(r0["checksum"], checksum, rtol=1e-4)
  single = [json.loads(l) for l in open(tmp_path / "single" / "metrics.jsonl")]
  np.testing.assert_allclose(r0["last_loss"], single[-1]["loss"], rtol=1e-4)


@pytest.mark.parametrize("field, value", [
    ("finetune.batch_size", 0), ("finetune.parameterisation", "residual"), ("am.num_steps", 0),
    ("am.diffusion", "sometimes"), ("finetune.optimizer.learning_rate", -1.0), ("data.name", "cifar"),
    ("reward.name", "aesthetic"), ("schedule", "sigmoid"), ("checkpoint.max_to_keep", 0),
    ("model.hidden", ()), ("am.reward_multiplier", 0.0),
])
def test_invalid_config_names_the_field(field, value):
  cfg = launch_helpers.tiny_config()
  node = cfg
  *path, last = field.split(".")
  for p in path:
    node = node[p]
  node[last] = value
  with pytest.raises(builders.ConfigError, match=field.replace(".", r"\.")):
    builders.validate_finetune(cfg)


def test_batch_not_divisible_by_devices_fails_at_start(tmp_path):
  cfg = launch_helpers.tiny_config(**{"finetune.batch_size": 30})
  with pytest.raises(ValueError, match="batch_size"):
    jobs.finetune(cfg, str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing was pre-trained or written first


@pytest.mark.slow
def test_pretrained_2d_base_matches_data(tmp_path):
  """Flow-matching pre-training on the ring: sliced W1 of base samples to the data below 0.08
  (measured 0.041 with the gmm2d defaults; noise floor 0.020; an untrained net is > 1)."""
  # One device: 8 forced host devices on 2 busy cores can starve XLA's CPU collectives (BUILD_NOTES.md).
  cfg = launch_helpers.tiny_config(**{"mesh.num_devices": 1, "pretrain.steps": 3000, "model.hidden": (128, 128, 128), "am.num_steps": 40,
                                      "data.num_samples": 50000, "pretrain.batch_size": 512,
                                      "pretrain.log_every": 1000, "pretrain.checkpoint.every_steps": 1000})
  summary = jobs.pretrain(cfg, str(tmp_path))
  assert summary["base_to_data_sliced_w1"] < 0.08, summary


def test_unet_and_image_pretraining_step():
  """Class-conditional U-Net on the bundled 8x8 digits: shapes, null label, loss decreases."""
  from am_jax import data
  x, y = data.digits("train")
  assert x.shape[1:] == (8, 8, 1) and x.min() >= -1 and x.max() <= 1 and set(np.unique(y)) == set(range(10))
  net = models.UNet(1, (16, 32), 32, num_classes=10, rngs=nnx.Rngs(0))
  apply_fn, params = models.functional(net)
  out = apply_fn(params, jnp.asarray(x[:4]), jnp.full((4,), 0.3), jnp.asarray(y[:4]))
  null = apply_fn(params, jnp.asarray(x[:4]), jnp.full((4,), 0.3))
  assert out.shape == (4, 8, 8, 1) and not np.allclose(out, null)
  opt = training.make_optimizer("adam", 2e-3)
  mesh = sharding.make_mesh(2)
  state = sharding.replicate_tree(training.init_state(params, opt, 0), mesh)
  step = training.make_pretrain_step(apply_fn, S, opt, 64, mesh, cond_drop_prob=0.1, null_label=10)
  data_dev = sharding.replicate_tree((x, y), mesh)
  first = None
  for _ in range(30):
    state, m = step(state, data_dev)
    first = float(m["loss"]) if first is None else first
  assert float(m["loss"]) < 0.8 * first
