"""Issue 4: classifier rewards, Fréchet distance, and a tiny end-to-end digits pipeline.

pre-train (few steps) -> train classifiers A/B -> AM fine-tune (2 lambdas, few steps) -> evaluate.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from am_jax import classifiers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


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
  assert apply_fn(params, x).shape == (6, 10)
  assert feat_fn(params, x).ndim == 2 and feat_fn(params, x).shape[0] == 6
  rewards = [classifiers.target_class_reward(apply_fn, params, 3),
             classifiers.prompt_consistency_reward(apply_fn, params),
             classifiers.ink_reward, classifiers.centring_reward]
  # One jit for all values and input gradients (eager NNX ops are slow).
  vals_grads = jax.jit(lambda z: [(r(z, labels), jax.grad(lambda u: jnp.sum(r(u, labels)))(z)) for r in rewards])(x)
  for val, g in vals_grads:
    assert val.shape == (6,) and bool(jnp.all(jnp.isfinite(val)))
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0
  assert bool(jnp.all(vals_grads[1][0] <= 0))
  np.testing.assert_allclose(classifiers.ink_reward(-jnp.ones((2, 8, 8, 1))), 0.0)
  np.testing.assert_allclose(classifiers.ink_reward(jnp.ones((2, 8, 8, 1))), 1.0)


def test_tiny_pipeline(tmp_path):
  from configs import digits_finetune, digits_pretrain, digits_reward
  from experiments import evaluate, finetune_images, pretrain, train_reward

  pc = digits_pretrain.get_config()
  pc.model.channels = (8, 16)
  pc.model.time_embed_dim = 16
  pc.pretrain.steps = 6
  pc.pretrain.batch_size = 16
  pc.pretrain.log_every = 3
  pc.pretrain.checkpoint.every_steps = 3
  pc.mesh.num_devices = 1
  base_dir = str(tmp_path / "base")
  pretrain.run(pc, base_dir)

  rc = digits_reward.get_config()
  rc.train.steps = 5
  rc.train.batch_size = 16
  rc.train.log_every = 5
  reward_dir = str(tmp_path / "reward")
  summary = train_reward.run(rc, reward_dir)
  assert 0.0 <= summary["A_test_accuracy"] <= 1.0
  for name in ("A", "B"):
    assert os.path.isfile(os.path.join(reward_dir, name, "config.json"))
  apply_b, feat_b, params_b, info = train_reward.load_classifier(reward_dir, "B")
  assert info["arch"] == "wide_cnn" and apply_b(params_b, jnp.zeros((2, 8, 8, 1))).shape == (2, 10)

  fc = digits_finetune.get_config()
  fc.base_checkpoint, fc.reward_checkpoint = base_dir, reward_dir
  fc.lambdas = (1.0, 3.0)
  fc.am.num_steps = 4
  fc.am.num_random_timesteps = 1
  fc.am.num_last_timesteps = 1
  fc.finetune.steps = 2
  fc.finetune.batch_size = 4
  fc.finetune.log_every = 1
  fc.eval.samples_per_class = 3
  fc.eval.num_steps = 4
  fc.eval.grid_per_class = 2
  ft_dir = str(tmp_path / "ft")
  out = finetune_images.run(fc, ft_dir)
  assert set(out) == {"lam_1", "lam_3"}
  for lam in ("lam_1", "lam_3"):
    rows = [json.loads(line) for line in open(os.path.join(ft_dir, lam, "metrics.jsonl"))]
    assert rows[-1]["step"] == 2 and all(np.isfinite(r["loss"]) for r in rows)

  metrics = evaluate.run(fc, ft_dir)
  assert set(metrics) >= {"real_data", "base", "lam_1", "lam_3"}
  settings = {"ode_w1", "ode_w2", "memoryless_w1", "memoryless_w2"}
  for name in ("base", "lam_1", "lam_3"):
    assert set(metrics[name]) == settings
    for m in metrics[name].values():
      assert all(np.isfinite(v) for v in m.values()), m
  assert os.path.isfile(os.path.join(ft_dir, "metrics.json"))
  for s in settings:
    assert os.path.getsize(os.path.join(ft_dir, f"grid_{s}.png")) > 0
  assert "| base |" in evaluate.table(metrics)
