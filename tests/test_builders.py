"""``am_jax.builders``: every config field is validated before any work (one-line ``ConfigError`` naming the field),
and a config becomes a ``Problem`` (model, rewards, conditions, method, AMConfig) in one place."""
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from am_jax import builders, losses
from tests.launch_helpers import tiny_config


def _problem(**overrides):
  cfg = tiny_config(base_checkpoint="(random init)", **overrides)
  base_apply, base_params = builders.build_velocity_model(cfg, builders.data_shape(cfg), cfg.seed)
  return builders.build_problem(cfg, base_apply, base_params), cfg


@pytest.mark.parametrize("field, value", [
    ("finetune.batch_size", 0), ("finetune.parameterisation", "residual"), ("am.num_steps", 0),
    ("am.diffusion", "sometimes"), ("finetune.optimizer.learning_rate", -1.0), ("data.name", "cifar"),
    ("reward.name", "aesthetic"), ("schedule", "sigmoid"), ("checkpoint.max_to_keep", 0),
    ("model.hidden", ()), ("am.reward_multiplier", 0.0), ("am.remat_segments", 3),
])
def test_invalid_field_is_named(field, value):
  cfg = tiny_config(**{field: value})
  with pytest.raises(builders.ConfigError, match=field.replace(".", r"\.")) as err:
    builders.validate_finetune(cfg)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("field,value,match", [
    ("finetune.batch_size", 30, "divisible by the 4 devices"),
    ("reward.name", "nope", "config.reward.name"),
    ("reward.name", "no_such_module_xyz:fn", "cannot import"),
    ("model.kind", "math:no_such_attr", "has no attribute"),
    ("method.name", "amm", "did you mean"),
    ("finetune.parameterisation", "lora", None),  # valid: lora_rank is set
    ("finetune.cond", "labels", "num_classes > 0"),
    ("eval.num_samples", 0, "config.eval.num_samples"),
])
def test_validate_finetune_names_the_field(field, value, match):
  cfg = tiny_config(base_checkpoint="(random init)", **{field: value})
  if match is None:
    builders.validate_finetune(cfg, num_devices=4)
    return
  with pytest.raises(ValueError, match=match):
    builders.validate_finetune(cfg, num_devices=4)


def test_eval_at_end_must_be_a_bool():
  """``eval.at_end`` (skip the final evaluation when False) from a config that declares it with another type."""
  import ml_collections
  cfg = tiny_config(base_checkpoint="(random init)")
  builders.validate_finetune(cfg, num_devices=4)
  cfg.eval = ml_collections.ConfigDict(dict(cfg.eval.to_dict(), at_end="no"))
  with pytest.raises(builders.ConfigError, match=r"config\.eval\.at_end = 'no': must be True or False"):
    builders.validate_finetune(cfg, num_devices=4)


def test_am_config_from_config():
  am = builders.build_am_config(tiny_config(**{"am.remat_segments": 4, "am.chunk_loss": True,
                                               "am.network_dtype": "bfloat16", "am.reward_multiplier": 3.0}))
  assert isinstance(am, losses.AMConfig) and am.num_steps == 8
  assert (am.remat_segments, am.chunk_loss, am.network_dtype, am.reward_multiplier) == (4, True, "bfloat16", 3.0)


def test_method_and_its_options_from_config():
  am = losses.AMConfig(num_steps=8)
  cfg = tiny_config(**{"method.name": "eam", "method.options": "num_times=3, weights='none', time_range=(0.1, 0.9)"})
  assert callable(builders.build_method(cfg, am))
  for options, match in (("num_time=3", r"config\.method: .*did you mean 'num_times'"),
                         ("num_times=", r"config\.method\.options = 'num_times='"),
                         ("3", r"config\.method\.options = '3'"),
                         ("num_times=0", r"config\.method: methods\.eam: num_times must be an int")):
    with pytest.raises(builders.ConfigError, match=match):
      builders.build_method(tiny_config(**{"method.name": "eam", "method.options": options}), am)


def test_condition_sampler_from_config():
  assert builders.build_cond_fn(tiny_config()) is None  # no classes: unconditional
  labelled = tiny_config(**{"model.num_classes": 3})
  (labels,) = builders.build_cond_fn(labelled)(jax.random.PRNGKey(0), 64)
  assert labels.shape == (64,) and set(np.unique(labels)) == {0, 1, 2}
  labelled.finetune.cond = "null"
  (labels,) = builders.build_cond_fn(labelled)(jax.random.PRNGKey(0), 5)
  np.testing.assert_array_equal(labels, 3)  # the null label of a classifier-free-guidance model
  with pytest.raises(builders.ConfigError, match="finetune.cond"):
    builders.build_cond_fn(tiny_config(**{"model.num_classes": 3, "finetune.cond": "sometimes"}))


def test_problem_from_config_residual_starts_at_base():
  problem, cfg = _problem()
  assert problem.sample_shape == (2,) and problem.parameterisation == "control"
  assert problem.lam == cfg.am.reward_multiplier == problem.config.reward_multiplier
  x, t = jax.random.normal(jax.random.PRNGKey(0), (5, 2)), jnp.full((5,), 0.3)
  v_ft = problem.finetuned_apply()(problem.init_params, x, t)
  np.testing.assert_allclose(v_ft, problem.base_apply(problem.base_params, x, t), atol=1e-6)
  # The exact target follows lambda: change lambda through the config, the target changes with it.
  t1, t2 = problem.exact_target, problem.with_config(reward_multiplier=3.0).exact_target
  assert not np.allclose(np.asarray(t1.means), np.asarray(t2.means))
  assert set(problem.reward_report(x)) == {"reward"}


def test_full_and_velocity_parameterisations():
  full, _ = _problem(**{"finetune.parameterisation": "full"})
  assert full.finetuned_apply() is full.net_apply
  assert full.merged_params(full.init_params) is full.init_params
  vel, _ = _problem(**{"finetune.parameterisation": "velocity"})
  with pytest.raises(ValueError, match="no merged form"):
    vel.merged_params(vel.init_params)


def test_user_callables_model_reward_and_x0_prediction(tmp_path, monkeypatch):
  """A user's model factory (plain jnp, an x0 predictor) and reward, named as 'module:attribute'."""
  (tmp_path / "user_task_mod.py").write_text(textwrap.dedent('''
      import jax.numpy as jnp
      def make_model(sample_shape, seed):
        d = sample_shape[0]
        params = {"w": jnp.zeros((d, d)), "b": jnp.zeros((d,))}
        return (lambda p, x, t: x @ p["w"] + p["b"]), params
      def reward(x):
        return -jnp.sum((x - 1.0) ** 2, axis=-1)
  '''))
  monkeypatch.syspath_prepend(str(tmp_path))
  cfg = tiny_config(**{"model.kind": "user_task_mod:make_model", "reward.name": "user_task_mod:reward",
                       "data.name": "", "base_checkpoint": "x", "finetune.parameterisation": "full"})
  with cfg.unlocked():
    cfg.data.shape = (3,)
    cfg.model.prediction = "x0"
  base_apply, base_params = builders.build_velocity_model(cfg, builders.data_shape(cfg), 0)
  problem = builders.build_problem(cfg, base_apply, base_params)
  assert problem.sample_shape == (3,)
  # x0-prediction 0 -> velocity of the data point 0: v = alphadot * 0 + betadot * eps with eps = x / beta.
  x, t = jnp.ones((2, 3)), jnp.full((2,), 0.5)
  sch = problem.schedule
  np.testing.assert_allclose(problem.base_apply(base_params, x, t), sch.beta_dot(0.5) * x / sch.beta(0.5), rtol=1e-6)
  np.testing.assert_allclose(problem.reward_fn(x), [0.0, 0.0])
