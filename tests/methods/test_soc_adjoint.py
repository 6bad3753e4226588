"""``methods.soc_adjoint``: the full adjoint is the pathwise gradient of the control cost; basic AM, the continuous
adjoint and the discrete adjoint give the gradients the paper says they give (Prop. 2)."""
import jax
import jax.numpy as jnp
import numpy as np

from am_jax import adjoint, losses, methods, sampling
from tests.methods import helpers

ALL_STEPS = losses.AMConfig(num_steps=8, noiseless_last_step=False, num_random_timesteps=8,
                            random_timestep_fraction=1.0, num_last_timesteps=0, loss_clip=None)


def test_full_adjoint_is_the_pathwise_gradient_of_the_control_cost():
  """a_k = dJ/dX_k with J = sum_j h |u_j|^2 / 2 - r(X_K) through the discretised controlled SDE (noise fixed)."""
  base, mix, reward = helpers.MIX, helpers.BASE, helpers.REWARD
  ft, params = helpers.random_model(base, mix)
  key, shape = jax.random.PRNGKey(3), (16, 1)
  coeffs, traj, adj, _ = jax.jit(lambda p: methods.soc_adjoint.full_adjoint_batch(ft, p, base, mix, reward, key,
                                                                                  shape, ALL_STEPS))(params)
  noise = sampling.draw_noise(jax.random.split(key)[1], coeffs.num_steps, shape)  # make_am_batch's key split

  def cost(deltas):
    """J with X_k -> X_k + delta_k before step k: dJ/d delta_k = dJ/dX_k = a_k (evaluated at delta = 0)."""
    def body(x, k):
      x = x + deltas[k]
      t = sampling.step_time(coeffs, k, shape[0])
      v_ft, v_base = ft(params, x, t), base(mix, x, t)
      u = (1 + coeffs.loss_drift_scale[k]) * (v_ft - v_base) / coeffs.loss_sigma[k]
      x_next = (x + coeffs.dt[k] * sampling.step_drift(v_ft, x, coeffs, k)
                + coeffs.sigma[k] * jnp.sqrt(coeffs.dt[k]) * noise[k])
      return x_next, coeffs.dt[k] * 0.5 * jnp.sum(u**2)

    x1, costs = jax.lax.scan(body, traj[0], jnp.arange(coeffs.num_steps))
    return jnp.sum(costs) - jnp.sum(reward(x1))

  pathwise = jax.jit(jax.grad(cost))(jnp.zeros((coeffs.num_steps,) + shape))
  np.testing.assert_allclose(adj[:-1], pathwise, rtol=1e-4, atol=1e-5)
  # The control terms matter: the lean adjoint of the same path differs.
  lean = adjoint.lean_adjoint(lambda x, t: base(mix, x, t), traj, adj[-1], coeffs)
  assert float(jnp.max(jnp.abs(lean[0] - adj[0]))) > 1e-3


def test_adjoint_method_gradients_agree():
  """continuous adjoint == discrete adjoint (exact chain rule of the Euler scheme); basic AM == 2 x adjoint
  (paper Prop. 2)."""
  ft, params = helpers.random_model(helpers.MIX, helpers.BASE)
  key, shape = jax.random.PRNGKey(4), (32, 1)
  compiled = {}

  def value_and_grad(name, k):
    if name not in compiled:  # one compilation per method; the key is an argument
      objective = methods.build(name, ALL_STEPS)
      compiled[name] = jax.jit(jax.value_and_grad(
          lambda p, kk: objective(ft, p, helpers.MIX, helpers.BASE, helpers.REWARD, kk, shape)[0]))
    value, grads = compiled[name](params, k)
    return float(value), np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads)])

  (val_c, g_cont), (val_d, g_disc) = value_and_grad("continuous_adjoint", key), value_and_grad("discrete_adjoint", key)
  assert np.abs(g_disc).max() > 1e-3  # not vacuous
  np.testing.assert_allclose(g_cont, g_disc, rtol=1e-4, atol=1e-5 * np.abs(g_disc).max())
  np.testing.assert_allclose(val_c, val_d, rtol=1e-5)  # the adjoint method's loss value is the objective J itself
  # basic_am splits its key into (trajectories, loss times); feed the adjoint method the same trajectories.
  _, g_basic = value_and_grad("basic_am", key)
  _, g_cont_same = value_and_grad("continuous_adjoint", jax.random.split(key)[0])
  np.testing.assert_allclose(g_basic, 2.0 * g_cont_same, rtol=1e-4, atol=1e-5 * np.abs(g_basic).max())
