"""Efficient Adjoint Matching: Gaussian reference base with a linear drift, few-step ODE sampling, closed-form adjoint.

Derived in docs/eam.md.  Replace the memoryless base b_base = 2 v_base - kappa x by the memoryless
process of the Gaussian reference p_ref = N(0, s^2 I), whose drift b_ref(x, t) = A(t) x is linear, and the terminal
cost -r by g(x) = -r(x) - log p_base(x) + log p_ref(x).  Both bases are memoryless and share the bridge law given X_1,
so the optimal path measure p_ref(X_1) e^{-g(X_1)} P(X | X_1) / Z = p_base(X_1) e^{r(X_1)} P(X | X_1) / Z is AM's:
same optimal velocity, same tilted target p_base e^r / Z.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from am_jax import adjoint as adjoint_lib
from am_jax import dynamics
from am_jax import losses
from am_jax import sampling
from am_jax import schedules as schedules_lib
from am_jax import sharding as sharding_lib
from am_jax.dynamics import _bcast
from am_jax.methods import _common

__all__ = ["SOLVERS", "WEIGHTS", "base_data_score", "eam", "linear_reference", "log_ratio_rate", "ode_sample",
           "ode_sample_with_log_ratio", "self_normalised_weights", "weight_mode"]

SOLVERS = ("euler", "midpoint")
WEIGHTS = ("auto", "exact", "hutchinson", "none")


def linear_reference(schedule: schedules_lib.Schedule, t, ref_std: float = 1.0):
  """Closed forms of the reference base used by EAM: the memoryless process of data N(0, s^2 I).

  With D_t = alpha_t^2 s^2 + beta_t^2 (the variance of its time-t marginal):
    velocity       v_ref(x, t) = (kappa_t - eta_t / D_t) x                     (linear in x)
    drift          b_ref(x, t) = 2 v_ref - kappa_t x = A(t) x,  A = kappa - 2 eta / D
    transition     Phi(1, t) = exp(int_t^1 A) = alpha_t s^2 / D_t  ( = E[X_1 | X_t = x] / x )
  so the lean adjoint da/dt = -A(t) a has the closed form a(t) = Phi(1, t) a(1).

  Args:
    t: array of times in (0, 1].  Returns (Phi(1, t), v_ref coefficient), both shaped like t.
  """
  s2 = ref_std**2
  a, b = schedule.alpha(t), schedule.beta(t)
  d = a**2 * s2 + b**2
  return a * s2 / d, schedule.kappa(t) - schedule.eta(t) / d


def base_data_score(base_velocity_fn: Callable, x, schedule, score_time: float):
  """grad log p_base(x) read off a velocity model at t_s < 1 (the score is singular to read at t = 1).

  X_t = alpha X_1 + beta Z gives s_t(y) = s~(y / alpha) / alpha with s~ the score of p_base smoothed by
  N(0, beta^2 / alpha^2), so grad log p_base(x) ~ alpha_s s_{t_s}(alpha_s x) with error O(beta_s^2 / alpha_s^2).
  """
  t = jnp.full((x.shape[0],), score_time, jnp.float32)
  a = schedule.alpha(t)
  y = _bcast(a, x) * x
  return _bcast(a, x) * dynamics.velocity_to_score(base_velocity_fn(y, t), y, t, schedule)


def _midpoint_grid(ode_steps: int, time_power: float):
  """Nodes t_k = (k / n)^p, step sizes and midpoints of the midpoint sampler; times clipped to [1e-4, 1 - 1e-4]
  for evaluation (some parameterisations, e.g. VP epsilon, are 0/0 at t = 0 or 1)."""
  nodes = (jnp.arange(ode_steps + 1, dtype=jnp.float32) / ode_steps) ** time_power
  h = nodes[1:] - nodes[:-1]
  clip = lambda t: jnp.clip(t, 1e-4, 1.0 - 1e-4)  # noqa: E731
  return clip(nodes[:-1]), h, clip(nodes[:-1] + 0.5 * h)


def ode_sample(velocity_fn: Callable, x0, config: losses.AMConfig, ode_steps: int = 8, ode_solver: str = "midpoint",
               time_power: float = 2.0):
  """EAM's few-step deterministic sampler: Euler on the config's ODE grid with ``ode_steps`` steps, or explicit
  midpoint (RK2) on the power grid t_k = (k / n)^p.  Returns X_1 (B, ...)."""
  if ode_solver == "euler":
    coeffs = _common.ode_coefficients(config, ode_steps)
    return sampling.simulate(velocity_fn, x0, jnp.zeros((ode_steps,) + x0.shape, x0.dtype), coeffs)[-1]
  batch = x0.shape[0]

  def body(x, xs):
    t0, h, tm = (jnp.full((batch,), c, jnp.float32) for c in xs)
    x_mid = x + 0.5 * _bcast(h, x) * velocity_fn(x, t0)
    return x + _bcast(h, x) * velocity_fn(x_mid, tm), None

  x1, _ = jax.lax.scan(body, x0, _midpoint_grid(ode_steps, time_power))
  return x1


def weight_mode(weights: str, x_shape) -> str:
  """Resolves ``weights='auto'``: exact divergence up to 16 dimensions per sample, Hutchinson above."""
  if weights != "auto":
    return weights
  return "exact" if math.prod(tuple(x_shape)[1:]) <= 16 else "hutchinson"


def log_ratio_rate(ft_velocity_fn: Callable, base_velocity_fn: Callable, x, t, schedule, mode: str, key=None):
  """Rate of log(p_base / p_n) along the fine-tuned ODE path, and v_ft.

  Along dX/dt = v_ft, the continuity equations of both probability flows give
      d/dt log p_n(X_t, t)    = -div v_ft,
      d/dt log p_base(X_t, t) = -div v_base + s_base(X_t, t) . (v_ft - v_base),
  so with dv = v_ft - v_base:   d/dt log(p_base / p_n)(X_t, t) = div dv + s_base . dv,
  s_base = (v_base - kappa x) / eta (``dynamics.velocity_to_score``).  Both processes start at N(0, I), so the
  integral over [0, 1] is log(p_base / p_n)(X_1) for the law p_n of the model's ODE samples.

  The divergence uses VJPs only (the U-Net's custom-VJP convolutions have no JVP): 'exact' = dim VJPs
  (diagonal of the Jacobian), 'hutchinson' = z . (J^T z) with one Rademacher probe z (unbiased).

  Args:
    x: (B, ...) states; t: (B,) times in (0, 1).  Returns (rate (B,), v_ft (B, ...)).
  """
  def dv_fn(y):
    vb = base_velocity_fn(y, t)
    return ft_velocity_fn(y, t) - vb, vb

  dv, vjp_fn, v_base = jax.vjp(dv_fn, x, has_aux=True)
  flat = lambda a: a.reshape(a.shape[0], -1)  # noqa: E731
  if mode == "exact":
    dim = math.prod(x.shape[1:])
    basis = jnp.eye(dim, dtype=x.dtype).reshape((dim, 1) + x.shape[1:])

    def diag_entry(e):
      ct = jnp.broadcast_to(e, x.shape)
      return jnp.sum(flat(vjp_fn(ct)[0] * ct), axis=-1)

    div = jnp.sum(jax.vmap(diag_entry)(basis), axis=0)
  elif mode == "hutchinson":
    z = jax.random.rademacher(key, x.shape, x.dtype)
    div = jnp.sum(flat(vjp_fn(z)[0] * z), axis=-1)
  else:
    raise ValueError(f"log_ratio_rate: mode must be 'exact' or 'hutchinson', got {mode!r}.")
  score = dynamics.velocity_to_score(v_base, x, t, schedule)
  return div + jnp.sum(flat(score * dv), axis=-1), dv + v_base


def ode_sample_with_log_ratio(ft_velocity_fn: Callable, base_velocity_fn: Callable, x0, config: losses.AMConfig, key,
                              mode: str, ode_steps: int = 8, ode_solver: str = "midpoint", time_power: float = 2.0):
  """``ode_sample``, also integrating log(p_base / p_n)(X_1) (``log_ratio_rate``) with the same rule (rate at the
  Euler evaluation / midpoint state).  Returns (x1 (B, ...), log_ratio (B,))."""
  batch = x0.shape[0]
  keys = jax.random.split(key, ode_steps)
  schedule = config.schedule
  if ode_solver == "euler":
    coeffs = _common.ode_coefficients(config, ode_steps)

    def body(carry, xs):
      x, ell = carry
      tau, dt, k = xs
      t = jnp.full((batch,), tau, jnp.float32)
      rate, v = log_ratio_rate(ft_velocity_fn, base_velocity_fn, x, t, schedule, mode, k)
      return (x + dt * v, ell + dt * rate), None

    (x1, ell), _ = jax.lax.scan(body, (x0, jnp.zeros((batch,), jnp.float32)), (coeffs.tau, coeffs.dt, keys))
    return x1, ell

  def body(carry, xs):
    x, ell = carry
    grid, key_k = xs
    t0, h, tm = (jnp.full((batch,), c, jnp.float32) for c in grid)
    x_mid = x + 0.5 * _bcast(h, x) * ft_velocity_fn(x, t0)
    rate, v = log_ratio_rate(ft_velocity_fn, base_velocity_fn, x_mid, tm, schedule, mode, key_k)
    return (x + _bcast(h, x) * v, ell + h * rate), None

  (x1, ell), _ = jax.lax.scan(body, (x0, jnp.zeros((batch,), jnp.float32)), (_midpoint_grid(ode_steps, time_power),
                                                                             keys))
  return x1, ell


def self_normalised_weights(log_w, max_log_weight: float = 0.0):
  """(B,) log-weights -> (B,) weights with mean 1 (softmax * B), and the effective sample size fraction.

  ``max_log_weight`` > 0 clips the log-weights from below at (max - max_log_weight): no sample weighs less than
  e^-max_log_weight times the heaviest (a guard against one sample taking all the weight)."""
  log_w = log_w - jnp.max(log_w)
  if max_log_weight > 0:
    log_w = jnp.maximum(log_w, -max_log_weight)
  p = jax.nn.softmax(log_w)
  return p * log_w.shape[0], 1.0 / (jnp.sum(p**2) * log_w.shape[0])


def eam(config: losses.AMConfig = losses.AMConfig(), ode_steps: int = 8, ode_solver: str = "midpoint",
        num_times: int = 16, ref_std: float = 1.0, score_time: float = 0.999, time_range: tuple = (1e-3, 1.0 - 1e-3),
        weights: str = "auto", time_power: float = 2.0, max_log_weight: float = 0.0) -> _common.Objective:
  """Efficient Adjoint Matching (module docstring; docs/eam.md).

  (i) The lean adjoint of a linear drift is closed form: a(t) = Phi(1, t) a(1), a(1) = grad g(X_1)
  (``linear_reference``): no backward simulation.  (ii) It depends on the path only through X_1, and the optimal
  process's pair (X_t, X_1) is X_1 ~ p*, X_t = alpha_t X_1 + beta_t Z: training needs only terminal samples (a
  few-step ODE of the current model, no SDE) and fresh noise.  Loss (cf. paper Eq. 25):

      L = E_{X_1, t, Z} w(X_1) | 2 (v_ft(X_t, t) - v_ref(X_t, t)) / sigma(t) + sigma(t) Phi(1, t) grad g(X_1) |^2,
      grad g(X_1) = -lambda grad reward(X_1) - grad log p_base(X_1) - X_1 / s^2,

  whose fixed point is v_ft = v_{p*} (target-score identity).  grad log p_base is read off the base velocity at
  t_s = ``score_time`` (``base_data_score``).  Unweighted (w = 1), with X_1 ~ p_n of the current model, the
  regression returns v_{p_n} + eta Phi E[grad log(p* / p_n)(X_1) | X_t]: mode weights are (nearly) neutral
  (``gmm.bimodal_1d`` keeps mass 0.63 vs 0.88; docs/eam.md (f)-(g)).  The self-normalised importance weights
  w oc p*(X_1) / p_n(X_1) = e^{lambda r} p_base / p_n, with log(p_base / p_n)(X_1) integrated along the sampler's
  ODE path (``log_ratio_rate``), make the regression target v* at every step.

  Args:
    config: lambda, schedule and (Euler sampler) time offset; the rest of the AMConfig is not used.
    ode_steps: training-time sampler steps.  ode_solver: 'midpoint' (RK2, 2 evaluations a step) or 'euler'.
    num_times: regression times per terminal sample, uniform in ``time_range`` = (lo, hi), 0 < lo < hi < 1.
    ref_std: s > 0 of the reference N(0, s^2 I).  score_time: t_s in (0, 1).
    weights: 'exact' (dim VJPs per evaluation) or 'hutchinson' (one probe) divergence for the log-ratio;
      'auto' = exact up to 16 dimensions, else hutchinson; 'none' = the unweighted regression.
    time_power: p >= 1 of the midpoint grid (p > 1 refines early times, where the control of a memoryless
      fine-tune (sigma ~ t^(-1/2)) makes the velocity stiff).
    max_log_weight: >= 0; clip of ``self_normalised_weights`` (0 disables it).

  Returns an objective; aux: loss, reward_mean, reward_std, target_norm, eam_ess (effective sample size / batch),
  log_ratio_mean.
  """
  _common.check_config("eam", config)
  req = lambda ok, msg: _common.require(ok, "eam", msg)  # noqa: E731
  req(_common.is_int(ode_steps) and ode_steps >= 1, f"ode_steps must be an int >= 1, got {ode_steps!r}.")
  req(ode_solver in SOLVERS, f"ode_solver must be one of {SOLVERS}, got {ode_solver!r}.")
  req(_common.is_int(num_times) and num_times >= 1, f"num_times must be an int >= 1, got {num_times!r}.")
  req(_common.is_real(ref_std) and ref_std > 0, f"ref_std must be > 0, got {ref_std!r}.")
  req(_common.is_real(score_time) and 0.0 < score_time < 1.0, f"score_time must be in (0, 1), got {score_time!r}.")
  req(len(time_range) == 2 and 0.0 < time_range[0] < time_range[1] < 1.0,
      f"time_range must be (lo, hi) with 0 < lo < hi < 1, got {time_range!r}.")
  req(weights in WEIGHTS, f"weights must be one of {WEIGHTS}, got {weights!r}.")
  req(_common.is_real(time_power) and time_power >= 1, f"time_power must be >= 1, got {time_power!r}.")
  req(_common.is_real(max_log_weight) and max_log_weight >= 0, f"max_log_weight must be >= 0, got {max_log_weight!r}.")
  schedule, lam, s, (lo, hi) = config.schedule, config.reward_multiplier, ref_std, time_range
  sampler = dict(ode_steps=ode_steps, ode_solver=ode_solver, time_power=time_power)

  def objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape, cond=(), mesh=None):
    k0, kt, kz = jax.random.split(key, 3)
    kh = jax.random.fold_in(key, 7)
    x0 = sharding_lib.constrain_batch(jax.random.normal(k0, tuple(x_shape), jnp.float32), mesh, 0)
    ft_sg = jax.lax.stop_gradient(ft_params)
    ft_v = lambda x, t: ft_apply_fn(ft_sg, x, t, *cond)  # noqa: E731
    base_v = lambda x, t: base_apply_fn(jax.lax.stop_gradient(base_params), x, t, *cond)  # noqa: E731
    mode = weight_mode(weights, x_shape)
    if mode == "none":
      x1 = jax.lax.stop_gradient(ode_sample(ft_v, x0, config, **sampler))
      log_ratio = jnp.zeros((x0.shape[0],), jnp.float32)
    else:
      x1, log_ratio = jax.lax.stop_gradient(ode_sample_with_log_ratio(ft_v, base_v, x0, config, kh, mode, **sampler))
    x1 = sharding_lib.constrain_batch(x1, mesh, 0)
    neg_grad_r, rewards = adjoint_lib.terminal_adjoint(reward_fn, x1, lam, cond)
    if mode == "none":
      w, ess = jnp.ones_like(rewards), jnp.ones((), jnp.float32)
    else:
      # p* / p_n  oc  e^{lambda r(X_1)} p_base(X_1) / p_n(X_1), normalised over the (global) batch.
      w, ess = self_normalised_weights(lam * rewards + log_ratio, max_log_weight)
      w = jax.lax.stop_gradient(w)
    # grad g = -grad r - grad log p_base + grad log p_ref, grad log p_ref(x) = -x / s^2.
    a1 = jax.lax.stop_gradient(neg_grad_r - base_data_score(base_v, x1, schedule, score_time) - x1 / s**2)
    a1 = sharding_lib.constrain_batch(a1, mesh, 0)

    batch = x1.shape[0]
    t = _common.constrain_rows(jax.random.uniform(kt, (num_times * batch,), jnp.float32, lo, hi), mesh, num_times)
    z = _common.constrain_rows(jax.random.normal(kz, (num_times * batch,) + x1.shape[1:], jnp.float32), mesh,
                               num_times)
    x1_m = jnp.concatenate([x1] * num_times, axis=0)
    a1_m = jnp.concatenate([a1] * num_times, axis=0)
    x_t = _bcast(schedule.alpha(t), z) * x1_m + _bcast(schedule.beta(t), z) * z
    phi, lin = linear_reference(schedule, t, s)
    sig = schedule.memoryless_sigma(t)
    v_ft = ft_apply_fn(ft_params, x_t, t, *losses._tile_cond(cond, num_times))
    u = _bcast(2.0 / sig, x_t) * (v_ft - _bcast(lin, x_t) * x_t)
    target = -_bcast(sig * phi, x_t) * a1_m
    loss = jnp.mean(_common.sqnorm(u - target) * jnp.concatenate([w] * num_times, axis=0))
    return loss, {"loss": loss, "reward_mean": jnp.mean(rewards), "reward_std": jnp.std(rewards),
                  "target_norm": jnp.mean(_common.sqnorm(target)), "eam_ess": ess,
                  "log_ratio_mean": jnp.mean(log_ratio)}

  return objective
