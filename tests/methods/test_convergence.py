"""Convergence of the method family on the exact 1-D problem (slow: 1000 steps at batch 512 per method).

0.5 N(-1, .3^2) + 0.5 N(1, .3^2), r(x) = x, lambda = 1 (exact target mass 0.881).  Thresholds sit between measured
values (BUILD_NOTES.md section 8, 2-core CPU, 2026-11-25): the AM family lands at W1 0.06-0.10, the biased /
reward-only methods at >= 0.19.  The default suite checks the same properties quickly: the exact tilt minimises the
AM loss and is EAM's fixed point, a constant sigma moves the minimiser (tests/test_losses.py), a short AM run moves
toward the target (tests/test_toy.py), EAM's weights move mode mass and DRaFT / ReFL never come close (this folder).
"""
import pytest

from tests.methods import helpers


@pytest.mark.slow
@pytest.mark.parametrize("method", ["am", "basic_am", "continuous_adjoint", "discrete_adjoint", "eam"])
def test_memoryless_soc_methods_reach_the_tilt(method):
  w1, mass = helpers.evaluate(helpers.train(method))
  assert w1 < helpers.REACH_W1, w1
  assert abs(mass - float(helpers.TARGET.weights[1])) < helpers.REACH_MASS, mass


@pytest.mark.slow
@pytest.mark.parametrize("method,kw", [("am_const_sigma", (("sigma", 0.2),)),
                                       ("am_const_sigma", (("sigma", 1.0),)),
                                       ("draft", ()), ("refl", ())])
def test_biased_and_reward_only_methods_miss_the_tilt(method, kw):
  w1, mass = helpers.evaluate(helpers.train(method, **dict(kw)))
  # sigma 0.2: W1 0.77 / mass 0.53; sigma 1.0: 0.19-0.28 / 0.73-0.76; DRaFT, ReFL: diverge (NaN).
  assert not (w1 < helpers.REACH_W1 and abs(mass - float(helpers.TARGET.weights[1])) < helpers.REACH_MASS), (w1, mass)
  if method == "am_const_sigma":
    assert mass < 0.8, mass
