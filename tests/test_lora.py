"""lora: zero delta at init, merge == composed apply, gradients only for adapters, on MLP / UNet / DiT."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from am_jax import checkpointing, lora, models, transformer
from tests import model_helpers


def _functional(ctor, seed=0):
  """(apply_fn, params) of ``ctor()`` with host-drawn random params (the initialisers matter nothing here)."""
  return model_helpers.host_init(ctor, 0.2, seed)


NETS = {
    "mlp": (lambda: models.MLP(2, hidden=(16, 16), num_classes=3, rngs=nnx.Rngs(0)), (4, 2)),
    "unet": (lambda: models.UNet(channels=(8,), time_embed_dim=16, num_classes=3, rngs=nnx.Rngs(0)), (2, 8, 8, 1)),
    "dit": (lambda: transformer.DiT(image_size=8, patch_size=4, width=32, depth=1, num_heads=2, num_classes=3,
                                    rngs=nnx.Rngs(0)), (2, 8, 8, 1)),
}


@pytest.mark.parametrize("name", sorted(NETS))
def test_zero_delta_merge_equals_apply_and_adapter_only_gradients(name):
  ctor, shape = NETS[name]
  base_apply, base_params = _functional(ctor)
  adapters = lora.init(base_params, 4, jax.random.PRNGKey(1))
  # Every >= 2-D kernel (and embedding table) is adapted, biases are not; conv kernels as (kh kw cin) x cout.
  leaves = {lora.leaf_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(base_params)}
  assert set(adapters) == {n for n, leaf in leaves.items() if leaf.ndim >= 2}
  for n, ad in adapters.items():
    m, k = int(np.prod(leaves[n].shape[:-1])), leaves[n].shape[-1]
    assert ad["a"].shape == (m, min(4, m, k)) and ad["b"].shape == (min(4, m, k), k)
    assert not np.any(np.asarray(ad["b"])) and np.all(np.abs(np.asarray(ad["a"])) <= np.sqrt(6 / m))
  if name == "unet":
    assert adapters["out/kernel"]["a"].shape == (3 * 3 * 8, 1)  # rank capped at min(m, n)
  x = np.random.default_rng(2).normal(size=shape).astype(np.float32)  # NumPy inputs: no eager compiles
  t = np.full((shape[0],), 0.3, np.float32)
  label = np.arange(shape[0], dtype=np.int32) % 4  # 3: the null label
  apply = lora.apply_fn(base_apply, scale=0.5)

  @jax.jit
  def run(adapters, base_params):
    ft = functools.partial(apply, base_params=base_params)  # base params traced, not closed-over constants
    out0, ref = ft(adapters, x, t, label), base_apply(base_params, x, t, label)
    grads = jax.grad(lambda a: jnp.mean((ft(a, x, t, label) - x) ** 2))(adapters)
    stepped = jax.tree.map(lambda a, g: a - 50.0 * g, adapters, grads)
    merged = lora.merge(base_params, stepped, scale=0.5)
    return out0, ref, grads, stepped, merged, ft(stepped, x, t, label), base_apply(merged, x, t, label)

  out0, ref, grads, stepped, merged, out1, out_merged = run(adapters, base_params)
  np.testing.assert_allclose(out0, ref, rtol=1e-6, atol=1e-6)  # B = 0: the adapted model is the base
  # Gradients exist only for the adapters (the grad tree is the adapter tree); at init only B moves.
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  assert sum(float(jnp.abs(g["b"]).sum()) for g in grads.values()) > 0
  assert all(not np.any(np.asarray(g["a"])) for g in grads.values())
  # After a step: a non-zero change, and merged params through the base apply == the composed apply.
  assert float(jnp.max(jnp.abs(out1 - ref))) > 1e-3
  np.testing.assert_allclose(out_merged, out1, rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(merged) == jax.tree.structure(base_params)
  # Each kernel moved by exactly scale * A @ B reshaped; everything else is the base.
  for p, w in jax.tree_util.tree_leaves_with_path(merged):
    n = lora.leaf_name(p)
    w0 = np.asarray(leaves[n])
    want = w0
    if n in stepped:
      want = w0 + 0.5 * (np.asarray(stepped[n]["a"]) @ np.asarray(stepped[n]["b"])).reshape(w0.shape)
    np.testing.assert_allclose(np.asarray(w), want, rtol=1e-5, atol=1e-6)


def test_filters_counts_and_checkpoint(tmp_path):
  _, base_params = _functional(
      lambda: transformer.DiT(width=32, depth=2, num_heads=2, num_classes=10, rngs=nnx.Rngs(0)))
  adapters = lora.init(base_params, 2, jax.random.PRNGKey(0), filter=lora.match(r"/qkv/", r"/proj/"))
  assert sorted(adapters) == ["blocks/0/proj/kernel", "blocks/0/qkv/kernel", "blocks/1/proj/kernel",
                              "blocks/1/qkv/kernel"]
  counts = lora.param_counts(base_params, adapters)
  assert counts["adapter_params"] == 2 * (2 * (32 + 96) + 2 * (32 + 32))
  assert counts["full_params"] == sum(x.size for x in jax.tree.leaves(base_params))
  assert counts["adapter_bytes"] == 4 * counts["adapter_params"] and 0 < counts["fraction"] < 0.05
  # Only the adapters are checkpointed: they round-trip through the library's Orbax helpers.
  adapters = {n: {"a": ad["a"], "b": ad["b"] + 1.0} for n, ad in adapters.items()}
  checkpointing.save_params(str(tmp_path / "lora"), adapters)
  back = checkpointing.load_params(str(tmp_path / "lora"), adapters)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(back)))


def test_errors():
  _, base_params = _functional(lambda: models.MLP(2, hidden=(8,), rngs=nnx.Rngs(0)))
  key = jax.random.PRNGKey(0)
  for bad in (0, -1, 2.0, True, "4"):
    with pytest.raises(ValueError, match="rank"):
      lora.init(base_params, bad, key)
  with pytest.raises(ValueError, match="selected no leaf"):
    lora.init(base_params, 2, key, filter=lora.match("nothing_matches"))
  with pytest.raises(ValueError, match="ndim >= 2"):
    lora.init(base_params, 2, key, filter=lambda name, leaf: True)
  adapters = lora.init(base_params, 2, key)
  with pytest.raises(ValueError, match="name no leaf"):
    lora.merge(base_params, {**adapters, "not/a/leaf": adapters["out/kernel"]})
  wrong = dict(adapters, **{"out/kernel": {"a": jnp.zeros((3, 2)), "b": jnp.zeros((2, 2))}})
  with pytest.raises(ValueError, match="does not fit"):
    lora.merge(base_params, wrong)
