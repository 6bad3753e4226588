"""``am_jax.classifiers``: classifier rewards on 8x8 and 28x28 digits, Fréchet distance, diversity (the digits
pipeline: tests/integration/test_digits_pipeline.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from am_jax import classifiers, data


def _psd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_closed_forms():
  rng = np.random.default_rng(0)
  d = 5
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  # Commuting (diagonal) covariances: tr sqrt(C1 C2) = sum sqrt(c1 c2) exactly.
  c1, c2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
  want = np.sum((mu1 - mu2) ** 2) + np.sum(c1 + c2 - 2 * np.sqrt(c1 * c2))
  got = classifiers.frechet_distance_gaussians(mu1, np.diag(c1), mu2, np.diag(c2))
  np.testing.assert_allclose(got, want, rtol=1e-10)
  # General covariances: compare with the definition tr (C1 C2)^1/2 via the eigenvalues of C1 C2.
  s1, s2 = _psd(rng, d), _psd(rng, d)
  tr_sqrt = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).real))
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * tr_sqrt
  np.testing.assert_allclose(classifiers.frechet_distance_gaussians(mu1, s1, mu2, s2), want, rtol=1e-8)
  assert abs(classifiers.frechet_distance_gaussians(mu1, s1, mu1, s1)) < 1e-8
  # Sample version converges to the Gaussian value.
  x = rng.multivariate_normal(mu1, s1, 20000)
  y = rng.multivariate_normal(mu2, s2, 20000)
  np.testing.assert_allclose(classifiers.frechet_distance(x, y),
                             classifiers.frechet_distance_gaussians(mu1, s1, mu2, s2), rtol=0.05)


def test_diversity():
  f = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0], [10.0, 1.0]])
  assert classifiers.diversity(f, np.array([0, 0, 1, 1])) == pytest.approx(3.0)  # (5 + 1) / 2
  assert classifiers.diversity(np.zeros((4, 3))) == 0.0


@pytest.mark.parametrize("arch", classifiers.ARCHS)
def test_reward_shapes_and_grads(arch):
  apply_fn, feat_fn, abstract = classifiers.functional(nnx.eval_shape(lambda: classifiers.build(arch, 0)))
  rng = np.random.default_rng(0)  # host-drawn weights: eager NNX init compiles one program per leaf shape
  params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.normal(size=s.shape).astype(np.float32)), abstract)
  x = jax.random.uniform(jax.random.PRNGKey(0), (6, 8, 8, 1), minval=-1, maxval=1)
  labels = jnp.array([0, 1, 2, 3, 9, 10], jnp.int32)  # 10: the null label
  rewards = [classifiers.target_class_reward(apply_fn, params, 3),
             classifiers.prompt_consistency_reward(apply_fn, params),
             classifiers.ink_reward, classifiers.centring_reward]
  # One jit for the logits, features, all values and input gradients (eager NNX ops are slow).
  logits, feats, vals_grads = jax.jit(lambda z: (apply_fn(params, z), feat_fn(params, z), [
      (r(z, labels), jax.grad(lambda u: jnp.sum(r(u, labels)))(z)) for r in rewards]))(x)  # noqa: B023
  assert logits.shape == (6, 10) and feats.ndim == 2 and feats.shape[0] == 6
  logp = jax.nn.log_softmax(logits)
  np.testing.assert_allclose(vals_grads[0][0], logp[:, 3], rtol=1e-5, atol=1e-6)  # log p(3 | x)
  np.testing.assert_allclose(vals_grads[1][0][:5], logp[np.arange(5), labels[:5]], rtol=1e-5, atol=1e-6)
  for val, g in vals_grads:
    assert val.shape == (6,) and bool(jnp.all(jnp.isfinite(val)))
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0
  assert bool(jnp.all(vals_grads[1][0] <= 0))
  np.testing.assert_allclose(classifiers.ink_reward(-jnp.ones((2, 8, 8, 1))), 0.0)
  np.testing.assert_allclose(classifiers.ink_reward(jnp.ones((2, 8, 8, 1))), 1.0)


@pytest.mark.parametrize("arch", classifiers.ARCHS)
def test_classifier_rewards_on_28x28(arch):
  model = nnx.eval_shape(lambda: classifiers.build(arch, 0, image_size=28))
  apply_fn, feat_fn, abstract = classifiers.functional(model)
  rng = np.random.default_rng(0)  # host-drawn weights: avoids compiling one init program per leaf shape
  params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.normal(size=s.shape).astype(np.float32)), abstract)
  x, _ = data.mnist("heldout", num_heldout=1000)
  x = jnp.asarray(x[:4])
  labels = jnp.array([0, 3, 9, 10], jnp.int32)
  target = classifiers.target_class_reward(apply_fn, params, 3)
  consistency = classifiers.prompt_consistency_reward(apply_fn, params)

  @jax.jit
  def run(z):
    logp = jax.nn.log_softmax(apply_fn(params, z))
    return (logp, feat_fn(params, z), target(z), jax.grad(lambda u: jnp.sum(target(u)))(z), consistency(z, labels))

  logp, feats, r_target, g, r_cons = run(x)
  assert logp.shape == (4, 10) and feats.shape == (4, 64 if arch == "small_cnn" else 128)
  np.testing.assert_allclose(r_target, logp[:, 3], rtol=1e-6)  # log p(target | x), labels ignored
  np.testing.assert_allclose(r_cons, [logp[0, 0], logp[1, 3], logp[2, 9], logp[3].max()], rtol=1e-6)
  assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0
  with pytest.raises(ValueError, match="built for images"):
    apply_fn(params, jnp.zeros((2, 8, 8, 1)))
  with pytest.raises(ValueError, match="image_size"):
    classifiers.build(arch, 0, image_size=2)
