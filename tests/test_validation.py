"""Every bad value rejected at start (issue 15): one line naming the field, before any device or file work, each in
well under 2 s.  Configs: ``tests.launch_helpers.tiny_config`` (configs/gmm2d.py shrunk) with one field changed."""
import os
import time

import pytest

from am_jax import builders, jobs, losses, methods
from am_jax.errors import ConfigError
from tests import launch_helpers


@pytest.mark.parametrize("kwargs, match", [
    ({"reward_multiplier": 0.0}, "reward_multiplier"),
    ({"reward_multiplier": float("nan")}, "reward_multiplier"),
    ({"reward_multiplier": -1.0}, "reward_multiplier"),
    ({"reward_multiplier": 1e19}, "reward_multiplier .*overflows float32"),
    ({"loss_clip": float("nan")}, "loss_clip"),
    ({"num_steps": 2.5}, "num_steps must be an integer"),
    ({"num_last_timesteps": 2.0}, "num_last_timesteps must be an integer"),
    ({"time_offset": 1e-6}, "time_offset .*multiplies X_0"),
])
def test_am_config_rejects(kwargs, match):
  with pytest.raises(ValueError, match=match) as err:
    losses.AMConfig(**kwargs)
  assert "\n" not in str(err.value)


def test_ode_config_is_rejected_by_the_am_loss_with_a_pointer():
  ode = losses.AMConfig(diffusion="ode")  # a shared config: the ODE methods (draft, refl, eam, ...) use it
  assert losses.AMConfig(diffusion="ode", time_offset=1e-3).time_offset == 1e-3  # no memoryless first step
  with pytest.raises(ValueError, match="methods.am: needs a stochastic diffusion"):
    methods.am(ode)
  methods.draft(ode)


BAD = [
    ({"am.reward_multiplier": 0.0}, "config.am.reward_multiplier"),
    ({"am.reward_multiplier": float("nan")}, "config.am.reward_multiplier"),
    ({"am.reward_multiplier": -2.0}, "config.am.reward_multiplier"),
    ({"am.reward_multiplier": 1e30}, "config.am.reward_multiplier"),
    ({"am.loss_clip": float("nan")}, "config.am.loss_clip"),
    ({"am.num_steps": 2.5}, "config.am.num_steps"),
    ({"am.time_offset": 1e-6}, "config.am.time_offset"),
    ({"am.diffusion": "ode"}, "config.am.diffusion = 'ode'.*deterministic_am"),
    ({"am.diffusion": 0.0}, "config.am.diffusion = 0.0"),
    ({"eval.num_samples": 0}, "config.eval.num_samples"),
    ({"eval.num_steps": -3}, "config.eval.num_steps"),
    ({"finetune.hidden": (0,)}, "config.finetune.hidden"),
    ({"finetune.batch_size": 0}, "config.finetune.batch_size"),
    ({"finetune.on_nonfinite": "ignore"}, "config.finetune.on_nonfinite"),
    ({"finetune.optimizer.learning_rate": 1e39}, "config.finetune.optimizer.learning_rate"),
    ({"finetune.optimizer.learning_rate": float("inf")}, "config.finetune.optimizer.learning_rate"),
    ({"checkpoint.verify": "yes"}, "config.checkpoint.verify"),
    ({"mesh.num_devices": 8, "finetune.batch_size": 30}, "config.finetune.batch_size = 30: must be divisible"),
    ({"mesh.num_devices": 8, "pretrain.batch_size": 60}, "config.pretrain.batch_size = 60: must be divisible"),
    ({"mesh.num_devices": 9}, "config.mesh.num_devices = 9: only 8 device.*xla_force_host_platform_device_count=9"),
]


def _config(overrides):
  cfg = launch_helpers.tiny_config()
  with cfg.unlocked():
    for k, v in overrides.items():
      node = cfg
      *path, last = k.split(".")
      for p in path:
        node = node[p]
      try:
        node[last] = v
      except TypeError:  # ml_collections keeps a field's type (num_steps 2.5): a dict-built config does not
        node.__setattr__(last, None)
        node[last] = v
  return cfg


@pytest.mark.parametrize("overrides, match", BAD, ids=[",".join(o) for o, _ in BAD])
def test_finetune_rejects_at_start(tmp_path, overrides, match):
  """The whole job (``jobs.finetune``, which pre-trains its own base first): fails before any file is written."""
  t = time.perf_counter()
  with pytest.raises(ConfigError, match=match) as err:
    jobs.finetune(_config(overrides), str(tmp_path / "run"))
  assert time.perf_counter() - t < 2.0
  assert "\n" not in str(err.value)
  assert not os.path.exists(tmp_path / "run")  # nothing pre-trained, nothing written


def test_pretrain_rejects_indivisible_batch_at_start(tmp_path):
  with pytest.raises(ConfigError, match="config.pretrain.batch_size"):
    jobs.pretrain(_config({"mesh.num_devices": 8, "pretrain.batch_size": 60}), str(tmp_path / "base"))
  assert not os.path.exists(tmp_path / "base")


@pytest.mark.parametrize("workdir", ["", "  ", None])
def test_empty_workdir_is_rejected(workdir, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for job in (jobs.finetune, jobs.pretrain):
    with pytest.raises(ConfigError, match="workdir is empty"):
      job(launch_helpers.tiny_config(), workdir)
  with pytest.raises(ConfigError, match="workdir is empty"):
    jobs.sample(launch_helpers.tiny_config(), workdir)
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "-inf", "fast"])
def test_sample_diffusion_values_are_rejected(text, tmp_path):
  with pytest.raises(ValueError, match="--diffusion"):
    jobs.sample(launch_helpers.tiny_config(), str(tmp_path), diffusion=text)


@pytest.mark.parametrize("kw,match", [({"integrator": "rk4"}, "--integrator='rk4'"),
                                      ({"integrator": "dpmpp_2m", "diffusion": "0.5"}, "--integrator=dpmpp_2m needs")])
def test_sample_integrator_values_are_rejected(kw, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    jobs.sample(launch_helpers.tiny_config(), str(tmp_path), **kw)


def test_sample_counts_are_rejected(tmp_path):
  with pytest.raises(ValueError, match="--num_samples=0"):
    jobs.sample(launch_helpers.tiny_config(), str(tmp_path), num_samples=0)


def test_cond_shape_and_batch_zero_are_named():
  """A condition sampler returning the wrong batch, or a batch of 0, through the public ``Problem`` API."""
  import jax.numpy as jnp

  from am_jax.errors import ShapeError
  from am_jax.problem import Problem
  v = lambda p, x, t, *c: x  # noqa: E731
  problem = Problem(base_apply=v, base_params={}, net_apply=v, init_params={}, parameterisation="control",
                    config=losses.AMConfig(), reward_fn=lambda x, *c: jnp.sum(x, -1), sample_shape=(2,),
                    cond_fn=lambda key, b: (jnp.zeros((b + 1,), jnp.int32),))
  with pytest.raises(ShapeError, match=r"cond_fn returned a condition of shape \(9,\); expected a leading batch axis 8"):
    problem.check_shapes(8)
  cfg = _config({"finetune.batch_size": 0})
  with pytest.raises(ConfigError, match="config.finetune.batch_size = 0"):
    builders.validate_finetune(cfg)
