"""``am_jax.parameterisation``: mixed precision casts, residual models (base x-gradient kept), guidance."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from am_jax import gmm, parameterisation, schedules, toy

S = schedules.LinearSchedule()
BASE = gmm.bimodal_1d()
MIX = toy.mixture_base(BASE, S)


def test_mixed_precision_wrapper():
  seen = {}

  def apply(params, x, t):
    seen["dtypes"] = (params["w"].dtype, x.dtype, t.dtype)
    return x @ params["w"]

  params = {"w": jnp.eye(2)}
  assert parameterisation.mixed_precision(apply, "float32") is apply
  bf = parameterisation.mixed_precision(apply, "bfloat16")
  out = bf(params, jnp.ones((3, 2)), jnp.full((3,), 0.5))
  assert seen["dtypes"] == (jnp.bfloat16, jnp.bfloat16, jnp.float32) and out.dtype == jnp.float32
  g = jax.grad(lambda p: jnp.sum(bf(p, jnp.ones((3, 2)), jnp.zeros(3))))(params)
  assert g["w"].dtype == jnp.float32
  np.testing.assert_array_equal(g["w"], 3.0 * jnp.ones((2, 2)))


def test_residual_model_parameterisations_and_base_x_gradient():
  """'control': v = v_base + sigma(t) / 2 net; 'velocity': v = v_base + net.  The base *parameters* are frozen but
  d v_base / dx still flows (the methods that differentiate through states need it)."""
  net = lambda p, x, t: p * jnp.sin(x)  # noqa: E731
  x, t = jnp.array([[0.3], [-1.1]]), jnp.array([0.4, 0.8])
  control = parameterisation.residual_model(MIX, BASE, net, S, "control")
  velocity = parameterisation.residual_model(MIX, BASE, net, S, "velocity")
  dv = lambda f: jax.grad(lambda z: f(0.0, z, t).sum())(x)  # noqa: E731

  @jax.jit
  def run(mix):
    g_base = jax.grad(lambda m: parameterisation.residual_model(MIX, m, net, S)(1.0, x, t).sum())(mix)
    return (control(2.0, x, t), velocity(2.0, x, t), MIX(mix, x, t), dv(control),
            dv(lambda p, z, tt: MIX(mix, z, tt)), g_base)

  v_control, v_velocity, v_base, dv_control, exact, g_base = run(BASE)
  np.testing.assert_allclose(v_control, v_base + S.memoryless_sigma(t)[:, None] * jnp.sin(x), rtol=1e-6)
  np.testing.assert_allclose(v_velocity, v_base + 2.0 * jnp.sin(x), rtol=1e-6)
  assert float(jnp.max(jnp.abs(exact))) > 0.0
  np.testing.assert_allclose(dv_control, exact, rtol=1e-5)
  # ... while no gradient reaches the base parameters.
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_base))
  with pytest.raises(ValueError, match="parameterisation"):
    parameterisation.residual_model(MIX, BASE, net, S, "full")


def test_guided_velocity():
  """v_null + w (v_label - v_null) in one batched call; w = 1 is the conditional model itself."""
  calls = []

  def apply(p, x, t, label):
    calls.append(x.shape[0])
    return x * p + label[:, None].astype(jnp.float32)

  assert parameterisation.guided(apply, 1.0, null_label=10) is apply
  g = parameterisation.guided(apply, 3.0, null_label=10)
  x, label = jnp.ones((2, 1)), jnp.array([1, 4])
  out = g(2.0, x, 0.5, label)
  np.testing.assert_allclose(out, (2.0 + 10.0) + 3.0 * (label[:, None] - 10.0))
  assert calls == [4]
