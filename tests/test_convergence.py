"""Optimisation noise on the exact 1-D problem (docs/maths.md section 7; issue 14 item 3).

Slow (``-m slow``): six 1000-step runs (~20 s CPU each).  With ``toy.TUNED_OPTIMISER`` (cosine decay from 3e-3 to 0,
EMA 0.99) the memoryless fine-tune is closer to the exact tilt than with the constant
Adam 1e-3 of ``finetune_mixture``'s defaults (``python -m benchmarks.convergence --part=noise``: W1 0.059 +- 0.009 vs
0.095 +- 0.005 on 1-D, sliced W1 0.068 +- 0.005 vs 0.126 +- 0.070 on the 2-D ring; the test itself measured
0.055 / 0.059 / 0.052, mass 0.849-0.855, and 0.29-0.31 for sigma = 1.0), while a constant sigma = 1.0
stays biased.  The issue's targets (W1 <= 0.05, right-mode mass within 0.015 of 0.881) are NOT asserted: at K = 40
Euler the loss's own discrete optimum sits at mass ~0.86 (section 7, bias (a)), which no optimiser removes.
"""
import numpy as np
import pytest

from am_jax import gmm, losses, rewards, toy

BASE = gmm.bimodal_1d()
TARGET = gmm.tilt_linear(BASE, 1.0)
SEEDS = (0, 1, 2)


def _run(diffusion, seed):
  config = losses.AMConfig(diffusion=diffusion)
  res = toy.finetune_mixture(BASE, rewards.linear_reward(1.0), config, steps=1000, batch_size=512, seed=seed,
                             log_fn=None, **toy.TUNED_OPTIMISER)
  ev = toy.evaluate_against_target(res, TARGET, diffusion="ode", num_steps=40)
  return ev["distance_to_cdf"], ev["mode_mass"][1]


@pytest.mark.slow
def test_tuned_optimiser_reaches_the_tilt_and_constant_sigma_stays_biased():
  memoryless = np.array([_run("memoryless", s) for s in SEEDS])
  const = np.array([_run(1.0, s) for s in SEEDS])
  print("memoryless (W1, mass):", memoryless.tolist(), "sigma=1.0:", const.tolist())
  w1, mass = memoryless[:, 0], memoryless[:, 1]
  assert w1.mean() < 0.075 and w1.max() < 0.09, w1          # constant Adam 1e-3: 0.092-0.100
  assert abs(mass.mean() - 0.881) < 0.04, mass                # measured 0.848-0.855
  assert (const[:, 0] > 0.2).all(), const                     # Fig. 2: constant sigma stays biased in every seed
