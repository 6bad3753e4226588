"""``Problem``: everything a reward fine-tuning run needs, built once and used everywhere.

A problem is the tilted target p*(x) ~ p_base(x) exp(lambda r(x)) (AM paper Eq. 1) together with how the
fine-tuned model is parameterised:

* the frozen base velocity ``base_apply(base_params, x, t, *cond)`` (an epsilon or x0 prediction is
  converted to a velocity by ``dynamics.prediction_as_velocity`` when the problem is built);
* the trained network ``net_apply(params, x, t, *cond)`` and its initial ``init_params``, combined with
  the base by ``parameterisation``:

  ``'full'``      the fine-tuned velocity is ``net_apply`` itself (a copy of the base, every weight trained);
  ``'control'``   v_ft = v_base + sigma(t) / 2 * net(x, t)   (a residual control, zero at init);
  ``'velocity'``  v_ft = v_base + net(x, t);
  ``'lora'``      v_ft = v_base's network with weights W + s A B (only the adapters A, B are trained;
                  ``am_jax.lora``);

* ``config`` (``losses.AMConfig``): schedule, lambda = ``config.reward_multiplier`` (the ONE place lambda
  lives), grid and solver of the memoryless SDE;
* the raw training reward ``reward_fn(x, *cond) -> (B,)``, its named components ``reward_terms`` (each
  logged as its own curve) and held-out ``gold_rewards`` (never trained on; watched for reward hacking);
* ``cond_fn(key, B) -> tuple of (B,) arrays`` drawing conditions (labels), the shape of one sample and,
  where known, the exact base mixture whose tilt is the exact target (Gaussian mixtures with linear or
  quadratic rewards; ``gmm.tilt_*``).

``builders.build_problem(cfg, ...)`` makes one from a config; the launcher, the method comparison, the
benchmarks, the notebook and the tests all take a ``Problem``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from am_jax import losses
from am_jax import parameterisation as param_lib
from am_jax import sampling
from am_jax.errors import ShapeError

__all__ = ["PARAMETERISATIONS", "Problem"]

PARAMETERISATIONS = ("full", "control", "velocity", "lora")


@dataclasses.dataclass(frozen=True)
class Problem:
  """A reward fine-tuning problem (see the module docstring).

  Attributes:
    base_apply: frozen base velocity ``apply(base_params, x, t, *cond) -> v``.
    base_params: its parameters (a pytree; passed to the jitted step as an argument, never baked in).
    net_apply: the trained network ``apply(params, x, t, *cond)`` (unused for 'lora': the base network).
    init_params: initial trained parameters (the base copy for 'full', a zero-output residual net for
      'control'/'velocity', zero-delta adapters for 'lora').
    parameterisation: one of ``PARAMETERISATIONS``.
    config: ``losses.AMConfig`` (schedule, lambda, grid).
    reward_fn: raw training reward ``r(x, *cond) -> (B,)`` (lambda is applied by the methods).
    sample_shape: shape of ONE sample, e.g. (2,) or (28, 28, 1).
    cond_fn: ``cond_fn(key, B) -> tuple`` of conditions, or None (unconditional).
    reward_terms: named components of ``reward_fn`` (logged separately; may be empty).
    gold_rewards: named held-out rewards (the monitor's gold twins; never used in training).
    exact_base: the base distribution as a ``gmm.GaussianMixture`` when it is exact, else None.
    tilt: ``tilt(mixture, lam) -> mixture``: the exact tilted target of ``exact_base`` (None if unknown).
    lora_merge: for 'lora', ``merge(base_params, adapters) -> params of net_apply`` (the base network).
    sample_guidance: classifier-free guidance weight w applied when SAMPLING (``sample``): v_null + w (v_c -
      v_null) of the sampled model (1 = none).  Guidance DURING fine-tuning is a guided ``base_apply`` instead
      (``builders``: ``finetune.guidance_mode = 'base'``).
    null_label: the null (unconditional) label of a class-conditional model (needed when guiding).
    name: a label for logs.
  """

  base_apply: Callable
  base_params: Any
  net_apply: Callable
  init_params: Any
  parameterisation: str
  config: losses.AMConfig
  reward_fn: Callable
  sample_shape: tuple
  cond_fn: Optional[Callable] = None
  reward_terms: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
  gold_rewards: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
  exact_base: Any = None
  tilt: Optional[Callable] = None
  lora_merge: Optional[Callable] = None
  sample_guidance: float = 1.0
  null_label: Optional[int] = None
  name: str = ""

  def __post_init__(self):
    if self.parameterisation not in PARAMETERISATIONS:
      raise ValueError(f"Problem.parameterisation must be one of {PARAMETERISATIONS}, got {self.parameterisation!r}.")
    if self.sample_guidance != 1.0 and self.null_label is None:
      raise ValueError("Problem.sample_guidance != 1 needs the null_label of the class-conditional model.")
    if self.parameterisation == "lora" and self.lora_merge is None:
      raise ValueError("Problem.parameterisation = 'lora' needs lora_merge(base_params, adapters).")
    if not isinstance(self.config, losses.AMConfig):
      raise TypeError(f"Problem.config must be an AMConfig, got {type(self.config).__name__}.")
    object.__setattr__(self, "sample_shape", tuple(int(s) for s in self.sample_shape))

  # ------------------------------------------------------------------------------------------ views
  @property
  def lam(self) -> float:
    """lambda: the reward multiplier of the tilt p_base exp(lambda r) (``config.reward_multiplier``)."""
    return self.config.reward_multiplier

  @property
  def schedule(self):
    return self.config.schedule

  def x_shape(self, batch: int) -> tuple:
    return (int(batch),) + self.sample_shape

  def replace(self, **changes) -> "Problem":
    return dataclasses.replace(self, **changes)

  def with_config(self, **am_changes) -> "Problem":
    """The same problem with AMConfig fields replaced (e.g. ``reward_multiplier=8.0``)."""
    return self.replace(config=dataclasses.replace(self.config, **am_changes))

  @property
  def exact_target(self):
    """The exact tilted target mixture p_base exp(lambda r) / Z, or None when it is not known."""
    if self.exact_base is None or self.tilt is None:
      return None
    return self.tilt(self.exact_base, self.lam)

  # ------------------------------------------------------------------------------ fine-tuned model
  def finetuned_apply(self, base_params=None, network_dtype: Optional[str] = None) -> Callable:
    """The fine-tuned velocity ``apply(params, x, t, *cond)`` with ``params`` the trained parameters.

    ``base_params`` (default ``self.base_params``) is closed over: inside a jitted step pass the step's
    own argument so the base is not baked into the program.  The base inside a residual / LoRA model is
    evaluated in ``network_dtype`` (default ``config.network_dtype``), as the methods do with the apply
    functions they are given.
    """
    bp = self.base_params if base_params is None else base_params
    dtype = self.config.network_dtype if network_dtype is None else network_dtype
    if self.parameterisation == "full":
      return self.net_apply
    if self.parameterisation == "lora":
      net_apply, merge = self.net_apply, self.lora_merge
      return lambda p, x, t, *cond: net_apply(merge(bp, p), x, t, *cond)
    base = param_lib.mixed_precision(self.base_apply, dtype)
    return param_lib.residual_model(base, bp, self.net_apply, self.schedule, self.parameterisation)

  def merged_params(self, params, base_params=None):
    """Parameters of ``base_apply`` equal to the fine-tuned model, where the parameterisation allows it.

    'full': ``params``; 'lora': base weights with the adapters merged in (sample with ``base_apply``, no
    adapter overhead).  Residual parameterisations have no such form: ValueError.
    """
    bp = self.base_params if base_params is None else base_params
    if self.parameterisation == "full":
      return params
    if self.parameterisation == "lora":
      return self.lora_merge(bp, params)
    raise ValueError(f"parameterisation {self.parameterisation!r} has no merged form; use finetuned_apply().")

  def check_shapes(self, batch: int) -> None:
    """Traces (``jax.eval_shape``: no compute) the base, the fine-tuned model and every reward on a batch
    and raises ONE-line ``errors.ShapeError``s naming the function and the expected shape, before any training."""
    x = jax.ShapeDtypeStruct(self.x_shape(batch), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    cond = jax.eval_shape(lambda k: self.cond_fn(k, batch), jax.random.PRNGKey(0)) if self.cond_fn is not None else ()
    cond = tuple(cond)
    for c in cond:
      if c.shape[:1] != (batch,):
        raise ShapeError(f"cond_fn returned a condition of shape {c.shape}; expected a leading batch axis {batch}.")

    def shape_of(what, fn, *args):
      try:
        out = jax.eval_shape(fn, *args)
      except Exception as e:  # noqa: BLE001  (report which function failed, in one line)
        raise ShapeError(f"{what} failed on x {x.shape}, t {t.shape}, cond {[c.shape for c in cond]}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
      return getattr(out, "shape", None)

    for what, fn, params in (("base_apply", self.base_apply, self.base_params),
                             ("fine-tuned model", self.finetuned_apply(), self.init_params)):
      got = shape_of(what, fn, params, x, t, *cond)
      if got != x.shape:
        raise ShapeError(f"{what} returned a velocity of shape {got}; expected {x.shape} (the shape of x).")
    rewards = {"reward_fn": self.reward_fn, **{f"reward_terms[{n!r}]": f for n, f in self.reward_terms.items()},
               **{f"gold_rewards[{n!r}]": f for n, f in self.gold_rewards.items()}}
    for what, fn in rewards.items():
      got = shape_of(what, fn, x, *cond)
      if got != (batch,):
        raise ShapeError(f"{what} returned shape {got}; expected ({batch},): one reward per sample.")

  # -------------------------------------------------------------------------------------- sampling
  def sample(self, params, key, num: int, diffusion="ode", num_steps: Optional[int] = None, cond=None,
             which: str = "finetuned", return_trajectory: bool = False, integrator: str = "euler"):
    """``num`` samples of the fine-tuned (or ``which='base'``) model; conditions drawn by ``cond_fn`` if None;
    classifier-free guidance ``sample_guidance`` applied to the sampled model.

    Jittable (``num``, ``diffusion``, ``num_steps``, ``which``, ``integrator`` static).  The grid is the config's
    (time offset, noiseless last step) with ``num_steps`` (default ``config.num_steps``) steps; ``integrator``
    as ``sampling.sample`` ('dpmpp_2m': the second-order multistep sampler on its own grid).
    """
    k_cond, k_x = jax.random.split(key)
    if cond is None:
      cond = tuple(self.cond_fn(k_cond, num)) if self.cond_fn is not None else ()
    if which == "base":
      apply_fn, p = self.base_apply, self.base_params if params is None else params
    elif which == "finetuned":
      apply_fn, p = self.finetuned_apply(), params
    else:
      raise ValueError(f"which must be 'finetuned' or 'base', got {which!r}.")
    if self.sample_guidance != 1.0:
      apply_fn = param_lib.guided(apply_fn, self.sample_guidance, self.null_label)
    c = self.config
    return sampling.sample(apply_fn, p, k_x, self.x_shape(num), c.schedule, diffusion, num_steps or c.num_steps,
                           c.time_offset, noiseless_last_step=c.noiseless_last_step, cond=cond,
                           return_trajectory=return_trajectory, integrator=integrator)

  def reward_report(self, x, cond=()) -> dict:
    """Mean of the training reward, each of its terms and each gold reward on samples ``x`` (jittable)."""
    out = {"reward": jnp.mean(self.reward_fn(x, *cond))}
    for name, fn in self.reward_terms.items():
      out[f"reward/{name}"] = jnp.mean(fn(x, *cond))
    for name, fn in self.gold_rewards.items():
      out[f"gold/{name}"] = jnp.mean(fn(x, *cond))
    return out
