"""Reliability of whole jobs (issue 15), on the tiny 2-D job with the exact ring base (no pre-training):

* a damaged latest checkpoint (bit flip, deleted manifest) -> the resume falls back to the previous verified step,
  says which step it rejected and why, and reaches the same final parameters as an uninterrupted run;
* a resume with a config that changes the maths is refused naming the fields (fast: before any work);
* SIGKILL + resume: ``metrics.jsonl`` equals the uninterrupted run's (timings aside);
* a NaN/inf inside a step: its own message, exit status 1, no checkpoint written after it.

Job-level runs take 10-60 s on the 2-core CPU: they are ``slow`` (``pytest -m slow``), except the drift test.  The
detection itself has fast tests: tests/test_checkpoint_integrity.py, tests/test_nonfinite.py, tests/test_validation.py.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from am_jax import checkpointing, jobs
from am_jax.errors import ConfigDriftError
from tests import launch_helpers

EXACT = {"model.kind": "exact", "mesh.num_devices": 1, "eval.num_samples": 128}


def _leaves(tree):
  return [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(tree)]


def _stored_run(workdir, **overrides):
  """A workdir holding one checkpoint (a tiny placeholder state) with the config of ``tiny_config(**overrides)``."""
  import jax.numpy as jnp

  from am_jax.training import TrainState
  cfg = launch_helpers.tiny_config(**{**EXACT, **overrides})
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  state = TrainState(jnp.asarray(5, jnp.int32), {"w": jnp.ones(2)}, (), {"w": jnp.ones(2)}, jnp.zeros(2, jnp.uint32))
  ckpt.save(5, state, cfg.to_dict(), force=True)
  ckpt.close()
  return cfg


def test_config_drift_is_refused_naming_each_field(tmp_path):
  _stored_run(str(tmp_path))
  changed = launch_helpers.tiny_config(**{**EXACT, "am.reward_multiplier": 5.0, "seed": 3})
  t = time.perf_counter()
  with pytest.raises(ConfigDriftError) as err:
    jobs.finetune(changed, str(tmp_path))
  assert time.perf_counter() - t < 2.0
  msg = str(err.value)
  assert "\n" not in msg
  assert "config.am.reward_multiplier: 1.0 -> 5.0" in msg and "config.seed: 0 -> 3" in msg
  assert "new --workdir" in msg and "--config.resume.allow_changes=am.reward_multiplier,seed" in msg
  assert os.listdir(tmp_path / "checkpoints") == ["5"]  # nothing else was written


def test_config_drift_rules():
  cfg = launch_helpers.tiny_config(**EXACT)
  stored = cfg.to_dict()
  free = launch_helpers.tiny_config(**{**EXACT, "finetune.steps": 99, "eval.num_samples": 7, "checkpoint.every_steps": 3})
  assert jobs.config_drift(stored, free)[0] == []
  assert [p for p, _, _ in jobs.config_drift(stored, free)[1]] == ["checkpoint.every_steps", "eval.num_samples",
                                                                   "finetune.steps"]
  width = launch_helpers.tiny_config(**{**EXACT, "finetune.hidden": (8,), "finetune.parameterisation": "velocity"})
  assert [p for p, _, _ in jobs.config_drift(stored, width)[0]] == ["finetune.hidden", "finetune.parameterisation"]
  assert jobs.config_drift(stored, width, allow=("finetune",))[0] == []
  assert jobs.config_drift(stored, width, allow=("all",))[0] == []
  # A pre-training run ignores the fine-tuning fields.
  assert jobs.config_drift(stored, width, kind="pretrain") == ([], [])
  with cfg.unlocked():
    cfg.resume = {"allow_changes": "am.reward_multiplier, seed"}
  assert jobs.allowed_changes(cfg) == ("am.reward_multiplier", "seed")


def _flip_latest(ckdir, step):
  files = sorted((f for f in glob.glob(os.path.join(ckdir, str(step), "state", "**", "d", "*"), recursive=True)
                  if os.path.isfile(f)), key=os.path.getsize)
  with open(files[-1], "r+b") as f:
    f.seek(os.path.getsize(files[-1]) // 2)
    b = f.read(1)[0]
    f.seek(-1, 1)
    f.write(bytes([b ^ 0x04]))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["bit_flip", "manifest"])
def test_damaged_latest_checkpoint_resumes_from_the_previous_verified_step(tmp_path, damage, capsys):
  over = {**EXACT, "finetune.steps": 20, "checkpoint.every_steps": 5, "finetune.log_every": 5}
  cfg = launch_helpers.tiny_config(**over)
  _, ref, _ = jobs.finetune(launch_helpers.tiny_config(**{**over, "checkpoint.every_steps": 20}), str(tmp_path / "ref"),
                            return_state=True)
  run = str(tmp_path / "run")
  assert jobs.finetune(cfg, run, stop_after=15)["step"] == 15
  ckdir = os.path.join(run, "checkpoints")
  if damage == "bit_flip":
    _flip_latest(ckdir, 15)
  else:
    os.remove(os.path.join(ckdir, "15", "state", "manifest.ocdbt"))
  capsys.readouterr()
  summary, state, _ = jobs.finetune(cfg, run, return_state=True)
  captured = capsys.readouterr()
  assert "checkpoint step 15" in captured.err and "rejected" in captured.err, captured.err
  assert "resuming from step 10" in captured.out + captured.err
  assert summary["step"] == 20 and os.listdir(os.path.join(run, "checkpoints_rejected"))[0].startswith("15-")
  for a, b in zip(_leaves(ref.params), _leaves(state.params)):
    np.testing.assert_array_equal(a, b)  # the same final state as the uninterrupted run
  steps = [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))]
  assert steps == [1, 5, 10, 15, 20]


TIMING = ("steps_per_s",)


def _rows(path):
  return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(path)]


def _launcher(workdir, overrides):
  args = ["-m", "experiments.finetune", "--config=configs/gmm2d.py", f"--workdir={workdir}"]
  return args + [f"--config.{k}={v}" for k, v in overrides.items()]


KILL = {"model.kind": "exact", "mesh.num_devices": 1, "data.num_samples": 4000, "am.num_steps": 8,
        "am.num_random_timesteps": 2, "am.num_last_timesteps": 2, "finetune.batch_size": 32, "finetune.hidden": "(16,)",
        "finetune.steps": 150, "finetune.log_every": 10, "checkpoint.every_steps": 10, "eval.num_samples": 128}


@pytest.mark.slow
def test_metrics_after_sigkill_and_resume_equal_the_uninterrupted_run(tmp_path):
  ref = str(tmp_path / "ref")
  p = launch_helpers.python(_launcher(ref, KILL), 1)
  out, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]
  run = str(tmp_path / "run")
  log = open(tmp_path / "killed.log", "w")
  proc = launch_helpers.python(_launcher(run, KILL), 1, stdout_file=log)
  ckdir = os.path.join(run, "checkpoints")
  try:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      steps = [int(d) for d in os.listdir(ckdir) if d.isdigit()] if os.path.isdir(ckdir) else []
      if steps and max(steps) >= 50:
        break
      time.sleep(0.05)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
  p = launch_helpers.python(_launcher(run, KILL), 1)
  out, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]
  assert "resuming from step" in out
  assert _rows(os.path.join(run, "metrics.jsonl")) == _rows(os.path.join(ref, "metrics.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize("overrides, exit_code, message", [
    ({"am.reward_multiplier": 1e18, "reward.b": "(1e4,0.5)"}, 1, "step 1: the adjoint became non-finite"),
    ({"finetune.optimizer.learning_rate": 1e30}, 1, "step 2: the trajectory became non-finite"),
    ({"finetune.optimizer.learning_rate": 1e39}, 2, "config.finetune.optimizer.learning_rate = 1e+39"),
    ({"am.diffusion": "ode"}, 2, "config.am.diffusion = 'ode'"),
])
def test_nonfinite_step_exits_nonzero_naming_its_source(tmp_path, overrides, exit_code, message):
  over = {**KILL, "finetune.steps": 6, "checkpoint.every_steps": 5, **overrides}
  workdir = str(tmp_path / "run")
  p = launch_helpers.python(_launcher(workdir, over), 1)
  out, err = p.communicate(timeout=600)
  assert p.returncode == exit_code, err[-3000:]
  lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err[-3000:]
  ckdir = os.path.join(workdir, "checkpoints")
  saved = [int(d) for d in os.listdir(ckdir) if d.isdigit()] if os.path.isdir(ckdir) else []
  failed_at = int(message.split(":")[0].split()[-1]) if message.startswith("step ") else 1
  assert all(s < failed_at for s in saved), saved  # nothing saved from the failing step on (Orbax saves step 1)


@pytest.mark.slow
def test_skip_policy_counts_dropped_updates(tmp_path):
  cfg = launch_helpers.tiny_config(**{**EXACT, "finetune.steps": 4, "finetune.log_every": 2})
  with cfg.unlocked():
    cfg.finetune.on_nonfinite = "skip"
    cfg.am.reward_multiplier, cfg.reward.b, cfg.am.loss_clip = 1e18, (1e4, 0.5), None  # |sigma a|^2 overflows
  summary = jobs.finetune(cfg, str(tmp_path))
  assert summary["skipped_steps"] == 4
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["skipped_steps"] for r in rows] == [1, 2, 4]
