"""``am_jax.chunked.separable_loss_in_chunks``: the loss, its terms, extras and gradient equal one call at all rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from am_jax import chunked, sharding
from tests.hlo_checks import while_body_ops


def _mlp(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def test_clipped_mean_in_chunks_matches_one_call_and_skips_integer_leaves():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"w1": jax.random.normal(k1, (3, 16)), "b1": jnp.zeros(16), "w2": jax.random.normal(k2, (16, 2)),
            "calls": jnp.array(7, jnp.int32)}  # an integer leaf: a constant, as to jax.grad(allow_int=True)
  x = jax.random.normal(k3, (6, 5, 3))          # 6 chunks of 5 rows
  target = jnp.ones((6, 5, 2))
  clip, rows = 4.0, 30

  def terms_of(p, x, target):
    out = _mlp(p, x) * (p["calls"] > 0)
    return jnp.sum((out - target) ** 2, -1), jnp.sum(out**2, -1)

  def clipped_mean(t):
    return jnp.mean(jnp.minimum(t, clip))

  def one_call(p):
    t, out_sq = terms_of(p, x.reshape(rows, 3), target.reshape(rows, 2))
    return clipped_mean(t), (t, out_sq)

  def in_chunks(p):
    loss, t, out_sq = chunked.separable_loss_in_chunks(
        lambda q, consts, chunk: terms_of(q, *chunk), p, (x, target), clipped_mean,
        lambda t: (t < clip).astype(t.dtype) / rows)
    return loss, (t, out_sq.reshape(rows))

  (l0, (t0, o0)), g0 = jax.jit(jax.value_and_grad(one_call, has_aux=True, allow_int=True))(params)
  (l1, (t1, o1)), g1 = jax.jit(jax.value_and_grad(in_chunks, has_aux=True, allow_int=True))(params)
  assert 0 < float(jnp.mean(t0 > clip)) < 1  # some terms clipped: their gradient must vanish
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  np.testing.assert_allclose(t1, t0, rtol=1e-6)
  np.testing.assert_allclose(o1, o0, rtol=1e-6)
  for name in ("w1", "b1", "w2"):
    np.testing.assert_allclose(g1[name], g0[name], rtol=1e-5, atol=1e-6, err_msg=name)
  assert g1["calls"].dtype == jax.dtypes.float0
  # The value alone (no gradient asked) runs the forward scan only and agrees too.
  np.testing.assert_allclose(jax.jit(lambda p: in_chunks(p)[0])(params), l0, rtol=1e-6)


def test_per_device_gradient_on_a_mesh_matches_one_call_with_one_all_reduce():
  """8 devices, the batch sharded: the same loss, gradient and (permuted) terms as one call at all rows, and no
  all-reduce inside the chunk loop (each device accumulates its part; without the mesh XLA reduced every chunk's
  gradient), each device doing 1/8 of the FLOPs.  Conditioning in consts with its own batch axis; a mesh without batch_axes is refused."""
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(8)
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(1), 4)
  params = {"w1": jax.random.normal(k1, (3, 16)), "b1": jnp.zeros(16), "w2": jax.random.normal(k2, (16, 2))}
  chunks, steps, paths = 3, 2, 16                      # data: (chunks, steps, paths, 3), paths sharded
  x = jax.random.normal(k3, (chunks, steps, paths, 3))
  scale = jax.random.uniform(k4, (paths,)) + 0.5       # per-path conditioning, a const with batch axis 0
  target = jnp.ones((chunks, steps, paths, 2))
  rows = chunks * steps * paths

  def terms_of(p, scale, x, target):                   # x (steps, b, 3) -> (steps b,) terms
    out = _mlp(p, x) * scale[None, :, None]
    return jnp.sum((out - target) ** 2, -1).reshape(-1), jnp.sum(out**2, -1).reshape(-1)

  def one_call(p, x):  # all chunks' steps at once: (chunks steps, paths, 3)
    t, _ = terms_of(p, scale, x.reshape(chunks * steps, paths, 3), target.reshape(chunks * steps, paths, 2))
    return jnp.mean(t), t

  def in_chunks(p, x, with_mesh=True):
    x = sharding.constrain_batch(x, mesh, 2)
    loss, t, _ = chunked.separable_loss_in_chunks(
        lambda q, consts, chunk: terms_of(q, consts, *chunk), p, (x, target), jnp.mean,
        lambda t: jnp.ones_like(t) / rows, consts=scale, mesh=mesh if with_mesh else None,
        batch_axes=(0, (1, 1)))
    return loss, t

  (l0, t0), g0 = jax.jit(jax.value_and_grad(one_call, has_aux=True))(params, x)
  step = jax.jit(jax.value_and_grad(in_chunks, has_aux=True))
  (l1, t1), g1 = step(params, x)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  value_only = jax.jit(lambda p, x: in_chunks(p, x)[0])  # the forward path (no VJP), also per device
  np.testing.assert_allclose(float(value_only(params, x)), float(l0), rtol=1e-6)
  assert value_only.lower(params, x).compile().cost_analysis()["flops"] < 0.3 * jax.jit(
      lambda p, x: one_call(p, x)[0]).lower(params, x).compile().cost_analysis()["flops"]
  np.testing.assert_allclose(np.sort(np.asarray(t1)), np.sort(np.asarray(t0)), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert while_body_ops(step.lower(params, x).compile().as_text(), "all-reduce") == 0
  # ... and each device does its 1/8 of the work (XLA's per-device FLOP count), not all groups redundantly.
  flops = lambda fn: fn.lower(params, x).compile().cost_analysis()["flops"]  # noqa: E731
  assert flops(step) < 0.3 * flops(jax.jit(jax.value_and_grad(one_call, has_aux=True)))
  per_chunk = jax.jit(jax.value_and_grad(lambda p, x: in_chunks(p, x, with_mesh=False), has_aux=True))
  assert while_body_ops(per_chunk.lower(params, x).compile().as_text(), "all-reduce") > 0  # what the mesh avoids
  with pytest.raises(ValueError, match="batch_axes"):
    chunked.separable_loss_in_chunks(lambda q, c, chunk: terms_of(q, c, *chunk), params, (x, target), jnp.mean,
                                     jnp.ones_like, consts=scale, mesh=mesh)
