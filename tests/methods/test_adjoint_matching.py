"""``methods.adjoint_matching``: ``am`` is the losses objective; AM on an epsilon-prediction VP base (slow).

The AM loss itself (minimiser, clipping, memory options) is tested in tests/test_losses.py; convergence of the
whole family on the exact 1-D problem in tests/methods/test_convergence.py."""
import jax
import pytest

from am_jax import losses, methods, schedules, toy
from tests.methods import helpers


def test_am_is_the_losses_objective():
  """methods.am(config) is losses.adjoint_matching_objective with that config (here one with remat and a clip),
  plus ``loss`` in aux."""
  cfg = losses.AMConfig(num_steps=6, num_random_timesteps=2, num_last_timesteps=2, remat_segments=3, loss_clip=0.5)
  ft, params = helpers.random_model(helpers.MIX, helpers.BASE)
  key = jax.random.PRNGKey(1)
  args = (ft, params, helpers.MIX, helpers.BASE, helpers.REWARD, key, (8, 1))
  both = jax.jit(lambda p: (methods.am(cfg)(*args[:1], p, *args[2:]),
                            losses.adjoint_matching_objective(*args[:1], p, *args[2:], cfg)))
  (loss, aux), (direct, direct_aux) = both(params)
  assert float(loss) == float(direct) and float(aux["loss"]) == float(loss)
  assert float(aux["clip_fraction"]) == float(direct_aux["clip_fraction"]) > 0.0


@pytest.mark.slow
def test_am_on_vp_epsilon_base_reaches_the_tilt():
  """Diffusion model: an epsilon-prediction base on the VP (DDPM) schedule, fine-tuned with AM (memoryless = DDPM)."""
  cfg = losses.AMConfig(schedule=schedules.VPSchedule(), loss_clip=None)
  result = toy.finetune_mixture(helpers.BASE, helpers.REWARD, cfg, objective=methods.am(cfg), steps=1000,
                                batch_size=512, base="epsilon", log_fn=None)
  # Measured W1 0.106 / mass 0.814 (seed 0), 0.049 / 0.855 (seed 1), 0.058 / 0.846 (2000 steps); base: W1 0.85.
  w1, mass = helpers.evaluate(result)
  assert w1 < helpers.REACH_W1, w1
  assert abs(mass - float(helpers.TARGET.weights[1])) < helpers.REACH_MASS, mass
