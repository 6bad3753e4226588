"""The training system end to end on the tiny 2-D job (``tests.launch_helpers.tiny_config``): an interrupted run
(stopped in-process, or SIGKILLed launcher process) resumes to parameters bit-identical to an uninterrupted run;
two processes under jax.distributed match one process; a bad batch fails before any work.  (The sharded step
itself: tests/test_training.py.)"""
import json
import os
import signal
import time

import jax
import numpy as np
import pytest

from am_jax import checkpointing, jobs
from tests import launch_helpers

# The run that is interrupted: long enough for a SIGKILL to land between the first checkpoint and the end.
STEPS, EVERY = 150, 10
OVERRIDES = {"mesh.num_devices": 1, "finetune.steps": STEPS, "checkpoint.every_steps": EVERY,
             "finetune.log_every": EVERY, "eval.num_samples": 256}


def _leaves(tree):
  return [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def reference(tiny_base_dir, tmp_path_factory):
  """(config, final params) of the uninterrupted run, shared by the two resume tests.  (It saves only at the end:
  checkpoints never change the numbers, and each save costs time; only its parameters are compared, so it skips
  the end-of-run evaluation, ``eval.at_end``.)"""
  cfg = launch_helpers.tiny_config(**OVERRIDES, base_checkpoint=tiny_base_dir)
  uninterrupted = launch_helpers.tiny_config(**{**OVERRIDES, "checkpoint.every_steps": STEPS, "eval.at_end": False},
                                             base_checkpoint=tiny_base_dir)
  _, state, _ = jobs.finetune(uninterrupted, str(tmp_path_factory.mktemp("uninterrupted")), return_state=True)
  return cfg, _leaves(state.params)


def test_stop_and_resume_gives_identical_parameters(tmp_path, reference):
  cfg, ref = reference
  # Crash after step 28 (last committed checkpoint: step 20), then rerun the same job.
  out = jobs.finetune(cfg, str(tmp_path), stop_after=28)
  assert out == {"step": 28, "stopped_early": True}
  assert checkpointing.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 20
  summary, resumed, _ = jobs.finetune(cfg, str(tmp_path), return_state=True)
  assert summary["step"] == STEPS
  for a, b in zip(ref, _leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)  # bit-identical on CPU
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  steps = [r["step"] for r in rows]
  # No duplicate rows after the resume, and the same rows as an uninterrupted run (the progress line of step 21,
  # the first after the restart, is printed but not logged: issue 15).
  assert steps == sorted(set(steps)) and 21 not in steps and 20 in steps, steps
  assert rows[-1]["step"] == STEPS and "steps_per_s" in rows[-1]
  final = json.load(open(tmp_path / "metrics.json"))
  assert "finetuned_ode_to_target_sliced_w1" in final and os.path.exists(tmp_path / "scatter.png")
  # A rerun of the finished job says so and leaves its metrics intact.
  again = jobs.finetune(cfg, str(tmp_path))
  assert again == final and json.load(open(tmp_path / "metrics.json")) == final
  out = jobs.sample(cfg, str(tmp_path), diffusion="0.5", num_samples=256)
  assert np.isfinite(out["reward_mean"]) and out["num_steps"] == cfg.am.num_steps
  assert np.load(tmp_path / "samples_finetuned_0.5.npz")["samples"].shape == (256, 2)
  out = jobs.sample(cfg, str(tmp_path), diffusion="ode", num_samples=256, num_steps=10, integrator="dpmpp_2m")
  assert np.isfinite(out["reward_mean"]) and (out["num_steps"], out["integrator"]) == (10, "dpmpp_2m")
  assert np.all(np.isfinite(np.load(tmp_path / "samples_finetuned_ode_dpmpp_2m.npz")["samples"]))


def test_sigkill_during_run_then_resume(tmp_path, reference, tiny_base_dir):
  """A real SIGKILL of the launcher process at an arbitrary point after the first checkpoint (an asynchronous
  save may be half written), then the same job again: the final parameters equal the uninterrupted run's.  (The
  end-of-run evaluation is checked by the test above: skipped here, ``eval.at_end``.)"""
  _, ref = reference
  over = {**OVERRIDES, "eval.at_end": False}
  cfg = launch_helpers.tiny_config(**over, base_checkpoint=tiny_base_dir)
  workdir = str(tmp_path / "run")
  overrides = [f"--config.{k}={v}" for k, v in over.items()] + [
      f"--config.base_checkpoint={tiny_base_dir}", "--config.data.num_samples=4000", "--config.model.hidden=(32,32)",
      "--config.am.num_steps=8", "--config.am.num_random_timesteps=2", "--config.am.num_last_timesteps=2",
      "--config.finetune.batch_size=32", "--config.finetune.hidden=(16,)", "--config.finetune.ema_decay=0.9"]
  cmd = ["-m", "experiments.finetune", "--config=configs/gmm2d.py", f"--workdir={workdir}"] + overrides
  log = open(tmp_path / "killed.log", "w")  # a file: a full pipe would stall the process
  proc = launch_helpers.python(cmd, 1, stdout_file=log)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = []
  try:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
      if steps and max(steps) >= 3 * EVERY:
        break
      time.sleep(0.05)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
  assert steps and max(steps) < STEPS, f"the run was not interrupted (checkpoints {steps}): {open(log.name).read()}"
  # The launcher's job, rerun with the same config (the config it stored with its checkpoints).
  stored = checkpointing.Checkpointer(ckpt_dir).restore_config()
  assert stored["finetune"]["steps"] == STEPS and stored["base_checkpoint"] == tiny_base_dir
  summary, resumed, _ = jobs.finetune(cfg, workdir, return_state=True)
  assert summary["step"] == STEPS and "finetuned_ode_to_target_sliced_w1" not in summary  # eval.at_end=False
  assert not os.path.exists(os.path.join(workdir, "scatter.png"))
  for a, b in zip(ref, _leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)


def test_two_processes_jax_distributed(tmp_path):
  """Two processes x 2 CPU devices (gloo): sharded pre-training and fine-tuning, Orbax saves written collectively
  and restored on the global mesh; the fine-tune matches one process x 4 devices on the base they wrote."""
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
      results.append(json.loads([line for line in text.splitlines() if line.startswith("RESULT ")][-1][7:]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  r0, r1 = sorted(results, key=lambda r: r["pid"])
  steps = launch_helpers.DISTRIBUTED_OVERRIDES["finetune.steps"]
  assert r0["step"] == r1["step"] == steps
  assert r0["restored_equals_final"] and r1["restored_equals_final"]
  assert r0["checksum"] == r1["checksum"]  # replicated params agree across hosts
  assert r0["local_noise_sum"] != r1["local_noise_sum"]  # hosts hold different slices of the noise
  # The same fine-tune on one process with 4 devices, from the base the two processes pre-trained and saved.
  cfg = launch_helpers.tiny_config(**launch_helpers.DISTRIBUTED_OVERRIDES,
                                   **{"mesh.num_devices": 4, "base_checkpoint": os.path.join(workdir, "base")})
  _, state, _ = jobs.finetune(cfg, str(tmp_path / "single"), return_state=True)
  checksum = float(sum(np.sum(np.abs(x)) for x in _leaves(state.params)))
  np.testing.assert_allclose(r0["checksum"], checksum, rtol=1e-4)
  single = [json.loads(line) for line in open(tmp_path / "single" / "metrics.jsonl")]
  np.testing.assert_allclose(r0["last_loss"], single[-1]["loss"], rtol=1e-4)


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
  cfg = launch_helpers.tiny_config(**{"mesh.num_devices": 1, "pretrain.steps": 3000, "model.hidden": (128, 128, 128),
                                      "am.num_steps": 40, "data.num_samples": 50000, "pretrain.batch_size": 512,
                                      "pretrain.log_every": 1000, "pretrain.checkpoint.every_steps": 1000})
  summary = jobs.pretrain(cfg, str(tmp_path))
  assert summary["base_to_data_sliced_w1"] < 0.08, summary
