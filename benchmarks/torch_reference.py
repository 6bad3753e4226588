r"""A PyTorch eager reference of the Adjoint Matching step, and am_jax / torch step-time ratios (CPU or GPU).

    python -m benchmarks.torch_reference            # every workload -> benchmarks/results/torch_reference_cpu.*
    python -m benchmarks.torch_reference --torch_device=cuda
                                                    # on a GPU machine: am_jax on jax's GPU, torch on CUDA
                                                    # -> torch_reference_gpu.* (benchmarks/device_check.sh)
    python -m benchmarks.torch_reference --mode=xla --loss_times=m20 --rounds=3
                                                    # XLA:CPU options, 3x256 MLP -> torch_reference_xla_cpu.*
    python -m benchmarks.torch_reference --mode=network --rounds=7 --iters=5
                                                    # the MLP's dense layers alone -> torch_reference_network_cpu.*

Needs the optional extra ``pip install -e ".[torch]"`` (any CPU build of torch >= 2.1; nothing in ``am_jax`` or the
default tests imports torch; ``tests/test_torch_reference.py`` is skipped without it).

The step (both frameworks, float32, the default Euler-Maruyama grid of ``AMConfig``; paper Alg. 1):

1. forward memoryless SDE of the fine-tuned model without gradient, K = 40 steps,
   X_{k+1} = X_k + h [v + c (v - kappa X_k)] + sigma sqrt(h) xi_k (``sampling.euler``);
2. terminal adjoint a_K = -lambda grad r(X_K), then the lean adjoint by one VJP of the base drift per step,
   a_k = a_{k+1} + h (grad_x b_k(X_k))^T a_{k+1}, k = K-1 .. 0 (``adjoint.lean_adjoint``);
3. loss on the time subset S (``losses.select_timesteps``: 10 random from the first 3/4 + the last 10, or all 40),
   mean over (k, b) of |(1 + c_k) / sigma_k (v_ft - v_base)(X_k) + sigma_k a_{k+1}|^2, with one batched network call
   at the M B loss points in torch; am_jax by default in chunks of 4 loss time steps (``--chunk_loss``,
   ``AMConfig.chunk_loss``: the same loss and gradient, each chunk's activations in the CPU's cache; the one-call
   step is timed beside it) (``losses.loss_at_timesteps``);
4. gradient of the fine-tuned parameters and one Adam step (optax.adam / torch.optim.Adam, lr 1e-3).

The torch side is what a PyTorch user would write: ``torch.no_grad`` rollout, ``torch.autograd.grad`` for each VJP,
``loss.backward()``, ``torch.optim.Adam``; per-step coefficients are Python floats.  The am_jax side is the
library's objective (``methods.am``) + optax Adam under one ``jax.jit`` with donated params and optimizer state
(the step of ``toy.finetune_mixture``; the base params are a step argument as in ``training.make_finetune_step``).

Workloads (``WORKLOADS``):

* ``toy1d``: the 1-D toy of ``toy.finetune_mixture`` (exact bimodal mixture base ``gmm.bimodal_1d``, residual MLP
  (64, 64) with the control parameterisation, linear reward c = 1, B = 512);
* ``mlp_d2`` / ``mlp_d16``: a matmul-bound net: base = MLP (256, 256, 256) (32-feature sinusoidal time embedding,
  ``models.MLP``) on d = 2 / 16, fine-tuned = a full copy of it, quadratic reward -|x|^2 / 4 + b.x, B = 256.

Each runs with the default M = 20 loss times (``m20``) and with all M = 40 (``m40``, "equal work": no subset).
``check_against_jax`` runs both frameworks from the same weights and the same draws (x0, xi, S of the am_jax
objective's key) and returns the loss and gradients of both (the test compares them).

Timing: ``interleaved`` (``benchmarks.common.interleaved`` plus process CPU time; compile and warm-up excluded;
rounds alternate am_jax, torch with ``torch.set_num_threads(1)`` and with 2 threads); ratios are per round,
reported as the median and range, in wall-clock and in CPU time (robust to other jobs on the cores).

``--mode=xla`` (issue 17 item 2): each ``XLA_FLAG_VARIANTS`` setting in its own subprocess (``--mode=xla_worker``),
timed there against the same torch step; in the default-flags process also ``IN_PROCESS_VARIANTS`` (matmul
precision, bf16 networks, the loss one time step at a time).  Results: docs/performance.md section 12.8.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from am_jax import gmm as gmm_lib
from am_jax import losses, methods, models, parameterisation, rewards, sampling, schedules, sharding, toy
from benchmarks import common

LEARNING_RATE = 1e-3
WORKLOADS = {
    "toy1d": dict(kind="toy", dim=1, batch=512, hidden=(64, 64)),
    "mlp_d2": dict(kind="mlp", dim=2, batch=256, hidden=(256, 256, 256)),
    "mlp_d16": dict(kind="mlp", dim=16, batch=256, hidden=(256, 256, 256)),
}
LOSS_TIMES = {"m20": {}, "m40": dict(num_random_timesteps=30)}  # m40: the pool of 30 is taken whole -> all 40


# ----------------------------------------------------------------------------------------------
# The am_jax side


@dataclasses.dataclass
class JaxSetup:
  """One workload in am_jax: the objective's inputs and the jitted train step."""

  name: str
  config: losses.AMConfig
  x_shape: tuple
  ft_apply: object
  params: object        # fine-tuned (trained) params, an nnx State
  base_apply: object
  base_params: object   # nnx State (mlp) or GaussianMixture (toy)
  reward_fn: object
  kind: str             # 'toy' (exact base, residual MLP) or 'mlp' (full fine-tune of an MLP)
  spec: dict

  def objective(self):
    return methods.am(self.config)

  def value_and_grad(self, params, key):
    objective = self.objective()

    def loss_fn(p):
      return objective(self.ft_apply, p, self.base_apply, self.base_params, self.reward_fn, key, self.x_shape)

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads

  def make_step(self, optimizer=None, network_dtype: Optional[str] = None, chunk_loss: Optional[int] = None,
                precision: Optional[str] = None, mesh=None):
    """Jitted ``step(params, opt_state, base_params, key) -> (params, opt_state, loss)`` (params donated); with a
    mesh the batch is sharded over its devices (the objective's ``mesh``)."""
    if mesh is not None:
      sharding.check_batch_divisible(self.x_shape[0], mesh, "batch")
    optimizer = optimizer or optax.adam(LEARNING_RATE)
    config = self.config
    if network_dtype is not None:
      config = dataclasses.replace(config, network_dtype=network_dtype)
    if chunk_loss is not None:
      config = dataclasses.replace(config, chunk_loss=chunk_loss)
    objective = methods.am(config)

    mesh_kw = {} if mesh is None else {"mesh": mesh}

    def step(params, opt_state, base_params, key):
      def loss_fn(p):
        return objective(self.ft_apply, p, self.base_apply, base_params, self.reward_fn, key, self.x_shape,
                         **mesh_kw)

      (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))
    if precision is None:
      return jitted

    def with_precision(*args):  # the context applies at trace time
      with jax.default_matmul_precision(precision):
        return jitted(*args)

    return with_precision


def build_jax(name: str, loss_times: str = "m20", ft_seed: Optional[int] = None, zero_init: bool = True,
              batch: int = 0, hidden=None, **am_overrides) -> JaxSetup:
  """The am_jax side of workload ``name`` (``WORKLOADS``) with loss times ``loss_times`` (``LOSS_TIMES``).

  batch, hidden: replace the workload's (0 / None: keep); am_overrides: AMConfig fields (the test's small sizes).
  ft_seed (mlp): initialise the fine-tuned MLP from this seed instead of copying the base (the check uses a
  fine-tuned net different from the base).  zero_init (toy): zero-initialised residual output layer (as in
  ``toy.finetune_mixture``); False gives every layer a non-zero gradient (the check).
  """
  spec = dict(WORKLOADS[name])
  spec.update({k: v for k, v in (("batch", batch), ("hidden", hidden and tuple(hidden))) if v})
  d = spec["dim"]
  am_overrides = {**LOSS_TIMES[loss_times], **am_overrides}
  if spec["kind"] == "toy":
    config = losses.AMConfig(loss_clip=None, **am_overrides)
    base = gmm_lib.bimodal_1d()
    base_apply = toy.mixture_base(base, config.schedule)
    net_apply, net_params = models.functional(models.MLP(d, hidden=spec["hidden"], zero_init_output=zero_init,
                                                         rngs=nnx.Rngs(0)))
    ft_apply = parameterisation.residual_model(base_apply, base, net_apply, config.schedule, "control")
    return JaxSetup(name, config, (spec["batch"], d), ft_apply, net_params, base_apply, base,
                    rewards.linear_reward(1.0), "toy", spec)
  config = losses.AMConfig(**am_overrides)
  base_apply, base_params = models.functional(models.MLP(d, hidden=spec["hidden"], rngs=nnx.Rngs(0)))
  if ft_seed is None:
    params = jax.tree.map(jnp.copy, base_params)
  else:
    params = models.functional(models.MLP(d, hidden=spec["hidden"], rngs=nnx.Rngs(ft_seed)))[1]
  return JaxSetup(name, config, (spec["batch"], d), base_apply, params, base_apply, base_params,
                  rewards.quadratic_reward(0.5, _reward_b(d)), "mlp", spec)


def _reward_b(d):
  return np.resize(np.asarray([1.0, 0.5], np.float32), d)


def jax_draws(setup: JaxSetup, key):
  """(x0, xi, idx) that the am_jax objective draws from ``key`` (losses.adjoint_matching_objective)."""
  k_batch, k_loss = jax.random.split(key)
  k0, kn = jax.random.split(k_batch)
  x0 = jax.random.normal(k0, setup.x_shape, jnp.float32)
  noise = sampling.draw_noise(kn, setup.config.num_steps, setup.x_shape)
  return x0, noise, losses.select_timesteps(k_loss, setup.config)


def jax_runner(setup: JaxSetup, mesh=None, **step_kw):
  """(run, compile_s): ``run()`` advances the donated am_jax step by one step and returns the loss; with a mesh, the
  step with the batch sharded over its devices (parameters replicated)."""
  optimizer = optax.adam(LEARNING_RATE)
  step = setup.make_step(optimizer, mesh=mesh, **step_kw)
  params = jax.tree.map(jnp.copy, setup.params)
  base_params = jax.tree.map(jnp.asarray, setup.base_params)
  if mesh is not None:
    params, base_params = sharding.replicate_tree((params, base_params), mesh)
  keys = list(jax.random.split(jax.random.PRNGKey(1), 64))
  holder = [params, optimizer.init(params), 0]
  t0 = time.perf_counter()
  holder[0], holder[1], loss = step(holder[0], holder[1], base_params, keys[0])
  jax.block_until_ready(loss)
  compile_s = time.perf_counter() - t0

  def run():
    i = holder[2] = holder[2] + 1
    holder[0], holder[1], loss = step(holder[0], holder[1], base_params, keys[i % len(keys)])
    return loss

  return run, compile_s


# ----------------------------------------------------------------------------------------------
# The torch side


def _torch():
  import torch  # pylint: disable=g-import-not-at-top
  return torch


def _state_dict_of(params):
  """nnx MLP params -> {'hidden.i.weight': (out, in), ...} numpy float32 (torch.nn.Linear layout)."""
  pure = nnx.to_pure_dict(params)
  out = {}
  for i in sorted(pure["hidden"]):
    out[f"hidden.{i}.weight"] = np.asarray(pure["hidden"][i]["kernel"]).T
    out[f"hidden.{i}.bias"] = np.asarray(pure["hidden"][i]["bias"])
  out["out.weight"] = np.asarray(pure["out"]["kernel"]).T
  out["out.bias"] = np.asarray(pure["out"]["bias"])
  return out


def torch_mlp(dim: int, hidden, time_embed_dim: int = 32):
  """``models.MLP`` in torch: [x, sin, cos of 1000 t f_i] -> (Linear, SiLU) x len(hidden) -> Linear."""
  torch = _torch()
  half = time_embed_dim // 2
  freqs = np.asarray(jnp.exp(-jnp.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half))

  class MLP(torch.nn.Module):

    def __init__(self):
      super().__init__()
      widths = [dim + time_embed_dim] + list(hidden)
      self.hidden = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
      self.out = torch.nn.Linear(widths[-1], dim)
      self.register_buffer("freqs", torch.from_numpy(freqs.copy()))

    def forward(self, x, t):
      args = 1000.0 * t[:, None] * self.freqs[None]
      h = torch.cat([x, torch.sin(args), torch.cos(args)], dim=-1)
      for layer in self.hidden:
        h = torch.nn.functional.silu(layer(h))
      return self.out(h)

  return MLP()


def _load(module, params):
  torch = _torch()
  module.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in _state_dict_of(params).items()},
                         strict=False)
  return module


def torch_mixture_velocity(mix: gmm_lib.GaussianMixture, device="cpu"):
  """``gmm.velocity`` of a diagonal-covariance mixture under the linear schedule, in torch (x (B, d), t (B,))."""
  torch = _torch()
  covs = np.asarray(mix.covs)
  if not np.allclose(covs, np.einsum("jd,de->jde", np.einsum("jdd->jd", covs), np.eye(covs.shape[-1]))):
    raise ValueError("torch_mixture_velocity needs diagonal covariances.")
  lam = torch.from_numpy(np.einsum("jdd->jd", covs).astype(np.float32).copy()).to(device)  # (J, d)
  means = torch.from_numpy(np.asarray(mix.means, np.float32).copy()).to(device)
  logw = torch.log(torch.from_numpy(np.asarray(mix.weights, np.float32).copy())).to(device)

  def velocity(x, t):
    a = t[:, None, None]
    b = 1.0 - a
    resid = x[:, None, :] - a * means[None]
    var = a * a * lam[None] + b * b
    z = resid / var
    logp = logw[None] - 0.5 * torch.sum(resid * z, -1) - 0.5 * torch.sum(torch.log(var), -1)
    post = torch.softmax(logp, dim=-1)
    e_x1 = means[None] + a * (lam[None] * z)
    e_x0 = b * z
    return torch.einsum("bj,bjd->bd", post, e_x1 - e_x0)  # alphadot = 1, betadot = -1

  return velocity


class TorchAM:
  """The AM step of ``setup`` in PyTorch eager (same weights, coefficients, loss and optimizer).

  device: torch device of the networks, the draws and every tensor of the step ('cpu', 'cuda'); the loss-time
  indices are drawn on the host (a Python list, as a PyTorch user indexes the trajectory list).
  """

  def __init__(self, setup: JaxSetup, seed: int = 0, device="cpu"):
    torch = self.torch = _torch()
    self.setup = setup
    self.device = dev = torch.device(device)
    cfg = setup.config
    if not isinstance(cfg.schedule, schedules.LinearSchedule) or cfg.integrator != "euler" or cfg.loss_clip:
      raise ValueError("TorchAM mirrors the linear schedule, the Euler step and no loss clip only.")
    co = cfg.coefficients()
    f = lambda a: [float(v) for v in np.asarray(a)]  # noqa: E731
    self.tau, self.dt, self.sigma, self.c, self.kappa = f(co.tau), f(co.dt), f(co.sigma), f(co.drift_scale), f(co.kappa)
    self.sqrt_dt = [math.sqrt(h) for h in self.dt]
    self.loss_sigma = torch.from_numpy(np.asarray(co.loss_sigma, np.float32).copy()).to(dev)
    self.loss_one_plus_c = torch.from_numpy(np.asarray(1.0 + co.loss_drift_scale, np.float32).copy()).to(dev)
    self.tau_t = torch.from_numpy(np.asarray(co.tau, np.float32).copy()).to(dev)
    self.lam = float(cfg.reward_multiplier)
    self.k_steps = cfg.num_steps
    b, d = setup.x_shape
    self.b, self.d = b, d
    spec = setup.spec
    if setup.kind == "toy":
      base_v = torch_mixture_velocity(setup.base_params, dev)
      self.net = _load(torch_mlp(d, spec["hidden"]), setup.params).to(dev)

      def ft(x, t, v_base=None):
        v_base = base_v(x, t) if v_base is None else v_base
        return v_base + 0.5 * torch.sqrt(2.0 * ((1.0 - t) / t))[:, None] * self.net(x, t)

      self.base, self.ft = base_v, ft
      c_vec = torch.ones(d, device=dev)
      self.reward = lambda x: torch.sum(x * c_vec, -1)
    else:
      self.base_net = _load(torch_mlp(d, spec["hidden"]), setup.base_params).requires_grad_(False).to(dev)
      self.net = _load(torch_mlp(d, spec["hidden"]), setup.params).to(dev)
      self.base = self.base_net
      self.ft = lambda x, t, v_base=None: self.net(x, t)
      bvec = torch.from_numpy(_reward_b(d)).to(dev)
      self.reward = lambda x: -0.5 * torch.sum(x * (0.5 * x), -1) + torch.sum(x * bvec, -1)
    self.opt = torch.optim.Adam(self.net.parameters(), lr=LEARNING_RATE)
    self.gen = torch.Generator(device=dev).manual_seed(seed)  # x0, xi on the device
    self.index_gen = torch.Generator().manual_seed(seed)     # the loss times on the host
    n_last = min(cfg.num_last_timesteps, self.k_steps)
    self.pool = min(int(cfg.random_timestep_fraction * self.k_steps), self.k_steps - n_last)
    self.n_rand = min(cfg.num_random_timesteps, self.pool)
    self.last = list(range(self.k_steps - n_last, self.k_steps))

  def draws(self):
    """(x0, xi, idx) drawn with torch's generator (the timed step)."""
    torch = self.torch
    x0 = torch.randn(self.b, self.d, generator=self.gen, device=self.device)
    xi = torch.randn(self.k_steps, self.b, self.d, generator=self.gen, device=self.device)
    rand = sorted(torch.randperm(self.pool, generator=self.index_gen)[:self.n_rand].tolist())
    return x0, xi, torch.tensor(rand + self.last)

  def loss(self, x0, xi, idx):
    """The AM loss (a graph to the fine-tuned parameters): rollout, lean adjoint, loss at the steps ``idx``.

    x0 (B, d), xi (K, B, d): tensors (moved to the device); idx (M,): a host tensor of step indices.
    """
    torch, dev = self.torch, self.device
    b, k_steps = self.b, self.k_steps
    x0, xi = x0.to(dev), xi.to(dev)
    with torch.no_grad():  # 1. memoryless rollout of the fine-tuned model
      x, traj = x0, [x0]
      for k in range(k_steps):
        t = torch.full((b,), self.tau[k], device=dev)
        v = self.ft(x, t)
        x = x + self.dt[k] * (v + self.c[k] * (v - self.kappa[k] * x)) + self.sigma[k] * (xi[k] * self.sqrt_dt[k])
        traj.append(x)
    x1 = traj[-1].detach().requires_grad_(True)  # 2. terminal and lean adjoint
    (g,) = torch.autograd.grad(self.reward(x1).sum(), x1)
    a = -self.lam * g
    adj = [None] * (k_steps + 1)
    adj[k_steps] = a
    for k in range(k_steps - 1, -1, -1):
      xk = traj[k].detach().requires_grad_(True)
      v = self.base(xk, torch.full((b,), self.tau[k], device=dev))
      drift = v + self.c[k] * (v - self.kappa[k] * xk)
      (vjp,) = torch.autograd.grad(drift, xk, a)
      a = a + self.dt[k] * vjp
      adj[k] = a
    # 3. loss at the M B points of the selected steps, one batched call of each network
    idx_l = idx.tolist()
    idx = idx.to(dev)
    xs = torch.cat([traj[k] for k in idx_l])
    a_sel = torch.cat([adj[k + 1] for k in idx_l])
    t = torch.repeat_interleave(self.tau_t[idx], b)
    sig = torch.repeat_interleave(self.loss_sigma[idx], b)[:, None]
    opc = torch.repeat_interleave(self.loss_one_plus_c[idx], b)[:, None]
    with torch.no_grad():
      v_base = self.base(xs, t)
    u = opc / sig * (self.ft(xs, t, v_base) - v_base)
    target = -sig * a_sel
    return torch.mean(torch.sum((u - target) ** 2, -1))

  def step(self, draws=None):
    """One training step (4. gradient + Adam); returns the loss as a float."""
    loss = self.loss(*(draws or self.draws()))
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return loss.detach().item()

  def grads(self):
    """{parameter name: numpy gradient} of the fine-tuned net after ``backward`` (torch layout)."""
    return {name: p.grad.detach().cpu().numpy().copy() for name, p in self.net.named_parameters()}


def check_against_jax(name: str, loss_times: str = "m20", key=None, device="cpu", **build_kw) -> dict:
  """Loss and gradients of am_jax and of the torch reference from the same weights and draws.

  Returns {'loss': (jax, torch), 'grads': {param: (jax, torch)}, 'params_after': {param: (jax, torch)}} (numpy, in
  torch's layout and names: 'hidden.0.weight' (out, in), ...); ``params_after``: one Adam step from those gradients.
  ``build_kw``: ``build_jax`` keywords (smaller sizes); ``device``: the torch side's device.
  """
  setup = build_jax(name, loss_times, ft_seed=1, zero_init=False, **build_kw)
  key = jax.random.PRNGKey(7) if key is None else key
  torch = _torch()
  opt = optax.adam(LEARNING_RATE)

  @jax.jit
  def jax_side(params, key):  # one compilation: the draws, the loss and gradient, one Adam step
    loss, grads = setup.value_and_grad(params, key)
    new = optax.apply_updates(params, opt.update(grads, opt.init(params), params)[0])
    return jax_draws(setup, key), loss, grads, new

  (x0, xi, idx), loss_j, grads_j, new_j = jax_side(setup.params, key)
  x0, xi, idx = (np.array(a) for a in (x0, xi, idx))  # writable copies for torch.from_numpy
  ref = TorchAM(setup, device=device)
  loss_t = ref.loss(torch.from_numpy(x0), torch.from_numpy(xi), torch.from_numpy(idx.astype(np.int64)))
  ref.opt.zero_grad(set_to_none=True)
  loss_t.backward()
  grads_t = ref.grads()
  ref.opt.step()
  sd_j = _state_dict_of(grads_j)
  sd_new_j = _state_dict_of(new_j)
  after_t = {n: p.detach().cpu().numpy().copy() for n, p in ref.net.named_parameters()}
  return {"loss": (float(loss_j), loss_t.detach().item()),
          "grads": {n: (sd_j[n], grads_t[n]) for n in sd_j},
          "params_after": {n: (sd_new_j[n], after_t[n]) for n in sd_j}}


def torch_runner(ref: TorchAM, threads: Optional[int]):
  """``run()``: one ``ref.step()`` (which returns a Python float: the step has finished, on any device) at ``threads``
  intra-op CPU threads (None: leave torch's setting, e.g. for a GPU reference)."""
  torch = ref.torch

  def run():
    if threads is not None and torch.get_num_threads() != threads:
      torch.set_num_threads(threads)
    return ref.step()

  return run


def torch_settings(threads, device="cpu") -> dict:
  """{label: intra-op threads} of the torch runs to time: '1t', '2t', ... on the CPU; one run 'cuda' on a GPU
  (its CPU thread count barely matters there and is left as torch sets it)."""
  if _torch().device(device).type == "cpu":
    return {f"{int(n)}t": int(n) for n in threads}
  return {_torch().device(device).type: None}


# ----------------------------------------------------------------------------------------------
# Timing


def interleaved(runs: dict, rounds: int = 5, iters: int = 2, warm: int = 1, settle: int = 1,
                pause_s: float = 0.3, settle_s: float = 0.15) -> dict:
  """``common.interleaved`` that also records process CPU seconds (all threads) per call.

  Wall time is what a user waits; CPU time is the work done, robust to other jobs on the cores (a process
  that is descheduled accumulates no CPU time), but it counts spin-waiting threads (OpenMP) as work.
  ``warm`` untimed calls of each function in the first round (compilation, allocators); ``settle`` untimed calls
  at the start of each later round: the first call after the other framework ran is slower than a training loop's
  steady state (measured on the toy step, idle: am_jax's round median 14.9-15.6 ms with 2 timed calls and no settle
  call vs 12.0 ms with 5; torch's changed by < 2%), so every function is timed in its steady state.
  ``pause_s``: a sleep before each function's calls, so that the previous function's idle worker threads (torch's
  OpenMP threads spin-wait after a parallel region) have gone to sleep and do not take the cores from the next one
  (measured 2026-11-27: am_jax's chunked 3x256 MLP step, right after torch with 2 threads, 64.8 ms without a pause,
  41.4 ms with torch's threads passive; the one-call step, timed after am_jax's own, was unaffected); then untimed
  calls for at least ``settle_s`` seconds (and ``settle`` calls), because the first calls after the pause are slow
  (threads and caches cold: the toy's 7 ms step measured 9.9 ms with the pause and one settle call).
  """
  per = {name: {"wall": [], "cpu": []} for name in runs}
  for r in range(rounds):
    for name, run in runs.items():
      time.sleep(pause_s)
      t0, n = time.perf_counter(), 0
      while n < (warm if r == 0 else settle) or time.perf_counter() - t0 < settle_s:
        jax.block_until_ready(run())
        n += 1
      wall, cpu = [], []
      for _ in range(iters):
        w0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(run())
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
      per[name]["wall"].append(statistics.median(wall))
      per[name]["cpu"].append(statistics.median(cpu))
  return {name: {"median_s": statistics.median(v["wall"]), "round_medians_s": v["wall"],
                 "cpu_median_s": statistics.median(v["cpu"]), "cpu_round_medians_s": v["cpu"], "rounds": rounds,
                 "iters": iters, "settle": settle, "pause_s": pause_s, "settle_s": settle_s}
          for name, v in per.items()}


def _ratios(times, num, den, key="round_medians_s"):
  """Per-round ratios num / den of the interleaved round medians (wall, or CPU with key='cpu_round_medians_s')."""
  return [a / b for a, b in zip(times[num][key], times[den][key])]


def _summary(r):
  return {"median": statistics.median(r), "min": min(r), "max": max(r), "per_round": r}


def run_reference(workloads, loss_times, threads=(1, 2), rounds=5, iters=5, device="cpu", settle: int = 1,
                  chunk_loss: int = 0, jax_devices: int = 1) -> dict:
  """am_jax (on jax's default device) against torch on ``device`` (CPU: one run per thread count in ``threads``).

  jax_devices > 1: also am_jax's step with the batch sharded over that many devices (on a CPU, XLA host devices,
  one per core: ``common.jax_host_devices``), timed in the same rounds ("am_jax_<n>dev").

  chunk_loss > 0: am_jax's step evaluates the loss in chunks of that many time steps (``AMConfig.chunk_loss``: same
  loss and gradient to float rounding, the chunk's activations stay in the CPU's cache), and the step with the loss
  in one call is timed in the same rounds too (``am_jax_one_call``).
  """
  torch = _torch()
  settings = torch_settings(threads, device)
  out = {"machine": common.machine_info(), "torch": torch.__version__, "torch_device": _device_name(device),
         "jax_device": jax.devices()[0].device_kind, "threads": list(settings), "rounds": rounds,
         "iters": iters, "settle": settle, "chunk_loss": chunk_loss, "load_average": _load_average(), "rows": [],
         "jax_devices": jax_devices}
  mesh = sharding.make_mesh(jax_devices) if jax_devices > 1 else None
  multi = f"am_jax_{jax_devices}dev"
  for name in workloads:
    for lt in loss_times:
      setup = build_jax(name, lt)
      runs = {}
      runs["am_jax"], compile_s = jax_runner(setup, chunk_loss=chunk_loss)
      if chunk_loss:
        runs["am_jax_one_call"] = jax_runner(setup, chunk_loss=0)[0]
      if mesh is not None:
        runs[multi] = jax_runner(setup, mesh, chunk_loss=chunk_loss)[0]
      for label, n in settings.items():
        ref = TorchAM(setup, device=device)
        if n is not None:
          torch.set_num_threads(n)
        ref.step()  # warm-up (allocator, thread pool, CUDA context and kernels)
        runs[f"torch_{label}"] = torch_runner(ref, n)
      times = interleaved(runs, rounds, iters, settle=settle)
      row = {"workload": name, "loss_times": lt, "num_loss_steps": int(losses.select_timesteps(
          jax.random.PRNGKey(0), setup.config).shape[0]), "batch": setup.x_shape[0], "dim": setup.x_shape[1],
             "num_steps": setup.config.num_steps, "compile_s": compile_s,
             "step_s": {k: v["median_s"] for k, v in times.items()},
             "cpu_s": {k: v["cpu_median_s"] for k, v in times.items()}, "times": times}
      for label in settings:
        row[f"jax_over_torch_{label}"] = _summary(_ratios(times, "am_jax", f"torch_{label}"))
        row[f"cpu_jax_over_torch_{label}"] = _summary(_ratios(times, "am_jax", f"torch_{label}",
                                                              "cpu_round_medians_s"))
      if chunk_loss:
        for label in settings:
          row[f"one_call_over_torch_{label}"] = _summary(_ratios(times, "am_jax_one_call", f"torch_{label}"))
        row["one_call_over_step"] = _summary(_ratios(times, "am_jax_one_call", "am_jax"))
      best = [min(times[f"torch_{label}"]["round_medians_s"][r] for label in settings) for r in range(rounds)]
      row["jax_over_best_torch"] = _summary([a / b for a, b in zip(times["am_jax"]["round_medians_s"], best)])
      if mesh is not None:
        row["multi_device"] = {"devices": jax_devices, "over_step": _summary(_ratios(times, multi, "am_jax")),
                               "over_best_torch": _summary([a / b for a, b in zip(times[multi]["round_medians_s"],
                                                                                  best)])}
        for label in settings:
          row["multi_device"][f"over_torch_{label}"] = _summary(_ratios(times, multi, f"torch_{label}"))
      out["rows"].append(row)
      print(_line(row, list(settings)), flush=True)
  return out


def _line(row, threads):
  s = row["step_s"]
  parts = [f"{row['workload']:8s} {row['loss_times']}  am_jax {1e3 * s['am_jax']:8.2f} ms"]
  for n in threads:
    r, c = row[f"jax_over_torch_{n}"], row[f"cpu_jax_over_torch_{n}"]
    parts.append(f"torch {n} {1e3 * s[f'torch_{n}']:8.2f} ms  am_jax/torch wall {r['median']:.3f} "
                 f"({r['min']:.3f}-{r['max']:.3f}) cpu {c['median']:.3f} ({c['min']:.3f}-{c['max']:.3f})")
  if "multi_device" in row:
    r = row["multi_device"]["over_best_torch"]
    parts.append(f"on {row['multi_device']['devices']} devices / faster torch {r['median']:.3f} "
                 f"({r['min']:.3f}-{r['max']:.3f})")
  if "one_call_over_step" in row:
    r = row["one_call_over_step"]
    parts.append(f"loss in one call {1e3 * s['am_jax_one_call']:8.2f} ms, one call / chunked {r['median']:.3f} "
                 f"({r['min']:.3f}-{r['max']:.3f})")
  return "  |  ".join(parts)


def _fmt(summary) -> str:
  """'median (min-max)' of a ``_summary``, 3 decimals."""
  return f"{summary['median']:.3f} ({summary['min']:.3f}-{summary['max']:.3f})"


def _labels(out):
  """The torch runs' labels of a results dict ('1t', '2t', 'cuda'; older files list thread counts)."""
  return [n if isinstance(n, str) else f"{n}t" for n in out["threads"]]


def _device_name(device) -> str:
  torch = _torch()
  device = torch.device(device)
  return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def reference_markdown(out) -> str:
  threads = _labels(out)
  m = out["machine"]
  on = f"am_jax on {out.get('jax_device', 'cpu')}, torch on {out.get('torch_device', 'cpu')}"
  lines = [f"# am_jax vs PyTorch eager, one AM step ({on})", "",
           f"`python -m benchmarks.torch_reference`; {m['date']}, {m['machine']}, jax {m['jax']}, "
           f"torch {out['torch']}; "
           f"{out['rounds']} interleaved rounds x {out['iters']} calls ({out.get('settle', 0)} untimed call(s) first "
           "in each round), compile and warm-up excluded.  Per round: "
           "am_jax / torch of the round medians, wall clock and process CPU time (all threads); the table gives the "
           "median (min-max) over the rounds; < 1: am_jax faster.  The machine was shared with other jobs "
           f"(load average {out.get('load_average', '?')} at the start): absolute times are inflated.", "",
           "| workload | M | am_jax ms (wall / cpu) | "
           + " | ".join(f"torch {n} ms (wall / cpu) | am_jax / torch {n}, wall | cpu" for n in threads) + " |",
           "|---|---|---|" + "---|---|---|" * len(threads)]
  for row in out["rows"]:
    s, c = row["step_s"], row["cpu_s"]
    cells = [row["workload"], str(row["num_loss_steps"]), f"{1e3 * s['am_jax']:.1f} / {1e3 * c['am_jax']:.1f}"]
    for n in threads:
      r, rc = row[f"jax_over_torch_{n}"], row[f"cpu_jax_over_torch_{n}"]
      cells += [f"{1e3 * s[f'torch_{n}']:.1f} / {1e3 * c[f'torch_{n}']:.1f}", _fmt(r), _fmt(rc)]
    lines.append("| " + " | ".join(cells) + " |")
  one_call = [row for row in out["rows"] if "one_call_over_step" in row]
  if one_call:
    lines += ["", f"am_jax's step above evaluates the loss in chunks of {out['chunk_loss']} time steps "
              "(`AMConfig.chunk_loss`, `--chunk_loss`); the same step with the loss in one call at all M B points, "
              "timed in the same rounds:", "",
              "| workload | M | one call ms | one call / chunked | "
              + " | ".join(f"one call / torch {n}, wall" for n in threads) + " |",
              "|---|---|---|---|" + "---|" * len(threads)]
    for row in one_call:
      r = row["one_call_over_step"]
      cells = [row["workload"], str(row["num_loss_steps"]), f"{1e3 * row['step_s']['am_jax_one_call']:.1f}",
               _fmt(r)]
      for n in threads:
        cells.append(_fmt(row[f"one_call_over_torch_{n}"]))
      lines.append("| " + " | ".join(cells) + " |")
  multi = [row for row in out["rows"] if "multi_device" in row]
  if multi:
    n = multi[0]["multi_device"]["devices"]
    lines += ["", f"am_jax's step with the batch sharded over {n} devices (`--jax_devices={n}`: XLA host devices, one "
              "per core), timed in the same rounds; wall clock, median (min-max) over the rounds, < 1: faster.  The "
              "one-device step of such a run can run slower than in a process of one device (measured 2026-11-27: up "
              "to 1.6x on the 3x256 MLP rows, up to 1.3x on the SOC steps), so '/ 1 device' is an upper bound on "
              "the gain; compare with a run without `--jax_devices`:", "",
              f"| workload | M | on {n} devices ms | / 1 device | "
              + " | ".join(f"/ torch {t}" for t in threads) + " | / faster torch |",
              "|---|---|---|---|" + "---|" * len(threads) + "---|"]
    for row in multi:
      md = row["multi_device"]
      cells = [row["workload"], str(row["num_loss_steps"]), f"{1e3 * row['step_s'][f'am_jax_{n}dev']:.1f}",
               _fmt(md["over_step"])] + [_fmt(md[f"over_torch_{t}"]) for t in threads] + [_fmt(md["over_best_torch"])]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# XLA:CPU options on the matmul-bound workloads (issue 17 item 2)

# (--xla_cpu_use_thunk_runtime=false is "no longer supported" in jax 0.10.2: XLA ignores it with a warning.)
XLA_FLAG_VARIANTS = {
    "default": "",
    "single_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "xnn_dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "onednn": "--xla_cpu_experimental_onednn_custom_call=true",
    "fast_math": "--xla_cpu_enable_fast_math=true",
}
IN_PROCESS_VARIANTS = {
    "default": {},
    "precision_highest": dict(precision="highest"),
    "precision_bf16": dict(precision="bfloat16"),
    "network_bf16": dict(network_dtype="bfloat16"),
    "loss_per_time": dict(chunk_loss=True),  # the M loss times one at a time instead of one (M B)-row matmul
}


def run_xla_worker(workloads, loss_times, variants, torch_threads, rounds, iters) -> dict:
  """In one process (its XLA_FLAGS fixed): am_jax variants and torch, interleaved; ratios to torch per round."""
  torch = _torch()
  torch.set_num_threads(torch_threads)
  res = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": []}
  for name in workloads:
    setup = build_jax(name, loss_times)
    runs, compile_s = {}, {}
    for v in variants:
      runs[v], compile_s[v] = jax_runner(setup, **IN_PROCESS_VARIANTS[v])
    ref = TorchAM(setup)
    ref.step()
    runs["torch"] = torch_runner(ref, torch_threads)
    times = interleaved(runs, rounds, iters)
    row = {"workload": name, "loss_times": loss_times, "compile_s": compile_s,
           "step_s": {k: v["median_s"] for k, v in times.items()},
           "cpu_s": {k: v["cpu_median_s"] for k, v in times.items()}, "times": times,
           "over_torch": {v: _summary(_ratios(times, v, "torch")) for v in variants},
           "cpu_over_torch": {v: _summary(_ratios(times, v, "torch", "cpu_round_medians_s")) for v in variants},
           "over_default": {v: _summary(_ratios(times, v, "default")) for v in variants if "default" in runs}}
    res["rows"].append(row)
  return res


def run_xla_study(workloads, loss_times, flag_variants, torch_threads=1, rounds=3, iters=2, passes=2,
                  on_pass=None) -> dict:
  """Every XLA_FLAGS variant in its own subprocess (``passes`` alternating passes); in-process variants in the
  default-flags process.  Each process times its am_jax variants against the same torch step, interleaved, so
  am_jax / torch ratios compare across processes (the machine's load cancels)."""
  out = {"machine": common.machine_info(), "torch": _torch().__version__, "torch_threads": torch_threads,
         "loss_times": loss_times, "rounds": rounds, "iters": iters, "load_average": _load_average(), "passes": []}
  for p in range(passes):
    results = {}
    for fv in flag_variants:
      variants = list(IN_PROCESS_VARIANTS) if fv == "default" else ["default"]
      env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + XLA_FLAG_VARIANTS[fv]).strip())
      cmd = [sys.executable, "-m", "benchmarks.torch_reference", "--mode=xla_worker",
             f"--workloads={','.join(workloads)}", f"--loss_times={loss_times}", f"--variants={','.join(variants)}",
             f"--torch_threads={torch_threads}", f"--rounds={rounds}", f"--iters={iters}"]
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.getcwd())
      if proc.returncode:
        err = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else [f"exit {proc.returncode}"]
        results[fv] = {"error": err}
        print(f"pass {p} {fv}: FAILED {results[fv]['error']}", flush=True)
        continue
      res = json.loads(proc.stdout.strip().splitlines()[-1])
      results[fv] = res
      for row in res["rows"]:
        print(f"pass {p} {fv:20s} {row['workload']:8s} " + "  ".join(
            f"{v} {1e3 * row['step_s'][v]:.1f} ms (x{row['over_torch'][v]['median']:.3f} torch, cpu "
            f"x{row['cpu_over_torch'][v]['median']:.3f})"
            for v in row["over_torch"]) + f"  torch {1e3 * row['step_s']['torch']:.1f} ms", flush=True)
    out["passes"].append(results)
    if on_pass is not None:  # write what is there after every pass
      on_pass(out)
  return out


def xla_markdown(out) -> str:
  lines = ["# XLA:CPU options on the matmul-bound AM step (3x256 MLP), against torch eager", "",
           f"`python -m benchmarks.torch_reference --mode=xla`; {out['machine']['date']}, {out['machine']['machine']}, "
           f"jax {out['machine']['jax']}, torch {out['torch']} ({out['torch_threads']} threads), M = "
           f"{out['loss_times'][1:]} loss times.  Each XLA_FLAGS setting runs in its own process, interleaved there "
           "with the same torch step; the table gives am_jax / torch, wall (cpu), median of the rounds, one column per "
           "pass (< 1: am_jax faster), and the CPU-time ratio to the default in the same process (one per pass).  "
           f"Shared machine (load average {out.get('load_average', '?')} at the start).", ""]
  passes = out["passes"]
  keys = []
  for res in passes:
    for fv, r in res.items():
      for row in r.get("rows", []):
        for v in row["over_torch"]:
          k = (row["workload"], fv, v)
          if k not in keys:
            keys.append(k)
  lines.append("| workload | XLA_FLAGS | variant | "
               + " | ".join(f"am_jax / torch, pass {i}" for i in range(len(passes)))
               + " | cpu / default, same process |")
  lines.append("|---|---|---|" + "---|" * len(passes) + "---|")
  for wl, fv, v in keys:
    cells = [wl, f"`{XLA_FLAG_VARIANTS[fv]}`" if XLA_FLAG_VARIANTS[fv] else "(none)", v]
    rel = []
    for res in passes:
      row = next((r for r in res.get(fv, {}).get("rows", []) if r["workload"] == wl), None)
      if row is None:
        cells.append("failed")
        continue
      cells.append(f"{row['over_torch'][v]['median']:.3f} ({row['cpu_over_torch'][v]['median']:.3f})")
      if v != "default" and "default" in row["times"]:
        rel.append(statistics.median(_ratios(row["times"], v, "default", "cpu_round_medians_s")))
    cells.append(" / ".join(f"{x:.3f}" for x in rel) if rel else "-")
    lines.append("| " + " | ".join(cells) + " |")
  for res in passes:
    for fv, r in res.items():
      if "error" in r:
        lines.append(f"\n`{XLA_FLAG_VARIANTS[fv]}` failed: {' '.join(r['error'])}")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# The network alone (which framework's dense layers are faster on this CPU)


def run_network(rows: int = 5120, dim: int = 16, hidden=(256, 256, 256), threads=(1, 2), rounds=7, iters=5) -> dict:
  """The 3x256 MLP's dense layers alone, am_jax's XLA against torch eager at each thread count, interleaved:
  one (rows, 256) x (256, 256) product, the MLP's forward, and its forward + backward in the weights (the loss's
  work at M B = ``rows`` points).  Float32, SiLU, the same random weights and inputs in both frameworks.

  This separates the dense-layer speed of the two frameworks' CPU libraries (XLA's dot emitter vs torch's BLAS)
  from the step's structure: on CPUs where torch's BLAS runs fewer FLOP/s per core, the whole step's ratio
  follows (docs/performance.md section 12.14)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  torch = _torch()
  sizes = [dim, *hidden, dim]
  rng = np.random.default_rng(0)
  ws = [(rng.standard_normal((a, b)) / math.sqrt(a)).astype(np.float32) for a, b in zip(sizes[:-1], sizes[1:])]
  bs = [np.zeros(b, np.float32) for b in sizes[1:]]
  x = rng.standard_normal((rows, dim)).astype(np.float32)
  h = rng.standard_normal((rows, hidden[0])).astype(np.float32)

  def mlp_jax(params, x):
    for i, (w, b) in enumerate(params):
      x = x @ w + b
      x = jax.nn.silu(x) if i < len(params) - 1 else x
    return x

  jparams = [(jnp.asarray(w), jnp.asarray(b)) for w, b in zip(ws, bs)]
  jx, jh, jw = jnp.asarray(x), jnp.asarray(h), jnp.asarray(ws[1])
  dot_j = jax.jit(lambda a, b: a @ b)
  fwd_j = jax.jit(mlp_jax)
  vg_j = jax.jit(jax.value_and_grad(lambda p, x: jnp.mean(mlp_jax(p, x) ** 2)))
  tparams = [(torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)) for w, b in zip(ws, bs)]
  tx, th, tw = torch.tensor(x), torch.tensor(h), torch.tensor(ws[1])

  def mlp_torch(x):
    for i, (w, b) in enumerate(tparams):
      x = x @ w + b
      x = torch.nn.functional.silu(x) if i < len(tparams) - 1 else x
    return x

  def vg_torch():
    loss = (mlp_torch(tx) ** 2).mean()
    grads = torch.autograd.grad(loss, [t for wb in tparams for t in wb])
    return loss.item(), grads

  def at(n, fn):
    def run():
      if torch.get_num_threads() != n:
        torch.set_num_threads(n)
      return fn()
    return run

  def no_grad(fn):
    def run():
      with torch.no_grad():
        return fn()
    return run

  pieces = {"dot": (lambda: dot_j(jh, jw), no_grad(lambda: th @ tw)),
            "forward": (lambda: fwd_j(jparams, jx), no_grad(lambda: mlp_torch(tx))),
            "forward_backward": (lambda: vg_j(jparams, jx), vg_torch)}
  flops = {"dot": 2 * rows * hidden[0] * hidden[1],
           "forward": 2 * rows * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))}
  flops["forward_backward"] = 3 * flops["forward"]
  out = {"machine": common.machine_info(), "torch": torch.__version__, "rows": rows, "dim": dim,
         "hidden": list(hidden), "threads": [int(n) for n in threads], "rounds": rounds, "iters": iters,
         "load_average": _load_average(), "cpu_model": common.cpu_model(), "rows_out": []}
  for piece, (jfn, tfn) in pieces.items():
    runs = {"am_jax": jfn, **{f"torch_{n}t": at(int(n), tfn) for n in threads}}
    times = interleaved(runs, rounds, iters)
    row = {"piece": piece, "gflop": flops[piece] / 1e9, "step_s": {k: v["median_s"] for k, v in times.items()},
           "cpu_s": {k: v["cpu_median_s"] for k, v in times.items()}, "times": times}
    for n in threads:
      row[f"jax_over_torch_{n}t"] = _summary(_ratios(times, "am_jax", f"torch_{n}t"))
    out["rows_out"].append(row)
    print(f"{piece:17s} " + "  ".join(f"{k} {v * 1e3:7.2f} ms ({flops[piece] / v / 1e9:5.0f} GFLOP/s)"
                                       for k, v in row["step_s"].items()), flush=True)
  return out


def network_markdown(out) -> str:
  th = out["threads"]
  lines = ["# The 3x256 MLP's dense layers alone, XLA:CPU (am_jax) vs torch eager", "",
           f"`python -m benchmarks.torch_reference --mode=network`; {out['machine']['date']}, {out['cpu_model']}, "
           f"{out['machine']['machine']}, jax {out['machine']['jax']}, torch {out['torch']}; {out['rows']} rows, "
           f"d = {out['dim']}, hidden {out['hidden']}, float32; {out['rounds']} interleaved rounds x {out['iters']} "
           f"calls; load average at the start {out['load_average']}.  Wall-clock ms and GFLOP/s (forward + backward "
           "counted as 3 forwards); ratio < 1: XLA faster.", "",
           "| piece | am_jax ms (GFLOP/s) | " + " | ".join(f"torch {n}t ms (GFLOP/s) | am_jax / torch {n}t"
                                                          for n in th) + " |",
           "|---|---|" + "---|---|" * len(th)]
  for row in out["rows_out"]:
    g = row["gflop"]
    cell = lambda k: f"{row['step_s'][k] * 1e3:.2f} ({g / row['step_s'][k]:.0f})"  # pylint: disable=cell-var-from-loop
    r = lambda n: row[f"jax_over_torch_{n}t"]  # pylint: disable=cell-var-from-loop
    lines.append(f"| {row['piece']} | {cell('am_jax')} | " + " | ".join(
        f"{cell(f'torch_{n}t')} | {r(n)['median']:.3f} ({r(n)['min']:.3f}-{r(n)['max']:.3f})" for n in th) + " |")
  return "\n".join(lines) + "\n"


def _load_average():
  try:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())
  except OSError:
    return "?"


def _write(prefix, out, md):
  common.write_json(prefix + ".json", out)
  with open(prefix + ".md", "w") as f:
    f.write(md)
  print(f"wrote {prefix}.md")


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  workloads = [w for w in f.workloads if w]
  if f.mode == "reference":
    common.jax_host_devices(f.jax_devices)
    out = run_reference(workloads, f.loss_times.split(","), tuple(int(n) for n in f.threads), f.rounds, f.iters,
                        f.torch_device, f.settle, f.chunk_loss, jax_devices=f.jax_devices)
    print(reference_markdown(out))
    name = f.out_name or ("torch_reference_cpu" if f.torch_device == "cpu" else "torch_reference_gpu")
    _write(os.path.join(f.out_dir, name), out, reference_markdown(out))
  elif f.mode == "xla":
    wl = [w for w in workloads if WORKLOADS[w]["kind"] == "mlp"]
    prefix = os.path.join(f.out_dir, "torch_reference_xla_cpu")
    out = run_xla_study(wl, f.loss_times.split(",")[0], list(f.flag_variants), f.torch_threads, f.rounds, f.iters,
                        f.passes, on_pass=lambda o: _write(prefix, o, xla_markdown(o)))
    print(xla_markdown(out))
  elif f.mode == "network":
    out = run_network(threads=tuple(int(n) for n in f.threads), rounds=f.rounds, iters=f.iters)
    print(network_markdown(out))
    _write(os.path.join(f.out_dir, f.out_name or "torch_reference_network_cpu"), out, network_markdown(out))
  elif f.mode == "xla_worker":
    res = run_xla_worker(workloads, f.loss_times.split(",")[0], list(f.variants), f.torch_threads, f.rounds, f.iters)
    print(json.dumps(res, default=float))
  else:
    raise ValueError(f"--mode must be reference, network, xla or xla_worker, got {f.mode!r}.")


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("mode", "reference", ["reference", "network", "xla", "xla_worker"], "What to run.")
  flags.DEFINE_list("workloads", list(WORKLOADS), f"Workloads among {list(WORKLOADS)}.")
  flags.DEFINE_string("loss_times", "m20,m40", f"Loss-time settings among {list(LOSS_TIMES)} (xla: the first).")
  flags.DEFINE_list("threads", ["1", "2"], "torch.set_num_threads settings to time.")
  flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
  flags.DEFINE_integer("iters", 2, "Timed calls per function and round.")
  flags.DEFINE_integer("settle", 1, "Untimed calls of each function at the start of every round after the first "
                       "(0: the first call after a switch of framework is timed too).")
  flags.DEFINE_string("out_dir", "benchmarks/results", "Where the .json / .md go.")
  flags.DEFINE_string("out_name", "", "File name (no suffix) of the results; default torch_reference_cpu / _gpu.")
  flags.DEFINE_string("torch_device", "cpu", "Device of the torch reference ('cpu' or 'cuda'; --threads is for "
                      "'cpu').  am_jax runs on jax's default device.")
  flags.DEFINE_list("flag_variants", list(XLA_FLAG_VARIANTS),
                    f"--mode=xla: XLA_FLAGS variants {list(XLA_FLAG_VARIANTS)}.")
  flags.DEFINE_list("variants", ["default"], f"--mode=xla_worker: in-process variants {list(IN_PROCESS_VARIANTS)}.")
  flags.DEFINE_integer("chunk_loss", 4, "am_jax's AMConfig.chunk_loss (loss time steps per chunk; must divide M) "
                       "in --mode=reference; 0: the loss in one call only.  The one-call step is timed beside it.")
  flags.DEFINE_integer("torch_threads", 1, "--mode=xla: torch threads of the yardstick.")
  flags.DEFINE_integer("jax_devices", 1, "--mode=reference: also time am_jax's step with the batch sharded over this "
                       "many devices (on a CPU: XLA host devices, one per core, set up here; 1: not).")
  flags.DEFINE_integer("passes", 2, "--mode=xla: alternating passes over the XLA_FLAGS variants.")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
