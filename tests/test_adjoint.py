"""``am_jax.adjoint``: the lean adjoint is the pathwise reward gradient (scan and diffrax solvers), the terminal
adjoint and its NaN check, and the bounded-memory (rematerialised) adjoint at the selected steps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from am_jax import adjoint, gmm, rewards, sampling, schedules

S = schedules.LinearSchedule()
MIX = gmm.ring_2d(num=4, radius=1.5, std=0.3)
VF = lambda x, t: gmm.velocity(MIX, x, t, S)  # noqa: E731
REWARD = rewards.quadratic_reward(0.5 * jnp.eye(2), jnp.array([1.0, -0.5]))
FIELDS = ("tau", "dt", "sigma", "drift_scale", "kappa", "loss_sigma", "loss_drift_scale")


@pytest.mark.parametrize("noiseless_last", [False, True])
def test_lean_adjoint_equals_pathwise_gradient(noiseless_last):
  """For u = 0 the lean adjoint is -d(lambda r(X_K))/dX_k through the discretised SDE, noise fixed; both solvers."""
  lam, k_steps = 2.0, 20
  coeffs = sampling.make_coefficients(S, "memoryless", k_steps, noiseless_last_step=noiseless_last)
  k0, kn = jax.random.split(jax.random.PRNGKey(0))
  x0 = jax.random.normal(k0, (16, 2))
  noise = sampling.draw_noise(kn, k_steps, x0.shape)
  traj = jax.jit(lambda x, n: sampling.simulate(VF, x, n, coeffs))(x0, noise)
  a1, _ = adjoint.terminal_adjoint(REWARD, traj[-1], lam)

  def neg_reward_from(k, xk):
    """-lambda r(X_K) as a function of X_k: the simulation restarted at step k on the rest of the grid."""
    rest = coeffs._replace(**{f: getattr(coeffs, f)[k:] for f in FIELDS}, t=coeffs.t[k:])
    return -lam * jnp.sum(REWARD(sampling.simulate(VF, xk, noise[k:], rest)[-1]))

  nodes = [0, 6, k_steps - 1]
  pathwise = {k: jax.jit(jax.grad(neg_reward_from, argnums=1), static_argnums=0)(k, traj[k]) for k in nodes}
  for solver in ("scan", "diffrax"):
    adj = jax.jit(lambda tr, a: adjoint.lean_adjoint(VF, tr, a, coeffs, solver))(traj, a1)
    assert adj.shape == traj.shape
    for k in nodes:
      np.testing.assert_allclose(adj[k], pathwise[k], rtol=2e-4, atol=2e-5, err_msg=f"{solver} k={k}")


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


def test_remat_adjoint_returns_the_selected_pairs():
  """simulate_checkpoints + lean_adjoint_remat (the bounded-memory path) = the full trajectory / adjoint at the loss
  steps, for a fine-tuned drift that differs from the base's."""
  w = jax.random.normal(jax.random.PRNGKey(2), (3, 2))
  v = lambda x, t: VF(x, t) + jnp.tanh(jnp.concatenate([x, t[:, None]], -1) @ w)  # noqa: E731
  k_steps = 20
  coeffs = sampling.make_coefficients(S, "memoryless", k_steps, noiseless_last_step=True)
  x0 = jax.random.normal(jax.random.PRNGKey(0), (32, 2))
  noise = sampling.draw_noise(jax.random.PRNGKey(1), k_steps, x0.shape)
  idx = jnp.array([0, 3, 7, 15, 19])

  @jax.jit
  def both(x0, noise):
    traj = sampling.simulate(v, x0, noise, coeffs)
    a1, _ = adjoint.terminal_adjoint(REWARD, traj[-1], 2.0)
    adj = adjoint.lean_adjoint(VF, traj, a1, coeffs)
    ckpts, x1 = sampling.simulate_checkpoints(v, x0, noise, coeffs, 4)
    xs, as_ = adjoint.lean_adjoint_remat(v, VF, ckpts, noise, a1, coeffs, idx)
    return traj, adj, ckpts, x1, xs, as_

  traj, adj, ckpts, x1, xs, as_ = both(x0, noise)
  np.testing.assert_allclose(ckpts, traj[0:20:5], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(x1, traj[-1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(xs, traj[idx], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(as_, adj[idx + 1], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="divide"):
    sampling.simulate_checkpoints(v, x0, noise, coeffs, 3)
