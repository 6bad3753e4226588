"""``am_jax.models``: MLP and U-Net velocity nets as pure apply functions; the fast-VJP convolution is the same
convolution (outputs and gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from am_jax import models, time_hints
from tests import model_helpers


def _max_abs_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_mlp_shapes_labels_and_zero_init_output():
  net = models.MLP(2, hidden=(8,), num_classes=3, zero_init_output=True, rngs=nnx.Rngs(0))
  apply_fn, params = models.functional(net)
  x, t = jnp.ones((4, 2)), jnp.full((4,), 0.3)
  assert not np.any(np.asarray(apply_fn(params, x, t, jnp.arange(4) % 3)))  # zero-initialised output layer
  apply_fn, params = model_helpers.host_init(lambda: models.MLP(2, hidden=(8,), num_classes=3, rngs=nnx.Rngs(0)))
  out = jax.jit(lambda p: (apply_fn(p, x, t, jnp.array([0, 1, 2, 3])), apply_fn(p, x, t), apply_fn(p, x, 0.9)))(params)
  assert out[0].shape == (4, 2)
  np.testing.assert_allclose(out[0][3], out[1][3], rtol=1e-6)  # label 3 = num_classes is the null label (None)
  assert not np.allclose(out[0][0], out[0][1])  # labels change the output
  assert not np.allclose(out[1], out[2])  # so does t


def test_mlp_shared_time_path_matches_per_row():
  """The shared-time path (one embedding for a batch at one time) gives the per-row model's outputs and gradients to
  float rounding (labelled net: every block of the first layer); rows at different times take the per-row path bit
  for bit; the path is taken inside jit, grad and scan alike."""
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 2))
  label = jnp.arange(16) % 4
  (fast, p), (slow, _) = (models.functional(models.MLP(2, hidden=(32, 32), num_classes=3, shared_time=s,
                                                       rngs=nnx.Rngs(0))) for s in (True, False))
  shared_t, rows_t = jnp.full((16,), 0.3), jnp.linspace(0.0, 1.0, 16)

  @jax.jit
  def both(t):
    out = [f(p, x, t, label) for f in (fast, slow)]
    grads = [jax.grad(lambda q, y, f=f: jnp.sum(f(q, y, t, label) ** 2), argnums=(0, 1))(p, x) for f in (fast, slow)]
    roll = [jax.lax.scan(lambda z, s, f=f: (z + 0.1 * f(p, z, jnp.full((16,), s), label), None), x,
                         jnp.linspace(0.05, 0.95, 10))[0] for f in (fast, slow)]
    return out, grads, roll

  out, grads, roll = both(shared_t)
  np.testing.assert_allclose(out[0], out[1], atol=1e-6)
  assert _max_abs_diff(*grads) < 1e-5
  np.testing.assert_allclose(roll[0], roll[1], atol=1e-5)
  np.testing.assert_array_equal(jax.jit(fast)(p, x, rows_t, label), jax.jit(slow)(p, x, rows_t, label))
  # Default (None): the per-row code unless traced inside time_hints.batch_shares_time() (and on CPU).
  auto, _ = models.functional(models.MLP(2, hidden=(32, 32), num_classes=3, rngs=nnx.Rngs(0)))
  np.testing.assert_array_equal(jax.jit(auto)(p, x, shared_t, label), jax.jit(slow)(p, x, shared_t, label))

  def hinted(q, y, t, lab):
    with time_hints.batch_shares_time():
      return auto(q, y, t, lab)

  assert not time_hints.shares_time()
  np.testing.assert_array_equal(jax.jit(hinted)(p, x, shared_t, label), jax.jit(fast)(p, x, shared_t, label))
  np.testing.assert_array_equal(jax.jit(hinted)(p, x, rows_t, label), jax.jit(slow)(p, x, rows_t, label))



def test_mlp_time_blocks_match_per_row_and_poison_a_broken_promise():
  """Inside ``time_hints.rows_in_time_blocks(M)`` (rows in M blocks at one time each, the losses' layout) the MLP
  embeds M times, not M B: outputs and gradients as the per-row code to float rounding (labelled net); a block whose
  rows differ in time gives NaN (never a wrong number); ``shared_time=False`` and ``models.per_row_time()`` keep
  the per-row code bit for bit; the hint is trace-time state only."""
  m, b = 5, 8
  x = jax.random.normal(jax.random.PRNGKey(0), (m * b, 2))
  label = jnp.arange(m * b) % 4
  blocked_t = jnp.repeat(jnp.linspace(0.1, 0.9, m), b)
  (apply_fn, p), (never, _) = (models.functional(models.MLP(2, hidden=(32, 32), num_classes=3, shared_time=s,
                                                            rngs=nnx.Rngs(0))) for s in (None, False))
  def value_and_grad(fn, t, blocks):
    def loss(q, y):
      if blocks is None:
        return jnp.sum(jnp.sin(fn(q, y, t, label)))
      with time_hints.rows_in_time_blocks(blocks):
        return jnp.sum(jnp.sin(fn(q, y, t, label)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(p, x)

  with model_helpers.embedded_rows() as embedded:
    ref = value_and_grad(apply_fn, blocked_t, None)
    assert embedded == [m * b]
    embedded.clear()
    got = value_and_grad(apply_fn, blocked_t, m)
    assert embedded == [m]  # one embedding per block
    one_block = value_and_grad(apply_fn, jnp.full((m * b,), 0.4), 1)
  np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-5)
  assert _max_abs_diff(got[1], ref[1]) < 1e-5 * max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref[1]))
  np.testing.assert_allclose(float(one_block[0]), float(value_and_grad(apply_fn, jnp.full((m * b,), 0.4), None)[0]),
                             rtol=1e-5)
  # A broken promise (rows of a block at different times): NaN, not a silently wrong answer.
  assert np.isnan(float(value_and_grad(apply_fn, jnp.linspace(0.0, 1.0, m * b), m)[0]))
  # Switched off: shared_time=False, and per_row_time() (the code before, bit for bit).
  per_row = value_and_grad(never, blocked_t, None)
  np.testing.assert_array_equal(value_and_grad(never, blocked_t, m)[0], per_row[0])
  with models.per_row_time():
    np.testing.assert_array_equal(value_and_grad(apply_fn, blocked_t, m)[0], per_row[0])
  assert time_hints.time_blocks() is None
  with pytest.raises(ValueError, match="num_blocks"):
    with time_hints.rows_in_time_blocks(0):
      pass

def test_unet_shapes_and_null_label():
  """Class-conditional U-Net on 8x8 images: the output has the input's shape; no label = the null label, which
  differs from a real label."""
  apply_fn, params = model_helpers.host_init(lambda: models.UNet(1, (8, 16), 16, num_classes=10, rngs=nnx.Rngs(0)))
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32))
  t, y = jnp.full((4,), 0.3), jnp.array([0, 3, 9, 10], jnp.int32)
  out, null = jax.jit(lambda p: (apply_fn(p, x, t, y), apply_fn(p, x, t)))(params)
  assert out.shape == (4, 8, 8, 1) and bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(out[3], null[3], rtol=1e-5, atol=1e-6)  # label 10 is the null label
  assert not np.allclose(out[:3], null[:3])


def test_fast_conv_vjp_is_the_same_convolution():
  """UNet with the explicit-kernel input VJP: same parameters, same outputs and gradients as lax's transpose rules."""
  kw = dict(in_channels=1, channels=(8,), time_embed_dim=16, num_classes=3)
  fast_apply, params = model_helpers.host_init(lambda: models.UNet(**kw, rngs=nnx.Rngs(0)))
  slow_apply, slow_abstract = models.functional(nnx.eval_shape(lambda: models.UNet(**kw, fast_conv_vjp=False,
                                                                                    rngs=nnx.Rngs(0))))
  assert jax.tree.structure(params) == jax.tree.structure(slow_abstract)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  t, lab = jnp.full((4,), 0.3), jnp.arange(4) % 3
  c = jax.random.normal(jax.random.PRNGKey(1), x.shape)

  @jax.jit
  def run(params, x):
    grads = lambda apply: jax.grad(lambda p, y: jnp.sum(c * apply(p, y, t, lab)), argnums=(0, 1))(params, x)  # noqa
    return fast_apply(params, x, t, lab), slow_apply(params, x, t, lab), grads(fast_apply), grads(slow_apply)

  out_fast, out_slow, g_fast, g_slow = run(params, x)
  np.testing.assert_array_equal(out_fast, out_slow)
  assert _max_abs_diff(g_fast, g_slow) < 1e-6 and _max_abs_diff(g_fast, jax.tree.map(jnp.zeros_like, g_fast)) > 1e-3
  # Padding other than SAME, and strided convolutions (fallback), agree with lax too.
  w = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 2, 4))
  xi = jax.random.normal(jax.random.PRNGKey(3), (2, 7, 7, 2))
  dn = ("NHWC", "HWIO", "NHWC")

  @jax.jit
  def conv_grads(a, b):
    out = []
    for strides, padding in (((1, 1), ((2, 0), (1, 1))), ((1, 1), "VALID"), ((2, 2), "SAME")):
      ref = lambda a, b: jax.lax.conv_general_dilated(a, b, strides, padding, dimension_numbers=dn)  # noqa: E731,B023
      new = lambda a, b: models.conv_general_dilated_fast_vjp(a, b, strides, padding,  # noqa: E731,B023
                                                              dimension_numbers=dn)
      out.append((jax.grad(lambda a, b: jnp.sum(jnp.sin(ref(a, b))), argnums=(0, 1))(a, b),
                  jax.grad(lambda a, b: jnp.sum(jnp.sin(new(a, b))), argnums=(0, 1))(a, b)))
    return out

  for (gr, gn), case in zip(conv_grads(xi, w), ("explicit padding", "VALID", "strided")):
    assert _max_abs_diff(gr, gn) < 1e-5, case
