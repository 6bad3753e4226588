"""Adjoint Matching as a general stochastic-optimal-control (SOC) solver, and the SOC-matching benchmarks.

Problem (Domingo-Enrich et al. 2023, "Stochastic Optimal Control Matching", Sec. 5):

    min_u  E[ int_0^T (1/2 |u(X_t, t)|^2 + f(X_t, t)) dt + g(X_T) ],
    dX_t = (b(X_t, t) + sigma(t) u(X_t, t)) dt + sqrt(nu) sigma(t) dB_t,   X_0 ~ p_0,

with nu the noise level (``SOCProblem.noise_level``: the lambda of the SOC-matching papers, not the reward
multiplier lambda of the fine-tuning code).  The optimal control is u* = -sigma^T grad_x V.  Reward fine-tuning is
the case b = the base model's memoryless drift, f = 0, g = -lambda reward (``losses``); here b, sigma (a (d, d)
matrix or a diagonal (d,)) and f are general.  The loops are the package's core ones (``sampling.scan_steps``,
``adjoint.scan_backward``, ``adjoint.terminal_adjoint``); this module supplies the step maps where the maths
differs (running cost, general drift, sigma matrix).  Derivations and measurements: docs/soc.md.

Discretisation: uniform grid t_k = k h, h = T / K, left-point Euler-Maruyama and running cost,

    X_{k+1} = X_k + h (b(X_k, t_k) + sigma_k u_k) + sqrt(nu h) sigma_k xi_k,   u_k = u(X_k, t_k),
    J = sum_{k<K} h (1/2 |u_k|^2 + f(X_k, t_k)) + g(X_K).

Lean adjoint with running cost (AM paper Eq. 23-24 plus f): the chain rule through one Euler step of the *base*
drift and the running cost it pays, a_K = grad g(X_K), a_k = a_{k+1} + h (grad_x b_k)^T a_{k+1} + h grad_x f_k;
for u = 0 it is the pathwise gradient dJ/dX_k with the noise fixed (tested against ``jax.grad``).  The dropped
control terms h (grad_x u_k)^T (u_k + sigma_k^T a_{k+1}) have zero conditional mean at the optimum.

AM regression (Eq. 25 with f): L = E sum_k h |u(X_k, t_k) + sigma_k^T a_{k+1}|^2.  X_k is paired with a_{k+1}
because u_k only moves X_{k+1}: the discrete dynamic programme gives u_k* = -sigma_k^T E[a_{k+1} | X_k], so the
fixed point is the exact discrete-time optimum, O(h) from the continuous u*(t_k, x) (the floor of the L2 error).

Baselines, under the names of the fine-tuning method registry (``METHODS``): ``discrete_adjoint`` differentiates the
batch's mean cost J by backprop through the scanned Euler-Maruyama loop with the noise fixed; ``continuous_adjoint``
integrates the full adjoint ODE da/dt = -(grad_x (b + sigma u))^T a - grad_x (|u|^2/2 + f) (Eq. 20) backward by
explicit Euler (field at the start t_{k+1} of each reverse step) and uses the gradient
int (du/dtheta)^T (u + sigma^T a) dt (Eq. 21) as a left Riemann sum: O(h) from the exact discrete gradient.

Shapes: x (B, d); time arguments of problem callables are scalars; ``control_apply(params, x, t)`` takes
t of shape (B,) (like ``am_jax.models.functional``) and returns (B, d).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import chex
import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from am_jax import adjoint as adjoint_lib
from am_jax import chunked
from am_jax import sampling
from am_jax import sharding as sharding_lib

__all__ = [
    "PROBLEMS", "METHODS", "SOCProblem", "apply_sigma", "zero_control", "reference_as_control",
    "draw_initial_and_noise", "rollout", "simulate_controlled", "terminal_adjoint", "lean_adjoint",
    "bootstrapped_adjoint", "terminal_control", "full_adjoint_continuous", "am_loss", "am_objective", "discrete_adjoint_objective",
    "continuous_adjoint_objective", "get_method", "evaluate_control", "RiccatiSolution", "riccati_field",
    "solve_riccati", "generator_1d", "solve_value_1d", "interp_uniform_2d", "quadratic_ou",
    "linear_ou", "double_well", "get_problem", "lq_discrete_optimum",
]

PROBLEMS = ("quadratic_easy", "quadratic_hard", "linear_ou", "double_well")


@dataclasses.dataclass(frozen=True, eq=False)
class SOCProblem:
  """A control-affine SOC problem (pure callables + constants).  Hashable by identity: usable as a jit static arg.

  Attributes:
    name: label.
    dim: state dimension d.
    drift: b(x (B, d), t scalar) -> (B, d), the uncontrolled drift.
    sigma: sigma(t scalar) -> (d, d) matrix, or (d,) for a diagonal sigma.
    running_cost: f(x (B, d), t scalar) -> (B,).
    terminal_cost: g(x (B, d)) -> (B,).
    x0_sampler: (key, n) -> (n, d) initial states.
    T: horizon.
    num_steps: K, number of uniform Euler-Maruyama steps.
    noise_level: nu > 0; the diffusion is sqrt(nu) sigma (the lambda of Domingo-Enrich et al.).
    u_star: optional reference control u*(t scalar, x (B, d)) -> (B, d).
    info: optional dict of problem constants (matrices, reference grids) for tests and reports.
  """

  name: str
  dim: int
  drift: Callable
  sigma: Callable
  running_cost: Callable
  terminal_cost: Callable
  x0_sampler: Callable
  T: float = 1.0
  num_steps: int = 100
  noise_level: float = 1.0
  u_star: Optional[Callable] = None
  info: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if int(self.num_steps) != self.num_steps or self.num_steps < 1:
      raise ValueError(f"SOCProblem.num_steps must be a positive integer, got {self.num_steps!r}.")
    if not self.T > 0 or not self.noise_level > 0:
      raise ValueError(f"SOCProblem.T and noise_level must be > 0, got T={self.T!r}, noise_level={self.noise_level!r}.")

  @property
  def dt(self) -> float:
    return self.T / self.num_steps

  def times(self):
    """(K+1,) grid t_k = k h (float32)."""
    return self.dt * jnp.arange(self.num_steps + 1, dtype=jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# sigma helpers (sigma is (d, d) or diagonal (d,)); u and a are (..., d) batches of row vectors.


def apply_sigma(sig, u):
  """sigma u for each row of u (..., d)."""
  return sig * u if sig.ndim == 1 else u @ sig.T


def _sigma_t_on_grid(problem: SOCProblem, a):
  """sigma(t_k)^T a_k for a (K, B, d), k < K."""
  sig = jax.vmap(problem.sigma)(problem.times()[:-1])  # (K, d, d) or (K, d)
  if sig.ndim == 2:
    return sig[:, None, :] * a
  return jnp.einsum("kij,kbi->kbj", sig, a)


def zero_control(params, x, t):
  """The uncontrolled process: u = 0."""
  del params, t
  return jnp.zeros_like(x)


def reference_as_control(u_star: Callable) -> Callable:
  """Wraps u*(t scalar, x) as control_apply(params, x, t (B,)) for ``rollout``, which passes one time per call
  (t[0] is used).  Not for ``am_loss``, which evaluates all (k, b) pairs in a single call."""
  return lambda params, x, t: u_star(t[0], x)


# ----------------------------------------------------------------------------------------------------------
# Forward simulation (the step map of ``sampling.scan_steps``).


def draw_initial_and_noise(problem: SOCProblem, key, batch: int, mesh=None):
  """x0 (B, d) from the problem's sampler and standard normal xi (K, B, d) (``sampling.draw_noise``).

  mesh: a ``('data',)`` mesh (``am_jax.sharding.make_mesh``) or None: the paths (x0's axis 0, xi's axis 1) are then
  sharded over its devices; the values do not depend on the mesh (``jax_threefry_partitionable``).
  """
  k0, kn = jax.random.split(key)
  x0 = problem.x0_sampler(k0, batch).astype(jnp.float32)
  noise = sampling.draw_noise(kn, problem.num_steps, (batch, problem.dim))
  return sharding_lib.constrain_batch(x0, mesh, 0), sharding_lib.constrain_batch(noise, mesh, 1)


def rollout(problem: SOCProblem, control_fn: Callable, params, x0, noise):
  """Euler-Maruyama under the control u = control_fn(params, x, t), accumulating the cost.

  Differentiable in params and x0 (backprop through the scan is the discrete adjoint method).

  Args:
    problem: the SOCProblem.
    control_fn: ``control_fn(params, x (B, d), t (B,)) -> (B, d)``.
    params: control parameters (any pytree).
    x0: (B, d) initial states.
    noise: (K, B, d) standard normal draws xi_k.

  Returns:
    traj (K+1, B, d) states X_0..X_K; controls (K, B, d) u_k = u(X_k, t_k); cost (B,) per-path J.
  """
  chex.assert_shape(noise, (problem.num_steps,) + x0.shape)
  h = problem.dt
  noise_scale = jnp.sqrt(problem.noise_level * h).astype(jnp.float32)
  batch = x0.shape[0]

  def step(x, cost, inp):
    t, xi = inp
    u = control_fn(params, x, jnp.full((batch,), t, jnp.float32))
    sig = problem.sigma(t)
    x_next = x + h * (problem.drift(x, t) + apply_sigma(sig, u)) + noise_scale * apply_sigma(sig, xi)
    # Left-point (Ito) rule for the running cost, matching the Euler step that produced X_{k+1}.
    cost = cost + h * (0.5 * jnp.sum(u**2, axis=-1) + problem.running_cost(x, t))
    return x_next, cost, u

  traj, run_cost, us = sampling.scan_steps(step, x0, (problem.times()[:-1], noise),
                                           jnp.zeros((batch,), jnp.float32))
  return traj, us, run_cost + problem.terminal_cost(traj[-1])


def simulate_controlled(problem: SOCProblem, control_fn: Callable, params, key, batch: int):
  """Trajectories (K+1, B, d) of the current control, without gradient (AM samples with stop-gradient)."""
  x0, noise = draw_initial_and_noise(problem, key, batch)
  traj, _, _ = rollout(problem, control_fn, jax.lax.stop_gradient(params), x0, noise)
  return jax.lax.stop_gradient(traj)


# ----------------------------------------------------------------------------------------------------------
# Adjoints (the increments of ``adjoint.scan_backward``).


def terminal_adjoint(problem: SOCProblem, x_last):
  """a_K = grad g(X_K), (B, d): ``adjoint.terminal_adjoint`` of the reward -g (raises if g or grad g is not finite)."""
  return adjoint_lib.terminal_adjoint(lambda x: -problem.terminal_cost(x), x_last, 1.0)[0]


def lean_adjoint(problem: SOCProblem, traj):
  """Lean adjoint with running cost, backward over a stored trajectory (exact VJP of the base Euler step).

      a_K = grad g(X_K),   a_k = a_{k+1} + h (grad_x b(X_k, t_k))^T a_{k+1} + h grad_x f(X_k, t_k).

  One VJP per step of x -> (h b(x, t_k), h sum_b f(x_b, t_k)) with cotangent (a_{k+1}, 1).

  Args:
    problem: the SOCProblem.
    traj: (K+1, B, d) trajectory (treated as constant).

  Returns:
    (K+1, B, d) adjoint a_0..a_K.
  """
  chex.assert_axis_dimension(traj, 0, problem.num_steps + 1)
  traj = jax.lax.stop_gradient(traj)
  h = problem.dt

  def increment(a_next, inp):
    x, t = inp
    # The batch sum of f gives per-sample gradients because f acts on each row independently.
    _, vjp = jax.vjp(lambda y: (h * problem.drift(y, t), h * jnp.sum(problem.running_cost(y, t))), x)
    return vjp((a_next, jnp.ones((), x.dtype)))[0]

  return adjoint_lib.scan_backward(increment, terminal_adjoint(problem, traj[-1]),
                                   (traj[:-1], problem.times()[:-1]))


def _solve_sigma_t(sig, u):
  """sigma^{-T} u for each row of u (..., d): the adjoint whose AM target -sigma^T a is u."""
  return u / sig if sig.ndim == 1 else jnp.linalg.solve(sig.T, u.T).T


def bootstrapped_adjoint(problem: SOCProblem, traj, controls, td_lambda: float):
  """Lean adjoint with TD(lambda) bootstrapping from the current control (variance reduction; docs/soc.md).

  The AM target of step k is -sigma_k^T a_{k+1} and its regression function is E[a_{k+1} | X_k]; the control
  being learned predicts it, p_k = -sigma_k^{-T} u(X_k, t_k) (``controls`` u_k of the rollout, no extra
  network call).  Mixing the sampled adjoint with that prediction before each backward step,

      A_K = grad g(X_K),   m_k = td_lambda A_{k+1} + (1 - td_lambda) p_k,
      A_k = m_k + h (grad_x b(X_k, t_k))^T m_k + h grad_x f(X_k, t_k),

  gives the lambda-return of the lean adjoint: td_lambda = 1 is ``lean_adjoint`` (up to rounding),
  td_lambda = 0 the one-step target.  Why the fixed point is kept: the lean step is affine in a_{k+1} with
  X_k-measurable coefficients, so E[A_k | X_k] = step_k(E[m_k | X_k]); if p_k = E[a_{k+1} | X_k] (the control
  is the discrete optimum, AM's fixed point), m_k has the conditional mean of a_{k+1} and by the tower property
  E[A_{k+1} | X_k] is unchanged for every td_lambda.  Away from the fixed point the target is biased toward the
  current control (as in TD learning) but its variance no longer carries the product of the Jacobians
  prod_j (I + h grad b_j) over the whole horizon: the weight of a_{k+n} decays like td_lambda^n (on the double
  well, |I + h grad b| = 1 + 20 h near x = 0, so td_lambda < 1 / (1 + 20 h) bounds it; measured per-step target
  variance 197 -> < 1 at t = 0 with td_lambda = 0.9).

  Args:
    problem: the SOCProblem (sigma must be invertible).
    traj: (K+1, B, d) trajectory of the control being learned (treated as constant).
    controls: (K, B, d) u(X_k, t_k) along it (``rollout``'s controls; treated as constant).
    td_lambda: in [0, 1] (may be traced).

  Returns:
    (K+1, B, d) adjoint A_0..A_K.
  """
  chex.assert_axis_dimension(traj, 0, problem.num_steps + 1)
  chex.assert_equal_shape([traj[:-1], controls])
  traj, controls = jax.lax.stop_gradient(traj), jax.lax.stop_gradient(controls)
  h, lam = problem.dt, jnp.asarray(td_lambda, traj.dtype)

  def increment(a_next, inp):
    x, t, u = inp
    mix = lam * a_next - (1.0 - lam) * _solve_sigma_t(problem.sigma(t), u)
    _, vjp = jax.vjp(lambda y: (h * problem.drift(y, t), h * jnp.sum(problem.running_cost(y, t))), x)
    return mix + vjp((mix, jnp.ones((), x.dtype)))[0] - a_next

  return adjoint_lib.scan_backward(increment, terminal_adjoint(problem, traj[-1]),
                                   (traj[:-1], problem.times()[:-1], controls))


def terminal_control(problem: SOCProblem):
  """q(x, t) = sigma(t)^T grad g(x), (B, d): minus the optimal control at t = T (u*(T, x) = -sigma^T grad g).

  The feature and gate of the ``grad_g`` control net (``soc_training.init_control``).
  """
  grad_g = jax.grad(lambda x: jnp.sum(problem.terminal_cost(x)))

  def q(x, t):
    sig = problem.sigma(t)
    g = grad_g(x)
    return sig * g if sig.ndim == 1 else g @ sig

  return q


def full_adjoint_continuous(problem: SOCProblem, control_fn: Callable, params, traj):
  """Full adjoint ODE, explicit Euler in reversed time (optimise-then-discretise; the continuous adjoint method).

      a(T) = grad g(X_T),   da/dt = -(grad_x (b + sigma u))^T a - grad_x (|u|^2 / 2 + f),
      a_k = a_{k+1} + h [(grad_x (b + sigma u))^T a + grad_x (|u|^2 / 2 + f)] at (X_{k+1}, t_{k+1}, a_{k+1}).

  Returns (K+1, B, d); params and traj are constants here (stop-gradient).
  """
  traj, params = jax.lax.stop_gradient(traj), jax.lax.stop_gradient(params)
  h = problem.dt

  def field(y, t):
    u = control_fn(params, y, jnp.full((y.shape[0],), t, jnp.float32))
    return (problem.drift(y, t) + apply_sigma(problem.sigma(t), u),
            jnp.sum(0.5 * jnp.sum(u**2, -1) + problem.running_cost(y, t)))

  def increment(a_next, inp):
    x, t = inp
    _, vjp = jax.vjp(lambda y: field(y, t), x)
    return h * vjp((a_next, jnp.ones((), x.dtype)))[0]

  return adjoint_lib.scan_backward(increment, terminal_adjoint(problem, traj[-1]), (traj[1:], problem.times()[1:]))


# ----------------------------------------------------------------------------------------------------------
# Methods: objective(control_apply, params, problem, key, batch, *, mesh=None) -> (loss, aux), differentiated w.r.t.
# params; mesh shards the batch of paths over its devices.  aux holds 'loss' and 'objective' (the batch's mean cost
# J, no gradient).


def _control_on_grid(control_apply: Callable, params, problem: SOCProblem, states, mesh=None):
  """u(X_k, t_k) for states (K, B, d) in one batched call -> (K, B, d); with a mesh of several devices the rows go
  device by device (``sharding.rows_by_device``: each device evaluates its own paths)."""
  k, b, _ = states.shape
  t = sharding_lib.rows_per_step(problem.times()[:k], b, mesh)
  u = control_apply(params, sharding_lib.rows_by_device(states, mesh), t)
  return sharding_lib.rows_by_device_inverse(u, k, mesh)


def am_loss(control_apply: Callable, params, problem: SOCProblem, traj, adjoint, chunk_steps: int = 0, mesh=None):
  """Adjoint Matching regression for SOC:  L = E sum_{k<K} h |u(X_k, t_k) + sigma_k^T a_{k+1}|^2.

  Args:
    control_apply: ``control_apply(params, x (N, d), t (N,)) -> (N, d)``; the only thing differentiated.
    params: control parameters.
    problem: the SOCProblem.
    traj: (K+1, B, d) trajectories of the current control (stop-gradient).
    adjoint: (K+1, B, d) lean adjoint (``lean_adjoint``); X_k is paired with a_{k+1} (module doc).
    chunk_steps: n > 0 evaluates the control at most n time steps (the largest divisor of K not above n) times B
      rows at a time, the gradient accumulated chunk by chunk (``chunked.separable_loss_in_chunks``): the same loss
      and gradient to float rounding, faster on a CPU once the K B rows' activations outgrow its cache
      (docs/soc.md).  0: one call at all K B rows.
    mesh: the mesh the paths are sharded over (or None); with chunk_steps each device then accumulates its own part
      of the gradient, summed once (``chunked.separable_loss_in_chunks``).

  Returns:
    (loss, aux) with aux = {'control_norm': E int |u|^2, 'target_norm': E int |sigma^T a|^2}.
  """
  traj, adjoint = jax.lax.stop_gradient(traj), jax.lax.stop_gradient(adjoint)
  chex.assert_equal_shape([traj, adjoint])
  chex.assert_axis_dimension(traj, 0, problem.num_steps + 1)
  h = problem.dt
  target = -_sigma_t_on_grid(problem, adjoint[1:])
  if chunk_steps:
    return _am_loss_in_chunks(control_apply, params, problem, traj[:-1], target, int(chunk_steps), mesh)
  u = _control_on_grid(control_apply, params, problem, traj[:-1], mesh)
  per_path = h * jnp.sum((u - target) ** 2, axis=(0, 2))
  aux = {"control_norm": h * jnp.mean(jnp.sum(u**2, axis=(0, 2))),
         "target_norm": h * jnp.mean(jnp.sum(target**2, axis=(0, 2)))}
  return jnp.mean(per_path), aux


def _am_loss_in_chunks(control_apply, params, problem: SOCProblem, states, target, n: int, mesh=None):
  """``am_loss`` with the control evaluated n' time steps at a time, n' the largest divisor of K not above n
  (states, target: (K, B, d))."""
  k, b, d = states.shape
  if n < 1:
    raise ValueError(f"chunk_steps = {n}: must be >= 0 (0: one call).")
  n = max(c for c in range(1, min(n, k) + 1) if k % c == 0)
  h = problem.dt
  data = (states.reshape(k // n, n, b, d), target.reshape(k // n, n, b, d), problem.times()[:k].reshape(k // n, n))

  def chunk_terms(p, consts, chunk):
    del consts
    x, tgt, t = chunk
    rows = x.shape[1]  # B, or B / G paths on each of G devices
    u = control_apply(p, x.reshape(n * rows, d), jnp.repeat(t, rows))
    tgt = tgt.reshape(n * rows, d)
    return h * jnp.sum((u - tgt) ** 2, -1), (jnp.sum(u**2, -1), jnp.sum(tgt**2, -1))

  # loss = mean over paths of the sum over k: every (k, b) term has weight 1 / B.
  loss, _, (u_sq, target_sq) = chunked.separable_loss_in_chunks(
      chunk_terms, params, data, lambda e: jnp.sum(e) / b, lambda e: jnp.full_like(e, 1.0 / b), mesh=mesh,
      batch_axes=((), (1, 1, None)))
  aux = {"control_norm": h * jnp.sum(u_sq) / b, "target_norm": h * jnp.sum(target_sq) / b}
  return loss, aux


def am_objective(control_apply: Callable, params, problem: SOCProblem, key, batch: int, *, td_lambda: float = 1.0,
                 chunk_steps: int = 0, mesh=None):
  """Adjoint Matching (AM paper Alg. 1): sample (stop-gradient) trajectories, lean adjoint, regression ``am_loss``.

  td_lambda < 1 replaces the lean adjoint by ``bootstrapped_adjoint`` (same fixed point, lower variance);
  td_lambda = 1 (default) is plain AM.  chunk_steps: ``am_loss``'s (the loss n time steps at a time; 0: one call).
  mesh: shards the paths over its devices (``draw_initial_and_noise``); None: no constraint.
  """
  if not 0.0 <= td_lambda <= 1.0:
    raise ValueError(f"td_lambda = {td_lambda!r}: must be in [0, 1].")
  x0, noise = draw_initial_and_noise(problem, key, batch, mesh)
  traj, us, cost = rollout(problem, control_apply, jax.lax.stop_gradient(params), x0, noise)
  traj = jax.lax.stop_gradient(traj)
  adj = lean_adjoint(problem, traj) if td_lambda == 1.0 else bootstrapped_adjoint(problem, traj, us, td_lambda)
  loss, aux = am_loss(control_apply, params, problem, traj, adj, chunk_steps, mesh)
  return loss, dict(aux, loss=loss, objective=jnp.mean(jax.lax.stop_gradient(cost)))


def discrete_adjoint_objective(control_apply: Callable, params, problem: SOCProblem, key, batch: int, *, mesh=None):
  """Mean cost of a batch; its gradient is backprop through the discretised SDE with fixed noise.

  mesh: shards the paths; each device then backpropagates through its own paths with its own copy of the
  parameters and the copies' gradients are summed once (``sharding.grad_by_device``).
  """
  x0, noise = draw_initial_and_noise(problem, key, batch, mesh)
  cost_fn = lambda p, x, xi: rollout(problem, control_apply, p, x, xi)[2]  # noqa: E731
  cost = sharding_lib.grad_by_device(cost_fn, mesh, (0, 1))(params, x0, noise)
  loss = jnp.mean(cost)
  return loss, {"loss": loss, "objective": jax.lax.stop_gradient(loss)}


def continuous_adjoint_objective(control_apply: Callable, params, problem: SOCProblem, key, batch: int, *, mesh=None):
  """Surrogate whose gradient is E sum_k h (d u_k / d theta)^T (u_k + sigma_k^T a_k), a from the full adjoint ODE.

  The value is not the cost; aux['objective'] is the batch's mean cost.
  """
  x0, noise = draw_initial_and_noise(problem, key, batch, mesh)
  traj, us, cost = rollout(problem, control_apply, jax.lax.stop_gradient(params), x0, noise)
  traj = jax.lax.stop_gradient(traj)
  adj = full_adjoint_continuous(problem, control_apply, params, traj)
  weight = jax.lax.stop_gradient(us + _sigma_t_on_grid(problem, adj[:-1]))
  u = _control_on_grid(control_apply, params, problem, traj[:-1], mesh)
  surrogate = problem.dt * jnp.mean(jnp.sum(u * weight, axis=(0, 2)))
  return surrogate, {"loss": surrogate, "objective": jnp.mean(jax.lax.stop_gradient(cost))}


# Keys are names of the fine-tuning method registry (``am_jax.methods``): the same algorithms on SOC problems.
METHODS = {
    "am": am_objective,
    "discrete_adjoint": discrete_adjoint_objective,
    "continuous_adjoint": continuous_adjoint_objective,
}


def get_method(name: str) -> Callable:
  """The SOC objective registered under ``name``; ValueError naming the unknown method otherwise."""
  if name not in METHODS:
    raise ValueError(f"Unknown SOC method {name!r}; expected one of {sorted(METHODS)}.")
  return METHODS[name]


# ----------------------------------------------------------------------------------------------------------
# Evaluation.


def evaluate_control(problem: SOCProblem, control_apply: Callable, params, u_star: Optional[Callable], key,
                     batch: int, mesh=None):
  """Control objective and L2 error from one batch of Euler-Maruyama paths of the learned control.

  Returns a dict of scalars: objective (mean of J = sum_k h (|u_k|^2 / 2 + f(X_k, t_k)) + g(X_K)) and
  objective_se (std / sqrt(B) of the per-path J); if u_star is given, the control L2 error
  E int_0^T |u(X_t, t) - u*(t, X_t)|^2 dt estimated as l2_error = (1/B) sum_b sum_{k<K} h |u_k^b - u*(t_k, X_k^b)|^2
  (left Riemann sum along the learned control's paths) and its standard error over paths l2_error_se.
  mesh: shards the paths over its devices (same values).
  """
  x0, noise = draw_initial_and_noise(problem, key, batch, mesh)
  traj, us, cost = rollout(problem, control_apply, params, x0, noise)
  out = {"objective": jnp.mean(cost), "objective_se": jnp.std(cost, ddof=1) / jnp.sqrt(batch)}
  if u_star is not None:
    u_ref = jax.vmap(u_star)(problem.times()[:-1], traj[:-1])
    per_path = problem.dt * jnp.sum((us - u_ref) ** 2, axis=(0, 2))
    out["l2_error"] = jnp.mean(per_path)
    out["l2_error_se"] = jnp.std(per_path, ddof=1) / jnp.sqrt(batch)
  return out


# ----------------------------------------------------------------------------------------------------------
# Reference solutions.


class RiccatiSolution(NamedTuple):
  """F(t) of the Riccati ODE tabulated on a fine uniform grid with its derivative; cubic Hermite in between.

  ts: (N+1,) uniform nodes on [0, T]; F: (N+1, d, d); dF: (N+1, d, d) = the ODE right-hand side at the nodes.
  """

  ts: jax.Array
  F: jax.Array
  dF: jax.Array

  def evaluate(self, t):
    """F(t) for a scalar t in [0, T] (clamped): cubic Hermite, error O(dt^4) (~1e-13 for N = 1024)."""
    n = self.ts.shape[0] - 1
    dt = self.ts[1] - self.ts[0]
    s = jnp.clip((t - self.ts[0]) / dt, 0.0, float(n))
    j = jnp.clip(jnp.floor(s).astype(jnp.int32), 0, n - 1)
    w = s - j
    h00, h10 = 2 * w**3 - 3 * w**2 + 1, w**3 - 2 * w**2 + w
    h01, h11 = -2 * w**3 + 3 * w**2, w**3 - w**2
    return h00 * self.F[j] + h10 * dt * self.dF[j] + h01 * self.F[j + 1] + h11 * dt * self.dF[j + 1]


def riccati_field(F, A, P, S):
  """Right-hand side -A^T F - F A + 2 F S F - P of the backward Riccati ODE."""
  return -A.T @ F - F @ A + 2.0 * F @ S @ F - P


def solve_riccati(A, P, Q, S, T: float, rtol: float = 1e-6, atol: float = 1e-8, num_nodes: int = 1024
                  ) -> RiccatiSolution:
  """Backward matrix Riccati ODE of the linear-quadratic problem, accurate at any t in [0, T].

  V(t, x) = x^T F(t) x + c(t) for b = A x, f = x^T P x, g = x^T Q x, sigma sigma^T = S, noise level 1:

      dF/dt = -A^T F - F A + 2 F S F - P,   F(T) = Q,      u*(t, x) = -2 sigma^T F(t) x.

  (From the HJB  V_t + b.grad V + 1/2 tr(S hess V) - 1/2 |sigma^T grad V|^2 + f = 0 with the quadratic ansatz.)
  Solved once by diffrax Tsit5 with an adaptive PID step from T to 0 and dense output; the dense solution
  is tabulated on ``num_nodes`` + 1 uniform nodes together with dF/dt from the ODE, and evaluated by cubic
  Hermite interpolation (cheap to embed in jitted code, unlike the dense-output buffers).  Off-grid
  accuracy is checked against a matrix-exponential solve in ``tests/test_soc.py``.
  """
  A, P, Q, S = (jnp.asarray(m, jnp.float32) for m in (A, P, Q, S))
  # The matrices go in as args (not closed over) so solves of the same shape reuse one compilation.
  sol = diffrax.diffeqsolve(diffrax.ODETerm(_riccati_term), diffrax.Tsit5(), t0=T, t1=0.0, dt0=-T / 100, y0=Q,
                            args=(A, P, S), saveat=diffrax.SaveAt(dense=True),
                            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=4096)
  ts = jnp.linspace(0.0, T, num_nodes + 1, dtype=jnp.float32)
  F = jax.vmap(sol.evaluate)(ts)
  return RiccatiSolution(ts, F, jax.vmap(lambda f: riccati_field(f, A, P, S))(F))


def _riccati_term(t, F, args):
  return riccati_field(F, *args)


def _bernoulli(z):
  """B(z) = z / (exp(z) - 1), B(0) = 1 (numpy float64)."""
  z = np.asarray(z, np.float64)
  small = np.abs(z) < 1e-8
  safe = np.where(small, 1.0, z)
  return np.where(small, 1.0 - z / 2, safe / np.expm1(safe))


def generator_1d(drift_1d: Callable, x_grid, diffusion: float):
  """Scharfetter-Gummel generator Q (N, N) of the 1-D diffusion dX = b(X) dt + sqrt(2 D) dB on a uniform grid.

  Rates to the neighbours across the edge midpoint m = (x_i + x_{i+1}) / 2, with z = b(m) dx / D:
      q_{i -> i+1} = D / dx^2 B(-z),   q_{i+1 -> i} = D / dx^2 B(z),   B(z) = z / (e^z - 1).
  This is a CTMC generator (rates >= 0, rows sum to 0) that is exact for a constant drift, second-order
  consistent for smooth b, and well behaved at large |b| dx / D (no negative rates, unlike central
  differences).  Reflecting ends: the grid must be wide enough that the boundary is never felt.
  """
  x = np.asarray(x_grid, np.float64)
  dx = x[1] - x[0]
  b_mid = drift_1d(0.5 * (x[1:] + x[:-1]))
  z = b_mid * dx / diffusion
  up, down = diffusion / dx**2 * _bernoulli(-z), diffusion / dx**2 * _bernoulli(z)
  n = x.shape[0]
  q = np.zeros((n, n))
  idx = np.arange(n - 1)
  q[idx, idx + 1] = up
  q[idx + 1, idx] = down
  q[np.arange(n), np.arange(n)] = -q.sum(axis=1)
  return q


def solve_value_1d(drift_1d: Callable, terminal_1d: Callable, T: float, x_max: float, num_x: int, num_t: int,
                   sigma: float = 1.0, noise_level: float = 1.0):
  """1-D reference control of  dX = (b(X) + sigma u) dt + sqrt(nu) sigma dB, cost int |u|^2/2 + g(X_T),
  nu = ``noise_level``.

  phi(t, x) = E[exp(-g(X_T) / nu) | X_t = x] under u = 0 solves the backward Kolmogorov equation
  phi_t + b phi_x + (nu sigma^2 / 2) phi_xx = 0, phi(T) = exp(-g / nu).  V = -nu log phi and

      u*(t, x) = -sigma dV/dx = nu sigma d/dx log phi(t, x).

  Method (transition matrix): the generator is discretised on a uniform grid of [-x_max, x_max] as a CTMC
  (``generator_1d``, D = nu sigma^2 / 2); one time step delta = T / num_t is the exact CTMC transition
  matrix M = expm(delta Q) (``scipy.linalg.expm``), and phi(t_j) = M phi(t_{j+1}).  No time-stepping error;
  the error is the O(dx^2) of the spatial scheme.  u* is central differences of log phi (float64).

  Returns:
    (x_grid (num_x,), t_grid (num_t + 1,), u (num_t + 1, num_x), log_phi (num_t + 1, num_x)), numpy float64.
  """
  x = np.linspace(-x_max, x_max, num_x)
  t = np.linspace(0.0, T, num_t + 1)
  m = scipy.linalg.expm(T / num_t * generator_1d(drift_1d, x, 0.5 * noise_level * sigma**2))
  phi = np.empty((num_t + 1, num_x))
  phi[-1] = np.exp(-terminal_1d(x) / noise_level)
  for j in range(num_t - 1, -1, -1):
    phi[j] = m @ phi[j + 1]
  log_phi = np.log(np.maximum(phi, 1e-300))
  u = noise_level * sigma * np.gradient(log_phi, x, axis=1)
  return x, t, u, log_phi


def interp_uniform_2d(tables, t_grid, x_grid, t, x):
  """Bilinear interpolation of per-coordinate tables on a uniform (t, x) grid; clamped outside it.

  Args:
    tables: (d, Nt, Nx) values u_i(t_j, x_l).
    t_grid: (Nt,) uniform; x_grid: (Nx,) uniform.
    t: scalar time; x: (B, d).

  Returns:
    (B, d) with entry [b, i] = u_i(t, x[b, i]).
  """
  nt, nx = tables.shape[1], tables.shape[2]
  ft = jnp.clip((t - t_grid[0]) / (t_grid[1] - t_grid[0]), 0.0, nt - 1.0)
  jt = jnp.clip(jnp.floor(ft).astype(jnp.int32), 0, nt - 2)
  wt = ft - jt
  fx = jnp.clip((x - x_grid[0]) / (x_grid[1] - x_grid[0]), 0.0, nx - 1.0)
  jx = jnp.clip(jnp.floor(fx).astype(jnp.int32), 0, nx - 2)
  wx = fx - jx
  coord = jnp.arange(tables.shape[0])[None, :]

  def at(j, i):
    return tables[coord, j, i]

  lo = (1 - wx) * at(jt, jx) + wx * at(jt, jx + 1)
  hi = (1 - wx) * at(jt + 1, jx) + wx * at(jt + 1, jx + 1)
  return (1 - wt) * lo + wt * hi


# ----------------------------------------------------------------------------------------------------------
# Benchmarks (SOC-matching suite).  Random constants use fixed seeds of jax.random (so they are not the
# PyTorch draws of the original code; the statistics are the same).


def _fixed_x0(x0_vec):
  return lambda key, n: jnp.broadcast_to(x0_vec, (n, x0_vec.shape[0]))


def quadratic_ou(hard: bool = False, dim: int = 20, num_steps: int = 50, T: float = 1.0, seed: int = 0) -> SOCProblem:
  """Quadratic Ornstein-Uhlenbeck: b = A x, sigma = I, f = x^T P x, g = x^T Q x, X_0 = x0 fixed.

  Easy: A = 0.2 I, P = 0.2 I, Q = 0.1 I.  Hard: A = I, P = I, Q = 0.5 I.  x0 = 0.5 N(0, I) drawn once with
  ``seed`` (every path starts there).  Exact u*(t, x) = -2 sigma^T F(t) x from ``solve_riccati``.
  """
  a, p, q = (1.0, 1.0, 0.5) if hard else (0.2, 0.2, 0.1)
  eye = jnp.eye(dim, dtype=jnp.float32)
  A, P, Q, sig = a * eye, p * eye, q * eye, eye
  x0 = 0.5 * jax.random.normal(jax.random.PRNGKey(seed), (dim,), jnp.float32)
  sol = solve_riccati(A, P, Q, sig @ sig.T, T)

  def u_star(t, x):
    F = sol.evaluate(jnp.asarray(t, jnp.float32))
    return -2.0 * (x @ F.T) @ sig

  return SOCProblem(
      name="quadratic_hard" if hard else "quadratic_easy", dim=dim,
      drift=lambda x, t: x @ A.T, sigma=lambda t: sig,
      running_cost=lambda x, t: jnp.einsum("bi,ij,bj->b", x, P, x),
      terminal_cost=lambda x: jnp.einsum("bi,ij,bj->b", x, Q, x),
      x0_sampler=_fixed_x0(x0), T=T, num_steps=num_steps, u_star=u_star,
      info={"A": A, "P": P, "Q": Q, "sigma": sig, "x0": x0, "riccati": sol})


def linear_ou(dim: int = 10, num_steps: int = 100, T: float = 1.0, seed: int = 0) -> SOCProblem:
  """Linear Ornstein-Uhlenbeck: b = A x, A = -I + xi, sigma = I + xi, xi = 0.1 N(0, I) (d x d, fixed seed),
  f = 0, g(x) = omega . x with omega = 1, X_0 = 0.

  V(t, x) = (e^{(T-t) A^T} omega) . x + c(t) (affine: p = grad V solves dp/dt = -A^T p, p(T) = omega), so
  u*(t) = -sigma^T expm((T - t) A^T) omega, independent of x.
  """
  xi = 0.1 * sampling.standard_normal(jax.random.PRNGKey(seed), (dim, dim))
  A = -jnp.eye(dim, dtype=jnp.float32) + xi
  sig = jnp.eye(dim, dtype=jnp.float32) + xi
  omega = jnp.ones((dim,), jnp.float32)

  def u_star(t, x):
    p = jax.scipy.linalg.expm((T - jnp.asarray(t, jnp.float32)) * A.T) @ omega
    return jnp.broadcast_to(-(sig.T @ p), x.shape)

  return SOCProblem(
      name="linear_ou", dim=dim, drift=lambda x, t: x @ A.T, sigma=lambda t: sig,
      running_cost=lambda x, t: jnp.zeros(x.shape[:1], x.dtype), terminal_cost=lambda x: x @ omega,
      x0_sampler=lambda key, n: jnp.zeros((n, dim), jnp.float32), T=T, num_steps=num_steps,
      u_star=u_star, info={"A": A, "sigma": sig, "omega": omega, "xi": xi})


def double_well(dim: int = 10, num_steps: int = 200, T: float = 1.0, x_max: float = 2.5, num_x: int = 1001,
                num_t: int = 1000) -> SOCProblem:
  """Double well: b = -grad Psi, Psi(x) = sum_i kappa_i (x_i^2 - 1)^2, sigma = I, f = 0,
  g(x) = sum_i nu_i (x_i^2 - 1)^2, kappa_i = 5, nu_i = 3 for i < 3, else 1, 1; X_0 = 0.

  The problem is separable (b, g, and the noise act coordinate-wise; noise level 1), so
  V(t, x) = sum_i V_i(t, x_i) and u*_i(t, x) = -dV_i/dx_i(t, x_i).  Each distinct 1-D (kappa, nu) pair is
  solved once by ``solve_value_1d`` (CTMC transition matrix on [-x_max, x_max], num_x points, num_t time
  steps; the default num_t = 1000 puts every training-grid time of K = 200 on a table node) and u* is
  bilinear interpolation of the table.  Grid convergence (docs/soc.md): along paths of u*, the L2 distance
  E int |u*_1001 - u*_N|^2 dt between the default table (num_x = 1001, dx = 0.005) and tables with
  N = 501 / 1601 points is 2.6e-7 / 1.5e-7, far below any learned-control error reported.
  """
  kappa = np.where(np.arange(dim) < 3, 5.0, 1.0)
  nu = np.where(np.arange(dim) < 3, 3.0, 1.0)
  tables, cache = [], {}
  for k_i, n_i in zip(kappa, nu):
    if (k_i, n_i) not in cache:
      x_grid, t_grid, u, _ = solve_value_1d(lambda y, k=k_i: -4.0 * k * y * (y**2 - 1.0),
                                            lambda y, n=n_i: n * (y**2 - 1.0) ** 2, T, x_max, num_x, num_t)
      cache[(k_i, n_i)] = u
    tables.append(cache[(k_i, n_i)])
  tables = jnp.asarray(np.stack(tables), jnp.float32)
  t_grid, x_grid = jnp.asarray(t_grid, jnp.float32), jnp.asarray(x_grid, jnp.float32)
  kappa_j, nu_j = jnp.asarray(kappa, jnp.float32), jnp.asarray(nu, jnp.float32)
  sig = jnp.ones((dim,), jnp.float32)

  def u_star(t, x):
    return interp_uniform_2d(tables, t_grid, x_grid, t, x)

  return SOCProblem(
      name="double_well", dim=dim, drift=lambda x, t: -4.0 * kappa_j * x * (x**2 - 1.0), sigma=lambda t: sig,
      running_cost=lambda x, t: jnp.zeros(x.shape[:1], x.dtype),
      terminal_cost=lambda x: jnp.sum(nu_j * (x**2 - 1.0) ** 2, axis=-1),
      x0_sampler=lambda key, n: jnp.zeros((n, dim), jnp.float32), T=T, num_steps=num_steps,
      u_star=u_star, info={"kappa": kappa, "nu": nu, "tables": tables, "t_grid": t_grid, "x_grid": x_grid})


def get_problem(name: str, **kwargs) -> SOCProblem:
  """Benchmark by name: 'quadratic_easy', 'quadratic_hard', 'linear_ou', 'double_well'."""
  if name == "quadratic_easy":
    return quadratic_ou(hard=False, **kwargs)
  if name == "quadratic_hard":
    return quadratic_ou(hard=True, **kwargs)
  if name == "linear_ou":
    return linear_ou(**kwargs)
  if name == "double_well":
    return double_well(**kwargs)
  raise ValueError(f"Unknown SOC problem {name!r}; expected one of {PROBLEMS}.")


def lq_discrete_optimum(problem: SOCProblem):
  """Exact optimum of the Euler-discretised quadratic OU problem and its L2 distance to the continuous u*.

  The fixed point of AM and of the discrete adjoint is the discrete-time optimum, not u*(t_k, x): this is the
  floor of their L2 error at the problem's K.  With V_k(x) = x^T F_k x + c_k (F_K = Q) the dynamic programme
  V_k(x) = min_u h |u|^2 / 2 + h x^T P x + E V_{k+1}(x + h (A x + sigma u) + sqrt(h) sigma xi) gives

      u_k = -G_k x,   G_k = (I + 2 h sigma^T F_{k+1} sigma)^{-1} 2 sigma^T F_{k+1} (I + h A),
      F_k = h P + h G_k^T G_k / 2 + M_k^T F_{k+1} M_k,   M_k = I + h A - h sigma G_k,

  and along its paths (second moments S_0 = x0 x0^T, S_{k+1} = M_k S_k M_k^T + h sigma sigma^T) the floor is
  sum_k h tr(D_k S_k D_k^T) with D_k = G_k - 2 sigma^T F(t_k) (``solve_riccati``).  numpy float64.

  Returns:
    (gains (K, d, d) G_k, floor float).
  """
  info = problem.info
  if "riccati" not in info or problem.noise_level != 1.0:
    raise ValueError(f"lq_discrete_optimum needs a quadratic_ou problem (noise level 1), got {problem.name!r}.")
  A, P, Q, sig = (np.asarray(info[k], np.float64) for k in ("A", "P", "Q", "sigma"))
  d, K, h = A.shape[0], problem.num_steps, problem.dt
  eye = np.eye(d)
  F, gains = Q, np.empty((K, d, d))
  for k in range(K - 1, -1, -1):
    G = np.linalg.solve(eye + 2 * h * sig.T @ F @ sig, 2 * sig.T @ F @ (eye + h * A))
    M = eye + h * A - h * sig @ G
    F = h * P + 0.5 * h * G.T @ G + M.T @ F @ M
    gains[k] = G
  x0 = np.asarray(info["x0"], np.float64)
  F_cont = np.asarray(jax.vmap(info["riccati"].evaluate)(problem.times()[:-1]), np.float64)
  S, floor = np.outer(x0, x0), 0.0
  for k in range(K):
    D = gains[k] - 2 * sig.T @ F_cont[k]
    floor += h * np.trace(D @ S @ D.T)
    M = eye + h * A - h * sig @ gains[k]
    S = M @ S @ M.T + h * sig @ sig.T
  return gains, float(floor)
