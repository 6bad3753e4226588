"""transformer.DiT: patchify layout, adaLN-Zero identity at init, conditioning, null label, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from am_jax import transformer
from tests import model_helpers


def _rngs():
  return nnx.Rngs(0)  # (constructors that raise, or under nnx.eval_shape: no initialiser runs)


def test_patchify_layout_and_sincos():
  net = nnx.eval_shape(lambda: transformer.DiT(image_size=8, patch_size=4, width=16, depth=1, num_heads=2,
                                               rngs=_rngs()))
  x = np.arange(2 * 8 * 8).reshape(2, 8, 8, 1).astype(np.float32)
  tokens = net._patchify(x)
  assert tokens.shape == (2, 4, 16)
  np.testing.assert_array_equal(tokens[1, 1], x[1, 0:4, 4:8, 0].reshape(-1))  # token (0, 1): rows 0-3, cols 4-7
  np.testing.assert_array_equal(tokens[0, 2], x[0, 4:8, 0:4, 0].reshape(-1))
  np.testing.assert_array_equal(net._unpatchify(tokens), x)
  pe = transformer.sincos_2d(7, 64)
  assert pe.shape == (49, 64) and np.all(np.abs(pe) <= 1)
  assert len({tuple(np.round(r, 5)) for r in pe}) == 49  # every position distinct
  with pytest.raises(ValueError, match="divisible by 4"):
    transformer.sincos_2d(7, 30)


def test_forward_conditioning_and_training_step():
  apply_fn, params = model_helpers.jit_init(lambda: transformer.DiT(
      image_size=8, patch_size=4, width=32, depth=1, num_heads=2, num_classes=10, pos_embed="learned",
      rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  t = jnp.array([0.1, 0.4, 0.7, 0.9])
  labels = jnp.array([0, 3, 9, 10], jnp.int32)  # 10: the null label
  opt = optax.adam(1e-2)

  @jax.jit
  def run(params):
    out = apply_fn(params, x, t, labels)
    out_null = apply_fn(params, x, t)  # label=None means the null label
    loss = lambda p: jnp.mean((apply_fn(p, x, t, labels) - x) ** 2)  # noqa: E731
    l0, g = jax.value_and_grad(loss)(params)
    updates, _ = opt.update(g, opt.init(params))
    p1 = optax.apply_updates(params, updates)
    # Samples are independent, so one batch holds the 4 inputs, sample 0 with label 5, and with t = 0.5.
    out1 = apply_fn(p1, jnp.concatenate([x, x[:1], x[:1]]), jnp.concatenate([t, t[:1], jnp.array([0.5])]),
                    jnp.concatenate([labels, jnp.array([5, 0], jnp.int32)]))
    return out, out_null, l0, g, out1

  out, out_null, _, grads, out1 = run(params)
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  # adaLN-Zero: every block and the final modulation start at zero, so at init the net is
  # out(LN(patch(x) + pos)) and ignores t and the label.
  np.testing.assert_allclose(out_null, out, rtol=1e-5, atol=1e-6)
  grad_ada = np.abs(np.asarray(grads["blocks"][0]["ada"]["kernel"][...])).sum()
  assert grad_ada > 0  # the zero-initialised modulations do get gradients
  # After one step, the label and the time both change the output.
  assert float(jnp.abs(out1[4] - out1[0]).max()) > 1e-4
  assert float(jnp.abs(out1[5] - out1[0]).max()) > 1e-4


def test_zero_init_output_and_errors():
  apply_fn, params = model_helpers.jit_init(lambda: transformer.DiT(
      image_size=8, patch_size=2, width=16, depth=1, num_heads=2, zero_init_output=True, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  assert not np.any(np.asarray(jax.jit(apply_fn)(params, x, jnp.array([0.2, 0.8]))))  # unconditional net, zero output
  with pytest.raises(ValueError, match="patch_size"):
    transformer.DiT(image_size=28, patch_size=3, rngs=_rngs())
  with pytest.raises(ValueError, match="num_heads"):
    transformer.DiT(width=30, num_heads=4, rngs=_rngs())
  with pytest.raises(ValueError, match="pos_embed"):
    transformer.DiT(pos_embed="rope", rngs=_rngs())
  with pytest.raises(ValueError, match="got x of shape"):
    apply_fn(params, jnp.zeros((2, 28, 28, 1)), jnp.zeros(2))
