"""``am_jax.problem.Problem``: the fine-tuned model of each parameterisation, lambda in one place, the exact
target, reward reports, sampling, and shape checks that name the function and the expected shape."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from am_jax import gmm, losses, rewards, schedules, toy
from am_jax.problem import Problem

S = schedules.LinearSchedule()
RING = gmm.ring_2d(num=3)
NET = lambda p, x, t: p["w"] * jnp.tanh(x) + p["b"]  # noqa: E731
PARAMS = {"w": jnp.float32(0.5), "b": jnp.array([0.1, -0.2])}


def _problem(parameterisation="control", **kw):
  """A 2-D problem on the exact 3-component ring, reward r(x) = x_0, lambda = 2, a two-parameter residual NET."""
  kw = {"config": losses.AMConfig(num_steps=8, reward_multiplier=2.0), "net_apply": NET, "exact_base": RING, **kw}
  return Problem(base_apply=toy.mixture_base(RING, S), base_params=RING, init_params=PARAMS,
                 parameterisation=parameterisation, reward_fn=rewards.linear_reward(jnp.array([1.0, 0.0])),
                 sample_shape=(2,), tilt=lambda mix, lam: gmm.tilt_linear(mix, lam * jnp.array([1.0, 0.0])), **kw)


def test_parameterisations_of_the_finetuned_model():
  x, t = jax.random.normal(jax.random.PRNGKey(0), (5, 2)), jnp.full((5,), 0.3)
  v_base = gmm.velocity(RING, x, t, S)
  np.testing.assert_allclose(_problem("velocity").finetuned_apply()(PARAMS, x, t), v_base + NET(PARAMS, x, t),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_problem("control").finetuned_apply()(PARAMS, x, t),
                             v_base + 0.5 * S.memoryless_sigma(t)[:, None] * NET(PARAMS, x, t), rtol=1e-5, atol=1e-6)
  full = _problem("full")
  assert full.finetuned_apply() is NET and full.merged_params(PARAMS) is PARAMS
  with pytest.raises(ValueError, match="no merged form"):
    _problem("velocity").merged_params(PARAMS)
  # 'lora': the base network (net_apply) with merged weights; here the "adapters" shift the mixture means.
  lora = _problem("lora", net_apply=toy.mixture_base(RING, S), lora_merge=lambda bp, d: bp._replace(means=bp.means + d))
  shift = jnp.array([[0.3, 0.0]] * 3)
  np.testing.assert_allclose(lora.finetuned_apply()(shift, x, t),
                             gmm.velocity(RING._replace(means=RING.means + shift), x, t, S), rtol=1e-6)


def test_lambda_lives_in_the_config_and_moves_the_exact_target():
  problem = _problem()
  assert problem.lam == problem.config.reward_multiplier == 2.0
  t2, t4 = problem.exact_target, problem.with_config(reward_multiplier=4.0).exact_target
  assert problem.with_config(reward_multiplier=4.0).lam == 4.0
  # The tilt by e^{lambda x_0} shifts every mean by lambda * Sigma e_0: twice as far for lambda 4.
  np.testing.assert_allclose(t4.means - RING.means, 2.0 * (t2.means - RING.means), rtol=1e-5)
  assert _problem(exact_base=None).exact_target is None


def test_problem_rejects_bad_fields():
  problem = _problem()
  with pytest.raises(ValueError, match="parameterisation"):
    problem.replace(parameterisation="residual")
  with pytest.raises(ValueError, match="lora_merge"):
    problem.replace(parameterisation="lora")
  with pytest.raises(TypeError, match="AMConfig"):
    problem.replace(config={"reward_multiplier": 1.0})


def test_reward_report_and_sample():
  problem = _problem(reward_terms={"x0": lambda x: x[:, 0]}, gold_rewards={"y": lambda x: -x[:, 1]})
  x = jnp.array([[1.0, 2.0], [3.0, -4.0]])
  rep = problem.reward_report(x)
  assert rep == {"reward": 2.0, "reward/x0": 2.0, "gold/y": 1.0}
  xs, base_xs = jax.jit(lambda p, k: (problem.sample(p, k, 64), problem.sample(None, k, 64, which="base")))(
      PARAMS, jax.random.PRNGKey(0))
  assert xs.shape == base_xs.shape == (64, 2) and not np.allclose(xs, base_xs)
  with pytest.raises(ValueError, match="which"):
    problem.sample(PARAMS, jax.random.PRNGKey(0), 4, which="target")


def test_check_shapes_names_the_function():
  problem = _problem()
  problem.check_shapes(8)
  with pytest.raises(ValueError, match=r"reward_fn returned shape \(8, 2\); expected \(8,\)"):
    problem.replace(reward_fn=lambda x: x).check_shapes(8)
  with pytest.raises(ValueError, match=r"base_apply returned a velocity of shape \(8, 1\)"):
    problem.replace(base_apply=lambda p, x, t: x[:, :1]).check_shapes(8)
  with pytest.raises(ValueError, match=r"fine-tuned model returned a velocity of shape \(8, 3\)"):
    problem.replace(parameterisation="full", net_apply=lambda p, x, t: jnp.zeros((8, 3))).check_shapes(8)
  with pytest.raises(ValueError, match="gold_rewards\\['g'\\] failed"):
    problem.replace(gold_rewards={"g": lambda x, y: x}).check_shapes(8)
  with pytest.raises(ValueError, match="leading batch axis 8"):
    problem.replace(cond_fn=lambda k, b: (jnp.zeros((b + 1,)),)).check_shapes(8)
