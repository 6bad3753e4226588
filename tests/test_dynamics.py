import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest

from am_jax import dynamics, gmm, schedules

SCHEDULES = [schedules.LinearSchedule(), schedules.CosineSchedule(), schedules.VPSchedule()]


@pytest.fixture
def mixture():
  return gmm.make_mixture([0.3, 0.7], [[0.0, 1.0], [2.0, -1.0]], [[0.5, 0.2], [0.3, 0.4]])


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: type(s).__name__)
def test_parameterisation_round_trips(s):
  key = jax.random.PRNGKey(0)
  x, v = jax.random.normal(key, (2, 16, 3))
  t = jnp.linspace(0.1, 0.9, 16)
  for to, back in [(dynamics.velocity_to_epsilon, dynamics.epsilon_to_velocity),
                   (dynamics.velocity_to_data, dynamics.data_to_velocity),
                   (dynamics.velocity_to_score, dynamics.score_to_velocity)]:
    np.testing.assert_allclose(back(to(v, x, t, s), x, t, s), v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: type(s).__name__)
def test_exact_epsilon_prediction_gives_exact_velocity(mixture, s):
  """E[X0 | x] of the mixture, converted with epsilon_to_velocity, equals the exact velocity."""
  x = jax.random.normal(jax.random.PRNGKey(1), (32, 2))
  t = jnp.linspace(0.05, 0.95, 32)
  post, _, e_x0 = gmm._posterior_terms(mixture, x, t, s)
  eps = jnp.einsum("bj,bjd->bd", post, e_x0)
  np.testing.assert_allclose(dynamics.epsilon_to_velocity(eps, x, t, s), gmm.velocity(mixture, x, t, s),
                             rtol=1e-3, atol=1e-3)
  eps_model = dynamics.epsilon_model_as_velocity(lambda p, x, t: eps, s)
  np.testing.assert_allclose(eps_model(None, x, t), gmm.velocity(mixture, x, t, s), rtol=1e-3, atol=1e-3)


def test_memoryless_drift_is_family_drift_with_memoryless_sigma():
  s = schedules.LinearSchedule()
  x, v = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 2))
  t = jnp.full((8,), 0.3)
  np.testing.assert_allclose(dynamics.family_drift(v, x, t, s, schedules.Memoryless()),
                             dynamics.memoryless_drift(v, x, t, s), rtol=1e-6)
  np.testing.assert_allclose(dynamics.family_drift(v, x, t, s, schedules.ZeroDiffusion()), v)
  # General formula with sigma^2 = 2 eta gives the same drift (no special casing hidden).
  generic = schedules.CallableDiffusion(lambda t: jnp.sqrt(2 * (1 - t) / t))
  np.testing.assert_allclose(dynamics.family_drift(v, x, t, s, generic), dynamics.memoryless_drift(v, x, t, s),
                             rtol=1e-5)


def test_control_round_trip_and_grad():
  v_ft, v_base = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 2))
  sigma = jnp.linspace(0.5, 2.0, 8)
  u = dynamics.control_from_velocities(v_ft, v_base, sigma)
  np.testing.assert_allclose(dynamics.velocity_from_control(v_base, u, sigma), v_ft, rtol=1e-5, atol=1e-6)
  # Differentiable in v_ft (the AM loss's only path to the parameters): autodiff = finite differences.  The loss is
  # quadratic in v_ft, so central differences are exact at any step; eps = 1e-2 keeps float32 rounding of the
  # loss (~160) out of the difference quotient (at jax's default float32 step the rounding alone is ~1%).
  jax.test_util.check_grads(lambda a: jnp.sum(dynamics.control_from_velocities(a, v_base, sigma) ** 2), (v_ft,),
                            order=1, modes=("rev",), atol=1e-2, rtol=1e-2, eps=1e-2)


def test_time_validation():
  with pytest.raises(Exception, match=r"\[0, 1\]"):
    dynamics.validate_time(jnp.array([0.5, 1.5]))
  with pytest.raises(Exception, match=r"\[0, 1\]"):
    jax.jit(dynamics.validate_time)(jnp.array([-0.1]))


def test_prediction_as_velocity_matches_exact_mixture():
  """An epsilon or x0 predictor of the exact mixture, converted to a velocity, is the exact velocity."""
  sch = schedules.LinearSchedule()
  mix = gmm.bimodal_1d()
  x, t = jnp.linspace(-2, 2, 7)[:, None], jnp.full((7,), 0.4)
  v = gmm.velocity(mix, x, t, sch)
  eps_fn = lambda p, x, t: dynamics.velocity_to_epsilon(gmm.velocity(p, x, t, sch), x, t, sch)  # noqa: E731
  x0_fn = lambda p, x, t: dynamics.velocity_to_data(gmm.velocity(p, x, t, sch), x, t, sch)  # noqa: E731
  for fn, kind in ((eps_fn, "epsilon"), (x0_fn, "x0")):
    np.testing.assert_allclose(dynamics.prediction_as_velocity(fn, kind, sch)(mix, x, t), v, rtol=1e-4, atol=1e-5)
  assert dynamics.prediction_as_velocity(gmm.velocity, "velocity", sch) is gmm.velocity
  with pytest.raises(ValueError, match="prediction"):
    dynamics.prediction_as_velocity(eps_fn, "score", sch)
