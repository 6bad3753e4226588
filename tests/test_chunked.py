"""``am_jax.chunked.separable_loss_in_chunks``: the loss, its terms, extras and gradient equal one call at all rows."""
import jax
import jax.numpy as jnp
import numpy as np

from am_jax import chunked


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
