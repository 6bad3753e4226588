r"""Seeded reward–diversity sweep: lambda x seeds x methods (LoRA vs full for AM) on one image ``Problem``.

    am-jax sweep --config=mnist_sweep --workdir=runs/sweep_tiny                 # 2-core CPU smoke size
    am-jax sweep --config=mnist_sweep.py:size=full --workdir=runs/sweep         # the full grid, one GPU

Each *setting* is (method, lambda, parameterisation): every method of ``sweep.methods`` (``methods.build`` names,
options from ``sweep.options``) at every lambda of ``sweep.lambdas`` (``AMConfig.reward_multiplier``: the tilt
p_base exp(lambda r), AM paper Eq. 1), with ``finetune.parameterisation``, and AM also with each of
``sweep.am_params`` ('lora' and 'full').  Each setting runs once per seed of ``sweep.seeds`` (the seed sets the
step keys and the LoRA initialisation).  lambda is a static field of the step, so there is ONE compiled program
per setting, reused by all its seeds (run one after another, or vmapped as one program with
``sweep.parallel_seeds``); ``sweep.compile_threads`` > 1 compiles the next settings in background threads while
one trains (XLA releases the GIL while compiling).

Per run, on ``sweep.eval_samples`` ODE samples drawn with the SAME noise and conditions for every run and the
base (paired comparisons):

* ``reward``: the training reward (``problem.reward_fn``), ``reward/<term>`` its terms; ``train_reward``: the mean
  of the step's own ``reward_mean`` over the last tenth of the steps (the method's training samples);
* ``gold/<term>``: the held-out gold twins (classifier B, the distance-transform thickness), never trained on;
* ``gold_accuracy``: fraction of samples classified as ``reward.target_class`` by classifier B (class rewards);
* ``diversity``: mean pairwise distance of classifier-B features within a condition (``classifiers.diversity``);
* ``fd``: Fréchet distance of B-features to the held-out real digits (``image_eval.heldout_images``); ``fd_target``:
  to the held-out digits of the target class (class rewards: the unconditional model is steered to one digit,
  so ``fd`` to all ten digits grows with success);
* ``blank_fraction``: fraction of blank pixels (``blank_fraction``): ~0.8 on real digits, ~0 on grey fog, the hack
  that DRaFT / ReFL find on the class reward and that fools classifier B too (so the gold reward cannot show it);
* ``ms_per_step`` (wall time of one step, the first and the monitor's evaluations excluded), ``peak_memory_mb``
  (``profiling.memory_stats`` of the compiled step; with ``parallel_seeds`` both are those of the program that
  steps every seed at once);
* with ``sweep.watch_every`` > 0, the reward-hacking monitor (``monitor.HackingMonitor``, settings
  ``eval.monitor``) on ``sweep.watch_samples`` fixed samples every ``watch_every`` steps: ``hacking_detected``.

References (class rewards): the held-out real digits of the target class and the class-conditional base sampled
with the target label (the tilt at lambda = 1 is close to it): the diversity a fine-tune should keep.

Aggregates over seeds: mean +- the half-width of the Student-t confidence interval (``sweep.confidence``, 95%;
``t_interval``).  Output in ``--workdir``: ``sweep.json`` (settings, base, references, every run, aggregates),
``sweep.md`` (table), ``sweep.png`` (training and gold reward against diversity with error bars and the Pareto
front of the setting means, base included: ``pareto_front``) and ``grid.png`` (base vs the best setting of each
method, same noise; best = highest mean gold reward).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import platform
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from am_jax import builders, classifiers, image_eval, methods, profiling, reporting, training
from am_jax import parameterisation as param_lib
from am_jax.errors import ConfigError
from am_jax.problem import Problem

__all__ = ["Setting", "METRICS", "validate", "settings", "t_interval", "aggregate", "pareto_front", "mark_pareto",
           "blank_fraction", "markdown", "plot", "write", "load", "replot", "rows_from_log", "summarise_log", "run"]

SWEEP_PARAMS = ("lora", "full")
# Per-run metrics aggregated over seeds (the table and the JSON); keys absent from a run are skipped.
METRICS = ("train_reward", "reward", "gold", "gold_accuracy", "label_accuracy", "diversity", "fd", "fd_target", "blank_fraction",
           "ms_per_step", "peak_memory_mb", "compile_seconds")


@dataclasses.dataclass(frozen=True)
class Setting:
  """One compiled program of the sweep: a method at one lambda with one parameterisation."""
  method: str
  lam: float
  param: str
  guidance: str = ""  # '' (no classifier-free guidance), 'base' or 'sampling' (``finetune.guidance_mode``)

  @property
  def label(self) -> str:
    return f"{self.method}/{self.param}{_mode_suffix(self.guidance)} λ={self.lam:g}"


def _mode_suffix(mode: str) -> str:
  return f" cfg-{mode}" if mode else ""


GUIDANCE_MODES = ("base", "sampling")


def _guidance(cfg) -> float:
  return float(cfg.finetune.get("guidance", 1.0))


def guidance_modes(cfg) -> tuple:
  """The guidance modes the sweep compares: ('',) without guidance (``finetune.guidance`` = 1), else
  ``sweep.guidance_modes`` (default: ``finetune.guidance_mode``)."""
  if _guidance(cfg) == 1.0:
    return ("",)
  return tuple(cfg.sweep.get("guidance_modes", ()) or (cfg.finetune.get("guidance_mode", "sampling"),))


# ------------------------------------------------------------------------------------------------ config


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _reward_terms(cfg) -> dict:
  """{term: weight} of the image reward of ``cfg.reward`` (builders' names: 'class', 'thickness', ...)."""
  name = cfg.reward.name
  if name == "weighted":
    return builders.parse_terms(cfg.reward.get("terms", ""))
  single = {"target_class": "class", "prompt": "prompt", "ink": "ink", "thickness": "thickness"}
  if name not in single:
    raise ConfigError(f"config.reward.name = {name!r}: the sweep needs an image reward (one of {sorted(single)} "
                      "or 'weighted').")
  return {single[name]: 1.0}


def _params_used(cfg) -> list:
  sw = cfg.sweep
  out = [cfg.finetune.parameterisation] if any(m != "am" for m in sw.methods) else []
  if "am" in sw.methods:
    out += [p for p in sw.am_params if p not in out]
  return out


def _method_options(cfg, method: str) -> dict:
  text = cfg.sweep.options.get(method, "") if "options" in cfg.sweep else ""
  return builders.parse_options(text, f"sweep.options.{method}") if text else {}


def validate(cfg) -> None:
  """Every field the sweep reads, before any work: one-line ``ConfigError`` naming the field."""
  req = builders.require
  if "sweep" not in cfg:
    raise ConfigError("config.sweep is missing: use a sweep config (configs/mnist_sweep.py).")
  names = req(cfg, "sweep.methods", lambda v: len(v) > 0 and all(m in methods.METHODS for m in v)
              and len(set(v)) == len(v), f"a non-empty tuple of distinct method names from {sorted(methods.METHODS)}")
  req(cfg, "sweep.lambdas", lambda v: len(v) > 0 and all(_finite_positive(x) for x in v) and len(set(v)) == len(v),
      "a non-empty tuple of distinct finite lambdas > 0")
  req(cfg, "sweep.seeds", lambda v: len(v) > 0 and all(_is_int(s) for s in v) and len(set(v)) == len(v),
      "a non-empty tuple of distinct integer seeds")
  req(cfg, "finetune.parameterisation", lambda v: v in SWEEP_PARAMS, f"one of {SWEEP_PARAMS} (the sweep samples the "
      "fine-tuned network with merged weights)")
  if "am" in names:
    req(cfg, "sweep.am_params", lambda v: len(v) > 0 and all(p in SWEEP_PARAMS for p in v) and len(set(v)) == len(v),
        f"a non-empty tuple of distinct parameterisations from {SWEEP_PARAMS}")
  for param in _params_used(cfg):
    req(cfg, f"sweep.learning_rates.{param}", lambda v: _finite_positive(v), "a finite learning rate > 0")
  if "options" in cfg.sweep:
    for m in cfg.sweep.options:
      if m not in names:
        continue  # options of a method left out of this sweep are kept for the next one
      opts = _method_options(cfg, m)
      try:
        methods.options(m, **opts)
      except ValueError as e:
        raise ConfigError(f"config.sweep.options.{m}: {e}") from None
  req(cfg, "sweep.eval_samples", lambda v: _is_int(v) and v >= 2, "an integer >= 2")
  req(cfg, "sweep.eval_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: am.num_steps)")
  req(cfg, "sweep.watch_every", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: no monitor)")
  req(cfg, "sweep.watch_samples", lambda v: _is_int(v) and v >= 1, "a positive integer")
  req(cfg, "sweep.grid_samples", lambda v: _is_int(v) and 0 <= v <= cfg.sweep.eval_samples,
      f"an integer in [0, sweep.eval_samples = {cfg.sweep.eval_samples}]")
  req(cfg, "sweep.confidence", lambda v: 0.0 < v < 1.0, "in (0, 1)")
  req(cfg, "sweep.parallel_seeds", lambda v: isinstance(v, bool), "True or False")
  req(cfg, "sweep.compile_threads", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
  if "replot" in cfg.sweep:
    req(cfg, "sweep.replot", lambda v: isinstance(v, bool), "True or False")
  req(cfg, "mesh.num_devices", lambda v: v == 1, "1 (the sweep runs on one device; parallel_seeds fills it)")
  if _guidance(cfg) != 1.0 and cfg.finetune.get("cond", "") == "null":
    raise ConfigError(f"config.finetune.guidance = {_guidance(cfg):g}: guidance needs class-conditional samples, but "
                      "finetune.cond = 'null' samples the null label (v_null + w (v_null - v_null) = v_null).")
  if "guidance_modes" in cfg.sweep:
    req(cfg, "sweep.guidance_modes", lambda v: all(m in GUIDANCE_MODES for m in v) and len(set(v)) == len(v),
        f"a tuple of distinct modes from {GUIDANCE_MODES} (empty: finetune.guidance_mode)")
  req(cfg, "reward.checkpoint", lambda v: isinstance(v, str) and v, "the classifier directory (diversity and FD use "
      "classifier B's features), e.g. shipped:mnist_classifiers")
  terms = _reward_terms(cfg)
  if "class" in terms:
    req(cfg, "reward.target_class", lambda v: _is_int(v) and 0 <= v < classifiers.NUM_CLASSES, "a digit in 0..9")
  for param in _params_used(cfg):  # the rest of the fine-tuning config, as each run will see it
    builders.validate_finetune(_run_config(cfg, param, cfg.sweep.lambdas[0], cfg.sweep.seeds[0]), num_devices=1)
  if len(builders.data_shape(cfg)) != 3:
    raise ConfigError(f"config.data.name = {cfg.data.name!r}: the sweep evaluates images (classifier features).")


def _finite_positive(v) -> bool:
  return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _run_config(cfg, param: str, lam: float, seed: int):
  """``cfg`` as one run sees it: parameterisation, its learning rate, lambda and seed filled in."""
  c = cfg.copy_and_resolve_references()
  with c.unlocked():
    c.finetune.parameterisation = param
    c.finetune.optimizer.learning_rate = float(cfg.sweep.learning_rates[param])
    c.am.reward_multiplier = float(lam)
    c.seed = int(seed)
  return c


def settings(cfg) -> list:
  """The sweep's settings in run order: per method, per parameterisation, per lambda."""
  sw = cfg.sweep
  out = []
  for m in sw.methods:
    params = list(sw.am_params) if m == "am" else [cfg.finetune.parameterisation]
    for p in params:
      for mode in guidance_modes(cfg):
        out += [Setting(m, float(lam), p, mode) for lam in sw.lambdas]
  return out


# ------------------------------------------------------------------------------------------- statistics


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
  """Mean and half-width of the Student-t confidence interval of the mean of the finite ``values``.

  half = t_{(1 + c) / 2, n - 1} s / sqrt(n), s the sample standard deviation (ddof 1).  Non-finite values
  (diverged runs) are left out and counted in ``dropped``; the half-width is None for fewer than 2 values.
  """
  v = np.asarray([float(x) for x in values if x is not None], np.float64)
  finite = v[np.isfinite(v)]
  n = len(finite)
  out = {"mean": float(finite.mean()) if n else None, "half": None, "n": n, "dropped": len(values) - n}
  if n >= 2:
    from scipy import stats
    s = float(finite.std(ddof=1))
    out["half"] = float(stats.t.ppf(0.5 * (1.0 + confidence), n - 1) * s / math.sqrt(n))
  return out


def aggregate(rows: Sequence[dict], confidence: float = 0.95) -> list:
  """One entry per setting (in first-seen order): its fields, ``t_interval`` of each of ``METRICS`` over the
  seeds, and the number of seeds the monitor flagged."""
  groups: dict = {}
  for r in rows:
    groups.setdefault((r["method"], r["param"], r.get("guidance", ""), r["lam"]), []).append(r)
  out = []
  for (m, p, mode, lam), rs in groups.items():
    entry = {"method": m, "param": p, "lam": lam, "seeds": [r["seed"] for r in rs]}
    if mode:
      entry["guidance"] = mode
    for k in METRICS:
      if any(k in r for r in rs):
        entry[k] = t_interval([r.get(k) for r in rs], confidence)
    flags = [r["hacking_detected"] for r in rs if r.get("hacking_detected") is not None]
    entry["hacking_flagged"] = sum(flags) if flags else None
    out.append(entry)
  return out


def pareto_front(xs: Sequence[float], ys: Sequence[float]) -> list:
  """Indices of the points not dominated when maximising both x and y, in increasing x.

  Point j dominates i when x_j >= x_i and y_j >= y_i with one inequality strict; non-finite points are
  never on the front (and dominate nothing).  Of identical points, the first is kept.
  """
  pts = [(float(x), float(y)) if x is not None and y is not None else (math.nan, math.nan) for x, y in zip(xs, ys)]
  ok = [i for i, (x, y) in enumerate(pts) if math.isfinite(x) and math.isfinite(y)]
  front = []
  for i in ok:
    xi, yi = pts[i]
    dominated = any((pts[j][0] >= xi and pts[j][1] >= yi and (pts[j][0] > xi or pts[j][1] > yi))
                    or (pts[j] == pts[i] and j < i) for j in ok if j != i)
    if not dominated:
      front.append(i)
  return sorted(front, key=lambda i: (pts[i][0], -pts[i][1]))


def mark_pareto(agg: list, base: dict, ykeys: Sequence[str] = ("reward", "gold")) -> None:
  """Sets ``entry["pareto"]`` (of each setting and of the base) to the rewards of ``ykeys`` on whose
  reward-vs-diversity Pareto front (``pareto_front`` of the means, base included) the entry lies."""
  entries = list(agg) + [base]
  for e in entries:
    e["pareto"] = []
  for yk in ykeys:
    xs = [_mean(e, "diversity") for e in entries]
    ys = [_mean(e, yk) for e in entries]
    for i in pareto_front(xs, ys):
      entries[i]["pareto"].append(yk)


def _mean(entry: dict, key: str):
  """The mean of an aggregated metric ({'mean': ...}) or a plain value (the base)."""
  v = entry.get(key)
  return v.get("mean") if isinstance(v, dict) else v


# ------------------------------------------------------------------------------------------- evaluation


class _Evaluator:
  """Fixed-noise ODE samples of any (merged) parameters of the base network and their rewards.

  Every fine-tuned model here is the base network with other weights ('full': its own; 'lora': merged
  W + s A B), so ONE compiled sampler serves the base and every run.  ``cond``: the conditions of the samples
  (default: drawn by ``problem.cond_fn`` from the seed).
  """

  def __init__(self, problem: Problem, num: int, num_steps: int, seed: int, cond: Optional[tuple] = None):
    self.problem, self.num = problem, num
    k_cond, k_x = jax.random.split(jax.random.PRNGKey(seed))
    if cond is None:
      cond = tuple(problem.cond_fn(k_cond, num)) if problem.cond_fn is not None else ()
    self.cond = cond
    self._draw = jax.jit(lambda p: problem.sample(p, k_x, num, "ode", num_steps, cond=cond, which="base"))
    self._report = jax.jit(problem.reward_report)

  def samples(self, merged_params) -> np.ndarray:
    return np.asarray(self._draw(merged_params))

  def report(self, x, cond: Optional[tuple] = None) -> dict:
    cond = self.cond if cond is None else cond
    return {k: float(v) for k, v in self._report(jnp.asarray(x), cond).items()}


BLANK = -0.8  # a pixel is blank (paper white) below 10% ink: (x + 1) / 2 < 0.1


def blank_fraction(x) -> float:
  """Mean fraction of blank pixels (x < ``BLANK``) per image: ~0.8 on real MNIST digits, ~0 on grey fog (the
  hack of a reward that a classifier and its gold twin both accept)."""
  return float(np.mean(np.asarray(x) < BLANK))


class _Scorer:
  """Classifier-B metrics of images: gold accuracy on the target class, diversity, FD (all / target digits),
  blank fraction; and the held-out real digits of the target class (a reference)."""

  def __init__(self, cfg):
    ckpt = cfg.reward.checkpoint
    self.classify = image_eval.make_classify(builders.load_classifier(ckpt, "A")[:3],
                                             builders.load_classifier(ckpt, "B")[:3])
    from am_jax import data as data_lib
    x_ref = image_eval.heldout_images(cfg)
    # Their labels (the same split: MNIST 'heldout', digits 'test'), for the target-class reference.
    y_ref = np.asarray((data_lib.mnist("heldout") if cfg.data.name == "mnist" else data_lib.digits("test"))[1])
    self.ref_feats = np.asarray(self.classify(x_ref)[2])
    self.target = int(cfg.reward.target_class) if "class" in _reward_terms(cfg) else None
    self.target_feats = self.real_target = None
    if self.target is not None:
      self.target_feats = self.ref_feats[y_ref == self.target]
      self.real_target = np.asarray(x_ref)[y_ref == self.target]

  def __call__(self, x, labels=None) -> dict:
    _, logp_b, feats = self.classify(x)
    feats = np.asarray(feats)
    out = {"diversity": classifiers.diversity(feats, labels), "fd": classifiers.frechet_distance(feats, self.ref_feats),
           "blank_fraction": blank_fraction(x)}
    if self.target is not None:
      out["gold_accuracy"] = float(np.mean(np.argmax(np.asarray(logp_b), -1) == self.target))
      out["fd_target"] = classifiers.frechet_distance(feats, self.target_feats)
    elif labels is not None and np.all(np.asarray(labels) < classifiers.NUM_CLASSES):
      # Class-conditional samples: how often classifier B reads the digit they were asked for (what guidance buys).
      out["label_accuracy"] = float(np.mean(np.argmax(np.asarray(logp_b), -1) == np.asarray(labels)))
    return out


def _metrics(x, evaluator: _Evaluator, scorer: _Scorer, gold_name: Optional[str], cond: Optional[tuple] = None
             ) -> dict:
  if not np.all(np.isfinite(x)):
    return {"diverged": True}
  cond = evaluator.cond if cond is None else cond
  out = evaluator.report(x, cond)
  out.update(scorer(x, np.asarray(cond[0]) if cond else None))
  if gold_name is not None:
    out["gold"] = out[f"gold/{gold_name}"]
  out["diverged"] = False
  return out


def _references(cfg, first: Problem, evaluator: _Evaluator, scorer: _Scorer, gold_name, eval_steps: int) -> dict:
  """What a class reward is measured against: the held-out real digits of the target class and, for a
  class-conditional base, the base sampled WITH the target label (the tilt at lambda = 1 is close to it)."""
  if scorer.target is None:
    return {}
  t = scorer.target
  real = scorer.real_target
  out = {f"real held-out {t}s": _metrics(real, evaluator, scorer, gold_name,
                                         (jnp.full((len(real),), t, jnp.int32),) if evaluator.cond else ())}
  if first.null_label is not None:
    cond = (jnp.full((evaluator.num,), t, jnp.int32),)
    labelled = _Evaluator(first, evaluator.num, eval_steps, cfg.seed + 1234, cond)
    out[f"base with label {t}"] = _metrics(labelled.samples(first.base_params), labelled, scorer, gold_name)
  return out


def _gold_name(problem: Problem, terms: dict) -> Optional[str]:
  """The gold reward the table shows: that of the largest-weight term with a gold twin."""
  golds = [t for t in sorted(terms, key=lambda t: -abs(terms[t])) if t in problem.gold_rewards]
  return golds[0] if golds else None


# ------------------------------------------------------------------------------------------------ runs


def _problems(cfg) -> tuple:
  """({(parameterisation, guidance mode): Problem}, reference Problem): the base, rewards and classifiers are loaded once; only the
  trained part differs between 'lora' and 'full', and only the base velocity between the guidance modes.

  With guidance w != 1, mode 'sampling' fine-tunes toward the tilt of the conditional base and samples with
  guidance w; mode 'base' fine-tunes toward the tilt of the guided base v_null + w (v_c - v_null) and samples
  the fine-tuned network without guidance (``builders.build_problem``).  The reference is the plain problem
  (the base as a user samples it, with guidance w at sampling).
  """
  params, modes = _params_used(cfg), guidance_modes(cfg)
  first = _run_config(cfg, params[0], cfg.sweep.lambdas[0], cfg.sweep.seeds[0])
  if modes != ("",):
    with first.unlocked():
      first.finetune.guidance_mode = "sampling"  # the un-guided base velocity; mode 'base' wraps it below
  base_apply, base_params = builders.load_base(first)
  problem = builders.build_problem(first, base_apply, base_params)
  problem.check_shapes(int(cfg.finetune.batch_size))
  per_param = {params[0]: problem}
  for p in params[1:]:
    net_apply, init, param, merge = builders.build_finetuned(_run_config(cfg, p, 1.0, cfg.sweep.seeds[0]),
                                                             problem.base_apply, problem.base_params,
                                                             problem.sample_shape)
    per_param[p] = problem.replace(net_apply=net_apply, init_params=init, parameterisation=param, lora_merge=merge)
  out = {}
  for p, pr in per_param.items():
    for mode in modes:
      out[(p, mode)] = pr if mode != "base" else pr.replace(
          base_apply=param_lib.guided(pr.base_apply, pr.sample_guidance, pr.null_label), sample_guidance=1.0)
  return out, problem


def _eval_problems(problems: dict, reference: Problem) -> dict:
  """{mode: Problem} whose ``sample(merged_params, which='base')`` samples a run's merged parameters as its
  guidance mode does: mode 'base' the plain network without guidance, the others as ``reference`` (the base as
  a user samples it: the plain network with the guidance weight, if any)."""
  return {mode: reference.replace(sample_guidance=1.0) if mode == "base" else reference for _, mode in problems}


def _init_params(cfg, problem: Problem, seed: int):
  """The trained parameters at step 0 for ``seed`` (LoRA's A is drawn from the seed; 'full' copies the base)."""
  run_cfg = _run_config(cfg, problem.parameterisation, 1.0, seed)
  return builders.build_finetuned(run_cfg, problem.base_apply, problem.base_params, problem.sample_shape)[1]


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree, n: int):
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


class _Program:
  """The compiled step of one setting and the initial states of its seeds."""

  def __init__(self, cfg, setting: Setting, problem: Problem):
    sw, fc = cfg.sweep, cfg.finetune
    self.setting, self.seeds = setting, [int(s) for s in sw.seeds]
    self.parallel = bool(sw.parallel_seeds)
    self.problem = problem.with_config(reward_multiplier=setting.lam)
    objective = methods.build(setting.method, self.problem.config, **_method_options(cfg, setting.method))
    self.optimizer = builders.build_optimizer(_run_config(cfg, setting.param, setting.lam, self.seeds[0]),
                                              "finetune.optimizer", int(fc.steps))
    step = training.make_finetune_step(self.problem, objective, self.optimizer, int(fc.batch_size), None,
                                       float(fc.ema_decay))
    self.states = [training.init_state(_init_params(cfg, problem, s), self.optimizer, s) for s in self.seeds]
    if self.parallel:  # every seed in one program: (S, ...) states, shared base params
      step = jax.jit(jax.vmap(step, in_axes=(0, None)), donate_argnums=(0,))
      example = _stack(self.states)
    else:
      example = self.states[0]
    t0 = time.perf_counter()
    self.lowered = step.lower(example, problem.base_params)
    self.lower_seconds = time.perf_counter() - t0

  def compile(self):
    t0 = time.perf_counter()
    compiled = self.lowered.compile()
    return compiled, time.perf_counter() - t0


def _run_setting(cfg, prog: _Program, compiled, compile_seconds: float, evaluator, scorer, watcher, gold_name,
                 merge: Callable, counter: str, keep_grid: int) -> tuple[list, Optional[np.ndarray]]:
  """Trains every seed of one setting with its compiled step; returns (rows, grid samples of the first seed)."""
  fc, s = cfg.finetune, prog.setting
  steps, ema = int(fc.steps), float(fc.ema_decay)
  base_params = prog.problem.base_params
  mem = profiling.memory_stats(compiled)
  groups = [prog.seeds] if prog.parallel else [[seed] for seed in prog.seeds]
  rows, grid = [], None
  for group in groups:
    idx = [prog.seeds.index(g) for g in group]
    state = _stack([prog.states[i] for i in idx]) if prog.parallel else prog.states[idx[0]]
    monitors = {g: watcher.monitor() for g in group} if watcher is not None else {}
    watch_hist = {g: [] for g in group}
    rewards, t_first, t_start, watch_s = [], None, time.perf_counter(), 0.0
    for k in range(steps):
      state, m = compiled(state, base_params)
      rewards.append(m["reward_mean"])
      if k == 0:
        jax.block_until_ready(state.params)
        t_first = time.perf_counter()
      done = k + 1
      if watcher is not None and (done % watcher.every == 0 or done == steps):
        jax.block_until_ready(state.params)  # the pending steps count as training time, the watch does not
        t_watch = time.perf_counter()
        per_seed = _unstack(training.eval_params(state, ema), len(group)) if prog.parallel else \
            [training.eval_params(state, ema)]
        for g, p in zip(group, per_seed):
          out = watcher(merge(p, base_params), monitors[g], done, f"{s.label} seed {g}")
          watch_hist[g].append([done] + [out.get(name) for name in watcher.names])
        watch_s += time.perf_counter() - t_watch
    jax.block_until_ready(state.params)
    wall = time.perf_counter() - t_start
    # The first step (dispatch, allocation) and the watch evaluations are left out of the step time.
    per_step = (time.perf_counter() - t_first - watch_s) / (steps - 1) if steps > 1 else wall - watch_s
    rewards = np.asarray(jnp.stack(rewards)).reshape(steps, len(group))
    last = max(1, steps // 10)
    finals = _unstack(training.eval_params(state, ema), len(group)) if prog.parallel else \
        [training.eval_params(state, ema)]
    for j, (g, p) in enumerate(zip(group, finals)):
      x = evaluator.samples(merge(p, base_params))
      row = {"method": s.method, "param": s.param, "lam": s.lam, "seed": g, "steps": steps,
             **({"guidance": s.guidance} if s.guidance else {}),
             "batch_size": int(fc.batch_size), "train_reward": float(np.mean(rewards[-last:, j])),
             "ms_per_step": 1e3 * per_step, "peak_memory_mb": mem.get("total_bytes", float("nan")) / 2**20,
             "compile_seconds": compile_seconds, "seeds_per_program": len(group)}
      row.update(_metrics(x, evaluator, scorer, gold_name))
      if watcher is not None:
        st = monitors[g].state_dict()
        row.update(hacking_detected=st["hacking_detected"], first_flagged_step=st["first_flagged_step"],
                   watch_columns=["step"] + list(watcher.names), watch=watch_hist[g])
      rows.append(row)
      if grid is None and keep_grid and not row["diverged"]:
        grid = x[:keep_grid]
      reporting.info(f"[sweep {counter}] {s.label} seed {g}: {steps} steps, {1e3 * per_step:.1f} ms/step  "
                     + "  ".join(f"{k} {row[k]:.4g}" for k in ("train_reward", "reward", "gold", "gold_accuracy",
                                                                "diversity", "fd") if k in row)
                     + ("  DIVERGED" if row["diverged"] else "")
                     + ("  hacking flagged" if row.get("hacking_detected") else ""))
  return rows, grid


class _Watcher:
  """The reward-hacking monitor of a run: training reward, terms and gold rewards on fixed samples."""

  def __init__(self, cfg, problem: Problem, seed: int):
    self.every = int(cfg.sweep.watch_every)
    self.evaluator = _Evaluator(problem, int(cfg.sweep.watch_samples),
                                int(cfg.sweep.eval_steps) or problem.config.num_steps, seed)
    options = cfg.eval.get("monitor", {}) if "eval" in cfg else {}
    self.options = options.to_dict() if hasattr(options, "to_dict") else dict(options or {})
    self.names = None

  def monitor(self):
    from am_jax import monitor as monitor_lib
    return monitor_lib.HackingMonitor(**self.options)

  def __call__(self, merged_params, monitor, step: int, what: str) -> dict:
    out = self.evaluator.report(self.evaluator.samples(merged_params))
    if self.names is None:
      self.names = sorted(out)
    gold = {k[len("gold/"):]: v for k, v in out.items() if k.startswith("gold/")}
    trained = {name: out.get(f"reward/{name}", out["reward"]) for name in gold}  # as jobs._RewardWatch pairs them
    for w in monitor.update(step, trained, gold):
      reporting.warn(f"{what}: {w}")
    return out


def rows_from_log(text: str) -> tuple:
  """(base metrics, rows) read back from a sweep's log (the ``[sweep i/n] <setting> seed s: ...`` lines ``run``
  prints): the per-run numbers when the workdir is lost (e.g. a device machine given back) but the log was kept.
  Only the metrics the log line prints survive (train/eval/gold reward, gold accuracy, diversity, FD, ms/step)."""
  import re
  line_re = re.compile(r"^\[sweep \d+/\d+\] (\w+)/(\w+)(?: cfg-(\w+))? λ=([0-9.eE+-]+) seed (-?\d+): (\d+) steps, "
                       r"([0-9.]+) ms/step\s+(.*?)(\s+DIVERGED)?(\s+hacking flagged)?$")
  base, rows = None, []
  for raw in text.splitlines():
    if raw.startswith("[sweep] base: "):
      vals = raw[len("[sweep] base: "):].split()
      base = {k: float(v) for k, v in zip(vals[::2], vals[1::2])}
      continue
    m = line_re.match(raw.strip())
    if not m:
      continue
    method, param, mode, lam, seed, steps, ms, rest, diverged, flagged = m.groups()
    vals = rest.split()
    row = {"method": method, "param": param, "lam": float(lam), "seed": int(seed), "steps": int(steps),
           "ms_per_step": float(ms), "diverged": bool(diverged), **({"guidance": mode} if mode else {})}
    row.update({k: float(v) for k, v in zip(vals[::2], vals[1::2])})
    if flagged:
      row["hacking_detected"] = True
    rows.append(row)
  if base is None or not rows:
    raise ValueError("no '[sweep] base:' line or no per-run lines: not the log of `am-jax sweep`.")
  return base, rows


def summarise_log(log_path: str, workdir: str, confidence: float = 0.95, gold: str = "") -> str:
  """Writes ``sweep.json`` / ``sweep.md`` / ``sweep.png`` in ``workdir`` from a sweep's log (``rows_from_log``);
  returns the table.  ``meta`` records where the numbers came from."""
  with open(log_path) as f:
    text = f.read()
  base, rows = rows_from_log(text)
  agg = aggregate(rows, confidence)
  mark_pareto(agg, base)
  import re
  seeds = sorted({r["seed"] for r in rows})
  steps = rows[0]["steps"]
  batch = re.search(r"steps of batch (\d+)", text)
  unknown = "(the config's)"
  saved = {"meta": {"source": f"log {os.path.basename(log_path)} (rows_from_log)", "seeds": seeds, "steps": steps,
                    "batch_size": int(batch.group(1)) if batch else unknown, "num_steps": unknown,
                    "eval_samples": unknown, "eval_steps": unknown,
                    "confidence": confidence, "config": os.path.basename(log_path), "machine": "see the log",
                    "gold": gold or None,
                    "date": time.strftime("%Y-%m-%d", time.gmtime(os.path.getmtime(log_path)))},
           "base": base, "references": {}, "runs": rows, "settings": agg}
  return write(saved, workdir)


def load(workdir: str) -> dict:
  """The ``sweep.json`` written by ``run``."""
  with open(os.path.join(workdir, "sweep.json")) as f:
    return json.load(f)


def replot(workdir: str) -> str:
  """Rewrites ``sweep.md`` and ``sweep.png`` from ``sweep.json`` (``grid.png`` is kept); returns the table."""
  saved = load(workdir)
  mark_pareto(saved["settings"], saved["base"])
  return write(saved, workdir)


def run(cfg, workdir: str) -> dict:
  """Runs the sweep of ``cfg`` (module docstring); writes the outputs to ``workdir``; returns a short summary.

  ``sweep.replot``: only rebuild the table and the plot from the ``sweep.json`` already in ``workdir``.
  """
  t_start = time.perf_counter()
  if "sweep" in cfg and cfg.sweep.get("replot", False):
    replot(workdir)
    return {"table": os.path.join(workdir, "sweep.md"), "plot": os.path.join(workdir, "sweep.png")}
  validate(cfg)
  sw, fc = cfg.sweep, cfg.finetune
  problems, first = _problems(cfg)
  terms = _reward_terms(cfg)
  gold_name = _gold_name(first, terms)
  eval_steps = int(sw.eval_steps) or first.config.num_steps
  # One evaluator (and watcher) per guidance mode, all with the same noise and conditions (paired comparisons).
  eval_problems = _eval_problems(problems, first)
  evaluator = _Evaluator(first, int(sw.eval_samples), eval_steps, cfg.seed + 1234)
  evaluators = {mode: evaluator if pr is first else _Evaluator(pr, int(sw.eval_samples), eval_steps, cfg.seed + 1234)
                for mode, pr in eval_problems.items()}
  scorer = _Scorer(cfg)
  watchers = {mode: _Watcher(cfg, pr, cfg.seed + 4242) for mode, pr in eval_problems.items()} \
      if sw.watch_every else {}
  merges = {p: jax.jit(lambda params, bp, pr=pr: pr.merged_params(params, bp)) for (p, _), pr in problems.items()}
  x_base = evaluator.samples(first.base_params)
  base = _metrics(x_base, evaluator, scorer, gold_name)
  references = _references(cfg, first, evaluator, scorer, gold_name, eval_steps)
  for name, m in [("base", base)] + list(references.items()):
    reporting.info(f"[sweep] {name}: " + "  ".join(f"{k} {m[k]:.4g}" for k in ("reward", "gold", "gold_accuracy",
                                                                             "diversity", "fd", "fd_target",
                                                                             "blank_fraction") if k in m))
  grid_n = int(sw.grid_samples)
  todo = settings(cfg)
  reporting.info(f"[sweep] {len(todo)} settings x {len(sw.seeds)} seeds, {fc.steps} steps of batch {fc.batch_size} "
                 f"({'seeds vmapped' if sw.parallel_seeds else 'seeds in turn'}; {sw.compile_threads} compile "
                 "thread(s))")
  rows, grids = [], {}
  threads = int(sw.compile_threads)
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads)
  programs, futures = {}, {}
  try:
    for i, s in enumerate(todo):
      # Lowering (tracing) holds the GIL, so it runs here; the compiles of the next ``threads - 1`` settings run
      # in the pool while this one trains (XLA compiles without the GIL).
      for j in range(i, min(i + threads, len(todo))):
        if j not in programs:
          programs[j] = _Program(cfg, todo[j], problems[(todo[j].param, todo[j].guidance)])
          futures[j] = pool.submit(programs[j].compile)
      compiled, compile_s = futures.pop(i).result()
      prog = programs.pop(i)
      reporting.info(f"[sweep {i + 1}/{len(todo)}] {s.label}: compiled in {compile_s:.1f} s "
                     f"(+{prog.lower_seconds:.1f} s tracing)")
      r, g = _run_setting(cfg, prog, compiled, compile_s, evaluators[s.guidance], scorer,
                          watchers.get(s.guidance), gold_name, merges[s.param], f"{i + 1}/{len(todo)}", grid_n)
      rows += r
      grids[s] = g
      del prog, compiled  # frees the program and its states before the next setting
  finally:
    pool.shutdown(wait=False, cancel_futures=True)
  agg = aggregate(rows, float(sw.confidence))
  mark_pareto(agg, base)
  from am_jax import lora
  sizes = None
  lora_problem = next((pr for (p, _), pr in problems.items() if p == "lora"), None)
  if lora_problem is not None:
    sizes = lora.param_counts(lora_problem.base_params, lora_problem.init_params)
  saved = {
      "meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": _machine(), "jax": jax.__version__,
               "config": cfg.get("name", ""), "model": cfg.model.kind, "reward": cfg.reward.name,
               "reward_terms": terms, "target_class": int(cfg.reward.get("target_class", -1)),
               "cond": cfg.finetune.get("cond", ""), "gold": gold_name, "steps": int(fc.steps),
               "batch_size": int(fc.batch_size), "num_steps": first.config.num_steps,
               "eval_samples": int(sw.eval_samples), "eval_steps": eval_steps, "seeds": list(sw.seeds),
               "lambdas": list(sw.lambdas), "guidance": _guidance(cfg),
               "guidance_modes": [m for m in guidance_modes(cfg) if m],
               "confidence": float(sw.confidence), "parallel_seeds": bool(sw.parallel_seeds),
               "learning_rates": dict(sw.learning_rates), "options": {m: _method_options(cfg, m) for m in sw.methods},
               "lora_sizes": sizes, "wall_seconds": time.perf_counter() - t_start},
      "base": base, "references": references, "runs": rows, "settings": agg}
  panels = [("base", x_base[:grid_n])] if grid_n else []
  for m in sw.methods:  # the best setting of each method and mode (highest mean gold reward, else training reward)
    for mode in guidance_modes(cfg):
      best = _best([a for a in agg if a.get("guidance", "") == mode], m)
      if best is not None and grid_n:
        x = grids.get(Setting(best["method"], best["lam"], best["param"], mode))
        if x is not None:
          panels.append((f"{best['method']}/{best['param']}{_mode_suffix(mode)} λ={best['lam']:g}", x))
  saved["meta"]["grid"] = [p[0] for p in panels]
  saved["meta"]["wall_seconds"] = time.perf_counter() - t_start
  write(saved, workdir, panels)
  return {"settings": len(agg), "runs": len(rows), "diverged": sum(bool(r.get("diverged")) for r in rows),
          "hacking_flagged": sum(bool(r.get("hacking_detected")) for r in rows),
          "wall_seconds": saved["meta"]["wall_seconds"], "table": os.path.join(workdir, "sweep.md")}


def _best(agg: list, method: str) -> Optional[dict]:
  key = "gold" if any("gold" in a for a in agg) else "reward"
  cands = [a for a in agg if a["method"] == method and a.get(key, {}).get("mean") is not None]
  return max(cands, key=lambda a: a[key]["mean"]) if cands else None


def _machine() -> str:
  if jax.default_backend() == "cpu":
    return f"{platform.machine()} CPU x{os.cpu_count()}"
  return jax.devices()[0].device_kind


# ------------------------------------------------------------------------------------------------ output


def _pm(stat: Optional[dict], nd: int = 3) -> str:
  """'m ± h' ('m' with one seed, 'diverged' without a finite value)."""
  if not stat or stat.get("mean") is None:
    return "diverged"
  text = f"{stat['mean']:.{nd}f}"
  if stat.get("half") is not None:
    text += f" ± {stat['half']:.{nd}f}"
  if stat.get("dropped"):
    text += f" ({stat['dropped']} diverged)"
  return text


def _one(v, nd: int = 3) -> str:
  return "-" if v is None or not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v:.{nd}f}"


_COLUMNS = (("train_reward", "train reward", 3), ("reward", "reward (eval)", 3), ("gold", "gold reward", 3),
            ("gold_accuracy", "gold acc.", 3), ("label_accuracy", "label acc.", 3), ("diversity", "diversity", 2), ("fd", "FD", 1),
            ("fd_target", "FD (target)", 1), ("blank_fraction", "blank px", 2), ("ms_per_step", "ms/step", 1),
            ("peak_memory_mb", "peak MB", 1))


def markdown(saved: dict) -> str:
  """The table: one row per setting (mean ± t half-width over seeds), the base and the references first; "Pareto"
  names the rewards on whose reward-vs-diversity front (setting means, base included) the row lies."""
  agg, base, meta = saved["settings"], saved["base"], saved["meta"]
  cols = [c for c in _COLUMNS if c[0] in base or any(c[0] in a for a in agg)]
  hacking = any(a.get("hacking_flagged") is not None for a in agg)
  pareto = "pareto" in base or any("pareto" in a for a in agg)
  guided = any(a.get("guidance") for a in agg)
  head = (["method", "param"] + ["guidance"] * guided + ["λ"] + [c[1] for c in cols] + (["hacking flagged"] if hacking else [])
          + (["Pareto"] if pareto else []))
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, ref in [("base", base)] + list(saved.get("references", {}).items()):
    cells = [name, "-"] + ["-"] * guided + ["-"] + [_one(ref.get(k), nd) if k not in ("train_reward", "ms_per_step", "peak_memory_mb")
                                else "-" for k, _, nd in cols]
    cells += ["-"] * hacking + [", ".join(ref.get("pareto", [])) or "-"] * pareto
    lines.append("| " + " | ".join(cells) + " |")
  for a in agg:
    cells = [a["method"], a["param"]] + [a.get("guidance", "-")] * guided + [f"{a['lam']:g}"] + [_pm(a.get(k), nd) if k in a else "-" for k, _, nd in cols]
    if hacking:
      cells.append("-" if a.get("hacking_flagged") is None else f"{a['hacking_flagged']}/{len(a['seeds'])}")
    if pareto:
      cells.append(", ".join(a.get("pareto", [])) or "-")
    lines.append("| " + " | ".join(cells) + " |")
  conf = int(round(100 * meta.get("confidence", 0.95)))
  if meta.get("guidance", 1.0) != 1.0:
    lines.append(f"\nclassifier-free guidance w = {meta['guidance']:g}: 'base' fine-tunes toward the tilt of the "
                 "guided base and samples without guidance; 'sampling' fine-tunes the conditional base and samples "
                 "with guidance w; the base row is the guided base.")
  note = (f"\nmean ± {conf}% Student-t half-width over seeds {meta.get('seeds')}; {meta.get('steps')} steps of batch "
          f"{meta.get('batch_size')}, K = {meta.get('num_steps')}; metrics on {meta.get('eval_samples')} ODE samples "
          f"(fixed noise, {meta.get('eval_steps')} steps); {meta.get('machine')}, {meta.get('date')}.\n")
  return "\n".join(lines) + "\n" + note


def _series(agg: list):
  """{(method, param): [settings]} in order."""
  out: dict = {}
  for a in agg:
    out.setdefault((a["method"], a["param"] + _mode_suffix(a.get("guidance", ""))), []).append(a)
  return out


def plot(saved: dict, path: str):
  """Training and gold reward against diversity, error bars = the t half-widths, dashed: the Pareto front of the
  setting means (base included)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  agg, base, meta = saved["settings"], saved["base"], saved["meta"]
  ykeys = [k for k in ("reward", "gold") if k in base or any(k in a for a in agg)]
  fig, axes = plt.subplots(1, len(ykeys), figsize=(6.2 * len(ykeys), 4.6), squeeze=False)
  colors = plt.get_cmap("tab10").colors
  for ax, yk in zip(axes[0], ykeys):
    for c, ((m, p), group) in enumerate(_series(agg).items()):
      pts = [(a["diversity"], a[yk], a["lam"]) for a in group if a.get("diversity", {}).get("mean") is not None
             and a.get(yk, {}).get("mean") is not None]
      if not pts:
        continue
      xs = [d["mean"] for d, _, _ in pts]
      ys = [r["mean"] for _, r, _ in pts]
      xerr = [d["half"] or 0.0 for d, _, _ in pts]
      yerr = [r["half"] or 0.0 for _, r, _ in pts]
      ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="-o", ms=4, capsize=2, lw=1, color=colors[c % 10],
                  label=f"{m}/{p}")
      for x, y, (_, _, lam) in zip(xs, ys, pts):
        ax.annotate(f"{lam:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6, color=colors[c % 10])
    if base.get("diversity") is not None and base.get(yk) is not None:
      ax.plot([base["diversity"]], [base[yk]], "k*", ms=11, label="base")
    for (name, ref), marker in zip(saved.get("references", {}).items(), ("D", "X", "P")):
      if ref.get("diversity") is not None and ref.get(yk) is not None:
        ax.plot([ref["diversity"]], [ref[yk]], marker, color="0.35", ms=7, label=name)
    xs = [a.get("diversity", {}).get("mean") for a in agg] + [base.get("diversity")]
    ys = [a.get(yk, {}).get("mean") for a in agg] + [base.get(yk)]
    front = pareto_front(xs, ys)
    if len(front) > 1:
      ax.step([xs[i] for i in front], [ys[i] for i in front], "--", where="post", color="0.5", lw=1,
              label="Pareto front")
    _limits(ax, agg, [base] + list(saved.get("references", {}).values()), yk)
    ax.set_xlabel("diversity (classifier-B feature distance within a condition)")
    gold = meta.get("gold")
    ax.set_ylabel("training reward (eval samples)" if yk == "reward" else
                  f"gold reward ({gold}, held out)" if gold else "gold reward (held out)")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  conf = int(round(100 * meta.get("confidence", 0.95)))
  fig.suptitle(f"{meta.get('config', '')}: {meta.get('steps')} steps x batch {meta.get('batch_size')}, seeds "
               f"{meta.get('seeds')} (bars: {conf}% t-intervals, clipped to the axes; labels: λ); "
               f"{meta.get('machine')}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _limits(ax, agg: list, points: list, yk: str):
  """Axes around the means (5% padding): one unstable setting's wide interval must not squash the rest (its
  bars run off the axes; the table has the numbers)."""
  for key, setter in (("diversity", ax.set_xlim), (yk, ax.set_ylim)):
    vals = [_mean(a, key) for a in agg] + [p.get(key) for p in points]
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if vals:
      lo, hi = min(vals), max(vals)
      if key == yk and hi <= 0 and lo < -1:
        # Log-probability rewards: the fine-tuned settings crowd within 1 nat of 0, the base sits near -20.
        ax.set_yscale("symlog", linthresh=0.1)
        setter(lo * 1.3, 0.02)
        continue
      pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 0.05
      setter(lo - pad, hi + pad)


def write(saved: dict, workdir: str, grid_panels: Sequence = ()) -> str:
  """Writes ``sweep.json``, ``sweep.md``, ``sweep.png`` and (given panels) ``grid.png``; returns the table."""
  from am_jax import plots
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "sweep.json"), "w") as f:
    json.dump(reporting.to_json(saved), f, indent=1, allow_nan=False)
  md = markdown(saved)
  with open(os.path.join(workdir, "sweep.md"), "w") as f:
    f.write(md)
  plot(saved, os.path.join(workdir, "sweep.png"))
  if grid_panels:
    plots.image_grid(os.path.join(workdir, "grid.png"), list(grid_panels), cols=8,
                     max_images=max(len(x) for _, x in grid_panels),
                     title="base vs the best setting of each method (highest mean gold reward), same noise")
  return md
