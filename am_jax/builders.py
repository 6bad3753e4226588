"""From ``ml_collections.ConfigDict`` to library objects, validating every field on the way.

The launchers in ``experiments/`` call these at start-up, so an invalid config fails before any
compilation with a ``ValueError`` whose message names the offending field (e.g.
``config.finetune.batch_size``).
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from am_jax import gmm as gmm_lib
from am_jax import losses
from am_jax import models
from am_jax import rewards as rewards_lib
from am_jax import schedules as schedules_lib
from am_jax import training


class ConfigError(ValueError):
  """An invalid configuration value; the message names the field."""


def _get(cfg, path: str):
  node = cfg
  for part in path.split("."):
    if part not in node:
      raise ConfigError(f"config.{path} is missing.")
    node = node[part]
  return node


def require(cfg, path: str, check: Callable, what: str):
  """Raises ConfigError('config.<path> = <value>: must be <what>') unless check(value)."""
  value = _get(cfg, path)
  try:
    ok = check(value)
  except Exception:  # noqa: BLE001  (a failing check is a bad value)
    ok = False
  if not ok:
    raise ConfigError(f"config.{path} = {value!r}: must be {what}.")
  return value


def _positive_int(v):
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


def build_schedule(cfg) -> schedules_lib.Schedule:
  name = require(cfg, "schedule", lambda v: v in ("linear", "cosine", "vp"), "'linear', 'cosine' or 'vp'")
  return schedules_lib.get_schedule(name)


DATA_NAMES = ("ring", "moons", "digits")


def validate_data(cfg):
  require(cfg, "data.name", lambda v: v in DATA_NAMES, f"one of {DATA_NAMES}")
  require(cfg, "data.num_samples", _positive_int, "a positive integer")
  if cfg.data.name == "ring":
    require(cfg, "data.num_components", _positive_int, "a positive integer")
    require(cfg, "data.radius", lambda v: v > 0, "> 0")
    require(cfg, "data.std", lambda v: v > 0, "> 0")


def data_shape(cfg) -> tuple:
  """Shape of one sample of ``cfg.data``."""
  return (8, 8, 1) if cfg.data.name == "digits" else (2,)


def exact_data_mixture(cfg):
  """The exact data distribution as a GaussianMixture, or None when there is none (moons)."""
  if cfg.data.name == "ring":
    return gmm_lib.ring_2d(cfg.data.num_components, cfg.data.radius, cfg.data.std)
  return None


def validate_model(cfg):
  kind = require(cfg, "model.kind", lambda v: v in ("mlp", "unet"), "'mlp' or 'unet'")
  if kind == "mlp":
    require(cfg, "model.hidden", lambda v: len(v) > 0 and all(_positive_int(w) for w in v),
            "a tuple of positive ints")
  else:
    require(cfg, "model.channels", lambda v: len(v) > 0 and all(_positive_int(w) for w in v),
            "a tuple of positive ints")
  require(cfg, "model.time_embed_dim", lambda v: _positive_int(v) and v % 2 == 0, "a positive even integer")
  require(cfg, "model.num_classes", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")


def build_model(cfg, data_shape, seed: int, zero_init_output: bool = False):
  """(apply_fn, params) of the velocity net described by ``cfg.model`` for samples of ``data_shape``.

  data_shape: the shape of one sample, e.g. (2,) or (8, 8, 1) (an int d means (d,)).
  """
  validate_model(cfg)
  data_shape = (data_shape,) if isinstance(data_shape, int) else tuple(data_shape)
  m = cfg.model
  if m.kind == "mlp":
    if len(data_shape) != 1:
      raise ConfigError(f"config.model.kind = 'mlp' needs vector data, got samples of shape {data_shape}.")
    net = models.MLP(data_shape[0], hidden=tuple(m.hidden), time_embed_dim=m.time_embed_dim,
                     num_classes=m.num_classes, zero_init_output=zero_init_output, rngs=nnx.Rngs(seed))
  else:
    if len(data_shape) != 3 or any(s % 2 ** (len(m.channels) - 1) for s in data_shape[:2]):
      raise ConfigError(f"config.model.channels = {tuple(m.channels)}: image size {data_shape[:2]} must be "
                        f"divisible by 2^(levels - 1).")
    net = models.UNet(data_shape[-1], tuple(m.channels), m.time_embed_dim, m.num_classes, zero_init_output,
                      rngs=nnx.Rngs(seed))
  return models.functional(net)


def validate_optimizer(cfg, path: str):
  require(cfg, f"{path}.name", lambda v: v in ("adam", "adamw"), "'adam' or 'adamw'")
  require(cfg, f"{path}.learning_rate", lambda v: v > 0, "> 0")
  require(cfg, f"{path}.warmup_steps", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
  require(cfg, f"{path}.decay", lambda v: v in ("constant", "cosine"), "'constant' or 'cosine'")
  require(cfg, f"{path}.grad_clip", lambda v: v >= 0, ">= 0 (0 disables clipping)")
  require(cfg, f"{path}.weight_decay", lambda v: v >= 0, ">= 0")


def build_optimizer(cfg, path: str, total_steps: int):
  validate_optimizer(cfg, path)
  o = _get(cfg, path)
  return training.make_optimizer(o.name, o.learning_rate, o.warmup_steps, total_steps, o.decay,
                                 o.grad_clip or None, o.weight_decay)


def build_reward(cfg, dim: int):
  """(reward_fn, tilt) where tilt(mixture) is the exact tilted mixture for lambda * reward."""
  name = require(cfg, "reward.name", lambda v: v in ("linear", "quadratic"), "'linear' or 'quadratic'")
  lam = require(cfg, "am.reward_multiplier", lambda v: v > 0, "> 0")
  if name == "linear":
    c = jnp.broadcast_to(jnp.asarray(require(cfg, "reward.c", lambda v: np.all(np.isfinite(v)), "finite"),
                                     jnp.float32), (dim,))
    return rewards_lib.linear_reward(c), lambda m: gmm_lib.tilt_linear(m, lam * c)
  a = require(cfg, "reward.a", lambda v: np.all(np.isfinite(v)), "finite")
  b = require(cfg, "reward.b", lambda v: np.all(np.isfinite(v)), "finite")
  a_mat = jnp.asarray(a, jnp.float32) * (jnp.eye(dim) if np.ndim(a) == 0 else 1.0)
  b_vec = jnp.broadcast_to(jnp.asarray(b, jnp.float32), (dim,))
  return rewards_lib.quadratic_reward(a_mat, b_vec), lambda m: gmm_lib.tilt_quadratic(m, lam * a_mat, lam * b_vec)


def build_am_config(cfg) -> losses.AMConfig:
  """AMConfig from ``cfg.am`` (+ ``cfg.schedule``); AMConfig's own errors are re-raised with the field."""
  am = cfg.am
  clip = am.get("loss_clip", None)
  kwargs = dict(schedule=build_schedule(cfg), reward_multiplier=float(am.reward_multiplier),
                num_steps=int(am.num_steps), time_offset=float(am.time_offset),
                noiseless_last_step=bool(am.noiseless_last_step), num_random_timesteps=int(am.num_random_timesteps),
                random_timestep_fraction=float(am.random_timestep_fraction),
                num_last_timesteps=int(am.num_last_timesteps), loss_clip=None if not clip else float(clip),
                solver=str(am.solver), diffusion=am.diffusion, remat_segments=am.get("remat_segments", 0),
                chunk_loss=am.get("chunk_loss", False), network_dtype=am.get("network_dtype", "float32"))
  try:
    return losses.AMConfig(**kwargs)
  except (ValueError, TypeError) as e:
    msg = str(e).replace("AMConfig.", "config.am.")
    if "config.am." not in msg:
      msg = f"config.am.diffusion = {am.diffusion!r}: {msg}" if "iffusion" in msg else f"config.am: {msg}"
    raise ConfigError(msg) from e


def validate_finetune(cfg):
  """All checks of a fine-tuning config (``configs/gmm2d.py`` layout)."""
  validate_data(cfg)
  validate_model(cfg)
  require(cfg, "seed", lambda v: isinstance(v, int), "an integer")
  require(cfg, "finetune.steps", _positive_int, "a positive integer")
  require(cfg, "finetune.batch_size", _positive_int, "a positive integer")
  require(cfg, "finetune.parameterisation", lambda v: v in ("control", "velocity", "full"),
          "'control', 'velocity' or 'full'")
  require(cfg, "finetune.ema_decay", lambda v: 0 <= v < 1, "in [0, 1)")
  require(cfg, "finetune.log_every", _positive_int, "a positive integer")
  validate_optimizer(cfg, "finetune.optimizer")
  validate_checkpoint(cfg, "checkpoint")
  require(cfg, "mesh.num_devices", lambda v: isinstance(v, int) and (v == -1 or v > 0), "-1 (all) or > 0")
  build_am_config(cfg)
  build_reward(cfg, 2)
  validate_pretrain(cfg)


def validate_checkpoint(cfg, path: str):
  require(cfg, f"{path}.every_steps", _positive_int, "a positive integer")
  require(cfg, f"{path}.max_to_keep", _positive_int, "a positive integer")


def validate_pretrain(cfg):
  validate_data(cfg)
  validate_model(cfg)
  build_schedule(cfg)
  require(cfg, "pretrain.steps", _positive_int, "a positive integer")
  require(cfg, "pretrain.batch_size", _positive_int, "a positive integer")
  require(cfg, "pretrain.ema_decay", lambda v: 0 <= v < 1, "in [0, 1)")
  require(cfg, "pretrain.log_every", _positive_int, "a positive integer")
  require(cfg, "pretrain.cond_drop_prob", lambda v: 0 <= v < 1, "in [0, 1)") if "cond_drop_prob" in cfg.pretrain else None
  validate_optimizer(cfg, "pretrain.optimizer")
  validate_checkpoint(cfg, "pretrain.checkpoint")
