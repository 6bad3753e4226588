"""Shared problems of the method tests: the exact 1-D bimodal problem, small configs, a cached toy trainer.

Exact 1-D problem: base 0.5 N(-1, .3^2) + 0.5 N(1, .3^2) (closed-form velocity), r(x) = x, lambda = 1; the exact
target puts mass 0.881 on the right mode.  Convergence thresholds sit between measured values (docs/comparisons.md,
BUILD_NOTES.md section 8, 2-core CPU): the AM family lands at W1 0.06-0.10, the biased / reward-only methods at >= 0.19.
"""
import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from am_jax import gmm, losses, methods, models, parameterisation, rewards, schedules, toy
from tests import model_helpers

S = schedules.LinearSchedule()
BASE = gmm.bimodal_1d()
TARGET = gmm.tilt_linear(BASE, 1.0)
REWARD = rewards.linear_reward(1.0)
MIX = toy.mixture_base(BASE, S)
UNIMODAL = gmm.make_mixture([1.0], [[-0.5]], [0.5])
UNIMODAL_TARGET = gmm.tilt_linear(UNIMODAL, 2.0)  # N(0, 0.5^2)
WRONG = gmm.GaussianMixture(jnp.array([0.4, 0.6]), TARGET.means, TARGET.covs)  # the target's modes, mass 0.6
REACH_W1 = 0.15  # AM family measured 0.05-0.11; biased / reward-only >= 0.19
REACH_MASS = 0.08  # |right-mode mass - 0.881|: AM family 0.83-0.89, constant sigma 1.0: 0.73-0.76
AM_CFG = losses.AMConfig(loss_clip=None)

SMALL = losses.AMConfig(num_steps=6, num_random_timesteps=2, num_last_timesteps=2, loss_clip=None)
SMALL_OPTIONS = {"draft": {"k": 2}, "deterministic_am": {"truncation": 0.5, "anchor_steps": 1},
                 "eam": {"ode_steps": 2, "num_times": 2}}


def small(name):
  """The method ``name`` on the 6-step grid, with options that exercise its non-default branches."""
  return methods.build(name, SMALL, **SMALL_OPTIONS.get(name, {}))


def random_net(dim=1, seed=0):
  """(apply_fn, params) of a small residual MLP with random (non-zero) weights, so controls and their x-Jacobians
  are non-trivial.  The weights are drawn on the host (``nnx.eval_shape`` + NumPy): eager NNX initialisation
  compiles one XLA program per parameter shape."""
  return model_helpers.host_init(lambda: models.MLP(dim, hidden=(16, 16), time_embed_dim=8, rngs=nnx.Rngs(seed)),
                                 0.1, seed)


def random_model(base_apply, base_params, schedule=S, dim=1, seed=0):
  """Fine-tuned velocity base + sigma / 2 * ``random_net`` (the 'control' residual) and its params."""
  net_apply, params = random_net(dim, seed)
  return parameterisation.residual_model(base_apply, base_params, net_apply, schedule), params


@functools.lru_cache(maxsize=None)
def train(method, steps=1000, batch=512, base_name="bimodal", init_name=None, seed=0, hidden=(64, 64), **kw):
  """``toy.finetune_mixture`` with ``methods.build(method, AM_CFG, **kw)``; cached (several tests read one run)."""
  base = {"bimodal": BASE, "unimodal": UNIMODAL}[base_name]
  init = {None: None, "target": TARGET, "mass_0.6": WRONG}[init_name]
  reward = REWARD if base_name == "bimodal" else rewards.linear_reward(2.0)
  return toy.finetune_mixture(base, reward, AM_CFG, objective=methods.build(method, AM_CFG, **kw), steps=steps,
                              batch_size=batch, seed=seed, init=init, hidden=hidden, log_fn=None)


def evaluate(result, target=TARGET, num_samples=20000):
  """(W1 of ODE samples to the exact target CDF, right-mode mass); (inf, nan) if the samples diverged."""
  ev = toy.evaluate_against_target(result, target, diffusion="ode", num_samples=num_samples)
  ok = bool(np.all(np.isfinite(np.asarray(ev["samples"]))))
  return (ev["distance_to_cdf"] if ok else float("inf")), (ev["mode_mass"][-1] if ok else float("nan"))
