"""The Adjoint Matching loss: interface (any framework), jit/vmap/grad, config errors, its minimiser (the exact
tilt for the memoryless SDE, not for a constant sigma), and the bounded-memory options (same loss and gradient)."""
import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from am_jax import gmm, losses, rewards, schedules, sharding

S = schedules.LinearSchedule()
MIX = gmm.bimodal_1d()
REWARD = rewards.linear_reward(1.0)
BASE = lambda p, x, t: gmm.velocity(p, x, t, S)  # noqa: E731


def _plain_mlp_init(key, dim=1, width=32):
  """A model written with nothing but jax.numpy: params are a dict, apply is a function."""
  k1, k2 = jax.random.split(key)
  return {"w1": 0.3 * jax.random.normal(k1, (dim + 1, width)), "b1": jnp.zeros(width),
          "w2": 0.01 * jax.random.normal(k2, (width, dim)), "b2": jnp.zeros(dim)}


def _plain_mlp_apply(params, x, t, mix=MIX):
  """Fine-tuned velocity = exact base velocity + a plain-JAX residual."""
  h = jnp.tanh(jnp.concatenate([x, t[:, None]], -1) @ params["w1"] + params["b1"])
  return gmm.velocity(mix, x, t, S) + h @ params["w2"] + params["b2"]


def test_non_flax_plain_function_model_trains():
  """A user's own (non-Flax) model plugs into the objective: jit, grad and an optax-free SGD step."""
  config = losses.AMConfig(num_steps=20, num_random_timesteps=5, num_last_timesteps=5)
  params = _plain_mlp_init(jax.random.PRNGKey(0))

  @jax.jit
  def step(params, key):
    (loss, aux), g = jax.value_and_grad(losses.adjoint_matching_objective, argnums=1, has_aux=True)(
        _plain_mlp_apply, params, BASE, MIX, REWARD, key, (64, 1), config)
    return jax.tree.map(lambda p, gi: p - 0.05 * gi, params, g), loss, aux, g

  new_params, loss, aux, g = step(params, jax.random.PRNGKey(1))
  assert jax.tree.structure(g) == jax.tree.structure(params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
  assert float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(g))) > 0
  assert loss.shape == () and float(loss) >= 0
  for k in ("loss_unclipped", "clip_fraction", "reward_mean", "reward_std", "control_norm", "target_norm"):
    assert k in aux and np.isfinite(float(aux[k]))


def test_equinox_model_and_diffrax_solver():
  """An Equinox module, split into (params, static) by the user, works the same way (here with the diffrax
  solver; its trajectories and adjoints equal the scan solver's: tests/test_sampling.py, tests/test_adjoint.py)."""
  mlp = eqx.nn.MLP(2, 1, 16, 2, key=jax.random.PRNGKey(0))
  params, static = eqx.partition(mlp, eqx.is_array)

  def apply(p, x, t):
    net = eqx.combine(p, static)
    return gmm.velocity(MIX, x, t, S) + 0.01 * jax.vmap(net)(jnp.concatenate([x, t[:, None]], -1))

  config = losses.AMConfig(num_steps=10, num_random_timesteps=3, num_last_timesteps=3, solver="diffrax")
  (loss, _), g = jax.jit(jax.value_and_grad(
      lambda p: losses.adjoint_matching_objective(apply, p, BASE, MIX, REWARD, jax.random.PRNGKey(2), (32, 1),
                                                  config), has_aux=True))(params)
  assert np.isfinite(float(loss))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
  assert float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(g))) > 0


@pytest.mark.parametrize("diffusion", ["memoryless", 0.2])
def test_exact_tilted_velocity_minimises_the_loss_only_when_memoryless(diffusion):
  """On trajectories of the exact tilted model, the AM loss of v_base + s (v_tilt - v_base) is quadratic in s.

  Memoryless: minimised at s = 1 (up to the K = 40 discretisation; measured 0.87): the tilt is the optimum, and a
  wrong control scale (u = (v_ft - v_base) / sigma, missing the 2) or a wrong adjoint pairing would move it.
  Constant sigma = 0.2 (paper Fig. 2): the initial value function biases the optimum away from the tilt
  (measured s* = 0.05; 0.60 for sigma = 1.0), which is why such fine-tunes miss the target (tests/test_toy.py, slow).
  """
  target = gmm.tilt_linear(MIX, 1.0)
  opt = lambda p, x, t: gmm.velocity(target, x, t, S)  # noqa: E731
  config = losses.AMConfig(reward_multiplier=1.0, loss_clip=None, num_random_timesteps=30, num_last_timesteps=10,
                           diffusion=diffusion)

  @jax.jit
  def losses_at(scales, key):
    batch = losses.make_am_batch(opt, None, BASE, MIX, REWARD, key, (20000, 1), config)

    def at(s):
      fn = lambda p, x, t: gmm.velocity(MIX, x, t, S) + s * (opt(p, x, t) - gmm.velocity(MIX, x, t, S))  # noqa: E731
      return losses.adjoint_matching_loss(fn, None, BASE, MIX, batch, jax.random.PRNGKey(0), config)[0]
    return jax.lax.map(at, scales)

  scales = np.array([0.0, 0.5, 1.0, 1.5, 2.0])
  values = np.asarray(losses_at(jnp.asarray(scales), jax.random.PRNGKey(3)))
  a, b, _ = np.polyfit(scales, values, 2)
  s_star = -b / (2 * a)
  if diffusion == "memoryless":
    assert 0.75 < s_star < 1.25, (s_star, values)
    assert values[2] < values[0] - 0.3, values
  else:
    assert s_star < 0.3, (s_star, values)


def test_select_timesteps():
  config = losses.AMConfig()
  idx = np.asarray(losses.select_timesteps(jax.random.PRNGKey(0), config))
  assert idx.shape == (20,)
  np.testing.assert_array_equal(idx[-10:], np.arange(30, 40))
  assert len(set(idx[:10].tolist())) == 10 and idx[:10].max() < 30
  idx2 = np.asarray(losses.select_timesteps(jax.random.PRNGKey(1), config))
  assert not np.array_equal(idx[:10], idx2[:10])
  small = losses.AMConfig(num_steps=8)  # fewer steps than requested: every step once, no duplicates
  idx = np.asarray(losses.select_timesteps(jax.random.PRNGKey(0), small))
  assert sorted(set(idx.tolist())) == idx.tolist() and idx[-1] == 7


def test_loss_clip_and_vmap():
  clip_cfg = losses.AMConfig(num_steps=10, num_random_timesteps=3, num_last_timesteps=2, loss_clip=1e-3)
  noclip = dataclasses.replace(clip_cfg, loss_clip=None)
  ft = lambda p, x, t: gmm.velocity(MIX, x, t, S) + p * x  # noqa: E731

  @jax.jit
  def run(p):
    batch = losses.make_am_batch(ft, p, BASE, MIX, REWARD, jax.random.PRNGKey(0), (128, 1), clip_cfg)
    l_c, a_c = losses.adjoint_matching_loss(ft, p, BASE, MIX, batch, jax.random.PRNGKey(1), clip_cfg)
    l_n, _ = losses.adjoint_matching_loss(ft, p, BASE, MIX, batch, jax.random.PRNGKey(1), noclip)
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    per_key = jax.vmap(lambda k: losses.adjoint_matching_loss(ft, p, BASE, MIX, batch, k, noclip)[0])(keys)
    return l_c, a_c, l_n, per_key

  l_c, a_c, l_n, per_key = run(0.5)
  assert float(a_c["clip_fraction"]) > 0.5 and float(l_c) <= 1e-3 + 1e-9
  np.testing.assert_allclose(float(a_c["loss_unclipped"]), float(l_n), rtol=1e-6)
  assert per_key.shape == (3,) and bool(jnp.all(jnp.isfinite(per_key)))
  assert len(set(np.asarray(per_key).tolist())) == 3  # each key selects other loss time steps


@pytest.mark.parametrize("kwargs, field", [
    ({"num_steps": 0}, "num_steps"),
    ({"time_offset": 0.0}, "time_offset"),
    ({"random_timestep_fraction": 1.5}, "random_timestep_fraction"),
    ({"num_random_timesteps": 0, "num_last_timesteps": 0}, "num_random_timesteps"),
    ({"loss_clip": -1.0}, "loss_clip"),
    ({"solver": "rk4"}, "solver"),
    ({"diffusion": "sometimes"}, "diffusion"),
    ({"num_steps": 40, "remat_segments": 7}, "remat_segments"),
    ({"remat_segments": -1}, "remat_segments"),
    ({"remat_segments": 4, "solver": "diffrax"}, "solver"),
    ({"chunk_loss": -1}, "chunk_loss"),
    ({"chunk_loss": 1.5}, "chunk_loss"),
    ({"chunk_loss": 3}, "chunk_loss"),  # must divide the M = 20 loss time steps
    ({"reuse_base_velocity": 1}, "reuse_base_velocity"),
    ({"network_dtype": "float16"}, "network_dtype"),
])
def test_config_errors_name_the_field(kwargs, field):
  with pytest.raises((ValueError, TypeError), match=field):
    losses.AMConfig(**kwargs)


def test_config_defaults_store_everything_in_float32():
  c = losses.AMConfig()
  assert c.remat_segments == 0 and not c.chunk_loss and c.network_dtype == "float32"


def test_batch_keeps_the_base_velocity_of_every_step():
  """AMBatch.base_velocity[k] = v_base(X_k, tau_k): the primal outputs of the adjoint's VJPs (what the loss reuses)."""
  config = losses.AMConfig(num_steps=4)
  off_config = dataclasses.replace(config, reuse_base_velocity=False)
  ft = lambda p, x, t: gmm.velocity(MIX, x, t, S) + 0.3  # noqa: E731
  tau = config.coefficients().tau

  @jax.jit
  def batches(key):
    on, off = (losses.make_am_batch(ft, None, BASE, MIX, REWARD, key, (16, 1), c) for c in (config, off_config))
    want = jax.vmap(lambda x, t: BASE(MIX, x, jnp.full((16,), t)))(on.traj[:-1], tau)
    return on, off, want

  batch, off, want = batches(jax.random.PRNGKey(1))
  np.testing.assert_allclose(batch.base_velocity, want, rtol=1e-5, atol=1e-6)
  assert off.base_velocity is None
  np.testing.assert_array_equal(off.adjoint, batch.adjoint)  # the adjoint itself is unchanged, bit for bit


def test_bad_inputs():
  config = losses.AMConfig(num_steps=10)
  ft = lambda p, x, t: gmm.velocity(MIX, x, t, S)  # noqa: E731
  batch = jax.jit(lambda k: losses.make_am_batch(ft, None, BASE, MIX, REWARD, k, (8, 1), config))(
      jax.random.PRNGKey(0))
  with pytest.raises(AssertionError):  # trajectory of the wrong length for the config
    losses.adjoint_matching_loss(ft, None, BASE, MIX, batch._replace(traj=batch.traj[:-1], adjoint=batch.adjoint[:-1]),
                                 jax.random.PRNGKey(0), config)
  with pytest.raises(Exception, match="non-finite"):  # NaN reward
    nan_reward = lambda x: jnp.sqrt(x[:, 0] - 100.0)  # noqa: E731
    jax.jit(lambda k: losses.make_am_batch(ft, None, BASE, MIX, nan_reward, k, (8, 1), config).rewards)(
        jax.random.PRNGKey(0))


def test_memory_options_give_the_same_loss_and_gradient():
  """Bounded-memory paths (BUILD_NOTES.md section 12): rematerialised segments of the trajectory / adjoint and the
  chunked loss give the default path's loss, aux and gradient (same keys, same noise) to float rounding; so does
  evaluating the base again at the loss points instead of reusing the adjoint's evaluations."""
  ring = gmm.ring_2d(4, 1.5, 0.3)
  params = _plain_mlp_init(jax.random.PRNGKey(5), dim=2)
  params["w2"] = 30.0 * params["w2"]  # a residual large enough to matter
  ft = lambda p, x, t: _plain_mlp_apply(p, x, t, ring)  # noqa: E731
  reward = rewards.quadratic_reward(0.5 * jnp.eye(2), jnp.array([1.0, -0.5]))
  config = losses.AMConfig(num_steps=12, num_random_timesteps=4, num_last_timesteps=3, loss_clip=1.6,
                           reward_multiplier=2.0)

  def value_and_grad(cfg):
    fn = lambda p: losses.adjoint_matching_objective(ft, p, BASE, ring, reward,  # noqa: E731
                                                     jax.random.PRNGKey(3), (64, 2), cfg)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

  (l0, aux0), g0 = value_and_grad(config)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0))
  assert scale > 1e-3 and 0.0 < float(aux0["clip_fraction"]) < 1.0
  # Each path once: remat (trajectory segments + the selected pairs) and the chunked loss (shared by both paths).
  for options in (dict(remat_segments=4), dict(chunk_loss=True), dict(chunk_loss=7), dict(reuse_base_velocity=False)):
    (l1, aux1), g1 = value_and_grad(dataclasses.replace(config, **options))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5, err_msg=str(options))
    for k in aux0:
      np.testing.assert_allclose(float(aux1[k]), float(aux0[k]), rtol=1e-5, atol=1e-6, err_msg=f"{k} {options}")
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    assert diff < 1e-5 * scale, options


def test_loss_of_a_residual_model_skips_the_base_forward():
  """With the adjoint's base velocities reused (the default) and a ``parameterisation.residual_model`` around the
  same base, the loss evaluates the residual network alone (``parameterisation.residual_difference``): no base
  forward at the M * B loss points.  Loss, aux and gradient agree with evaluating ft - v_base (reuse off) to float
  rounding, plain and chunked; a residual model around ANOTHER base, or other params, still evaluates ft."""
  from am_jax import parameterisation
  ring = gmm.ring_2d(4, 1.5, 0.3)
  traced = []

  def base(p, x, t):
    traced.append(x.shape[0])  # one entry per trace of the base
    return gmm.velocity(p, x, t, S)

  def net(p, x, t):
    h = jnp.tanh(jnp.concatenate([x, t[:, None]], -1) @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]

  params = _plain_mlp_init(jax.random.PRNGKey(5), dim=2)
  params["w2"] = 30.0 * params["w2"]
  reward = rewards.quadratic_reward(0.5 * jnp.eye(2), jnp.array([1.0, -0.5]))
  config = losses.AMConfig(num_steps=12, num_random_timesteps=4, num_last_timesteps=3, reward_multiplier=2.0)
  m, b = 7, 64

  def value_and_grad(cfg, base_params=ring, ft_base_params=None):
    def fn(p, bp):
      ft = parameterisation.residual_model(base, bp if ft_base_params is None else ft_base_params, net, S)
      return losses.adjoint_matching_objective(ft, p, base, bp, reward, jax.random.PRNGKey(3), (b, 2), cfg)
    traced.clear()
    out = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, base_params)
    return out, list(traced)

  (l0, aux0), g0 = value_and_grad(dataclasses.replace(config, reuse_base_velocity=False))[0]
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0))
  for options in (dict(), dict(chunk_loss=True)):
    ((l1, aux1), g1), traces = value_and_grad(dataclasses.replace(config, **options))
    # The base is traced by the rollout (inside ft) and the adjoint's VJPs (batch B), never at the loss points.
    assert m * b not in traces and all(n == b for n in traces), (options, traces)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5, err_msg=str(options))
    for k in aux0:
      np.testing.assert_allclose(float(aux1[k]), float(aux0[k]), rtol=1e-5, atol=1e-6, err_msg=f"{k} {options}")
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    assert diff < 1e-5 * scale, options
  # A residual model whose base params are another object than the loss's base: ft evaluated (a base trace at M B).
  other = jax.tree.map(lambda a: a + 0.0, ring)
  traces = value_and_grad(config, ft_base_params=other)[1]
  assert m * b in traces
  f = parameterisation.residual_model(base, ring, net, S)
  assert parameterisation.residual_difference(f, base, ring) is not None
  assert parameterisation.residual_difference(f, base, other) is None
  assert parameterisation.residual_difference(f, BASE, ring) is None
  assert parameterisation.residual_difference(net, base, ring) is None
  bf16 = parameterisation.residual_model(parameterisation.mixed_precision(base, "bfloat16"), ring, net, S)
  assert parameterisation.residual_difference(bf16, base, ring) is not None  # the same base in another precision


def test_loss_embeds_each_loss_time_once():
  """The loss calls the network inside ``time_hints.rows_in_time_blocks``: a ``models.MLP`` residual embeds the M
  loss times once each (not per row of the M B loss points; the chunked loss: once per scan step), and loss and
  gradient agree with the per-row code (``models.per_row_time``) to float rounding."""
  from flax import nnx

  from am_jax import models, parameterisation
  from tests import model_helpers
  ring = gmm.ring_2d(4, 1.5, 0.3)
  net, params = models.functional(models.MLP(2, hidden=(16, 16), rngs=nnx.Rngs(1)))
  reward = rewards.quadratic_reward(0.5 * jnp.eye(2), jnp.array([1.0, -0.5]))
  config = losses.AMConfig(num_steps=12, num_random_timesteps=4, num_last_timesteps=3, reward_multiplier=2.0)
  m, b = 7, 64
  def value_and_grad(cfg):
    def fn(p):
      ft = parameterisation.residual_model(BASE, ring, net, S)
      return losses.adjoint_matching_objective(ft, p, BASE, ring, reward, jax.random.PRNGKey(3), (b, 2), cfg)[0]
    with model_helpers.embedded_rows(only_in_loss=True) as embedded:  # the calls traced by the loss
      out = jax.jit(jax.value_and_grad(fn))(params)
    return out, embedded

  for options, want in ((dict(), ([m * b], [m])), (dict(chunk_loss=True), ([b], [1])),
                        (dict(chunk_loss=m), ([m * b], [m]))):
    cfg = dataclasses.replace(config, **options)
    with models.per_row_time():
      (l0, g0), before = value_and_grad(cfg)
    (l1, g1), after = value_and_grad(cfg)
    # The embeddings traced by the loss (inside its time-block hint): M B -> M rows (chunked: n B -> n per chunk).
    assert (before, after) == want, (options, before, after)
    np.testing.assert_allclose(float(l1), float(l0), rtol=5e-5, err_msg=str(options))  # the rollouts differ by rounding too
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0))
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    assert diff < 5e-5 * scale, options


def test_loss_chunks_of_several_time_steps_match_one_call():
  """``chunk_loss = n``: the M loss steps in M / n chunks of n B rows (conditioning tiled per chunk) give
  the loss, aux and gradient of the single (M B)-row call to float rounding, for every divisor n of M, also with the
  batch sharded over 8 devices (each accumulating its part of the gradient; also on the remat path)."""
  ring = gmm.ring_2d(4, 1.5, 0.3)
  params = _plain_mlp_init(jax.random.PRNGKey(5), dim=2)
  params["w2"] = 30.0 * params["w2"]
  params["wc"] = 0.5 * jax.random.normal(jax.random.PRNGKey(6), (3, 2))

  def ft(p, x, t, label):  # a conditional model: the label's row of wc shifts the velocity
    return _plain_mlp_apply(p, x, t, ring) + p["wc"][label]

  def base(p, x, t, label):
    del label
    return gmm.velocity(p, x, t, S)

  labels = jnp.arange(32) % 3
  reward = rewards.quadratic_reward(0.5 * jnp.eye(2), jnp.array([1.0, -0.5]))
  config = losses.AMConfig(num_steps=12, num_random_timesteps=4, num_last_timesteps=4, reward_multiplier=2.0)
  assert config.num_loss_timesteps == 8

  def value_and_grad(cfg, mesh=None):
    fn = lambda p: losses.adjoint_matching_objective(ft, p, base, ring, reward, jax.random.PRNGKey(3),  # noqa: E731
                                                     (32, 2), cfg, cond=(labels,), mesh=mesh)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

  (l0, aux0), g0 = value_and_grad(config)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0))
  assert scale > 1e-3 and float(jnp.max(jnp.abs(g0["wc"]))) > 1e-3
  mesh = sharding.make_mesh(8)  # also with the paths (and their labels) split over 8 devices, per-device gradients
  for n, m, remat in ((1, None, 0), (2, None, 0), (4, None, 0), (8, None, 0), (1, mesh, 0), (4, mesh, 0),
                      (2, mesh, 3)):
    (l1, aux1), g1 = value_and_grad(dataclasses.replace(config, chunk_loss=n, remat_segments=remat), m)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5, err_msg=str(n))
    for k in aux0:
      np.testing.assert_allclose(float(aux1[k]), float(aux0[k]), rtol=1e-5, atol=1e-6, err_msg=f"{k} {n}")
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    assert diff < 1e-5 * scale, n
  with pytest.raises(ValueError, match="chunk_loss"):
    dataclasses.replace(config, chunk_loss=3)
