"""``am_jax.rewards``: stroke thickness and its gold twin, weighted sums (classifier rewards: test_classifiers.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from am_jax import data, rewards


def _bar(width, length=20, size=28):
  img = -np.ones((1, size, size, 1), np.float32)
  img[0, 4:4 + length, 10:10 + width] = 1.0
  return img


@jax.jit
def _both(x):
  """(trained, gold) thickness and their input gradients, one compiled program per batch shape."""
  vals = lambda f: (f(x), jax.grad(lambda z: jnp.sum(f(z)))(x))  # noqa: E731
  return vals(rewards.stroke_thickness), vals(rewards.gold_stroke_thickness)


def test_thickness_of_bars_closed_forms():
  square = -np.ones((1, 28, 28, 1), np.float32)
  square[0, 4:24, 4:24] = 1.0
  blank = -np.ones((1, 28, 28, 1), np.float32)
  (thick, _), (gold, _) = _both(np.concatenate([_bar(w) for w in range(1, 9)] + [square, blank]))
  thick, gold = np.asarray(thick), np.asarray(gold)
  w = np.arange(1, 9)
  # 2 area / perimeter of an L x w bar = L w / (L + w) (about w for L >> w); 3% from the corners'
  # isotropic gradient and the +1 in the denominator.
  np.testing.assert_allclose(thick[:8], 20 * w / (20 + w), rtol=0.03)
  # 2 d - 1 on the medial axis: w for odd widths, w - 1 for even ones.
  np.testing.assert_array_equal(gold[:8], np.where(w % 2, w, w - 1))
  # A filled square of side 2R scores about R on the trained measure (area / half perimeter).
  np.testing.assert_allclose(thick[8], 10.0, rtol=0.03)
  assert gold[8] > 15  # its medial axis (the centre and diagonals) reaches depth 10
  assert thick[9] == 0.0 and gold[9] == 0.0  # no ink
  with pytest.raises(ValueError, match=r"\(B, H, W, 1\)"):
    rewards.stroke_thickness(jnp.zeros((2, 28, 28)))
  with pytest.raises(ValueError, match=r"\(B, H, W, 1\)"):
    rewards.gold_stroke_thickness(jnp.zeros((2, 28, 28, 3)))


def test_thickness_twins_agree_on_real_digits_and_disagree_on_a_hack():
  x, _ = data.mnist("heldout")
  fog = np.full((1, 28, 28, 1), -0.4, np.float32)  # faint grey everywhere, no stroke
  (thick, g), (gold, g_gold) = _both(np.concatenate([x, fog]))
  thick, gold = np.asarray(thick), np.asarray(gold)
  ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
  spearman = np.corrcoef(ranks(thick[:-1]), ranks(gold[:-1]))[0, 1]
  assert spearman > 0.9, spearman  # measured 0.943 on the 1,000 held-out digits
  assert abs(thick[:-1].mean() - gold[:-1].mean()) < 0.3 and 2.0 < thick[:-1].mean() < 3.0  # pixels: ~2.5
  # The fog hack: a huge "thickness" for the soft measure, no ink at all for the gold one.
  assert thick[-1] > 10 and gold[-1] == 0.0
  # The trained measure is differentiable on real digits; the gold one is piecewise constant.
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g[:-1]).sum()) > 0
  assert not np.any(np.asarray(g_gold))


def test_weighted_sum_terms_and_errors():
  lin = rewards.linear_reward(1.0)
  quad = rewards.quadratic_reward(1.0)
  combo = rewards.weighted_sum({"lin": (lin, 2.0), "quad": (quad, -0.5), "log_only": (lin, 0.0)})
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
  r, terms = jax.jit(lambda z: (combo.reward(z), combo.terms(z)))(x)
  assert set(terms) == {"lin", "quad", "log_only"} and all(v.shape == (5,) for v in terms.values())
  np.testing.assert_allclose(terms["lin"], lin(x), rtol=1e-6)
  np.testing.assert_allclose(r, 2.0 * lin(x) - 0.5 * quad(x), rtol=1e-6)
  g = jax.grad(lambda z: jnp.sum(combo.reward(z)))(x)
  np.testing.assert_allclose(g, 2.0 + 0.5 * x, rtol=1e-6)  # d/dx (2 sum x + x^2 / 4)
  assert combo.weights == {"lin": 2.0, "quad": -0.5, "log_only": 0.0}
  # Conditions are passed to every term.
  seen = []
  cond_fn = lambda z, label: (seen.append(label.shape), jnp.sum(z, -1) * label)[1]  # noqa: E731
  rc = rewards.weighted_sum({"c": (cond_fn, 1.0)})
  np.testing.assert_allclose(rc.reward(x, jnp.full((5,), 2.0)), 2 * jnp.sum(x, -1), rtol=1e-6)
  for bad, match in (({}, "non-empty"), ({"a": lin}, "reward_fn, weight"), ({"a": (1.0, lin)}, "reward_fn, weight"),
                     ({"a": (lin, float("nan"))}, "finite"), ({"a": (lin, "1")}, "finite"),
                     ({"a": (lin, 0.0)}, "every weight"),
                     ({"": (lin, 1.0)}, "names")):
    with pytest.raises(ValueError, match=match):
      rewards.weighted_sum(bad)
