"""Reward fine-tuning methods behind one jittable interface, selected by name.

Every entry of ``METHODS`` has the signature of ``losses.adjoint_matching_objective``:

    objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape, config, cond=())
        -> (loss scalar, aux dict)

* ``ft_apply_fn(params, x, t, *cond) -> v`` (velocity, x (N, ...), t (N,)); only ``ft_params`` is trained.
* ``config`` is a ``MethodConfig`` (an ``AMConfig`` is accepted and wrapped as ``MethodConfig(am=config)``).
* ``aux`` always holds ``reward_mean`` (mean raw reward of the X_1 the step generated) and ``loss``.
* Differentiate with ``jax.grad(..., has_aux=True)`` w.r.t. ``ft_params``; everything is jittable
  (``x_shape`` and ``config`` static).

Notation as in ``schedules``/``dynamics``: kappa = alphadot/alpha, eta = beta (kappa beta - betadot),
memoryless sigma = sqrt(2 eta), r = lambda * reward.  Step k of a grid has size h, evaluation time tau_k,
drift b_k(x) = v(x, tau_k) + c_k (v - kappa_k x), so the fine-tuned drift is b_base + sigma u with the
control u_k = (1 + c_k)(v_ft - v_base) / sigma_k (2 (v_ft - v_base) / sigma when memoryless; paper Eq. 18).

Methods (derivations and measurements: BUILD_NOTES.md section 8):
  am                  Adjoint Matching, lean adjoint (paper Alg. 1, Eq. 25): ``losses.adjoint_matching_objective``.
  basic_am            basic AM (paper Eq. 22): same regression, full adjoint of the controlled process (Eq. 20).
  continuous_adjoint  the adjoint method (paper Eq. 20-21): surrogate whose gradient is
                      sum_k h (du_k/dtheta)^T (sigma_k a_{k+1} + u_k), trajectory stop-gradient.
  discrete_adjoint    backprop through the discretised SDE of J = sum_k h |u_k|^2 / 2 - r(X_1) (noise fixed).
  draft               DRaFT-K: ODE sampling, gradient of -r(X_1) through the last K steps only, no KL.
  refl                ReFL: ODE to a random late node t, one-step prediction x1_hat, loss -r(x1_hat).
  am_const_sigma      AM sampled with a constant sigma (the biased baseline of paper Fig. 2).
  eam                 Efficient AM: linear (Gaussian-reference) base drift, terminal cost
                      g = -r - log p_base + log p_ref, few-step ODE sampling, closed-form adjoint.
                      Terminal samples are importance-weighted by p_base e^r / p_n (log-ratio integrated along
                      the ODE path), without which mode weights are a near-neutral direction (BUILD_NOTES.md 8.7).
  deterministic_am    ODE dynamics, truncated lean adjoint, regulariser 'kl' | 'kinetic' | 'power'.

IMPORTANT for methods that differentiate through the states (basic_am, continuous_adjoint,
discrete_adjoint, draft): ``ft_apply_fn`` must be differentiable in x, including its base-model part.
``parameterisation.residual_model`` stops the gradient of the base *parameters* only, so d v_base / dx flows
(needed by the methods that differentiate through states).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from am_jax import parameterisation
from am_jax import adjoint as adjoint_lib
from am_jax import dynamics
from am_jax import gmm as gmm_lib
from am_jax import losses
from am_jax import models
from am_jax import sampling
from am_jax import schedules as schedules_lib
from am_jax import toy
from am_jax.dynamics import _bcast
from am_jax.losses import adjoint_matching_objective  # noqa: F401  (re-export: the 'am' method)

REGULARISERS = ("kl", "kinetic", "power")
EAM_SOLVERS = ("euler", "midpoint")
EAM_WEIGHTS = ("auto", "exact", "hutchinson", "none")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """Static, hashable options of every method; the shared ones live in ``am`` (an AMConfig).

  Shared (from ``am``): schedule, reward_multiplier (lambda), num_steps (K), time_offset,
  noiseless_last_step, loss time-step selection, loss_clip (AM family only), solver, diffusion.

  Attributes:
    am: AMConfig used by am / basic_am / the adjoint methods, and for the shared fields by all.
    const_sigma: sigma of 'am_const_sigma' (0.2 and 1.0 are the paper's Fig. 2 values).
    draft_k: DRaFT-K: number of final ODE steps the reward gradient flows through (1 <= K <= num_steps).
    refl_t_range: (t_min, t_max): ReFL stops the ODE at a uniformly drawn grid node in this range.
    truncation: deterministic_am: fraction of the final steps that get the adjoint and the loss.
    regulariser: deterministic_am running cost R(dv) of dv = v_ft - v_base:
      'kl'      |dv|^2 / eta_t  (= |u|^2 / 2 of the memoryless SDE with the same velocities),
      'kinetic' |dv|^2 / (2 w)  (kinetic energy of the perturbation: a W2-type proximity term),
      'power'   |dv|^p / (p w^(p-1)), p = regulariser_power > 1 (penalises large deviations harder).
    regulariser_weight: w (multiplies eta/2 for 'kl').
    regulariser_power: p of 'power'.
    det_anchor_steps: deterministic_am: random steps before the window whose control is regressed to
      0, so the learned field solves the truncated problem (control only on the window).
    eam_ode_steps: EAM training-time ODE solver steps.
    eam_ode_solver: 'midpoint' (explicit RK2, 2 evaluations a step) or 'euler'.
    eam_num_times: EAM regression times per terminal sample.
    eam_ref_std: s: the linear reference base is the memoryless process of N(0, s^2 I).
    eam_score_time: t_s < 1 at which the base data score grad log p_base is read off the velocity.
    eam_time_range: EAM regression times are uniform in this interval.
    eam_weights: self-normalised importance weights p_base e^r / p_n on the terminal samples (what makes EAM
      move mass between modes; BUILD_NOTES.md section 8.7g).  log(p_base / p_n)(X_1) is integrated along the
      sampler's ODE path with the divergence of v_ft - v_base computed 'exact'ly (dim VJPs per evaluation) or
      by a one-probe 'hutchinson' estimate; 'auto' = exact for dim <= 16, else hutchinson; 'none' = the
      unweighted regression (correct fixed point, but mode weights are neutral).
    eam_time_power: p >= 1: the midpoint sampler's grid is t_k = (k / n)^p (p > 1 refines early times, where
      the control of a memoryless fine-tune (sigma ~ t^(-1/2)) makes the velocity stiff).
    eam_max_log_weight: log-weights are clipped to (max - this) from below after centring at their maximum
      (a guard against a single sample taking all the weight; 0 disables clipping).
  """

  am: losses.AMConfig = dataclasses.field(default_factory=losses.AMConfig)
  const_sigma: float = 1.0
  draft_k: int = 1
  refl_t_range: tuple = (0.75, 0.975)
  truncation: float = 0.25
  regulariser: str = "kinetic"
  regulariser_weight: float = 1.0
  regulariser_power: float = 4.0
  det_anchor_steps: int = 4
  eam_ode_steps: int = 8
  eam_ode_solver: str = "midpoint"
  eam_num_times: int = 16
  eam_ref_std: float = 1.0
  eam_score_time: float = 0.999
  eam_time_range: tuple = (1e-3, 1.0 - 1e-3)
  eam_weights: str = "auto"
  eam_time_power: float = 2.0
  eam_max_log_weight: float = 0.0

  def __post_init__(self):
    if not isinstance(self.am, losses.AMConfig):
      raise TypeError(f"MethodConfig.am must be an AMConfig, got {self.am!r}.")
    if not 1 <= self.draft_k <= self.am.num_steps:
      raise ValueError(f"MethodConfig.draft_k must be in [1, num_steps={self.am.num_steps}], got {self.draft_k}.")
    lo, hi = self.refl_t_range
    if not 0.0 < lo <= hi < 1.0:
      raise ValueError(f"MethodConfig.refl_t_range must satisfy 0 < t_min <= t_max < 1, got {self.refl_t_range}.")
    if not 0.0 < self.truncation <= 1.0:
      raise ValueError(f"MethodConfig.truncation must be in (0, 1], got {self.truncation}.")
    if self.regulariser not in REGULARISERS:
      raise ValueError(f"MethodConfig.regulariser must be one of {REGULARISERS}, got {self.regulariser!r}.")
    if self.regulariser_weight <= 0 or self.regulariser_power <= 1:
      raise ValueError("MethodConfig.regulariser_weight must be > 0 and regulariser_power > 1.")
    if self.eam_ode_steps < 1 or self.eam_num_times < 1 or self.eam_ref_std <= 0:
      raise ValueError("MethodConfig.eam_ode_steps, eam_num_times must be >= 1 and eam_ref_std > 0.")
    if self.eam_ode_solver not in EAM_SOLVERS:
      raise ValueError(f"MethodConfig.eam_ode_solver must be one of {EAM_SOLVERS}, got {self.eam_ode_solver!r}.")
    if not 0.0 < self.eam_score_time < 1.0:
      raise ValueError(f"MethodConfig.eam_score_time must be in (0, 1), got {self.eam_score_time}.")
    lo, hi = self.eam_time_range
    if not 0.0 < lo < hi < 1.0:
      raise ValueError(f"MethodConfig.eam_time_range must satisfy 0 < lo < hi < 1, got {self.eam_time_range}.")
    if self.eam_weights not in EAM_WEIGHTS:
      raise ValueError(f"MethodConfig.eam_weights must be one of {EAM_WEIGHTS}, got {self.eam_weights!r}.")
    if self.eam_time_power < 1:
      raise ValueError(f"MethodConfig.eam_time_power must be >= 1, got {self.eam_time_power}.")
    if self.eam_max_log_weight < 0:
      raise ValueError(f"MethodConfig.eam_max_log_weight must be >= 0, got {self.eam_max_log_weight}.")

  @property
  def schedule(self) -> schedules_lib.Schedule:
    return self.am.schedule

  @property
  def lam(self) -> float:
    return self.am.reward_multiplier


def as_method_config(config) -> MethodConfig:
  """MethodConfig as is; an AMConfig becomes MethodConfig(am=config)."""
  if isinstance(config, MethodConfig):
    return config
  if isinstance(config, losses.AMConfig):
    return MethodConfig(am=config)
  raise TypeError(f"config must be a MethodConfig or an AMConfig, got {type(config).__name__}.")


# ``parameterisation.residual_model`` freezes only the base *parameters*, so d v_base / dx flows: the methods
# that backpropagate through states need it (the drift Jacobian of the fine-tuned process).
residual_model = parameterisation.residual_model


# ---------------------------------------------------------------------------------------------
# Shared pieces.
# ---------------------------------------------------------------------------------------------


def _sqnorm(x):
  """Per-sample squared norm: (N, ...) -> (N,)."""
  return jnp.sum((x**2).reshape(x.shape[0], -1), axis=-1)


def _slice_coeffs(coeffs: sampling.StepCoefficients, start: int, stop: int) -> sampling.StepCoefficients:
  """Steps start..stop-1 of a grid (nodes start..stop), for simulating or adjoining a segment."""
  per_step = {f: getattr(coeffs, f)[start:stop] for f in ("tau", "dt", "sigma", "drift_scale", "kappa",
                                                          "loss_sigma", "loss_drift_scale")}
  return coeffs._replace(t=coeffs.t[start:stop + 1], **per_step)


def _initial_state(key, x_shape, num_steps):
  k0, kn = jax.random.split(key)
  return jax.random.normal(k0, tuple(x_shape), jnp.float32), sampling.draw_noise(kn, num_steps, x_shape)


def _controlled_coefficients(cfg: MethodConfig) -> sampling.StepCoefficients:
  coeffs = cfg.am.coefficients()
  # The control u = (1 + c)(v_ft - v_base) / sigma needs sigma > 0 at every step (not the ODE).
  if isinstance(schedules_lib.get_diffusion(cfg.am.diffusion), schedules_lib.ZeroDiffusion):
    raise ValueError("This method needs a stochastic diffusion (sigma > 0); got an ODE ('ode' / 0).")
  return coeffs


def _flat_steps(traj, coeffs, cond):
  """Stacks steps 0..K-1 into one batch: x (K B, ...), t (K B,), per-row step coefficients and cond."""
  k_steps, b = coeffs.num_steps, traj.shape[1]
  x = traj[:-1].reshape((k_steps * b,) + traj.shape[2:])
  rep = lambda c: jnp.repeat(c, b)  # noqa: E731
  return x, rep(coeffs.tau), {f: rep(getattr(coeffs, f)) for f in ("dt", "drift_scale", "kappa", "loss_sigma",
                                                                   "loss_drift_scale")}, losses._tile_cond(cond, k_steps)


def _ode_coefficients(cfg: MethodConfig, num_steps: Optional[int] = None) -> sampling.StepCoefficients:
  return sampling.make_coefficients(cfg.schedule, "ode", num_steps or cfg.am.num_steps, cfg.am.time_offset)


# ---------------------------------------------------------------------------------------------
# 1. Adjoint Matching (lean adjoint) and 7. AM with a constant sigma.
# ---------------------------------------------------------------------------------------------


def am_objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape, config, cond=()):
  """Adjoint Matching (paper Alg. 1, Eq. 25): ``losses.adjoint_matching_objective`` with ``config.am``."""
  cfg = as_method_config(config)
  loss, aux = losses.adjoint_matching_objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key,
                                                x_shape, cfg.am, cond)
  return loss, dict(aux, loss=loss)


def am_const_sigma_objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape, config,
                             cond=()):
  """AM whose trajectories and adjoint use sigma(t) = ``const_sigma`` instead of the memoryless schedule.

  Drift b = v + c (v - kappa x), c = sigma^2 / (2 eta) (paper Eq. 5), control u = (1 + c)(v_ft - v_base)/sigma.
  The SOC optimum then has the initial-value-function bias of paper Eq. 17, so X_1 is NOT
  p_base exp(r) / Z (paper Thm. 1, Fig. 2): the biased baseline.
  """
  cfg = as_method_config(config)
  am_cfg = dataclasses.replace(cfg.am, diffusion=float(cfg.const_sigma))
  return am_objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape,
                      dataclasses.replace(cfg, am=am_cfg), cond)


# ---------------------------------------------------------------------------------------------
# 2. Basic Adjoint Matching: the full adjoint.
# ---------------------------------------------------------------------------------------------


def full_adjoint(ft_velocity_fn: Callable, base_velocity_fn: Callable, traj, a1, coeffs: sampling.StepCoefficients):
  """Adjoint of the controlled process with running cost |u|^2 / 2 (paper Eq. 20), backward over ``traj``.

  Discrete cost J = sum_k h_k |u_k(X_k)|^2 / 2 - r(X_K) with X_{k+1} = X_k + h_k b^ft_k(X_k) + sigma_k sqrt(h_k) xi_k,
  b^ft_k = b^base_k + sigma_k u_k.  Its pathwise gradient a_k = dJ/dX_k (noise and params fixed) is

      a_K = -grad r(X_K),   a_k = a_{k+1} + h_k [ (grad_x b^ft_k)^T a_{k+1} + (grad_x u_k)^T u_k ],

  the Euler discretisation of da/dt = -(grad_x (b + sigma u))^T a - grad_x |u|^2 / 2 that is exact for the
  discrete dynamics (one VJP of (b^ft_k, u_k) with cotangent (a_{k+1}, u_k) per step).

  Args:
    ft_velocity_fn, base_velocity_fn: ``fn(x, t) -> v`` (params closed over; ft must be differentiable in x).
    traj: (K+1, B, ...) trajectory of the fine-tuned process (treated as constant).
    a1: (B, ...) terminal adjoint -lambda grad reward(X_K).
    coeffs: the grid that produced ``traj``.

  Returns:
    (K+1, B, ...) adjoint a_0..a_K.
  """
  chex.assert_shape(traj, (coeffs.num_steps + 1,) + a1.shape)
  traj = jax.lax.stop_gradient(traj)
  batch = a1.shape[0]

  def body(a_next, k):
    t_k = sampling.step_time(coeffs, k, batch)

    def drift_and_control(x):
      v_ft, v_base = ft_velocity_fn(x, t_k), base_velocity_fn(x, t_k)
      u = (1.0 + coeffs.loss_drift_scale[k]) * (v_ft - v_base) / coeffs.loss_sigma[k]
      return sampling.step_drift(v_ft, x, coeffs, k), u

    (_, u), vjp = jax.vjp(drift_and_control, traj[k])
    a_k = a_next + coeffs.dt[k] * vjp((a_next, u))[0]
    return a_k, a_k

  _, a_rev = jax.lax.scan(body, a1, jnp.arange(coeffs.num_steps), reverse=True)
  return jnp.concatenate([a_rev, a1[None]], axis=0)


def _full_adjoint_batch(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape,
                        cfg: MethodConfig, cond):
  """Fine-tuned trajectories (no gradient) and their full adjoint."""
  coeffs = _controlled_coefficients(cfg)
  x0, noise = _initial_state(key, x_shape, cfg.am.num_steps)
  ft_sg = jax.lax.stop_gradient(ft_params)
  ft_v = lambda x, t: ft_apply_fn(ft_sg, x, t, *cond)  # noqa: E731
  base_v = lambda x, t: base_apply_fn(base_params, x, t, *cond)  # noqa: E731
  traj = jax.lax.stop_gradient(sampling.simulate(ft_v, x0, noise, coeffs, cfg.am.solver))
  a1, rewards = adjoint_lib.terminal_adjoint(reward_fn, traj[-1], cfg.lam, cond)
  adj = jax.lax.stop_gradient(full_adjoint(ft_v, base_v, traj, a1, coeffs))
  return coeffs, traj, adj, rewards


def basic_am_objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape, config, cond=()):
  """Basic Adjoint Matching (paper Eq. 22): regress u(X_k) onto -sigma_k a_{k+1} with the FULL adjoint.

  L = mean_{k in S, b} |u_k(X_k; theta) + sigma_k a_{k+1}|^2 (same time steps S, weights and clipping as
  'am'; only the adjoint differs).  Its gradient is 2 (du/dtheta)^T (u + sigma a): with every step
  selected it is 2 / (K h) = 2 times the adjoint-method gradient (paper Prop. 2; tested).
  """
  cfg = as_method_config(config)
  k_batch, k_loss = jax.random.split(key)
  _, traj, adj, rewards = _full_adjoint_batch(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn,
                                              k_batch, x_shape, cfg, cond)
  loss, aux = losses.adjoint_matching_loss(ft_apply_fn, ft_params, base_apply_fn, base_params,
                                           losses.AMBatch(traj, adj, rewards), k_loss, cfg.am, cond)
  return loss, dict(aux, loss=loss)


# ---------------------------------------------------------------------------------------------
# 3. Continuous adjoint method and 4. discrete adjoint (backprop through the SDE).
# ---------------------------------------------------------------------------------------------


def _control_cost_and_drift(ft_apply_fn, params, base_apply_fn, base_params, traj, coeffs, cond):
  """Per-step (u_k, b^ft_k) at X_k for all k in one batched call: shapes (K B, ...)."""
  x, t, c, cond_k = _flat_steps(traj, coeffs, cond)
  v_ft = ft_apply_fn(params, x, t, *cond_k)
  v_base = jax.lax.stop_gradient(base_apply_fn(base_params, x, t, *cond_k))
  u = _bcast((1.0 + c["loss_drift_scale"]) / c["loss_sigma"], x) * (v_ft - v_base)
  drift = v_ft + _bcast(c["drift_scale"], x) * (v_ft - _bcast(c["kappa"], x) * x)
  return u, drift, c["dt"]


def continuous_adjoint_objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape, config,
                                 cond=()):
  """The adjoint method (paper Eq. 20-21) as a surrogate loss.

  With a the full adjoint (``full_adjoint``, trajectory and params stopped), the gradient of
  J(theta) = E[sum_k h |u_k|^2 / 2 - r(X_K)] is

      dJ/dtheta = E sum_k h [ (d b^ft_k / dtheta)^T a_{k+1} + (d u_k / dtheta)^T u_k ]
                = E sum_k h (d u_k / dtheta)^T (sigma_k a_{k+1} + u_k)       (d b^ft_k / dtheta = sigma_k du_k/dtheta),

  i.e. paper Eq. 21 discretised.  The surrogate S(theta) = E sum_k h [<b^ft_k(X_k; theta), a_{k+1}> + |u_k|^2 / 2]
  has exactly this gradient (also on a noiseless last step, where d b/dtheta uses that step's own
  coefficients).  The returned loss has the value of J and the gradient of S: J + S - stopgrad(S).
  Because the adjoint is the exact chain rule of the Euler scheme, this equals the discrete-adjoint
  gradient to float precision (tested); it needs O(K) stored states, not the K network activations.
  """
  cfg = as_method_config(config)
  coeffs, traj, adj, rewards = _full_adjoint_batch(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn,
                                                   key, x_shape, cfg, cond)
  b = traj.shape[1]
  u, drift, dt = _control_cost_and_drift(ft_apply_fn, ft_params, base_apply_fn, base_params, traj, coeffs, cond)
  a_next = adj[1:].reshape(drift.shape)
  per_row = dt * (jnp.sum((drift * a_next).reshape(drift.shape[0], -1), -1) + 0.5 * _sqnorm(u))
  surrogate = jnp.sum(per_row) / b
  control_cost = jnp.sum(dt * 0.5 * _sqnorm(jax.lax.stop_gradient(u))) / b
  value = control_cost - cfg.lam * jnp.mean(rewards)
  loss = value + surrogate - jax.lax.stop_gradient(surrogate)
  aux = {"loss": value, "control_cost": control_cost, "reward_mean": jnp.mean(rewards),
         "reward_std": jnp.std(rewards)}
  return loss, aux


def discrete_adjoint_objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape, config,
                               cond=()):
  """J = mean_b [sum_k h |u_k(X_k)|^2 / 2 - lambda reward(X_K)] simulated with live params (lax.scan).

  ``jax.grad`` backpropagates through every Euler-Maruyama step with the noise held fixed (the
  discrete adjoint method of Han & E; paper Sec. 4).  Memory grows with K (all activations stored).
  """
  cfg = as_method_config(config)
  coeffs = _controlled_coefficients(cfg)
  x0, noise = _initial_state(key, x_shape, cfg.am.num_steps)
  batch = x0.shape[0]

  def body(x, k):
    t_k = sampling.step_time(coeffs, k, batch)
    v_ft = ft_apply_fn(ft_params, x, t_k, *cond)
    v_base = base_apply_fn(jax.lax.stop_gradient(base_params), x, t_k, *cond)
    u = (1.0 + coeffs.loss_drift_scale[k]) * (v_ft - v_base) / coeffs.loss_sigma[k]
    x_next = (x + coeffs.dt[k] * sampling.step_drift(v_ft, x, coeffs, k)
              + coeffs.sigma[k] * jnp.sqrt(coeffs.dt[k]) * noise[k])
    return x_next, coeffs.dt[k] * 0.5 * _sqnorm(u)

  x1, costs = jax.lax.scan(body, x0, jnp.arange(coeffs.num_steps))
  rewards = reward_fn(x1, *cond)
  chex.assert_shape(rewards, (batch,))
  control_cost = jnp.mean(jnp.sum(costs, axis=0))
  loss = control_cost - cfg.lam * jnp.mean(rewards)
  return loss, {"loss": loss, "control_cost": control_cost, "reward_mean": jnp.mean(rewards),
                "reward_std": jnp.std(rewards)}


# ---------------------------------------------------------------------------------------------
# 5. DRaFT-K and 6. ReFL (reward only, ODE sampling, no KL term).
# ---------------------------------------------------------------------------------------------


def draft_objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape, config, cond=()):
  """DRaFT-K: loss = -lambda mean reward(X_1), X_1 from the fine-tuned ODE (K = ``num_steps`` Euler steps).

  The first num_steps - draft_k steps run with stopped params and the state is stopped before the
  last draft_k steps, so the gradient is the truncated backprop of DRaFT-K.  No KL term: the
  optimum is reward maximisation (for an unbounded reward, no optimum at all).
  """
  cfg = as_method_config(config)
  coeffs = _ode_coefficients(cfg)
  k_steps, k_grad = coeffs.num_steps, cfg.draft_k
  x0 = jax.random.normal(key, tuple(x_shape), jnp.float32)
  zeros = jnp.zeros((k_steps,) + tuple(x_shape), jnp.float32)
  ft_sg = jax.lax.stop_gradient(ft_params)
  head = _slice_coeffs(coeffs, 0, k_steps - k_grad)
  if head.num_steps:
    x_mid = sampling.simulate(lambda x, t: ft_apply_fn(ft_sg, x, t, *cond), x0, zeros[:head.num_steps], head)[-1]
  else:
    x_mid = x0
  x_mid = jax.lax.stop_gradient(x_mid)
  tail = _slice_coeffs(coeffs, k_steps - k_grad, k_steps)
  x1 = sampling.simulate(lambda x, t: ft_apply_fn(ft_params, x, t, *cond), x_mid, zeros[head.num_steps:], tail)[-1]
  rewards = reward_fn(x1, *cond)
  loss = -cfg.lam * jnp.mean(rewards)
  return loss, {"loss": loss, "reward_mean": jnp.mean(rewards), "reward_std": jnp.std(rewards)}


def refl_objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape, config, cond=()):
  """ReFL: loss = -lambda mean reward(x1_hat), x1_hat = (x_t - beta_t eps_hat) / alpha_t (one-step prediction).

  The ODE (no gradient) runs to a grid node t_k drawn uniformly (per sample) among the nodes in
  ``refl_t_range``; the only gradient is through v_ft(X_{t_k}, t_k) in ``dynamics.velocity_to_data``.
  ``reward_mean`` reports the reward of the full ODE sample X_1.
  """
  cfg = as_method_config(config)
  coeffs = _ode_coefficients(cfg)
  k_steps = coeffs.num_steps
  lo = max(1, math.ceil(cfg.refl_t_range[0] * k_steps - 1e-6))
  hi = min(k_steps - 1, math.floor(cfg.refl_t_range[1] * k_steps + 1e-6))
  if lo > hi:
    raise ValueError(f"refl_t_range {cfg.refl_t_range} contains no interior node of a {k_steps}-step grid.")
  k0, kk = jax.random.split(key)
  x0 = jax.random.normal(k0, tuple(x_shape), jnp.float32)
  ft_sg = jax.lax.stop_gradient(ft_params)
  traj = jax.lax.stop_gradient(sampling.simulate(lambda x, t: ft_apply_fn(ft_sg, x, t, *cond), x0,
                                                 jnp.zeros((k_steps,) + tuple(x_shape)), coeffs))
  batch = x0.shape[0]
  node = jax.random.randint(kk, (batch,), lo, hi + 1)
  x_t = traj[node, jnp.arange(batch)]
  t = coeffs.t[node]
  x1_hat = dynamics.velocity_to_data(ft_apply_fn(ft_params, x_t, t, *cond), x_t, t, cfg.schedule)
  pred_rewards = reward_fn(x1_hat, *cond)
  rewards = reward_fn(traj[-1], *cond)
  loss = -cfg.lam * jnp.mean(pred_rewards)
  return loss, {"loss": loss, "reward_mean": jnp.mean(rewards), "reward_std": jnp.std(rewards),
                "predicted_reward_mean": jnp.mean(pred_rewards), "t_mean": jnp.mean(t)}


# ---------------------------------------------------------------------------------------------
# 8. Efficient Adjoint Matching: Gaussian reference base with a linear drift.
# ---------------------------------------------------------------------------------------------


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


def _midpoint_grid(cfg: MethodConfig):
  """Nodes t_k = (k / n)^p, step sizes and midpoints of EAM's midpoint sampler; times clipped to
  [1e-4, 1 - 1e-4] for evaluation (some parameterisations, e.g. VP epsilon, are 0/0 at t = 0 or 1)."""
  n = cfg.eam_ode_steps
  nodes = (jnp.arange(n + 1, dtype=jnp.float32) / n) ** cfg.eam_time_power
  h = nodes[1:] - nodes[:-1]
  clip = lambda t: jnp.clip(t, 1e-4, 1.0 - 1e-4)  # noqa: E731
  return clip(nodes[:-1]), h, clip(nodes[:-1] + 0.5 * h)


def _ode_sample(velocity_fn, x0, cfg: MethodConfig):
  """Few-step deterministic sampler for EAM (no noise): Euler at mid-step times, or explicit midpoint."""
  n = cfg.eam_ode_steps
  if cfg.eam_ode_solver == "euler":
    coeffs = _ode_coefficients(cfg, n)
    return sampling.simulate(velocity_fn, x0, jnp.zeros((n,) + x0.shape, x0.dtype), coeffs)[-1]
  batch = x0.shape[0]

  def body(x, xs):
    t0, h, tm = (jnp.full((batch,), c, jnp.float32) for c in xs)
    x_mid = x + 0.5 * _bcast(h, x) * velocity_fn(x, t0)
    return x + _bcast(h, x) * velocity_fn(x_mid, tm), None

  x1, _ = jax.lax.scan(body, x0, _midpoint_grid(cfg))
  return x1


def eam_weight_mode(cfg: MethodConfig, x_shape) -> str:
  """Resolves ``eam_weights='auto'``: exact divergence up to 16 dimensions per sample, Hutchinson above."""
  if cfg.eam_weights != "auto":
    return cfg.eam_weights
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


def ode_sample_with_log_ratio(ft_velocity_fn: Callable, base_velocity_fn: Callable, x0, cfg: MethodConfig, key,
                              mode: str):
  """EAM's few-step ODE sampler, also integrating log(p_base / p_n)(X_1) (``log_ratio_rate``).

  Same grid and update as ``_ode_sample`` (Euler at the ODE grid's evaluation times, or explicit midpoint);
  the log-ratio is integrated with the same rule (rate at the evaluation / midpoint state).

  Returns:
    (x1 (B, ...), log_ratio (B,)).
  """
  n, batch = cfg.eam_ode_steps, x0.shape[0]
  keys = jax.random.split(key, n)
  schedule = cfg.schedule
  if cfg.eam_ode_solver == "euler":
    coeffs = _ode_coefficients(cfg, n)

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

  (x1, ell), _ = jax.lax.scan(body, (x0, jnp.zeros((batch,), jnp.float32)), (_midpoint_grid(cfg), keys))
  return x1, ell


def self_normalised_weights(log_w, max_log_weight: float = 0.0):
  """(B,) log-weights -> (B,) weights with mean 1 (softmax * B), and the effective sample size fraction."""
  log_w = log_w - jnp.max(log_w)
  if max_log_weight > 0:
    log_w = jnp.maximum(log_w, -max_log_weight)
  p = jax.nn.softmax(log_w)
  return p * log_w.shape[0], 1.0 / (jnp.sum(p**2) * log_w.shape[0])


def eam_objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape, config, cond=()):
  """Efficient Adjoint Matching (derived in BUILD_NOTES.md section 8).

  Reformulation.  Replace the memoryless base b_base = 2 v_base - kappa x by the memoryless process of the
  Gaussian reference p_ref = N(0, s^2 I), whose drift b_ref(x, t) = A(t) x is linear, and the terminal
  cost -r by  g(x) = -r(x) - log p_base(x) + log p_ref(x).  Both bases are memoryless and share the bridge
  law given X_1 (the linear noising kernel X_t = alpha_t X_1 + beta_t Z), so the optimal path measure
  p_ref(X_1) e^{-g(X_1)} P(X | X_1) / Z = p_base(X_1) e^{r(X_1)} P(X | X_1) / Z is the same as AM's: same
  optimal velocity, same tilted target p_base e^r / Z.

  Consequences.  (i) The lean adjoint of a linear drift is closed form: a(t) = Phi(1, t) a(1), a(1) = grad g(X_1)
  (``linear_reference``), so no backward simulation.  (ii) It depends on the path only through X_1, and the
  optimal process's pair (X_t, X_1) is X_1 ~ p*, X_t = alpha_t X_1 + beta_t Z; so training needs only
  terminal samples (from a few-step ODE of the current model, no SDE) and fresh noise.  Loss:

      L = E_{X_1, t, Z} | 2 (v_ft(X_t, t) - v_ref(X_t, t)) / sigma(t) + sigma(t) Phi(1, t) grad g(X_1) |^2,
      grad g(X_1) = -lambda grad reward(X_1) - grad log p_base(X_1) - X_1 / s^2,

  a regression of the control relative to the reference, u_ref = 2 (v_ft - v_ref) / sigma, onto
  -sigma Phi a(1) (cf. paper Eq. 25).  Its fixed point v_ft = v_{p*}: with p* = p_base e^r / Z this is the
  target-score identity s_t(x) = E[grad log p*(X_1) | X_t = x] / alpha_t rewritten (BUILD_NOTES.md section 8).
  grad log p_base is read off the base velocity at t_s = ``eam_score_time`` (``base_data_score``).

  Importance weights (``eam_weights``; BUILD_NOTES.md section 8.7f-g).  Unweighted, with samples X_1 ~ p_n of the
  current model, the regression returns v_{p_n} + eta Phi E[grad log(p* / p_n)(X_1) | X_t]: it rebuilds the
  model's own velocity plus a correction that vanishes where log(p* / p_n) is flat, so the relative weights of
  well-separated modes are (nearly) neutral (on ``gmm.bimodal_1d`` it keeps mass 0.63 vs 0.88).  Weighting each
  terminal sample by w oc p*(X_1) / p_n(X_1) = e^{lambda r(X_1)} p_base(X_1) / p_n(X_1) (self-normalised over the
  batch) turns the pairs (X_t, X_1) into samples of P*'s, so the regression target is v* at every step.
  log(p_base / p_n)(X_1) is integrated along the sampler's ODE path (``log_ratio_rate``): one base forward and
  the divergence of v_ft - v_base per evaluation, still no backward simulation.

  aux: loss, reward_mean, reward_std, target_norm, eam_ess (effective sample size / batch), log_ratio_mean.
  """
  cfg = as_method_config(config)
  schedule, s = cfg.schedule, cfg.eam_ref_std
  k0, kt, kz = jax.random.split(key, 3)
  kh = jax.random.fold_in(key, 7)
  x0 = jax.random.normal(k0, tuple(x_shape), jnp.float32)
  ft_sg = jax.lax.stop_gradient(ft_params)
  ft_v = lambda x, t: ft_apply_fn(ft_sg, x, t, *cond)  # noqa: E731
  base_v = lambda x, t: base_apply_fn(jax.lax.stop_gradient(base_params), x, t, *cond)  # noqa: E731
  mode = eam_weight_mode(cfg, x_shape)
  if mode == "none":
    x1 = jax.lax.stop_gradient(_ode_sample(ft_v, x0, cfg))
    log_ratio = jnp.zeros((x0.shape[0],), jnp.float32)
  else:
    x1, log_ratio = jax.lax.stop_gradient(ode_sample_with_log_ratio(ft_v, base_v, x0, cfg, kh, mode))
  neg_grad_r, rewards = adjoint_lib.terminal_adjoint(reward_fn, x1, cfg.lam, cond)
  if mode == "none":
    weights, ess = jnp.ones_like(rewards), jnp.ones((), jnp.float32)
  else:
    # p* / p_n  oc  e^{lambda r(X_1)} p_base(X_1) / p_n(X_1), normalised over the (global) batch.
    weights, ess = self_normalised_weights(cfg.lam * rewards + log_ratio, cfg.eam_max_log_weight)
    weights = jax.lax.stop_gradient(weights)
  # grad g = -grad r - grad log p_base + grad log p_ref, grad log p_ref(x) = -x / s^2.
  a1 = jax.lax.stop_gradient(neg_grad_r - base_data_score(base_v, x1, schedule, cfg.eam_score_time) - x1 / s**2)

  m, batch = cfg.eam_num_times, x1.shape[0]
  lo, hi = cfg.eam_time_range
  t = jax.random.uniform(kt, (m * batch,), jnp.float32, lo, hi)
  z = jax.random.normal(kz, (m * batch,) + x1.shape[1:], jnp.float32)
  x1_m = jnp.concatenate([x1] * m, axis=0)
  a1_m = jnp.concatenate([a1] * m, axis=0)
  x_t = _bcast(schedule.alpha(t), z) * x1_m + _bcast(schedule.beta(t), z) * z
  phi, lin = linear_reference(schedule, t, s)
  sig = schedule.memoryless_sigma(t)
  v_ft = ft_apply_fn(ft_params, x_t, t, *losses._tile_cond(cond, m))
  u = _bcast(2.0 / sig, x_t) * (v_ft - _bcast(lin, x_t) * x_t)
  target = -_bcast(sig * phi, x_t) * a1_m
  terms = _sqnorm(u - target) * jnp.concatenate([weights] * m, axis=0)
  loss = jnp.mean(terms)
  return loss, {"loss": loss, "reward_mean": jnp.mean(rewards), "reward_std": jnp.std(rewards),
                "target_norm": jnp.mean(_sqnorm(target)), "eam_ess": ess,
                "log_ratio_mean": jnp.mean(log_ratio)}


# ---------------------------------------------------------------------------------------------
# 9. Deterministic Adjoint Matching with a truncated adjoint and general regularisers.
# ---------------------------------------------------------------------------------------------


def _regulariser_weight(cfg: MethodConfig, tau):
  """w(t) of R: eta/2 * weight for 'kl' (R = |dv|^2 / eta), weight otherwise."""
  if cfg.regulariser == "kl":
    return cfg.regulariser_weight * 0.5 * cfg.schedule.eta(tau)
  return cfg.regulariser_weight * jnp.ones_like(tau)


def regulariser_cost(cfg: MethodConfig, dv, tau):
  """R(dv) per sample: |dv|^2 / (2 w) ('kl', 'kinetic') or |dv|^p / (p w^(p-1)) ('power').  dv (N, ...), tau (N,)."""
  w = _regulariser_weight(cfg, tau)
  if cfg.regulariser == "power":
    p = cfg.regulariser_power
    return (_sqnorm(dv) + 1e-12) ** (0.5 * p) / (p * w ** (p - 1.0))
  return 0.5 * _sqnorm(dv) / w


def regulariser_target(cfg: MethodConfig, a_next, tau):
  """The stationary control dv = grad R*(-a): -w a (quadratic), -w |a|^{(2-p)/(p-1)} a ('power')."""
  w = _bcast(_regulariser_weight(cfg, tau), a_next)
  if cfg.regulariser == "power":
    p = cfg.regulariser_power
    norm = jnp.sqrt(_sqnorm(a_next) + 1e-12)
    return -w * _bcast(norm ** ((2.0 - p) / (p - 1.0)), a_next) * a_next
  return -w * a_next


def deterministic_am_objective(ft_apply_fn, ft_params, base_apply_fn, base_params, reward_fn, key, x_shape, config,
                               cond=()):
  """Deterministic Adjoint Matching: ODE dynamics dX = (v_base + dv) dt, cost sum_k h R(dv_k) - r(X_1).

  Pontryagin: for the discrete problem with open-loop controls the costate is the lean adjoint along
  the controlled path, a_k = a_{k+1} + h (grad_x v_base)^T a_{k+1}, a_K = -grad r(X_K), and stationarity
  is grad R(dv_k) = -a_{k+1}, i.e. dv_k = grad R*(-a_{k+1}) (``regulariser_target``).  We regress
  dv(X_k, tau_k) = v_ft - v_base onto that target under the current policy:

      L = mean_{k in window, b} |dv_k - grad R*(-a_{k+1})|^2 / w_k  +  mean_{k in anchors, b} |dv_k|^2 / w_k.

  Truncation: only the last ceil(truncation K) steps get the adjoint (the backward pass stops there)
  and the regression; ``det_anchor_steps`` random earlier steps are regressed to dv = 0 so the field
  solves the truncated problem (control only on the window).  The fixed point is NOT the tilted
  distribution: it is the push-forward of N(0, I) by the per-trajectory optimal deterministic control
  (``deterministic_reference_samples``); see BUILD_NOTES.md section 8.
  """
  cfg = as_method_config(config)
  coeffs = _ode_coefficients(cfg)
  k_steps = coeffs.num_steps
  n_win = max(1, min(k_steps, math.ceil(cfg.truncation * k_steps - 1e-6)))
  k_start = k_steps - n_win
  k0, ka = jax.random.split(key)
  x0 = jax.random.normal(k0, tuple(x_shape), jnp.float32)
  ft_sg = jax.lax.stop_gradient(ft_params)
  traj = jax.lax.stop_gradient(sampling.simulate(lambda x, t: ft_apply_fn(ft_sg, x, t, *cond), x0,
                                                 jnp.zeros((k_steps,) + tuple(x_shape)), coeffs))
  a1, rewards = adjoint_lib.terminal_adjoint(reward_fn, traj[-1], cfg.lam, cond)
  window = _slice_coeffs(coeffs, k_start, k_steps)
  base_v = lambda x, t: base_apply_fn(base_params, x, t, *cond)  # noqa: E731
  adj = jax.lax.stop_gradient(adjoint_lib.lean_adjoint(base_v, traj[k_start:], a1, window))

  batch = x0.shape[0]
  n_anchor = min(cfg.det_anchor_steps, k_start)
  idx = jnp.arange(k_start, k_steps)
  if n_anchor:
    idx = jnp.concatenate([jax.random.choice(ka, k_start, (n_anchor,), replace=False), idx])
  n = idx.shape[0]
  x = traj[idx].reshape((n * batch,) + traj.shape[2:])
  tau = jnp.repeat(coeffs.tau[idx], batch)
  cond_n = losses._tile_cond(cond, n)
  dv = ft_apply_fn(ft_params, x, tau, *cond_n) - jax.lax.stop_gradient(base_apply_fn(base_params, x, tau, *cond_n))
  a_next = adj[1:].reshape((n_win * batch,) + traj.shape[2:])
  target = regulariser_target(cfg, a_next, tau[n_anchor * batch:])
  target = jnp.concatenate([jnp.zeros((n_anchor * batch,) + traj.shape[2:]), target], axis=0)
  terms = _sqnorm(dv - target) / _regulariser_weight(cfg, tau)
  loss = jnp.mean(terms)
  reg = jnp.sum(coeffs.dt[0] * regulariser_cost(cfg, jax.lax.stop_gradient(dv), tau)) / batch
  return loss, {"loss": loss, "reward_mean": jnp.mean(rewards), "reward_std": jnp.std(rewards),
                "regulariser_cost": reg}


def deterministic_reference_samples(base_apply_fn: Callable, base_params, reward_fn: Callable, x0, config,
                                    *, iterations: int = 400, learning_rate: float = 0.05, cond=()):
  """What deterministic_am converges to: per-trajectory optimal open-loop controls, solved directly.

  For each x0 (independently; the objective is a sum over trajectories) minimise
  sum_{k in window} h R(dv_k) - lambda reward(X_K) over dv_k in R^d with the base ODE on the same grid as
  ``deterministic_am_objective``, by Adam on the per-trajectory controls (backprop through the ODE).
  Its stationarity condition is exactly that method's regression target.  Returns X_K (B, ...).
  """
  cfg = as_method_config(config)
  coeffs = _ode_coefficients(cfg)
  k_steps = coeffs.num_steps
  n_win = max(1, min(k_steps, math.ceil(cfg.truncation * k_steps - 1e-6)))
  k_start = k_steps - n_win
  batch = x0.shape[0]
  base_v = lambda x, t: base_apply_fn(base_params, x, t, *cond)  # noqa: E731
  zeros = jnp.zeros((k_steps,) + x0.shape)
  x_start = sampling.simulate(base_v, x0, zeros[:k_start], _slice_coeffs(coeffs, 0, k_start))[-1]
  window = _slice_coeffs(coeffs, k_start, k_steps)

  def endpoint(controls):
    def body(x, k):
      t_k = sampling.step_time(window, k, batch)
      return x + window.dt[k] * (base_v(x, t_k) + controls[k]), None
    return jax.lax.scan(body, x_start, jnp.arange(n_win))[0]

  def objective(controls):
    tau = jnp.repeat(window.tau, batch)
    reg = jnp.sum(jnp.repeat(window.dt, batch) * regulariser_cost(cfg, controls.reshape((n_win * batch,)
                                                                                           + x0.shape[1:]), tau))
    return reg - cfg.lam * jnp.sum(reward_fn(endpoint(controls), *cond))

  opt = optax.adam(learning_rate)

  @jax.jit
  def solve(controls):
    def step(carry, _):
      c, s = carry
      g = jax.grad(objective)(c)
      upd, s = opt.update(g, s, c)
      return (optax.apply_updates(c, upd), s), None
    (c, _), _ = jax.lax.scan(step, (controls, opt.init(controls)), None, length=iterations)
    return endpoint(c)

  return solve(jnp.zeros((n_win,) + x0.shape))


# ---------------------------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------------------------

METHODS = {
    "am": am_objective,
    "basic_am": basic_am_objective,
    "continuous_adjoint": continuous_adjoint_objective,
    "discrete_adjoint": discrete_adjoint_objective,
    "draft": draft_objective,
    "refl": refl_objective,
    "am_const_sigma": am_const_sigma_objective,
    "eam": eam_objective,
    "deterministic_am": deterministic_am_objective,
}

def get_objective(name: str) -> Callable:
  """The objective registered under ``name``; ValueError naming the unknown method otherwise."""
  if name not in METHODS:
    raise ValueError(f"Unknown fine-tuning method {name!r}; expected one of {sorted(METHODS)}.")
  return METHODS[name]


# ---------------------------------------------------------------------------------------------
# Toy driver: any method on an exact Gaussian-mixture base (mirrors toy.finetune_mixture).
# ---------------------------------------------------------------------------------------------


def mixture_base(gmm: gmm_lib.GaussianMixture, schedule, parameterisation: str = "velocity"):
  """The exact mixture as a base ``apply_fn(params, x, t)``; 'epsilon' goes through an exact eps model.

  'epsilon': eps(x, t) = ``dynamics.velocity_to_epsilon`` of the exact velocity, wrapped back by
  ``dynamics.epsilon_model_as_velocity`` -- the path an epsilon-prediction diffusion model takes.
  """
  vel = lambda p, x, t, *c: gmm_lib.velocity(p, x, t, schedule)  # noqa: E731
  if parameterisation == "velocity":
    return vel
  if parameterisation == "epsilon":
    eps = lambda p, x, t, *c: dynamics.velocity_to_epsilon(vel(p, x, t), x, t, schedule)  # noqa: E731
    return dynamics.epsilon_model_as_velocity(eps, schedule)
  raise ValueError(f"base parameterisation must be 'velocity' or 'epsilon', got {parameterisation!r}.")


def finetune_mixture_method(gmm: gmm_lib.GaussianMixture, reward_fn: Callable, method: str = "am",
                            method_config: MethodConfig = MethodConfig(), steps: int = 1000, batch_size: int = 512,
                            lr: float = 1e-3, seed: int = 0, *, hidden=(64, 64), parameterisation: str = "control",
                            base: str = "velocity", init: Optional[gmm_lib.GaussianMixture] = None,
                            log_every: int = 0, eval_fn: Optional[Callable] = None,
                            log_fn: Optional[Callable] = None) -> toy.ToyResult:
  """Fine-tunes an exact mixture base with any registered method; returns a ``toy.ToyResult``.

  Same setup as ``toy.finetune_mixture``: base = exact mixture velocity, fine-tuned = base + zero-init
  MLP (``residual_model`` of this module, differentiable in x), Adam(lr), one ``jax.jit`` per step.
  Every ``log_every`` steps ``history[step]`` gets the step's aux (floats), ``wall_s`` (training seconds
  so far, compilation of step 0 excluded) and, if given, ``eval_fn(ft_apply_fn, params)`` (a dict; its
  time is not counted).  ``ToyResult.seconds`` is the training wall-clock without step 0 and without logging.
  ``init``: start the fine-tuned model at the exact velocity of this mixture instead of the base
  (fixed-point experiments: does a method stay at / move away from a given distribution?).
  """
  objective = get_objective(method)
  cfg = as_method_config(method_config)
  schedule = cfg.schedule
  base_apply = mixture_base(gmm, schedule, base)
  net = models.MLP(gmm.dim, hidden=hidden, zero_init_output=True, rngs=nnx.Rngs(seed))
  net_apply, params = models.functional(net)
  start_apply, start_params = (base_apply, gmm) if init is None else (mixture_base(init, schedule, base), init)
  ft_apply = residual_model(start_apply, start_params, net_apply, schedule, parameterisation)
  opt = optax.adam(lr)
  opt_state = opt.init(params)

  @jax.jit
  def train_step(params, opt_state, key):
    def loss_fn(p):
      return objective(ft_apply, p, base_apply, gmm, reward_fn, key, (batch_size, gmm.dim), cfg)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, dict(aux, loss=loss)

  key = jax.random.PRNGKey(seed)
  history, elapsed, start = {}, 0.0, None
  for step in range(steps):
    key, sub = jax.random.split(key)
    params, opt_state, aux = train_step(params, opt_state, sub)
    if step == 0:
      jax.block_until_ready(params)
      start = time.perf_counter()
    if log_every and (step % log_every == 0 or step == steps - 1):
      jax.block_until_ready(params)
      elapsed += time.perf_counter() - start
      entry = {k: float(v) for k, v in aux.items()}
      entry["wall_s"] = elapsed
      if eval_fn is not None:
        entry.update(eval_fn(ft_apply, params))
      history[step] = entry
      if log_fn:
        log_fn(f"[{method}] step {step:5d}  loss {entry['loss']:.4f}  reward {entry['reward_mean']:.4f}")
      start = time.perf_counter()
  jax.block_until_ready(params)
  elapsed += time.perf_counter() - start
  # config: the grid toy.evaluate_against_target samples on by default (K, offset, schedule).
  return toy.ToyResult(params, ft_apply, history, elapsed, cfg.am)
