"""A user's own model and reward, defined in files OUTSIDE the repo, fine-tuned by the one launcher.

The same files as README "Your own model and reward": a plain-jnp velocity model factory and a reward
named as 'module:attribute', a base checkpoint written with ``checkpointing.save_params``, and a config
file; ``am-jax finetune --config=/path/to/their_config.py`` (the installed console command, run from a
directory that is not the repo) fine-tunes it.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from am_jax import checkpointing

USER_MODEL = '''
"""my_task.py: a 4-d model and reward written by a user (no am_jax code)."""
import jax
import jax.numpy as jnp


def make_model(sample_shape, seed):
  """(apply_fn, params): a one-hidden-layer velocity net v(x, t) for samples of `sample_shape`."""
  d = sample_shape[0]
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  params = {"w1": 0.3 * jax.random.normal(k1, (d + 1, 32)), "b1": jnp.zeros(32),
            "w2": 0.3 * jax.random.normal(k2, (32, d)), "b2": jnp.zeros(d)}

  def apply_fn(p, x, t):
    h = jnp.tanh(jnp.concatenate([x, t[:, None]], axis=-1) @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"] - x  # roughly a flow toward 0 at init

  return apply_fn, params


def reward(x):
  """Prefers samples near (1, 1, 1, 1)."""
  return -jnp.sum((x - 1.0) ** 2, axis=-1)
'''

USER_CONFIG = '''
"""their_config.py: fine-tune my_task's model toward exp(lambda * reward) with Adjoint Matching."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "my_task"
  c.seed = 0
  c.schedule = "linear"
  c.data = dict(name="", shape=(4,))                  # no bundled dataset: the shape of one sample
  c.model = dict(kind="my_task:make_model", prediction="velocity", num_classes=0)
  c.base_checkpoint = "BASE_DIR"                        # written with am_jax.checkpointing.save_params
  c.reward = dict(name="my_task:reward")
  c.am = dict(reward_multiplier=1.0, num_steps=10, time_offset=0.5, noiseless_last_step=True,
              num_random_timesteps=3, random_timestep_fraction=0.75, num_last_timesteps=3, loss_clip=0.0,
              solver="scan", diffusion="memoryless")
  c.method = dict(name="am", options="")
  c.finetune = dict(steps=60, batch_size=64, parameterisation="full", ema_decay=0.0, log_every=20, cond="",
                    optimizer=dict(name="adam", learning_rate=3e-3, warmup_steps=0, decay="constant", grad_clip=1.0,
                                   weight_decay=0.0))
  c.checkpoint = dict(every_steps=30, max_to_keep=1, async_save=False)
  c.mesh = dict(num_devices=1)
  c.eval = dict(num_samples=512, num_steps=0, every=0)
  return c
'''


BAD_REWARD = """

def bad_reward(x):
  return x
"""


@pytest.fixture(scope="module")
def user(tmp_path_factory):
  """The user's folder (my_task.py, no am_jax code in it) and their base weights, saved once with
  ``checkpointing.save_params`` (as a user would; in this process: the saving is not what is under test)."""
  root = tmp_path_factory.mktemp("user_task")
  user_dir = root / "user"
  user_dir.mkdir()
  (user_dir / "my_task.py").write_text(textwrap.dedent(USER_MODEL) + BAD_REWARD)
  spec = importlib.util.spec_from_file_location("my_task_for_test", user_dir / "my_task.py")
  my_task = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(my_task)
  base_dir = str(root / "my_base")
  checkpointing.save_params(base_dir, my_task.make_model((4,), 0)[1])  # the untrained initialisation is the "base"
  env = dict(os.environ, PYTHONPATH=str(user_dir), JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return user_dir, base_dir, env


def test_user_task_outside_the_repo(user, tmp_path):
  user_dir, base_dir, env = user
  (user_dir / "their_config.py").write_text(textwrap.dedent(USER_CONFIG).replace("BASE_DIR", base_dir))
  exe = shutil.which("am-jax")
  cmd = [exe] if exe else [sys.executable, "-m", "am_jax.cli"]
  workdir = tmp_path / "run"
  proc = subprocess.run(cmd + ["finetune", f"--config={user_dir / 'their_config.py'}", f"--workdir={workdir}"],
                        cwd=user_dir, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.load(open(workdir / "metrics.json"))
  assert summary["step"] == 60
  # Fine-tuning moved the samples toward the reward's optimum.
  assert summary["reward_mean_finetuned_ode"] > summary["reward_mean_base_ode"] + 0.5, summary
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 20, 40, 60]
  # Progress: one line per logged step, not a print and a log line twice; no Orbax INFO flood.
  assert len(proc.stderr.splitlines()) + len(proc.stdout.splitlines()) < 40, proc.stderr[-3000:]


def test_user_task_wrong_reward_shape_fails_at_start(user, tmp_path):
  user_dir, base_dir, env = user
  cfg = textwrap.dedent(USER_CONFIG).replace("BASE_DIR", base_dir).replace('"my_task:reward"', '"my_task:bad_reward"')
  (user_dir / "bad_config.py").write_text(cfg)
  proc = subprocess.run([sys.executable, "-m", "am_jax.cli", "finetune", f"--config={user_dir / 'bad_config.py'}",
                         f"--workdir={tmp_path / 'run'}"], cwd=user_dir, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert "reward" in last and "(64,)" in last, proc.stderr[-2000:]
  assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr[-2000:]
  assert not (tmp_path / "run" / "checkpoints").exists()  # it failed before any training
