"""Problem and builders.build_problem: one construction of a fine-tuning problem, validated up front."""
import os
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from am_jax import builders, dynamics, gmm, losses, methods, schedules, training
from am_jax.problem import Problem
from tests.launch_helpers import tiny_config


def _problem(**overrides):
  cfg = tiny_config(base_checkpoint="(random init)", **overrides)
  base_apply, base_params = builders.build_velocity_model(cfg, builders.data_shape(cfg), cfg.seed)
  return builders.build_problem(cfg, base_apply, base_params), cfg


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
  rep = problem.reward_report(x)
  assert set(rep) == {"reward"}


def test_full_and_velocity_parameterisations():
  full, _ = _problem(**{"finetune.parameterisation": "full"})
  assert full.finetuned_apply() is full.net_apply
  assert full.merged_params(full.init_params) is full.init_params
  vel, _ = _problem(**{"finetune.parameterisation": "velocity"})
  with pytest.raises(ValueError, match="no merged form"):
    vel.merged_params(vel.init_params)


def test_problem_rejects_bad_fields():
  problem, _ = _problem()
  with pytest.raises(ValueError, match="parameterisation"):
    problem.replace(parameterisation="residual")
  with pytest.raises(TypeError, match="AMConfig"):
    problem.replace(config={"reward_multiplier": 1.0})


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


def test_prediction_as_velocity_matches_exact_mixture():
  sch = schedules.LinearSchedule()
  mix = gmm.bimodal_1d()
  x, t = jnp.linspace(-2, 2, 7)[:, None], jnp.full((7,), 0.4)
  v = gmm.velocity(mix, x, t, sch)
  eps_fn = lambda p, x, t: dynamics.velocity_to_epsilon(gmm.velocity(p, x, t, sch), x, t, sch)  # noqa: E731
  x0_fn = lambda p, x, t: dynamics.velocity_to_data(gmm.velocity(p, x, t, sch), x, t, sch)  # noqa: E731
  for fn, kind in ((eps_fn, "epsilon"), (x0_fn, "x0")):
    np.testing.assert_allclose(dynamics.prediction_as_velocity(fn, kind, sch)(mix, x, t), v, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="prediction"):
    dynamics.prediction_as_velocity(eps_fn, "score", sch)


def test_finetune_step_from_problem_compiles_once_and_learns():
  problem, cfg = _problem()
  opt = builders.build_optimizer(cfg, "finetune.optimizer", 10)
  step = training.make_finetune_step(problem, methods.am(problem.config), opt, 32)
  state = training.init_state(problem.init_params, opt, 0)
  for _ in range(3):
    state, m = step(state, problem.base_params)
  assert step._cache_size() == 1
  assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
  chex.assert_trees_all_equal_shapes(state.params, problem.init_params)


def test_check_shapes_names_the_function():
  problem, _ = _problem()
  problem.check_shapes(8)
  with pytest.raises(ValueError, match=r"reward_fn returned shape \(8, 2\); expected \(8,\)"):
    problem.replace(reward_fn=lambda x: x).check_shapes(8)
  with pytest.raises(ValueError, match=r"base_apply returned a velocity of shape \(8, 1\)"):
    problem.replace(base_apply=lambda p, x, t: x[:, :1]).check_shapes(8)
  with pytest.raises(ValueError, match="gold_rewards\\['g'\\] failed"):
    problem.replace(gold_rewards={"g": lambda x, y: x}).check_shapes(8)
