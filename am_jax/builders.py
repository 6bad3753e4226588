"""From ``ml_collections.ConfigDict`` to library objects, validating every field on the way.

The launchers in ``experiments/`` call these at start-up, so an invalid config fails before any
compilation with a ``ValueError`` whose message names the offending field (e.g.
``config.finetune.batch_size``).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from am_jax import checkpointing
from am_jax import classifiers
from am_jax import dynamics
from am_jax import gmm as gmm_lib
from am_jax import losses
from am_jax import models
from am_jax import parameterisation
from am_jax import rewards as rewards_lib
from am_jax import schedules as schedules_lib
from am_jax import sharding as sharding_lib
from am_jax import training
from am_jax.errors import ConfigError  # re-exported: builders.ConfigError
from am_jax.problem import Problem


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


DATA_NAMES = ("ring", "moons", "digits", "mnist")
DATA_SHAPES = {"ring": (2,), "moons": (2,), "digits": (8, 8, 1), "mnist": (28, 28, 1)}


def validate_data(cfg, for_training: bool = True):
  """``data.name`` is a bundled dataset, or '' / 'none' for a user task that gives ``data.shape``."""
  name = require(cfg, "data.name", lambda v: v in DATA_NAMES + ("", "none"), f"one of {DATA_NAMES} or '' (none)")
  if name in ("", "none"):
    if for_training:
      raise ConfigError("config.data.name = '': pre-training needs a dataset; set config.base_checkpoint to a "
                        "trained base instead.")
    require(cfg, "data.shape", lambda v: len(v) > 0 and all(_positive_int(s) for s in v),
            "a tuple of positive ints (the shape of one sample)")
    return
  require(cfg, "data.num_samples", _positive_int, "a positive integer")
  if cfg.data.name == "ring":
    require(cfg, "data.num_components", _positive_int, "a positive integer")
    require(cfg, "data.radius", lambda v: v > 0, "> 0")
    require(cfg, "data.std", lambda v: v > 0, "> 0")


def data_shape(cfg) -> tuple:
  """Shape of one sample of ``cfg.data`` (``data.shape`` for a user task without a bundled dataset)."""
  if cfg.data.name in DATA_SHAPES:
    return DATA_SHAPES[cfg.data.name]
  return tuple(int(s) for s in cfg.data.shape)


def exact_data_mixture(cfg):
  """The exact data distribution as a GaussianMixture, or None when there is none (moons)."""
  if cfg.data.name == "ring":
    return gmm_lib.ring_2d(cfg.data.num_components, cfg.data.radius, cfg.data.std)
  return None


MODEL_KINDS = ("mlp", "unet", "transformer", "exact")
PREDICTIONS = ("velocity", "epsilon", "x0")


def load_callable(spec: str, field: str) -> Callable:
  """The object named by ``"package.module:attribute"`` (e.g. ``"my_pkg.rewards:aesthetic"``).

  The module is imported normally (it must be on ``sys.path``: installed, or in the working directory);
  a ``.py`` path also works (``"/path/to/file.py:attribute"``).  ConfigError naming ``field`` otherwise.
  """
  if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
    raise ConfigError(f"config.{field} = {spec!r}: must be 'package.module:attribute'.")
  mod_name, attr = spec.split(":")
  try:
    if mod_name.endswith(".py"):
      import importlib.util
      import os
      path = os.path.abspath(mod_name)
      mod_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
      module = importlib.util.module_from_spec(mod_spec)
      mod_spec.loader.exec_module(module)
    else:
      import importlib
      module = importlib.import_module(mod_name)
  except Exception as e:  # noqa: BLE001  (any import failure is a config error naming the field)
    raise ConfigError(f"config.{field} = {spec!r}: cannot import {mod_name!r} ({type(e).__name__}: {e}).") from e
  if not hasattr(module, attr):
    raise ConfigError(f"config.{field} = {spec!r}: module {mod_name!r} has no attribute {attr!r}.")
  obj = getattr(module, attr)
  if not callable(obj):
    raise ConfigError(f"config.{field} = {spec!r}: {attr!r} is not callable.")
  return obj


def _is_callable_spec(v) -> bool:
  return isinstance(v, str) and ":" in v


def validate_model(cfg):
  kind = require(cfg, "model.kind", lambda v: v in MODEL_KINDS or _is_callable_spec(v),
                 f"one of {MODEL_KINDS} or 'package.module:make_model'")
  require(cfg, "model.prediction", lambda v: v in PREDICTIONS, f"one of {PREDICTIONS}") \
      if "prediction" in cfg.model else None
  if _is_callable_spec(kind):
    load_callable(kind, "model.kind")
    return
  if kind == "exact":
    if cfg.data.name != "ring":
      raise ConfigError(f"config.model.kind = 'exact' needs an exact-mixture dataset (data.name = 'ring'), got "
                        f"{cfg.data.name!r}.")
    return
  if kind == "mlp":
    require(cfg, "model.hidden", lambda v: len(v) > 0 and all(_positive_int(w) for w in v),
            "a tuple of positive ints")
  elif kind == "unet":
    require(cfg, "model.channels", lambda v: len(v) > 0 and all(_positive_int(w) for w in v),
            "a tuple of positive ints")
  else:
    for f in ("patch_size", "width", "depth", "num_heads"):
      require(cfg, f"model.{f}", _positive_int, "a positive integer")
  require(cfg, "model.time_embed_dim", lambda v: _positive_int(v) and v % 2 == 0, "a positive even integer")
  require(cfg, "model.num_classes", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")


def build_model(cfg, data_shape, seed: int, zero_init_output: bool = False, abstract: bool = False):
  """(apply_fn, params) of the network described by ``cfg.model`` for samples of ``data_shape``.

  ``abstract=True``: params are ``jax.ShapeDtypeStruct``s (``nnx.eval_shape``: no initialiser runs or
  compiles), the restore target of a checkpoint — an MNIST U-Net builds in ~0.1 s instead of ~10 s on a CPU.

  data_shape: the shape of one sample, e.g. (2,) or (8, 8, 1) (an int d means (d,)).  ``model.kind`` may
  name a user factory ``"pkg.mod:make_model"`` called as ``make_model(sample_shape, seed)`` and returning
  ``(apply_fn, params)`` with ``apply_fn(params, x, t, *cond)``.  The output is the raw prediction
  (``model.prediction``); ``build_velocity_model`` converts it to a velocity.
  """
  validate_model(cfg)
  data_shape = (data_shape,) if isinstance(data_shape, int) else tuple(data_shape)
  m = cfg.model
  if _is_callable_spec(m.kind):
    out = load_callable(m.kind, "model.kind")(data_shape, seed)
    if not (isinstance(out, tuple) and len(out) == 2 and callable(out[0])):
      raise ConfigError(f"config.model.kind = {m.kind!r}: must return (apply_fn, params), got {type(out).__name__}.")
    return out
  if m.kind == "exact":  # the closed-form velocity of the data mixture: params = the mixture itself
    schedule = build_schedule(cfg)
    return (lambda p, x, t, *cond: gmm_lib.velocity(p, x, t, schedule)), exact_data_mixture(cfg)
  if m.kind == "mlp":
    if len(data_shape) != 1:
      raise ConfigError(f"config.model.kind = 'mlp' needs vector data, got samples of shape {data_shape}.")
    make = lambda: models.MLP(data_shape[0], hidden=tuple(m.hidden), time_embed_dim=m.time_embed_dim,  # noqa: E731
                              num_classes=m.num_classes, zero_init_output=zero_init_output, rngs=nnx.Rngs(seed))
  elif m.kind == "unet":
    if len(data_shape) != 3 or any(s % 2 ** (len(m.channels) - 1) for s in data_shape[:2]):
      raise ConfigError(f"config.model.channels = {tuple(m.channels)}: image size {data_shape[:2]} must be "
                        f"divisible by 2^(levels - 1).")
    make = lambda: models.UNet(data_shape[-1], tuple(m.channels), m.time_embed_dim, m.num_classes,  # noqa: E731
                               zero_init_output, rngs=nnx.Rngs(seed))
  else:
    from am_jax import transformer
    if len(data_shape) != 3 or any(s % m.patch_size for s in data_shape[:2]):
      raise ConfigError(f"config.model.patch_size = {m.patch_size}: must divide the image size {data_shape[:2]}.")
    if data_shape[0] != data_shape[1]:
      raise ConfigError(f"config.model.kind = 'transformer' needs square images, got samples of shape {data_shape}.")
    make = lambda: transformer.DiT(  # noqa: E731
        image_size=data_shape[0], in_channels=data_shape[-1], patch_size=m.patch_size, width=m.width, depth=m.depth,
        num_heads=m.num_heads, time_embed_dim=m.get("time_embed_dim", 64), num_classes=m.num_classes,
        zero_init_output=zero_init_output, rngs=nnx.Rngs(seed))
  return models.functional(nnx.eval_shape(make) if abstract else make())


def build_velocity_model(cfg, data_shape, seed: int, zero_init_output: bool = False, abstract: bool = False):
  """``build_model`` with the output converted to a velocity (``model.prediction``; default velocity)."""
  apply_fn, params = build_model(cfg, data_shape, seed, zero_init_output, abstract)
  prediction = cfg.model.get("prediction", "velocity")
  return dynamics.prediction_as_velocity(apply_fn, prediction, build_schedule(cfg)), params


def validate_optimizer(cfg, path: str):
  require(cfg, f"{path}.name", lambda v: v in ("adam", "adamw"), "'adam' or 'adamw'")
  require(cfg, f"{path}.learning_rate", lambda v: _real(v) and 0 < v <= float(np.finfo(np.float32).max),
          "a finite number > 0 (float32: <= 3.4e38)")
  require(cfg, f"{path}.warmup_steps", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
  require(cfg, f"{path}.decay", lambda v: v in ("constant", "cosine"), "'constant' or 'cosine'")
  require(cfg, f"{path}.grad_clip", lambda v: v >= 0, ">= 0 (0 disables clipping)")
  require(cfg, f"{path}.weight_decay", lambda v: v >= 0, ">= 0")


def build_optimizer(cfg, path: str, total_steps: int):
  validate_optimizer(cfg, path)
  o = _get(cfg, path)
  return training.make_optimizer(o.name, o.learning_rate, o.warmup_steps, total_steps, o.decay,
                                 o.grad_clip or None, o.weight_decay)


BUILTIN_REWARDS = ("linear", "quadratic", "prompt", "target_class", "ink", "thickness", "weighted")
# Image reward terms: name -> (trained reward, its held-out gold twin or None).  'class' = log p_A(target | x)
# (twin: classifier B), 'prompt' = log p_A(label | x) (twin: B), 'thickness' = soft stroke width (twin: the
# binarised distance-transform width), 'ink' = mean ink (no twin).
IMAGE_TERMS = ("class", "prompt", "thickness", "ink")
_SINGLE_TERM = {"target_class": "class", "prompt": "prompt", "ink": "ink", "thickness": "thickness"}


def resolve_path(path: str) -> str:
  """``shipped:NAME`` -> the directory ``NAME`` of the checkpoints shipped inside the package
  (``am_jax/assets/NAME``: pre-trained MNIST bases and reward classifiers); other paths unchanged."""
  if isinstance(path, str) and path.startswith("shipped:"):
    import importlib.resources
    return str(importlib.resources.files("am_jax") / "assets" / path[len("shipped:"):])
  return path


def parse_terms(text: str, field: str = "reward.terms") -> dict:
  """``"class:1.0,thickness:0.3"`` -> {"class": 1.0, "thickness": 0.3} (ConfigError naming ``field``)."""
  out = {}
  for item in [s.strip() for s in str(text).split(",") if s.strip()]:
    name, sep, weight = item.partition(":")
    try:
      w = float(weight) if sep else 1.0
    except ValueError:
      raise ConfigError(f"config.{field} = {text!r}: weight {weight!r} of {name!r} is not a number.") from None
    if name not in IMAGE_TERMS:
      raise ConfigError(f"config.{field} = {text!r}: unknown term {name!r}; terms are {IMAGE_TERMS}.")
    if not np.isfinite(w):
      raise ConfigError(f"config.{field} = {text!r}: weight of {name!r} must be finite.")
    out[name] = w
  if not out or all(w == 0 for w in out.values()):
    raise ConfigError(f"config.{field} = {text!r}: needs at least one term with a non-zero weight, e.g. "
                      "'class:1.0,thickness:0.3'.")
  return out


def _term_names(cfg) -> list:
  name = cfg.reward.name
  if name == "weighted":
    return list(parse_terms(cfg.reward.get("terms", "")))
  return [_SINGLE_TERM[name]] if name in _SINGLE_TERM else []


def validate_reward(cfg):
  name = require(cfg, "reward.name", lambda v: v in BUILTIN_REWARDS or _is_callable_spec(v),
                 f"one of {BUILTIN_REWARDS} or 'package.module:reward_fn'")
  if name == "linear":
    require(cfg, "reward.c", lambda v: np.all(np.isfinite(v)), "finite")
  elif name == "quadratic":
    require(cfg, "reward.a", lambda v: np.all(np.isfinite(v)), "finite")
    require(cfg, "reward.b", lambda v: np.all(np.isfinite(v)), "finite")
  elif _is_callable_spec(name):
    load_callable(name, "reward.name")
  terms = _term_names(cfg)
  if terms and len(data_shape(cfg)) != 3:
    raise ConfigError(f"config.reward.name = {name!r}: image rewards need image samples, got {data_shape(cfg)}.")
  if set(terms) & {"class", "prompt"}:
    require(cfg, "reward.checkpoint", lambda v: isinstance(v, str) and v, "a classifier directory "
            "(`am-jax train-reward` workdir, or shipped:mnist_classifiers)")
  if "class" in terms:
    require(cfg, "reward.target_class", lambda v: isinstance(v, int) and 0 <= v < 10, "a digit in 0..9")


class Rewards(NamedTuple):
  """What ``build_rewards`` makes of ``cfg.reward``: the raw training reward, its named terms (logged), the
  held-out gold twins (monitored, never trained on) and the exact tilt where one exists."""
  reward_fn: Callable
  terms: dict
  gold: dict
  tilt: Optional[Callable]


def _image_term(cfg, name: str, gold: bool):
  """(trained or gold) reward function of one image term; None when the term has no gold twin."""
  if name in ("class", "prompt"):
    which = "B" if gold else cfg.reward.get("classifier", "A")
    if gold and cfg.reward.get("gold_classifier", "B") is None:
      return None
    apply_fn, _, params, _ = load_classifier(resolve_path(cfg.reward.checkpoint), which)
    if name == "prompt":
      return classifiers.prompt_consistency_reward(apply_fn, params)
    return classifiers.target_class_reward(apply_fn, params, int(cfg.reward.target_class))
  if name == "thickness":
    return rewards_lib.gold_stroke_thickness if gold else rewards_lib.stroke_thickness
  if name == "ink":
    return None if gold else classifiers.ink_reward
  raise ConfigError(f"config.reward: unknown term {name!r}.")


def build_rewards(cfg, sample_shape) -> Rewards:
  """The rewards of ``cfg.reward`` (``Rewards``).  lambda is not read here: it lives in
  ``config.am.reward_multiplier`` only (``Problem.lam``).

  ``reward.name``: 'linear' / 'quadratic' (exact tilts of mixtures), an image term ('target_class', 'prompt',
  'thickness', 'ink'), 'weighted' with ``reward.terms = "class:1.0,thickness:0.3"`` (r = sum_i w_i r_i, each
  r_i logged as its own curve), or a user ``"pkg.mod:reward_fn"``.  Image terms get their gold twins unless
  ``reward.gold = False``.
  """
  validate_reward(cfg)
  name = cfg.reward.name
  dim = int(np.prod(sample_shape))

  def vector(field, shape):
    value = _get(cfg, field)
    if np.ndim(value) == 0 or np.shape(value) == shape:
      return jnp.broadcast_to(jnp.asarray(value, jnp.float32), shape)
    raise ConfigError(f"config.{field} has shape {np.shape(value)}: must be a scalar or of shape {shape} "
                      f"(samples of shape {tuple(sample_shape)}).")

  if name == "linear":
    c = vector("reward.c", (dim,))
    return Rewards(rewards_lib.linear_reward(c), {}, {}, lambda m, lam: gmm_lib.tilt_linear(m, lam * c))
  if name == "quadratic":
    a = cfg.reward.a
    a_mat = jnp.eye(dim) * float(a) if np.ndim(a) == 0 else vector("reward.a", (dim, dim))
    b_vec = vector("reward.b", (dim,))
    return Rewards(rewards_lib.quadratic_reward(a_mat, b_vec), {}, {},
                   lambda m, lam: gmm_lib.tilt_quadratic(m, lam * a_mat, lam * b_vec))
  if _is_callable_spec(name):
    return Rewards(load_callable(name, "reward.name"), {}, {}, None)
  with_gold = bool(cfg.reward.get("gold", True))
  if name == "weighted":
    weights = parse_terms(cfg.reward.terms)
    terms = {t: _image_term(cfg, t, False) for t in weights}
    reward_fn = rewards_lib.weighted_sum({t: (terms[t], w) for t, w in weights.items()}).reward
  else:
    t = _SINGLE_TERM[name]
    terms = {t: _image_term(cfg, t, False)}
    reward_fn = terms[t]
  gold = {}
  if with_gold:
    gold = {t: g for t in terms if (g := _image_term(cfg, t, True)) is not None}
  return Rewards(reward_fn, terms if name == "weighted" else {}, gold, None)


def build_reward(cfg, sample_shape) -> tuple:
  """(reward_fn, tilt) of ``build_rewards`` (the training reward and the exact tilt, where one exists)."""
  r = build_rewards(cfg, sample_shape)
  return r.reward_fn, r.tilt


def save_classifier(directory: str, name: str, params, info: dict):
  """Saves a classifier's params (Orbax) and ``info`` (arch, seed, ...) under ``directory/name``."""
  import json
  import os
  d = os.path.join(os.path.abspath(directory), name)
  checkpointing.save_params(os.path.join(d, "params"), params)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(info, f, indent=2)


def load_classifier(directory: str, name: str):
  """(apply_fn, features_fn, params, info) of a classifier saved by ``save_classifier``."""
  import json
  import os
  directory = resolve_path(directory)
  d = os.path.join(os.path.abspath(directory), name)
  if not os.path.isfile(os.path.join(d, "config.json")):
    raise FileNotFoundError(f"{d!r} holds no classifier: train one with `am-jax train-reward` "
                            "(experiments/train_reward.py).")
  with open(os.path.join(d, "config.json")) as f:
    info = json.load(f)
  net = nnx.eval_shape(lambda: classifiers.build(info["arch"], info["seed"], image_size=int(info.get("image_size", 8))))
  apply_fn, features_fn, params = classifiers.functional(net)  # params: shapes only, the restore target
  params = checkpointing.load_params(os.path.join(d, "params"), params)
  return apply_fn, features_fn, params, info


COND_MODES = ("", "none", "labels", "null")


def build_cond_fn(cfg) -> Optional[Callable]:
  """``cond_fn(key, B) -> tuple`` of ``finetune.cond``: '' (labels when the model has classes, else none),
  'labels' (uniform over the classes), 'null' (the null label = num_classes: unconditional generation
  from a classifier-free-guidance model), 'none', or a user ``"pkg.mod:cond_fn"``."""
  mode = cfg.finetune.get("cond", "")
  if _is_callable_spec(mode):
    return load_callable(mode, "finetune.cond")
  require(cfg, "finetune.cond", lambda v: v in COND_MODES, f"one of {COND_MODES} or 'package.module:cond_fn'") \
      if "cond" in cfg.finetune else None
  n_cls = int(cfg.model.get("num_classes", 0) or 0)
  if mode == "":
    mode = "labels" if n_cls else "none"
  if mode == "none":
    return None
  if not n_cls:
    raise ConfigError(f"config.finetune.cond = {mode!r} needs config.model.num_classes > 0.")
  if mode == "labels":
    return lambda key, b: (jax.random.randint(key, (b,), 0, n_cls, jnp.int32),)
  return lambda key, b: (jnp.full((b,), n_cls, jnp.int32),)


def parse_options(text: str, field: str) -> dict:
  """``"k=1,name='x',t=(0.1, 0.9)"`` -> dict of Python literals (ConfigError naming ``field`` otherwise)."""
  import ast
  try:
    call = ast.parse(f"f({text})", mode="eval").body
    if call.args:
      raise ValueError("positional value")
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
  except (SyntaxError, ValueError) as e:
    raise ConfigError(f"config.{field} = {text!r}: must be 'key=value,...' with Python literal values ({e}).") from e


def build_method(cfg, am_config: losses.AMConfig) -> Callable:
  """The objective of ``cfg.method`` (``name`` + ``options``) built by ``am_jax.methods.build``."""
  from am_jax import methods
  name = require(cfg, "method.name", lambda v: isinstance(v, str), "a method name")
  options = cfg.method.get("options", "") or {}
  if isinstance(options, str):
    options = parse_options(options, "method.options")
  options = options.to_dict() if hasattr(options, "to_dict") else dict(options)
  options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
  try:
    return methods.build(name, am_config, **options)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.method: {e}") from e


def build_finetuned(cfg, base_apply, base_params, sample_shape):
  """(net_apply, init_params, parameterisation, lora_merge) of ``cfg.finetune.parameterisation``."""
  param = cfg.finetune.parameterisation
  if param == "full":  # every weight trained, starting from a copy of the base
    return base_apply, jax.tree.map(jnp.copy, base_params), "full", None
  if param == "lora":
    from am_jax import lora
    adapters = lora.init(base_params, int(cfg.finetune.lora_rank), jax.random.PRNGKey(cfg.seed + 1))
    scale = float(cfg.finetune.get("lora_scale", 1.0))
    return base_apply, adapters, "lora", lambda bp, ad: lora.merge(bp, ad, scale)
  if len(sample_shape) == 1:
    net = models.MLP(sample_shape[0], hidden=tuple(cfg.finetune.hidden),
                     time_embed_dim=cfg.model.get("time_embed_dim", 32), num_classes=cfg.model.get("num_classes", 0),
                     zero_init_output=True, rngs=nnx.Rngs(cfg.seed + 1))
    net_apply, params = models.functional(net)
  else:  # an image residual: the base architecture, zero-initialised output
    net_apply, params = build_model(cfg, sample_shape, cfg.seed + 1, zero_init_output=True)
  return net_apply, params, param, None


def build_problem(cfg, base_apply: Callable, base_params, name: str = "") -> Problem:
  """The ``Problem`` of a fine-tuning config given the loaded base (``load_base``).

  Everything is validated first (``validate_finetune``), so a bad field fails here, before any work.
  """
  validate_finetune(cfg)
  sample_shape = data_shape(cfg)
  am_config = build_am_config(cfg)
  rewards = build_rewards(cfg, sample_shape)
  net_apply, params, param, merge = build_finetuned(cfg, base_apply, base_params, sample_shape)
  exact = exact_data_mixture(cfg)
  w = float(cfg.finetune.get("guidance", 1.0))
  mode = cfg.finetune.get("guidance_mode", "sampling")
  null = int(cfg.model.get("num_classes", 0) or 0) or None
  if w != 1.0 and mode == "base":
    # Fine-tune toward the tilt of the GUIDED base v_null + w (v_c - v_null); the fine-tuned network (a copy
    # of the conditional network) is sampled without guidance.
    base_apply = parameterisation.guided(base_apply, w, null)
  return Problem(base_apply=base_apply, base_params=base_params, net_apply=net_apply, init_params=params,
                 parameterisation=param, config=am_config, reward_fn=rewards.reward_fn, sample_shape=sample_shape,
                 cond_fn=build_cond_fn(cfg), reward_terms=rewards.terms, gold_rewards=rewards.gold, exact_base=exact,
                 tilt=rewards.tilt if exact is not None else None, lora_merge=merge,
                 sample_guidance=w if mode == "sampling" else 1.0, null_label=null, name=name or cfg.get("name", ""))


def load_base(cfg, mesh=None):
  """(base velocity apply_fn, base params) named by ``cfg.base_checkpoint``.

  ``model.kind = 'exact'``: the closed-form velocity of the exact data mixture (no checkpoint).  Otherwise
  ``base_checkpoint`` is either a pre-training workdir of ``am-jax pretrain`` (its own config is restored
  and must agree with ``cfg`` on the schedule and sample shape), or a params directory written by
  ``checkpointing.save_params`` for a user model (``cfg.model.kind = "pkg.mod:make_model"`` gives the
  structure).  Params are host NumPy copies; the launcher replicates them on its mesh.
  """
  import os
  if cfg.model.kind == "exact":
    return build_velocity_model(cfg, data_shape(cfg), cfg.seed)
  base_dir = resolve_path(require(cfg, "base_checkpoint", lambda v: isinstance(v, str) and v, "a directory"))
  if os.path.isdir(os.path.join(base_dir, "checkpoints")):
    apply_fn, params, base_cfg = load_pretrained(base_dir, mesh)
    if base_cfg.schedule != cfg.schedule:
      raise ConfigError(f"config.schedule = {cfg.schedule!r}: the base in {base_dir!r} was trained with "
                        f"{base_cfg.schedule!r}.")
    if data_shape(base_cfg) != data_shape(cfg):
      raise ConfigError(f"config.data: samples of shape {data_shape(cfg)}, but the base in {base_dir!r} "
                        f"generates {data_shape(base_cfg)}.")
    return apply_fn, params
  if not os.path.isdir(base_dir):
    raise ConfigError(f"config.base_checkpoint = {base_dir!r}: no such directory.")
  user_model = _is_callable_spec(cfg.model.kind)  # a user factory builds concrete params itself
  apply_fn, target = build_velocity_model(cfg, data_shape(cfg), cfg.seed, abstract=not user_model)
  return apply_fn, checkpointing.load_params(base_dir, target)


def load_pretrained(base_dir: str, mesh=None):
  """(velocity apply_fn, params, config) of a base saved by ``am-jax pretrain`` (EMA params when EMA was on)."""
  import os
  ckpt = checkpointing.Checkpointer(os.path.join(base_dir, "checkpoints"))
  try:
    if ckpt.latest_step() is None:
      raise ConfigError(f"config.base_checkpoint = {base_dir!r} holds no checkpoint.")
    base_cfg = ml_collections.ConfigDict(ckpt.restore_config())
    apply_fn, params = build_velocity_model(base_cfg, data_shape(base_cfg), base_cfg.seed, abstract=True)
    optimizer = build_optimizer(base_cfg, "pretrain.optimizer", base_cfg.pretrain.steps)
    target = jax.eval_shape(lambda p: training.init_state(p, optimizer, base_cfg.seed), params)
    state = ckpt.restore(None, target, mesh)
  finally:
    ckpt.close()
  params = training.eval_params(state, base_cfg.pretrain.ema_decay)
  return apply_fn, sharding_lib.to_local(params), base_cfg


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
                chunk_loss=am.get("chunk_loss", False), reuse_base_velocity=am.get("reuse_base_velocity", True),
                network_dtype=am.get("network_dtype", "float32"),
                integrator=am.get("integrator", "euler"))
  try:
    return losses.AMConfig(**kwargs)
  except (ValueError, TypeError) as e:
    msg = str(e).replace("AMConfig.", "config.am.")
    if "config.am." not in msg:
      msg = f"config.am.diffusion = {am.diffusion!r}: {msg}" if "iffusion" in msg else f"config.am: {msg}"
    raise ConfigError(msg) from e


PARAMETERISATIONS = ("control", "velocity", "full", "lora")


def validate_finetune(cfg, num_devices: Optional[int] = None):
  """All checks of a fine-tuning config (``configs/gmm2d.py`` layout), before any work.

  ``num_devices``: the device count of the mesh (default: from ``config.mesh.num_devices``), checked
  to divide the batch.
  """
  require(cfg, "seed", lambda v: isinstance(v, int), "an integer")
  has_base = bool(cfg.get("base_checkpoint", "")) or cfg.model.get("kind") == "exact"
  validate_data(cfg, for_training=not has_base)
  validate_model(cfg)
  build_schedule(cfg)
  require(cfg, "finetune.steps", _positive_int, "a positive integer")
  batch = require(cfg, "finetune.batch_size", _positive_int, "a positive integer")
  param = require(cfg, "finetune.parameterisation", lambda v: v in PARAMETERISATIONS, f"one of {PARAMETERISATIONS}")
  if param in ("control", "velocity") and len(data_shape(cfg)) == 1:
    require(cfg, "finetune.hidden", lambda v: len(v) > 0 and all(_positive_int(w) for w in v),
            "a tuple of positive ints")
  if param == "lora":
    require(cfg, "finetune.lora_rank", _positive_int, "a positive integer")
  if "guidance" in cfg.finetune:
    w = require(cfg, "finetune.guidance", lambda v: np.isfinite(v) and v >= 0, "a finite weight >= 0 (1 = none)")
    mode = require(cfg, "finetune.guidance_mode", lambda v: v in ("base", "sampling"), "'base' or 'sampling'")
    if w != 1.0 and not cfg.model.get("num_classes", 0):
      raise ConfigError(f"config.finetune.guidance = {w}: classifier-free guidance needs a class-conditional "
                        "model (config.model.num_classes > 0).")
    if w != 1.0 and mode == "base" and param in ("control", "velocity"):
      raise ConfigError("config.finetune.guidance_mode = 'base' needs parameterisation 'full' or 'lora' (the "
                        "fine-tuned model is the unguided network).")
  require(cfg, "finetune.ema_decay", lambda v: 0 <= v < 1, "in [0, 1)")
  require(cfg, "finetune.log_every", _positive_int, "a positive integer")
  validate_optimizer(cfg, "finetune.optimizer")
  validate_checkpoint(cfg, "checkpoint")
  require(cfg, "mesh.num_devices", lambda v: isinstance(v, int) and (v == -1 or v > 0), "-1 (all) or > 0")
  if num_devices is None:
    validate_mesh(cfg)
    num_devices = jax.device_count() if cfg.mesh.num_devices == -1 else cfg.mesh.num_devices
  if batch % num_devices:
    raise ConfigError(f"config.finetune.batch_size = {batch}: must be divisible by the {num_devices} devices "
                      "of the mesh (config.mesh.num_devices).")
  if "eval" in cfg:
    require(cfg, "eval.num_samples", _positive_int, "a positive integer") if "num_samples" in cfg.eval else None
    require(cfg, "eval.num_steps", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0: am.num_steps)") \
        if "num_steps" in cfg.eval else None
    require(cfg, "eval.at_end", lambda v: isinstance(v, bool), "True or False (evaluate the final model)") \
        if "at_end" in cfg.eval else None
  if "on_nonfinite" in cfg.finetune:
    require(cfg, "finetune.on_nonfinite", lambda v: v in NONFINITE_POLICIES,
            f"one of {NONFINITE_POLICIES} (halt: stop with the source of the NaN/inf; skip: drop that update)")
  if "resume" in cfg and "allow_changes" in cfg.resume:
    require(cfg, "resume.allow_changes", lambda v: isinstance(v, str), "a comma-separated list of config fields")
  validate_am(cfg)
  am_config = build_am_config(cfg)
  validate_reward(cfg)
  if cfg.reward.name in ("linear", "quadratic"):
    build_rewards(cfg, data_shape(cfg))  # checks the coefficient shapes against the samples
  build_cond_fn(cfg)
  if "method" in cfg:
    build_method(cfg, am_config)
  if not has_base:
    validate_pretrain(cfg)


NONFINITE_POLICIES = ("halt", "skip")
# Methods whose regression target needs sigma > 0 at every step (control u = (1 + c)(v_ft - v_base) / sigma).
STOCHASTIC_METHODS = ("am", "basic_am", "continuous_adjoint", "discrete_adjoint")


def _real(v):
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def validate_am(cfg):
  """``config.am``: the types AMConfig would otherwise coerce (``int(2.5)``) and the ODE diffusion for the
  AM-family methods; the value ranges are AMConfig's own checks (``build_am_config``)."""
  for f in ("num_steps", "num_random_timesteps", "num_last_timesteps"):
    require(cfg, f"am.{f}", lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool), "an integer")
  require(cfg, "am.reward_multiplier", lambda v: _real(v) and np.isfinite(v) and 0 < v <= losses.MAX_REWARD_MULTIPLIER,
          f"a finite lambda in (0, {losses.MAX_REWARD_MULTIPLIER:.0e}]")
  require(cfg, "am.time_offset", lambda v: _real(v) and 0 < v <= 1, "in (0, 1] (a fraction of a step)")
  if cfg.am.get("loss_clip", None) is not None:
    require(cfg, "am.loss_clip", lambda v: _real(v) and np.isfinite(v) and v >= 0,
            "a finite number > 0 (x lambda^2), or 0 / None for no clipping")
  method = cfg.method.get("name", "am") if "method" in cfg else "am"
  diffusion = cfg.am.get("diffusion", "memoryless")
  try:
    is_ode = isinstance(schedules_lib.get_diffusion(diffusion), schedules_lib.ZeroDiffusion)
  except (ValueError, TypeError):
    is_ode = False  # reported by build_am_config with the field name
  if is_ode and method in STOCHASTIC_METHODS:
    raise ConfigError(f"config.am.diffusion = {diffusion!r}: method {method!r} regresses the control "
                      "u = (1 + c)(v_ft - v_base) / sigma, which needs sigma > 0 (an ODE gives the loss weight "
                      "1/sigma = inf); use 'memoryless' (the tilted optimum, AM Thm. 1) or a constant sigma > 0, or "
                      "method.name = 'deterministic_am' to fine-tune an ODE.")


def validate_mesh(cfg):
  """``mesh.num_devices``: -1 (every device) or at most the devices JAX sees."""
  n = require(cfg, "mesh.num_devices", lambda v: isinstance(v, int) and (v == -1 or v > 0), "-1 (all) or > 0")
  if n > jax.device_count():
    raise ConfigError(f"config.mesh.num_devices = {n}: only {jax.device_count()} device(s) visible "
                      f"({jax.devices()[0].platform}); use -1 for all of them"
                      f"{sharding_lib.host_devices_hint(n)}.")


def validate_checkpoint(cfg, path: str):
  require(cfg, f"{path}.every_steps", _positive_int, "a positive integer")
  require(cfg, f"{path}.max_to_keep", _positive_int, "a positive integer")
  if "verify" in _get(cfg, path):
    require(cfg, f"{path}.verify", lambda v: isinstance(v, bool), "True or False (SHA-256 of every saved array)")


def _mesh_devices(cfg) -> int:
  return jax.device_count() if cfg.mesh.num_devices == -1 else int(cfg.mesh.num_devices)


def validate_pretrain(cfg):
  validate_data(cfg)
  validate_model(cfg)
  build_schedule(cfg)
  validate_mesh(cfg)
  require(cfg, "pretrain.steps", _positive_int, "a positive integer")
  batch = require(cfg, "pretrain.batch_size", _positive_int, "a positive integer")
  if batch % _mesh_devices(cfg):
    raise ConfigError(f"config.pretrain.batch_size = {batch}: must be divisible by the {_mesh_devices(cfg)} devices "
                      "of the mesh (config.mesh.num_devices).")
  require(cfg, "pretrain.ema_decay", lambda v: 0 <= v < 1, "in [0, 1)")
  require(cfg, "pretrain.log_every", _positive_int, "a positive integer")
  if "cond_drop_prob" in cfg.pretrain:
    require(cfg, "pretrain.cond_drop_prob", lambda v: 0 <= v < 1, "in [0, 1)")
  validate_optimizer(cfg, "pretrain.optimizer")
  validate_checkpoint(cfg, "pretrain.checkpoint")
