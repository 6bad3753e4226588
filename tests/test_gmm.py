import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from am_jax import gmm, schedules


@pytest.fixture
def mixture():
  return gmm.make_mixture([0.3, 0.7], [[0.0, 1.0], [2.0, -1.0]], [[0.5, 0.2], [0.3, 0.4]])


@pytest.mark.parametrize("s", [schedules.LinearSchedule(), schedules.CosineSchedule(), schedules.VPSchedule()],
                         ids=lambda s: type(s).__name__)
def test_velocity_matches_score_of_marginal(mixture, s):
  """v = kappa x + eta grad log p_t(x), with p_t the exact marginal mixture (independent formula)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 2))
  t = jnp.linspace(0.1, 0.9, 6)

  @jax.jit
  def both(x, t):
    score = jax.vmap(lambda xi, ti: jax.grad(lambda y: gmm.log_prob(gmm.marginal(mixture, ti, s), y[None])[0])(xi))
    return gmm.velocity(mixture, x, t, s), s.kappa(t)[:, None] * x + s.eta(t)[:, None] * score(x, t)

  got, ref = both(x, t)
  assert float(jnp.max(jnp.abs(ref))) > 0.5  # not vacuous
  np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3)


def test_velocity_jit_vmap_grad_shapes(mixture):
  s = schedules.LinearSchedule()
  x = jnp.ones((5, 2))
  v = jax.jit(gmm.velocity, static_argnums=3)(mixture, x, 0.5, s)
  chex.assert_shape(v, (5, 2))
  g, vs = jax.jit(lambda m: (jax.grad(lambda m: jnp.sum(gmm.velocity(m, x, 0.5, s)))(m),
                             jax.vmap(lambda t: gmm.velocity(m, x, t, s))(jnp.array([0.2, 0.5]))))(mixture)
  chex.assert_trees_all_equal_shapes(g, mixture)
  assert float(jnp.max(jnp.abs(g.means))) > 0  # the velocity depends on the means
  chex.assert_shape(vs, (2, 5, 2))
  np.testing.assert_allclose(vs[1], v, rtol=1e-6)
  with pytest.raises(Exception):
    gmm.velocity(mixture, jnp.ones((5, 3)), 0.5, s)


def test_tilt_linear_equals_quadratic_with_zero_a(mixture):
  c = jnp.array([0.7, -0.4])
  a = gmm.tilt_linear(mixture, c)
  b = gmm.tilt_quadratic(mixture, jnp.zeros((2, 2)), c)
  for u, v in zip(a, b):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quadratic", [False, True])
def test_tilt_matches_importance_weighting(mixture, quadratic):
  """Moments of the exact tilt vs self-normalised importance weights exp(r) on base samples."""
  x = np.asarray(gmm.sample(mixture, jax.random.PRNGKey(1), 400_000), np.float64)
  if quadratic:
    a_mat, b_vec = np.array([[0.8, 0.2], [0.2, 0.5]]), np.array([0.3, -0.2])
    r = -0.5 * np.einsum("nd,de,ne->n", x, a_mat, x) + x @ b_vec
    target = gmm.tilt_quadratic(mixture, a_mat, b_vec)
  else:
    c = np.array([0.7, -0.4])
    r = x @ c
    target = gmm.tilt_linear(mixture, c)
  w = np.exp(r - r.max())
  w /= w.sum()
  mean_is = w @ x
  cov_is = (x - mean_is).T @ ((x - mean_is) * w[:, None])
  y = np.asarray(gmm.sample(target, jax.random.PRNGKey(2), 400_000), np.float64)
  np.testing.assert_allclose(y.mean(0), mean_is, atol=0.02)
  np.testing.assert_allclose(np.cov(y.T), cov_is, atol=0.03)


def test_1d_calibration_values():
  t = gmm.tilt_linear(gmm.bimodal_1d(), [1.0])
  np.testing.assert_allclose(t.weights, [0.1192, 0.8808], atol=1e-3)
  np.testing.assert_allclose(t.means[:, 0], [-0.91, 1.09], atol=1e-5)


def test_non_integrable_tilt_raises(mixture):
  with pytest.raises(ValueError, match="positive definite"):
    gmm.tilt_quadratic(mixture, -100 * jnp.eye(2), 0.0)
