import jax
import jax.numpy as jnp
import numpy as np
import pytest

from am_jax import adjoint, gmm, rewards, sampling, schedules

S = schedules.LinearSchedule()
MIX = gmm.ring_2d(num=4, radius=1.5, std=0.3)
VF = lambda x, t: gmm.velocity(MIX, x, t, S)  # noqa: E731
REWARD = rewards.quadratic_reward(0.5 * jnp.eye(2), jnp.array([1.0, -0.5]))


@pytest.mark.parametrize("solver", ["scan", "diffrax"])
@pytest.mark.parametrize("noiseless_last", [False, True])
def test_lean_adjoint_equals_pathwise_gradient(solver, noiseless_last):
  """For u = 0 the lean adjoint is -d(lambda r(X_K))/dX_k through the discretised SDE, noise fixed."""
  lam, k_steps = 2.0, 20
  coeffs = sampling.make_coefficients(S, "memoryless", k_steps, noiseless_last_step=noiseless_last)
  k0, kn = jax.random.split(jax.random.PRNGKey(0))
  x0 = jax.random.normal(k0, (16, 2))
  noise = sampling.draw_noise(kn, k_steps, x0.shape)
  traj = sampling.simulate(VF, x0, noise, coeffs)
  a1, r = adjoint.terminal_adjoint(REWARD, traj[-1], lam)
  adj = jax.jit(lambda tr, a: adjoint.lean_adjoint(VF, tr, a, coeffs, solver))(traj, a1)
  assert adj.shape == traj.shape

  def neg_reward_from(k, xk):
    rest = sampling.make_coefficients(S, "memoryless", k_steps, noiseless_last_step=noiseless_last)
    rest = rest._replace(**{f: getattr(rest, f)[k:] for f in ("tau", "dt", "sigma", "drift_scale", "kappa",
                                                              "loss_sigma", "loss_drift_scale")},
                         t=rest.t[k:])
    x_end = sampling.simulate(VF, xk, noise[k:], rest)[-1]
    return -lam * jnp.sum(REWARD(x_end))

  for k in [0, 1, 5, 13, k_steps - 1]:
    g = jax.grad(neg_reward_from, argnums=1)(k, traj[k])
    np.testing.assert_allclose(adj[k], g, rtol=2e-4, atol=2e-5)


def test_terminal_adjoint_and_nan_reward():
  x = jnp.array([[1.0, 2.0], [0.0, -1.0]])
  a1, r = adjoint.terminal_adjoint(rewards.linear_reward(jnp.array([1.0, 3.0])), x, 2.0)
  np.testing.assert_allclose(a1, -2.0 * jnp.array([[1.0, 3.0], [1.0, 3.0]]))
  np.testing.assert_allclose(r, [7.0, -3.0])
  bad = lambda x: jnp.log(x[:, 0])  # noqa: E731  (log of a negative -> NaN)
  with pytest.raises(Exception, match="non-finite"):
    jax.jit(lambda x: adjoint.terminal_adjoint(bad, x)[0])(jnp.array([[-1.0, 0.0]]))
  with pytest.raises(AssertionError):
    adjoint.terminal_adjoint(lambda x: jnp.sum(x), x)  # reward must be per sample (B,)
