import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from am_jax import schedules

SCHEDULES = [schedules.LinearSchedule(), schedules.CosineSchedule(), schedules.VPSchedule()]
T = jnp.linspace(0.05, 0.95, 19)


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: type(s).__name__)
def test_derivatives_match_autodiff(s):
  np.testing.assert_allclose(s.alpha_dot(T), jax.vmap(jax.grad(s.alpha))(T), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(s.beta_dot(T), jax.vmap(jax.grad(s.beta))(T), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: type(s).__name__)
def test_eta_and_kappa_follow_definitions(s):
  kappa = s.alpha_dot(T) / s.alpha(T)
  eta = s.beta(T) * (kappa * s.beta(T) - s.beta_dot(T))
  np.testing.assert_allclose(s.kappa(T), kappa, rtol=1e-5)
  np.testing.assert_allclose(s.eta(T), eta, rtol=1e-4)
  np.testing.assert_allclose(s.memoryless_sigma(T) ** 2, 2 * eta, rtol=1e-4)
  assert np.all(np.asarray(s.eta(T)) > 0)


def test_boundary_values():
  for s in SCHEDULES[:2]:
    np.testing.assert_allclose([s.alpha(0.0), s.beta(0.0), s.alpha(1.0), s.beta(1.0)], [0, 1, 1, 0], atol=1e-6)
  vp = schedules.VPSchedule()
  assert float(vp.alpha(0.0)) < 1e-2 and abs(float(vp.alpha(1.0)) - 1) < 1e-6


def test_linear_closed_forms():
  s = schedules.LinearSchedule()
  np.testing.assert_allclose(s.eta(T), (1 - T) / T, rtol=1e-6)
  np.testing.assert_allclose(s.memoryless_sigma(T), jnp.sqrt(2 * (1 - T) / T), rtol=1e-6)


def test_vp_memoryless_is_ddpm_noise_rate():
  vp = schedules.VPSchedule()
  np.testing.assert_allclose(vp.memoryless_sigma(T) ** 2, 0.1 + 19.9 * (1 - T), rtol=1e-5)
  np.testing.assert_allclose(vp.alpha(T) ** 2 + vp.beta(T) ** 2, 1.0, rtol=1e-6)


@pytest.mark.parametrize("spec,expected_scale", [("memoryless", 1.0), ("ode", 0.0), (0.0, 0.0)])
def test_diffusion_families(spec, expected_scale):
  s = schedules.LinearSchedule()
  d = schedules.get_diffusion(spec)
  np.testing.assert_allclose(d.drift_scale(s, T), expected_scale)


def test_constant_and_callable_diffusion_scale():
  s = schedules.LinearSchedule()
  for d in [schedules.get_diffusion(0.7), schedules.get_diffusion(lambda t: 0.7 + 0 * t)]:
    np.testing.assert_allclose(d.sigma(s, T), 0.7, rtol=1e-6)
    np.testing.assert_allclose(d.drift_scale(s, T), 0.49 / (2 * s.eta(T)), rtol=1e-5)


def test_bad_specs_raise():
  with pytest.raises(ValueError, match="Unknown diffusion"):
    schedules.get_diffusion("banana")
  with pytest.raises(ValueError, match=">= 0"):
    schedules.get_diffusion(-1.0)
  with pytest.raises(ValueError, match="Unknown schedule"):
    schedules.get_schedule("quadratic")


def test_jit_vmap_grad():
  s = schedules.CosineSchedule()
  f = jax.jit(lambda t: s.memoryless_sigma(t) * s.kappa(t))
  chex.assert_shape(jax.vmap(f)(T), T.shape)
  np.testing.assert_allclose(jax.vmap(f)(T), [f(t) for t in T], rtol=1e-6)
  g = float(jax.grad(f)(0.3))
  np.testing.assert_allclose(g, (float(f(0.3 + 1e-3)) - float(f(0.3 - 1e-3))) / 2e-3, rtol=1e-3)
