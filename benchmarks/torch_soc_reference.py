r"""A PyTorch eager reference of Adjoint Matching for SOC, and am_jax / torch per-iteration times (issue 16, item 5).

    python -m benchmarks.torch_soc_reference          # timing, 4 problems -> benchmarks/results/torch_soc_reference_cpu.*
    python -m benchmarks.torch_soc_reference --rounds=0 --floor_rounds=3 --train_iterations=500 \
        --train_losses=am,socm_adjoint                # each step against its network-work floor; train both from the
                                                      # same weights, am_jax's L2 metric on both (parts not run are
                                                      # kept from the results file)
    python -m benchmarks.torch_soc_reference --jax_devices=2   # also am_jax with the paths over 2 XLA host devices
                                                      # (one per core; set up before jax starts) in the same rounds

Needs the optional extra ``pip install -e ".[torch]"`` (any CPU build of torch >= 2.1); nothing in ``am_jax`` or the
default tests imports torch (``tests/test_torch_soc_reference.py`` is skipped without it).  The SOC-matching authors'
code (facebookresearch/SOC-matching) cannot be installed offline, so this re-implements their training step in torch
from the facts of their public code (network, initialisation, optimiser, loss definitions; nothing copied).

The problems are am_jax's (``am_jax.soc``: linear OU d = 10, quadratic OU easy / hard d = 20, double well d = 10,
T = 1, noise level 1) with the settings of ``configs/soc.py:<problem>,net=<net>``: ``net=socm`` (default here) is the
equal-architecture variant, i.e. SOC matching's control network ``soc_networks.SOCMatchingUNet`` (widths
(256, 128, 64), u = -sigma^T net(t, x), PyTorch-default init), Adam lr 1e-4 eps 1e-4, their batch and K
(linear OU B = 64, K = 100; quadratic B = 128, K = 50; double well B = 128, K = 200); ``net=default`` is am_jax's
own net where the torch side has it (``models.MLP`` with sinusoidal time features: linear OU, quadratic easy; the
``grad_g`` nets of quadratic hard / double well are not mirrored and those rows are skipped).  Both frameworks start
from the same weights (the am_jax initialisation, copied into torch).

The step (both frameworks, float32; ``soc.am_objective`` + Adam, the step of ``soc_training.make_train_step``):

1. rollout of the controlled SDE without gradient, Euler-Maruyama on t_k = k h,
   X_{k+1} = X_k + h (b(X_k) + sigma u(X_k, t_k)) + sqrt(nu h) sigma xi_k;
2. lean adjoint with the running cost by one VJP per step: a_K = grad g(X_K),
   a_k = a_{k+1} + h (grad_x b(X_k))^T a_{k+1} + h grad_x f(X_k);
3. AM regression L = (1/B) sum_b sum_{k<K} h |u(X_k, t_k) + sigma^T a_{k+1}|^2, one batched network call at the K B
   points;
4. gradient and one Adam step (optax.adam / torch.optim.Adam, same lr, eps; the config's schedule and clipping).

torch: ``torch.no_grad`` rollout (the authors' rollout runs with autograd on and detaches afterwards: more work for
torch, so the reference here is the faster of the two), ``torch.autograd.grad`` per VJP, ``loss.backward()``,
``torch.optim.Adam``.  am_jax: ``soc_training.make_train_step`` (one ``jax.jit``), as ``experiments/soc.py`` runs it.

``loss='socm_adjoint'`` is the authors' SOCM_adjoint loss as their code defines it (torch only; a second yardstick):
the same rollout, also accumulating the log importance weight of each path,
log w = sum_k [h / nu (-f(X_{k+1}) - |u_k|^2 / 2) - sqrt(h / nu) u_k . xi_k] - g(X_K) / nu (their f is evaluated at
the state after the step); the adjoint by the trapezoidal rule,
a_k = a_{k+1} + h [(grad f(X_k) + grad f(X_{k+1})) / 2 + ((grad b(X_k) + grad b(X_{k+1})) / 2)^T a_{k+1}] (two VJPs
per step here; they form the d x d Jacobians); the loss over all K + 1 points, X_k paired with a_k,
sum_{k<=K} sum_b w_b |u(X_k, t_k) + sigma^T a_k|^2 / ((K + 1) B), divided by a normalisation constant: the mean weight
of ``normalization_batches`` rollouts of the initial control (their 512), then after every step their running average
of the batch mean weight (``_ema``, coefficient 0.002).

``check_against_jax`` runs both frameworks from the same weights and the same draws (x0, xi of the am_jax objective's
key) and returns the loss, the gradients and the parameters after one Adam step of both (the test compares them).

Timing (``run_timing``): ``benchmarks.torch_reference.interleaved`` (wall and process CPU time, compile and warm-up
excluded; rounds alternate am_jax, torch AM with 1 and 2 threads, torch SOCM_adjoint); ratios per round, median and
range; CPU-time ratios are the robust ones on a shared machine.  Training (``run_training``): both frameworks train
from the same initial weights for N iterations (am_jax with ``soc_training.train_method``, the key schedule of
``experiments/soc.py``; torch with its own generator), and am_jax's metric ``soc.evaluate_control`` (L2 error
E int |u - u*|^2 dt on 1024 fixed paths of the learned control) is evaluated on both controls.  Floor
(``run_floor``): each framework's step interleaved with the network work it cannot avoid (K forwards at batch B, one
forward + backward at the K B loss points; ``jax_floor_runner`` / ``torch_floor_runner``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from am_jax import launch, soc, soc_training
from am_jax import sharding as sharding_lib
from benchmarks import common
from benchmarks import torch_reference as tr

PROBLEMS = ("linear_ou", "quadratic_easy", "quadratic_hard", "double_well")
NETS = ("socm", "default")
LOSSES = ("am", "socm_adjoint")
TORCH_NETS = ("socm", "mlp")  # control_net values mirrored in torch


def load_config(problem: str, net: str = "socm"):
  """``configs/soc.py:<problem>,net=<net>`` (``launch.load_config``, as ``experiments/soc.py`` reads it)."""
  return launch.load_config(f"soc.py:{problem},net={net}")


# ----------------------------------------------------------------------------------------------
# The am_jax side


@dataclasses.dataclass
class JaxSide:
  """One problem in am_jax: the config, the problem, the control net and the jitted train step."""

  name: str
  net: str
  config: object        # ml_collections.ConfigDict of configs/soc.py
  problem: soc.SOCProblem
  apply_fn: object
  params: object        # nnx State
  optimizer: object

  @property
  def batch(self) -> int:
    return int(self.config.batch_size)

  def objective(self):
    return soc_training.method_objective("am", self.config)

  def make_step(self, mesh=None):
    """``soc_training.make_train_step``: jitted ``step(params, opt_state, key) -> (params, opt_state, loss)``; with a
    mesh the paths are sharded over its devices (``--config.num_devices``)."""
    return soc_training.make_train_step(self.objective(), self.problem, self.apply_fn, self.optimizer, self.batch,
                                        mesh=mesh)


def build_jax(name: str, net: str = "socm", *, batch: int = 0, num_steps: int = 0, hidden=None, seed: int = 0,
              problem_kw: Optional[dict] = None, **config_overrides) -> JaxSide:
  """The am_jax side of problem ``name`` with ``configs/soc.py:<name>,net=<net>``; 0 / None keep the config's value.

  problem_kw: extra ``soc.get_problem`` arguments (smaller dim / reference tables for the tests).
  """
  config = load_config(name, net)
  if batch:
    config.batch_size = int(batch)
  if num_steps:
    config.num_steps = int(num_steps)
  if hidden:
    config.hidden = tuple(hidden)
  config.seed = int(seed)
  config.update(config_overrides)
  soc_training.validate_config(config)
  kw = dict(problem_kw or {})
  if config.num_steps:
    kw["num_steps"] = int(config.num_steps)
  problem = soc.get_problem(config.problem, **kw)
  apply_fn, params = soc_training.control_from_config(problem, config)
  return JaxSide(name, net, config, problem, apply_fn, params, soc_training.make_optimizer(config))


def jax_runner(side: JaxSide, mesh=None):
  """(run, compile_s): ``run()`` advances the am_jax train step by one step (the keys of ``train_method``); with a
  mesh, the step of ``--config.num_devices`` (paths sharded over the mesh, parameters replicated)."""
  step = side.make_step(mesh)
  params = jax.tree.map(jnp.copy, side.params)
  if mesh is not None:
    params = sharding_lib.replicate_tree(params, mesh)
  holder = [params, side.optimizer.init(params), jax.random.PRNGKey(side.config.seed + 1)]

  def run():
    holder[2], sub = jax.random.split(holder[2])
    holder[0], holder[1], loss = step(holder[0], holder[1], sub)
    return loss

  t0 = time.perf_counter()
  jax.block_until_ready(run())
  return run, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# The torch side


def _torch():
  import torch  # pylint: disable=g-import-not-at-top
  return torch


def _flat_state(pure, prefix=""):
  """Pure dict of an nnx net -> {'a.0.weight': (out, in), 'a.0.bias': ...} (numpy; torch.nn.Linear layout)."""
  out = {}
  for k, v in pure.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict) and "kernel" in v:
      out[name + ".weight"] = np.asarray(v["kernel"], np.float32).T
      out[name + ".bias"] = np.asarray(v["bias"], np.float32)
    elif isinstance(v, dict):
      out.update(_flat_state(v, name + "."))
  return out


def state_dict_of(params) -> dict:
  """nnx params (SOCMatchingUNet or models.MLP) -> torch state-dict entries as numpy float32."""
  return _flat_state(nnx.to_pure_dict(params))


def params_from_state_dict(template, state_dict):
  """The inverse of ``state_dict_of``: an nnx State like ``template`` holding the torch weights."""
  pure = nnx.to_pure_dict(template)

  def fill(d, prefix):
    for k, v in d.items():
      name = f"{prefix}{k}"
      if isinstance(v, dict) and "kernel" in v:
        v["kernel"] = jnp.asarray(np.asarray(state_dict[name + ".weight"], np.float32).T)
        v["bias"] = jnp.asarray(np.asarray(state_dict[name + ".bias"], np.float32))
      elif isinstance(v, dict):
        fill(v, name + ".")

  fill(pure, "")
  state = jax.tree.map(jnp.copy, template)
  nnx.replace_by_pure_dict(state, pure)
  return state


def torch_socm_net(dim: int, hidden):
  """``soc_networks.SOCMatchingUNet`` in torch: r_0 = (t, x), r_{i+1} = relu(D_i r_i); o_n = r_n,
  o_i = relu(U_i o_{i+1}) + S_i r_i; net = o_0 (module attributes down / skip / up as in am_jax)."""
  torch = _torch()
  hidden = tuple(int(h) for h in hidden)
  ins, outs = (dim + 1,) + hidden[:-1], (dim,) + hidden[:-1]

  class FullyConnectedUNet(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.down = torch.nn.ModuleList(torch.nn.Linear(i, h) for i, h in zip(ins, hidden))
      self.skip = torch.nn.ModuleList(torch.nn.Linear(i, o) for i, o in zip(ins, outs))
      self.up = torch.nn.ModuleList(torch.nn.Linear(h, o) for h, o in zip(hidden, outs))

    def forward(self, x, s):
      rs = [torch.cat([s[:, None], x], dim=-1)]
      for layer in self.down:
        rs.append(torch.relu(layer(rs[-1])))
      out = rs[-1]
      for i in reversed(range(len(self.up))):
        out = torch.relu(self.up[i](out)) + self.skip[i](rs[i])
      return out

  return FullyConnectedUNet()


@dataclasses.dataclass
class TorchProblem:
  """An ``soc.SOCProblem`` in torch (float32 constants copied from ``problem.info``); time-independent b, sigma, f."""

  drift: object          # (x (B, d)) -> (B, d)
  running_cost: object   # (x) -> (B,), or None where f = 0
  terminal_cost: object  # (x) -> (B,)
  sigma: object          # (d, d) tensor, or (d,) for a diagonal sigma
  x0: object             # (d,) tensor: every path starts there


def torch_problem(problem: soc.SOCProblem, device="cpu") -> TorchProblem:
  """The four benchmarks of ``soc.get_problem`` (by name), from the constants am_jax drew (tensors on ``device``)."""
  torch = _torch()
  info = problem.info
  f32 = lambda a: torch.from_numpy(np.array(a, np.float32)).to(device)  # noqa: E731  (a writable copy)
  d = problem.dim
  if problem.name == "linear_ou":
    A, omega = f32(info["A"]), f32(info["omega"])
    return TorchProblem(lambda x: x @ A.T, None, lambda x: x @ omega, f32(info["sigma"]), torch.zeros(d, device=device))
  if problem.name in ("quadratic_easy", "quadratic_hard"):
    A, P, Q = f32(info["A"]), f32(info["P"]), f32(info["Q"])
    return TorchProblem(lambda x: x @ A.T, lambda x: torch.sum((x @ P) * x, -1), lambda x: torch.sum((x @ Q) * x, -1),
                        f32(info["sigma"]), f32(info["x0"]))
  if problem.name == "double_well":
    kappa, nu = f32(info["kappa"]), f32(info["nu"])
    return TorchProblem(lambda x: -4.0 * kappa * x * (x * x - 1.0), None,
                        lambda x: torch.sum(nu * (x * x - 1.0) ** 2, -1), torch.ones(d, device=device),
                        torch.zeros(d, device=device))
  raise ValueError(f"torch_problem: unknown SOC problem {problem.name!r}; expected one of {PROBLEMS}.")


def _ema(value, ema, itr, coeff=0.002):
  """Their running average: the value at itr 0, the plain mean of the first 1 / coeff values, then an EMA."""
  if itr == 0:
    return value
  if itr <= int(math.floor(1.0 / coeff)):
    return (value + itr * ema) / (itr + 1)
  return coeff * value + (1.0 - coeff) * ema


class TorchSOC:
  """The AM (or SOCM_adjoint) training step of ``side`` in PyTorch eager: same problem, net, weights, optimiser.

  device: torch device of the net, the draws and every tensor of the step ('cpu', 'cuda').
  """

  def __init__(self, side: JaxSide, loss: str = "am", seed: int = 0, normalization_batches: int = 16,
               device="cpu"):
    torch = self.torch = _torch()
    self.device = dev = torch.device(device)
    cfg, problem = side.config, side.problem
    if loss not in LOSSES:
      raise ValueError(f"TorchSOC: loss = {loss!r}; expected one of {LOSSES}.")
    if cfg.control_net not in TORCH_NETS or cfg.time_feature != "linear":
      raise NotImplementedError(f"TorchSOC mirrors control_net in {TORCH_NETS} with time_feature='linear' only "
                                f"(config.control_net = {cfg.control_net!r}, time_feature = {cfg.time_feature!r}).")
    if loss == "am" and cfg.td_lambda != 1.0:
      raise NotImplementedError(f"TorchSOC mirrors plain AM only (config.td_lambda = {cfg.td_lambda!r}).")
    self.side, self.loss_name = side, loss
    self.k_steps, self.b, self.d = problem.num_steps, side.batch, problem.dim
    self.h = float(problem.dt)
    self.nu = float(problem.noise_level)
    self.noise_scale = float(np.sqrt(np.float32(self.nu * self.h)))  # = am_jax's float32 sqrt(nu h)
    self.ts = [float(t) for t in np.asarray(problem.times())]      # the float32 grid of am_jax
    self.time_scale = float(cfg.time_scale)
    self.tp = torch_problem(problem, dev)
    self.dense_sigma = self.tp.sigma.ndim == 2
    if cfg.control_net == "socm":
      self.net, self.net_predicts_grad_v = torch_socm_net(self.d, cfg.hidden).to(dev), True
    else:
      self.net, self.net_predicts_grad_v = tr.torch_mlp(self.d, cfg.hidden).to(dev), False
    self.load(state_dict_of(side.params))
    self.opt = torch.optim.Adam(self.net.parameters(), lr=float(cfg.learning_rate), eps=float(cfg.adam_eps))
    self.sched = None
    if cfg.lr_schedule == "cosine":  # optax.cosine_decay_schedule(lr, num_iterations, alpha=lr_final_fraction)
      n, alpha = int(cfg.num_iterations), float(cfg.lr_final_fraction)
      self.sched = torch.optim.lr_scheduler.LambdaLR(
          self.opt, lambda c: (1 - alpha) * 0.5 * (1 + math.cos(math.pi * min(c, n) / n)) + alpha)
    self.grad_clip = float(cfg.grad_clip)
    self.gen = torch.Generator(device=dev).manual_seed(seed)
    self.itr = 0
    self.normalization_const = None
    if loss == "socm_adjoint":
      with torch.no_grad():
        self.normalization_const = float(torch.mean(torch.cat(
            [self._rollout(*self.draws(), weights=True)[2] for _ in range(normalization_batches)])))

  # -- weights

  def load(self, state_dict_np: dict):
    torch = self.torch
    self.net.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state_dict_np.items()},
                             strict=False)  # copies into the parameters on their device

  def state_dict_np(self) -> dict:
    return {k: v.detach().cpu().numpy().copy() for k, v in self.net.state_dict().items()
            if not k.startswith("freqs")}

  def jax_params(self):
    """The torch weights as an nnx State for ``side.apply_fn`` (am_jax's evaluation of the torch control)."""
    return params_from_state_dict(self.side.params, self.state_dict_np())

  # -- the pieces

  def _sigma(self, u):
    """sigma u, row-wise."""
    return u @ self.tp.sigma.T if self.dense_sigma else u * self.tp.sigma

  def _sigma_t(self, a):
    """sigma^T a, row-wise."""
    return a @ self.tp.sigma if self.dense_sigma else a * self.tp.sigma

  def control(self, x, s):
    """u(x, t) for x (N, d) and the net's time input s (N,) = time_scale t."""
    out = self.net(x, s)
    return -self._sigma_t(out) if self.net_predicts_grad_v else out

  def draws(self):
    """(x0 (B, d), xi (K, B, d)) drawn with torch's generator (the timed and trained steps)."""
    torch = self.torch
    x0 = self.tp.x0.expand(self.b, self.d).contiguous()
    return x0, torch.randn(self.k_steps, self.b, self.d, generator=self.gen, device=self.device)

  def _rollout(self, x0, xi, weights=False):
    """Euler-Maruyama of the current control without gradient -> (traj list of K + 1 (B, d), controls, weight)."""
    torch, h, dev = self.torch, self.h, self.device
    with torch.no_grad():
      x, traj, us = x0, [x0], []
      log_w = torch.zeros(self.b, device=dev) if weights else None
      for k in range(self.k_steps):
        u = self.control(x, torch.full((self.b,), self.time_scale * self.ts[k], device=dev))
        x = x + h * (self.tp.drift(x) + self._sigma(u)) + self.noise_scale * self._sigma(xi[k])
        traj.append(x)
        us.append(u)
        if weights:  # their path weight (running cost at the state after the step)
          f = self.tp.running_cost(x) if self.tp.running_cost is not None else 0.0
          log_w = log_w + h / self.nu * (-f - 0.5 * torch.sum(u * u, -1)) - math.sqrt(h / self.nu) * torch.sum(
              u * xi[k], -1)
      w = torch.exp(log_w - self.tp.terminal_cost(x) / self.nu) if weights else None
    return traj, us, w

  def _vjp(self, x, a):
    """(grad_x b(x))^T a + grad_x f(x), one VJP (f = 0: b only)."""
    torch = self.torch
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
      if self.tp.running_cost is None:
        (g,) = torch.autograd.grad(self.tp.drift(x), x, a)
      else:
        (g,) = torch.autograd.grad((self.tp.drift(x), self.tp.running_cost(x).sum()), x,
                                   (a, torch.ones((), device=self.device)))
    return g

  def _terminal_adjoint(self, x):
    torch = self.torch
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
      (g,) = torch.autograd.grad(self.tp.terminal_cost(x).sum(), x)
    return g

  def lean_adjoint(self, traj):
    """a_K = grad g(X_K), a_k = a_{k+1} + h ((grad b_k)^T a_{k+1} + grad f_k): list of K + 1 (B, d)."""
    a = self._terminal_adjoint(traj[-1])
    adj = [None] * (self.k_steps + 1)
    adj[-1] = a
    for k in range(self.k_steps - 1, -1, -1):
      a = a + self.h * self._vjp(traj[k], a)
      adj[k] = a
    return adj

  def trapezoid_adjoint(self, traj):
    """Their SOCM_adjoint recursion: a_k = a_{k+1} + h/2 [J_k + J_{k+1}] with J_j = (grad b_j)^T a_{k+1} + grad f_j."""
    a = self._terminal_adjoint(traj[-1])
    adj = [None] * (self.k_steps + 1)
    adj[-1] = a
    for k in range(self.k_steps - 1, -1, -1):
      a = a + 0.5 * self.h * (self._vjp(traj[k], a) + self._vjp(traj[k + 1], a))
      adj[k] = a
    return adj

  def _on_grid(self, states, num_times):
    """u at every (k, b) of states (n K-steps stacked (n, B, d)) in one batched call -> (n B, d)."""
    torch = self.torch
    s = torch.repeat_interleave(torch.tensor([self.time_scale * t for t in self.ts[:num_times]], device=self.device),
                                self.b)
    return self.control(torch.cat(states), s)

  def loss(self, x0, xi):
    """The training loss (a graph to the net's parameters) from the draws (x0, xi; moved to the device)."""
    torch = self.torch
    x0, xi = x0.to(self.device), xi.to(self.device)
    if self.loss_name == "am":
      traj, _, _ = self._rollout(x0, xi)
      adj = self.lean_adjoint(traj)
      target = -self._sigma_t(torch.cat(adj[1:]))          # pairs X_k with a_{k+1}
      u = self._on_grid(traj[:-1], self.k_steps)
      return self.h * torch.sum((u - target) ** 2) / self.b
    traj, _, w = self._rollout(x0, xi, weights=True)
    adj = self.trapezoid_adjoint(traj)
    target = -self._sigma_t(torch.cat(adj))                  # all K + 1 points, X_k with a_k
    u = self._on_grid(traj, self.k_steps + 1)
    wk = w.repeat(self.k_steps + 1)[:, None]
    self.normalization_const = _ema(float(torch.mean(w)), self.normalization_const, self.itr)
    return torch.sum((u - target) ** 2 * wk) / ((self.k_steps + 1) * self.b) / self.normalization_const

  def step(self, draws=None) -> float:
    """One training step (gradient + Adam); returns the loss as a float."""
    loss = self.loss(*(draws or self.draws()))
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    if self.grad_clip:
      self.torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
    self.opt.step()
    if self.sched is not None:
      self.sched.step()
    self.itr += 1
    return loss.detach().item()

  def grads(self) -> dict:
    return {name: p.grad.detach().cpu().numpy().copy() for name, p in self.net.named_parameters()}


def torch_supported(config) -> Optional[str]:
  """None if TorchSOC mirrors this config's AM step, else why not (one line)."""
  if config.control_net not in TORCH_NETS:
    return f"control_net={config.control_net!r} is not mirrored in torch"
  if config.time_feature != "linear":
    return f"time_feature={config.time_feature!r} is not mirrored in torch"
  if config.td_lambda != 1.0:
    return f"td_lambda={config.td_lambda} (TD(lambda) adjoint) is not mirrored in torch"
  return None


# ----------------------------------------------------------------------------------------------
# Same numbers


def check_against_jax(name: str, net: str = "socm", key=None, device="cpu", **build_kw) -> dict:
  """Loss, gradients and one Adam step of am_jax and of the torch reference from the same weights and draws.

  Returns {'loss': (jax, torch), 'grads': {param: (jax, torch)}, 'params_after': {param: (jax, torch)}} (numpy,
  torch layout and names).  ``build_kw``: ``build_jax`` keywords (smaller sizes); ``device``: the torch side's.
  """
  side = build_jax(name, net, **build_kw)
  # Zero-initialised layers (am_jax's output layers) get small random values: every gradient is then non-zero.
  leaves, treedef = jax.tree.flatten(side.params)
  keys = jax.random.split(jax.random.PRNGKey(11), len(leaves))
  side.params = jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape, x.dtype) if not jnp.any(x) else x
                                             for k, x in zip(keys, leaves)])
  key = jax.random.PRNGKey(7) if key is None else key
  torch = _torch()
  objective = side.objective()

  @jax.jit
  def jax_side(params, key):  # one compilation: the draws, loss and gradient, one optimiser step
    (loss, _), grads = jax.value_and_grad(
        lambda p: objective(side.apply_fn, p, side.problem, key, side.batch), has_aux=True)(params)
    new = optax.apply_updates(params, side.optimizer.update(grads, side.optimizer.init(params), params)[0])
    return soc.draw_initial_and_noise(side.problem, key, side.batch), loss, grads, new

  (x0, xi), loss_j, grads_j, new_j = jax_side(side.params, key)
  ref = TorchSOC(side, device=device)
  loss_t = ref.loss(torch.from_numpy(np.array(x0)), torch.from_numpy(np.array(xi)))
  ref.opt.zero_grad(set_to_none=True)
  loss_t.backward()
  grads_t = ref.grads()
  ref.opt.step()
  sd_g, sd_new = state_dict_of(grads_j), state_dict_of(new_j)
  after_t = {n: p.detach().cpu().numpy().copy() for n, p in ref.net.named_parameters()}
  return {"loss": (float(loss_j), loss_t.detach().item()),
          "grads": {n: (sd_g[n], grads_t[n]) for n in sd_g},
          "params_after": {n: (sd_new[n], after_t[n]) for n in sd_g}}


# ----------------------------------------------------------------------------------------------
# Timing


torch_runner = tr.torch_runner  # any reference with .torch and .step(): ``ref.step`` at a torch thread count


def _speedups(times, num, den, key):
  """Per-round den / num (> 1: num faster) of the interleaved round medians."""
  return tr._summary([b / a for a, b in zip(times[num][key], times[den][key])])  # pylint: disable=protected-access


def run_timing(problems, nets=("socm",), threads=(1, 2), rounds=5, iters=2, socm_adjoint=True, device="cpu",
               jax_devices: int = 1) -> dict:
  """am_jax (jax's default device) against torch on ``device`` (CPU: one AM run per thread count in ``threads``).

  jax_devices > 1: also am_jax's step with the paths sharded over that many devices (``--config.num_devices``; on a
  CPU, XLA host devices, one per core: ``common.jax_host_devices``), timed in the same rounds ("am_jax_<n>dev").
  """
  torch = _torch()
  settings = tr.torch_settings(threads, device)
  mesh = sharding_lib.make_mesh(jax_devices) if jax_devices > 1 else None
  out = {"jax_devices": jax_devices, "machine": common.machine_info(), "torch": torch.__version__,
         "threads": list(settings),
         "torch_device": tr._device_name(device), "jax_device": jax.devices()[0].device_kind,  # pylint: disable=protected-access
         "rounds": rounds, "iters": iters, "load_average": tr._load_average(), "rows": [], "skipped": []}  # pylint: disable=protected-access
  for net in nets:
    for name in problems:
      side = build_jax(name, net)
      why = torch_supported(side.config)
      if why:
        out["skipped"].append({"problem": name, "net": net, "why": why})
        print(f"{name} net={net}: skipped ({why})", flush=True)
        continue
      runs = {}
      runs["am_jax"], compile_s = jax_runner(side)
      multi = f"am_jax_{jax_devices}dev"
      if mesh is not None:
        runs[multi] = jax_runner(side, mesh)[0]
      if side.config.get("chunk_loss", 0):  # the same step with the loss in one call at all K B rows, beside it
        runs["am_jax_one_call"] = jax_runner(build_jax(name, net, chunk_loss=0))[0]
      for label, n in settings.items():
        if n is not None:
          torch.set_num_threads(n)
        ref = TorchSOC(side, device=device)
        ref.step()  # warm-up (allocator, thread pool, CUDA context and kernels)
        runs[f"torch_am_{label}"] = torch_runner(ref, n)
      if socm_adjoint:
        label, n = next(iter(settings.items()))
        if n is not None:
          torch.set_num_threads(n)
        ref = TorchSOC(side, "socm_adjoint", device=device)
        ref.step()
        runs[f"torch_socm_adjoint_{label}"] = torch_runner(ref, n)
      times = tr.interleaved(runs, rounds, iters)
      cfg = side.config
      row = {"problem": name, "net": net, "control_net": cfg.control_net, "hidden": list(cfg.hidden),
             "dim": side.problem.dim, "num_steps": side.problem.num_steps, "batch": side.batch,
             "num_params": sum(int(np.size(v)) for v in state_dict_of(side.params).values()),
             "compile_s": compile_s, "step_s": {k: v["median_s"] for k, v in times.items()},
             "cpu_s": {k: v["cpu_median_s"] for k, v in times.items()}, "times": times, "speedup": {}}
      for other in runs:
        if other not in ("am_jax", multi):
          row["speedup"][other] = {"wall": _speedups(times, "am_jax", other, "round_medians_s"),
                                   "cpu": _speedups(times, "am_jax", other, "cpu_round_medians_s")}
      am_runs = [f"torch_am_{label}" for label in settings]
      for key, label in (("round_medians_s", "wall"), ("cpu_round_medians_s", "cpu")):
        best = [min(times[r][key][i] for r in am_runs) for i in range(rounds)]
        row["speedup"].setdefault("best_torch_am", {})[label] = tr._summary(  # pylint: disable=protected-access
            [b / a for a, b in zip(times["am_jax"][key], best)])
        if "am_jax_one_call" in times:
          row.setdefault("one_call_speedup_best_torch_am", {})[label] = tr._summary(  # pylint: disable=protected-access
              [b / a for a, b in zip(times["am_jax_one_call"][key], best)])
        if multi in times:
          row.setdefault("multi_device", {"devices": jax_devices, "speedup": {}}).setdefault(
              "best_torch_am", {})[label] = tr._summary([b / a for a, b in zip(times[multi][key], best)])  # pylint: disable=protected-access
      if multi in times:
        for other in runs:
          if other != multi:
            row["multi_device"]["speedup"][other] = {"wall": _speedups(times, multi, other, "round_medians_s"),
                                                     "cpu": _speedups(times, multi, other, "cpu_round_medians_s")}
      row["chunk_loss"] = int(side.config.get("chunk_loss", 0))
      out["rows"].append(row)
      print(_line(row), flush=True)
  return out


def _line(row):
  s = row["step_s"]
  parts = [f"{row['problem']:15s} net={row['net']:7s} am_jax {1e3 * s['am_jax']:8.1f} ms"]
  for k, v in row["speedup"].items():
    if k in s:
      parts.append(f"{k} {1e3 * s[k]:8.1f} ms: x{v['wall']['median']:.2f} wall, x{v['cpu']['median']:.2f} cpu")
  if "multi_device" in row:
    best = row["multi_device"]["best_torch_am"]
    parts.append(f"on {row['multi_device']['devices']} devices vs faster torch AM: x{best['wall']['median']:.2f} wall, "
                 f"x{best['cpu']['median']:.2f} cpu")
  return "  |  ".join(parts)


def _fmt(summary):
  return f"{summary['median']:.2f} ({summary['min']:.2f}-{summary['max']:.2f})"


def _settle(out) -> int:
  """Untimed calls per round of a timing result (``tr.interleaved``'s settle; 0 in files written before it)."""
  times = out["rows"][0]["times"] if out.get("rows") else {}
  return next(iter(times.values()), {}).get("settle", 0)


def timing_markdown(out) -> str:
  m = out["machine"]
  threads = tr._labels(out)  # pylint: disable=protected-access
  on = f"am_jax on {out.get('jax_device', 'cpu')}, torch on {out.get('torch_device', 'cpu')}"
  lines = [
      f"## Per-iteration time, am_jax vs PyTorch eager, equal architecture ({on})", "",
      f"`python -m benchmarks.torch_soc_reference`; {m['date']}, {m['machine']}, jax {m['jax']}, torch {out['torch']}; "
      f"{out['rounds']} interleaved rounds x {out['iters']} calls ({_settle(out)} untimed call(s) first in each round), "
      "compile and warm-up excluded.  Speed-up = torch / "
      "am_jax of the round medians per round (> 1: am_jax faster), median (min-max) over the rounds, in process CPU "
      "time (all threads; robust to other jobs) and wall clock.  Load average at the start: "
      f"{out.get('load_average', '?')}.", "",
      "| problem | net (params) | K | B | am_jax ms, CPU | "
      + " | ".join(f"torch AM {n} ms, CPU | speed-up vs torch AM {n}, CPU | wall" for n in threads)
      + " | speed-up vs faster torch AM, CPU | torch SOCM_adjoint ms, CPU | speed-up vs it, CPU |",
      "|---|---|---|---|---|" + "---|---|---|" * len(threads) + "---|---|---|"]
  for row in out["rows"]:
    c, sp = row["cpu_s"], row["speedup"]
    cells = [row["problem"], f"{row['control_net']} ({row['num_params']:,})", str(row["num_steps"]), str(row["batch"]),
             f"{1e3 * c['am_jax']:.1f}"]
    for n in threads:
      k = f"torch_am_{n}"
      cells += [f"{1e3 * c[k]:.1f}", _fmt(sp[k]["cpu"]), _fmt(sp[k]["wall"])]
    cells.append(_fmt(sp["best_torch_am"]["cpu"]))
    adj = [k for k in sp if k.startswith("torch_socm_adjoint")]
    cells += [f"{1e3 * c[adj[0]]:.1f}", _fmt(sp[adj[0]]["cpu"])] if adj else ["-", "-"]
    lines.append("| " + " | ".join(cells) + " |")
  one_call = [row for row in out["rows"] if "one_call_speedup_best_torch_am" in row]
  if one_call:
    lines += ["", "am_jax's step above evaluates the AM loss in chunks of time steps (`config.chunk_loss`, "
              "`soc.am_loss(chunk_steps=...)`); the same step with the loss in one call at all K B rows, in the same "
              "rounds:", "", "| problem | net | chunk_loss | one call ms, CPU | speed-up of the chunked step over it, "
              "wall | one call: speed-up vs faster torch AM, CPU | wall |", "|---|---|---|---|---|---|---|"]
    for row in one_call:
      sp, oc = row["speedup"]["am_jax_one_call"], row["one_call_speedup_best_torch_am"]
      lines.append(f"| {row['problem']} | {row['net']} | {row['chunk_loss']} | "
                   f"{1e3 * row['cpu_s']['am_jax_one_call']:.1f} | {_fmt(sp['wall'])} | {_fmt(oc['cpu'])} | "
                   f"{_fmt(oc['wall'])} |")
  multi = [row for row in out["rows"] if "multi_device" in row]
  if multi:
    n = multi[0]["multi_device"]["devices"]
    lines += ["", f"am_jax's step with the paths sharded over {n} devices (`--jax_devices={n}`: XLA host devices, one "
              "per core, `--config.num_devices`), in the same rounds.  Wall clock is the measure here (its point is "
              "to keep both cores busy, and CPU time counts both); speed-up = torch / am_jax on "
              f"{n} devices, median (min-max) over the rounds.  The one-device step of such a run can be slower than "
              "in a process of one device (1.03-1.29x on these steps in the second of two runs of 2026-11-27, up to 1.6x on "
              "benchmarks/torch_reference's MLP): "
              "for the gain over one device, compare with a run without `--jax_devices`:", "",
              f"| problem | net | am_jax ms, wall | am_jax on {n} devices ms, wall | its speed-up over 1 device, wall | "
              + " | ".join(f"vs torch AM {t}, wall | CPU" for t in threads) + " | vs faster torch AM, wall | CPU |",
              "|---|---|---|---|---|" + "---|---|" * len(threads) + "---|---|"]
    for row in multi:
      md, w = row["multi_device"], row["step_s"]
      key = f"am_jax_{md['devices']}dev"
      cells = [row["problem"], row["net"], f"{1e3 * w['am_jax']:.1f}", f"{1e3 * w[key]:.1f}",
               _fmt(md["speedup"]["am_jax"]["wall"])]
      for t in threads:
        sp = md["speedup"][f"torch_am_{t}"]
        cells += [_fmt(sp["wall"]), _fmt(sp["cpu"])]
      cells += [_fmt(md["best_torch_am"]["wall"]), _fmt(md["best_torch_am"]["cpu"])]
      lines.append("| " + " | ".join(cells) + " |")
  for s in out.get("skipped", []):
    lines.append(f"\n{s['problem']} net={s['net']}: skipped ({s['why']}).")
  slow = [n for n in threads[1:] if n.endswith("t") and threads[0].endswith("t") and all(r["cpu_s"][f"torch_am_{n}"] > 3 * r["cpu_s"][f"torch_am_{threads[0]}"]
                                        for r in out["rows"])]
  if slow:
    lines.append(f"\ntorch with {', '.join(n[:-1] for n in slow)} threads used > 3x the CPU time of {threads[0][:-1]} thread on "
                 "every problem: on the loaded 2-core machine its OpenMP workers spin-wait for descheduled partners "
                 "(docs/performance.md section 12.8), so those columns measure the machine's load, not torch; the "
                 f"{threads[0][:-1]}-thread columns are the yardstick.")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The network-work floor of a step (what no framework can avoid)


FLOOR_PARTS = ("all", "rollout", "loss_fwd", "loss")  # all = rollout + loss


def jax_floor_runner(side: JaxSide, part: str = "all", mesh=None):
  """(run, compile_s) of the network work of one AM step with no solver around it, jitted.

  part: 'rollout' = K forwards of the control at batch B (a scan carrying x <- x + h u, so none can be dropped);
  'loss' = value_and_grad of sum |u|^2 at the K B loss points (fixed random states); 'loss_fwd' = its forward only;
  'all' = rollout + loss (the floor).  mesh: the rollout's B paths sharded over its devices (part 'rollout' only:
  what the rollout of the multi-device step costs).
  """
  if mesh is not None and part != "rollout":
    raise ValueError(f"jax_floor_runner: a mesh is for part 'rollout', got part {part!r}.")
  problem, apply_fn, b = side.problem, side.apply_fn, side.batch
  h, ts = problem.dt, problem.times()[:-1]
  x0 = jnp.zeros((b, problem.dim), jnp.float32)
  params = side.params
  if mesh is not None:
    x0, params = jax.device_put(x0, sharding_lib.batch_sharding(mesh, 2, 0)), sharding_lib.replicate_tree(params, mesh)
  xs = jax.random.normal(jax.random.PRNGKey(3), (problem.num_steps * b, problem.dim), jnp.float32)
  tl = jnp.repeat(ts, b)

  @jax.jit
  def floor(params, x0):
    out = {}
    if part in ("all", "rollout"):
      def fwd(x, t):
        return x + h * apply_fn(params, x, jnp.full((x.shape[0],), t)), None

      out["x_end"] = jax.lax.scan(fwd, x0, ts)[0]
    if part in ("all", "loss"):
      out["loss"], out["grads"] = jax.value_and_grad(lambda p: jnp.sum(apply_fn(p, xs, tl) ** 2))(params)
    if part == "loss_fwd":
      out["u"] = apply_fn(params, xs, tl)
    return out

  t0 = time.perf_counter()
  jax.block_until_ready(floor(params, x0))
  return (lambda: floor(params, x0)), time.perf_counter() - t0


def forward_flops(side: JaxSide) -> float:
  """XLA's FLOP count (``cost_analysis``) of one control forward at the K B loss points: one network "unit"."""
  problem, b = side.problem, side.batch
  xs = jnp.zeros((problem.num_steps * b, problem.dim), jnp.float32)
  tl = jnp.zeros((problem.num_steps * b,), jnp.float32)
  cost = jax.jit(side.apply_fn).lower(side.params, xs, tl).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def dot_peak_flops(n: int = 2048, reps: int = 7) -> float:
  """FLOP/s of XLA's n x n float32 matmul on all the cores it uses (best of ``reps`` timed calls): the rate no
  network evaluation beats on this machine."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda m: m @ m)
  jax.block_until_ready(f(a))
  best = math.inf
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best


def step_lower_bound(rollout_wall_s: float, unit_flops: float, peak_flops: float) -> dict:
  """Lower bounds on the wall time of an AM step whose rollout is as measured (``rollout_wall_s``).

  The rollout is sequential (X_{k+1} needs u(X_k)) and on one XLA device its K forwards at batch B run on one core
  (measured: CPU time = wall time; B = 64-128 rows are too few to split a dot across cores profitably), so it is
  taken as measured (on N host devices: the rollout over the mesh, each device's paths on its own core).
  The loss gradient needs at least the backward of the network at the K B loss points, 2 units of
  ``unit_flops`` (input and weight cotangents) if its forward were reused from the rollout, 3 units with the
  forward recomputed (what am_jax and torch do), each at no more than ``peak_flops`` (all cores).
  """
  return {"rollout_wall_s": rollout_wall_s, "unit_flops": unit_flops, "peak_flops": peak_flops,
          "rollout_flops_per_s": unit_flops / rollout_wall_s,
          "bound_reuse_s": rollout_wall_s + 2.0 * unit_flops / peak_flops,
          "bound_recompute_s": rollout_wall_s + 3.0 * unit_flops / peak_flops}


def torch_floor_runner(ref: TorchSOC, threads: Optional[int], part: str = "all"):
  """The same network work in torch eager (``jax_floor_runner``'s parts): no-grad forwards, one forward (+ backward);
  on ``ref.device`` (threads None: leave torch's CPU thread count)."""
  torch, dev = ref.torch, ref.device
  xs = torch.randn(ref.k_steps * ref.b, ref.d, generator=torch.Generator().manual_seed(3)).to(dev)
  tl = torch.repeat_interleave(torch.tensor([ref.time_scale * t for t in ref.ts[:-1]], device=dev), ref.b)

  def run():
    if threads is not None and torch.get_num_threads() != threads:
      torch.set_num_threads(threads)
    out = 0.0
    if part in ("all", "rollout"):
      with torch.no_grad():
        x = torch.zeros(ref.b, ref.d, device=dev)
        for k in range(ref.k_steps):
          x = x + ref.h * ref.control(x, torch.full((ref.b,), ref.time_scale * ref.ts[k], device=dev))
      out += float(x[0, 0])
    if part in ("all", "loss"):
      ref.net.zero_grad(set_to_none=True)
      loss = torch.sum(ref.control(xs, tl) ** 2)
      loss.backward()
      out += loss.detach().item()
    if part == "loss_fwd":
      with torch.no_grad():
        out += float(ref.control(xs, tl)[0, 0])
    return out

  return run


def run_floor(problems, rounds=5, iters=2, net="socm", threads=1, parts=("all",), device="cpu",
              jax_devices: int = 1) -> dict:
  """am_jax and torch (``threads``; on ``device``) steps interleaved with their network-work floors (and the floors'
  ``parts``); CPU-time ratios per round (on a GPU: wall-clock ratios, ``wall``).

  jax_devices > 1 (with 'rollout' in parts): also am_jax's step and its rollout with the paths sharded over that many
  devices, and the lower bound with that rollout (``bound_multi``).
  """
  torch = _torch()
  on_cpu = torch.device(device).type == "cpu"
  if on_cpu:
    torch.set_num_threads(threads)
  else:
    threads = None
  out = {"machine": common.machine_info(), "torch": torch.__version__, "threads": threads,
         "torch_device": tr._device_name(device), "jax_device": jax.devices()[0].device_kind,  # pylint: disable=protected-access
         "rounds": rounds,
         "iters": iters, "net": net, "parts": list(parts), "load_average": tr._load_average(), "rows": [],  # pylint: disable=protected-access
         "jax_devices": jax_devices}
  mesh = sharding_lib.make_mesh(jax_devices) if jax_devices > 1 and "rollout" in parts else None
  multi, multi_rollout = f"am_jax_{jax_devices}dev", f"am_jax_floor_rollout_{jax_devices}dev"
  for name in problems:
    side = build_jax(name, net)
    if torch_supported(side.config):
      continue
    ref = TorchSOC(side, device=device)
    runs = {"am_jax": jax_runner(side)[0], "torch_am": torch_runner(ref, threads)}
    for part in parts:
      suffix = "" if part == "all" else "_" + part
      runs["am_jax_floor" + suffix] = jax_floor_runner(side, part)[0]
      runs["torch_floor" + suffix] = torch_floor_runner(TorchSOC(side, device=device), threads, part)
    if mesh is not None:
      runs[multi], runs[multi_rollout] = jax_runner(side, mesh)[0], jax_floor_runner(side, "rollout", mesh)[0]
    times = tr.interleaved(runs, rounds, iters)
    key = "cpu_round_medians_s" if on_cpu else "round_medians_s"  # a GPU's work is not the host's CPU time
    ratio = lambda a, b: tr._summary([x / y for x, y in zip(times[a][key], times[b][key])])  # noqa: E731  pylint: disable=protected-access
    row = {"problem": name, "net": net, "num_steps": side.problem.num_steps, "batch": side.batch,
           "cpu_s": {k: v["cpu_median_s"] for k, v in times.items()}, "times": times,
           "wall_s": {k: v["median_s"] for k, v in times.items()}, "ratio_clock": "cpu" if on_cpu else "wall"}
    if "all" in parts:
      row.update(am_jax_over_floor=ratio("am_jax", "am_jax_floor"), torch_over_floor=ratio("torch_am", "torch_floor"),
                 torch_floor_over_am_jax_floor=ratio("torch_floor", "am_jax_floor"))
    row["torch_over_am_jax"] = {p: ratio("torch_floor" + ("" if p == "all" else "_" + p),
                                         "am_jax_floor" + ("" if p == "all" else "_" + p)) for p in parts}
    row["torch_over_am_jax"]["step"] = ratio("torch_am", "am_jax")
    if "rollout" in parts:
      rollout = times["am_jax_floor_rollout"]
      row["bound"] = step_lower_bound(rollout["median_s"], forward_flops(side), out.setdefault("peak_flops",
                                                                                                dot_peak_flops()))
      row["bound"]["rollout_cpu_over_wall"] = rollout["cpu_median_s"] / rollout["median_s"]
      if mesh is not None:
        rollout = times[multi_rollout]
        row["bound_multi"] = dict(step_lower_bound(rollout["median_s"], row["bound"]["unit_flops"], out["peak_flops"]),
                                  devices=jax_devices, rollout_cpu_over_wall=rollout["cpu_median_s"] / rollout["median_s"])
    out["rows"].append(row)
    print(f"{name}: cpu ms " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in row["cpu_s"].items())
          + "; torch / am_jax " + ", ".join(f"{k} {_fmt(v)}" for k, v in row["torch_over_am_jax"].items()), flush=True)
  return out


def floor_markdown(out) -> str:
  m = out["machine"]
  wall = out["rows"][0].get("ratio_clock") == "wall" if out["rows"] else False
  clock, times_of = ("wall-clock", "wall_s") if wall else ("CPU time", "cpu_s")
  torch_on = (f"torch on {out['torch_device']}" if wall else f"torch ({out['threads']} thread)")
  lines = [
      f"## Where the time goes: each step against its network-work floor ({clock})", "",
      f"`python -m benchmarks.torch_soc_reference --rounds=0 --floor_rounds={out['rounds']} "
      f"--floor_parts={','.join(out.get('parts', ['all']))}"
      f"{'' if out.get('threads') in (1, None) else ' --floor_threads=' + str(out['threads'])}`; {m['date']}, "
      f"{m['machine']}, am_jax on {out.get('jax_device', 'cpu')}, {torch_on}, torch {out['torch']}, "
      f"net={out['net']}.  Floor = the network work of "
      "one step with nothing around it: K forwards at batch B + one forward and backward at the K B loss points "
      f"(same sizes as the step).  Interleaved rounds; {clock} ratios per round, median (min-max).  Load average at "
      f"the start: {out.get('load_average', '?')}.", "",
      "| problem | K | B | am_jax step ms | am_jax floor ms | torch step ms | torch floor ms | am_jax step / floor "
      "| torch step / floor | torch floor / am_jax floor |", "|---|---|---|---|---|---|---|---|---|---|"]
  for row in out["rows"]:
    c = row[times_of]
    if "am_jax_over_floor" not in row:
      continue
    lines.append(f"| {row['problem']} | {row['num_steps']} | {row['batch']} | {1e3 * c['am_jax']:.1f} | "
                 f"{1e3 * c['am_jax_floor']:.1f} | {1e3 * c['torch_am']:.1f} | {1e3 * c['torch_floor']:.1f} | "
                 f"{_fmt(row['am_jax_over_floor'])} | {_fmt(row['torch_over_floor'])} | "
                 f"{_fmt(row['torch_floor_over_am_jax_floor'])} |")
  parts = [p for p in out.get("parts", ["all"]) if p != "all"]
  if parts:
    lines += ["", f"The floor's parts, {clock} ms am_jax / torch (torch / am_jax, median (min-max) of the rounds): rollout = "
              "the K forwards at batch B; loss_fwd = one forward at the K B loss points; loss = its forward + backward.",
              "", "| problem | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
    for row in out["rows"]:
      c = row[times_of]
      lines.append(f"| {row['problem']} | " + " | ".join(
          f"{1e3 * c['am_jax_floor_' + p]:.1f} / {1e3 * c['torch_floor_' + p]:.1f} ({_fmt(row['torch_over_am_jax'][p])})"
          for p in parts) + " |")
  bounds = [row for row in out["rows"] if "bound" in row]
  if bounds:
    th = out["threads"]
    lines += ["", f"Lower bound on am_jax's step (wall clock; `step_lower_bound`): the rollout as measured (sequential, one "
              "core: CPU / wall below) + the loss gradient at XLA's peak matmul rate on all cores "
              f"({out['peak_flops'] / 1e9:.0f} GFLOP/s, {2048}x{2048} float32 dot, in the same run): 2 network units "
              "(backward only, the forward reused from the rollout) or 3 (forward recomputed, as both codes do).  "
              "unit = one forward at the K B loss points, XLA's FLOP count.  The last columns: the highest "
              f"am_jax / torch ({th} thread{'s' if th != 1 else ''}) speed-up any am_jax step could reach here.", "",
              "| problem | unit GFLOP | rollout ms (GFLOP/s, CPU / wall) | bound, fwd reused ms | bound, fwd "
              "recomputed ms | am_jax step ms | torch AM step ms | torch / bound (reused) | torch / bound "
              "(recomputed) | torch / am_jax |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in bounds:
      b, w = row["bound"], row["wall_s"]
      lines.append(f"| {row['problem']} | {b['unit_flops'] / 1e9:.2f} | {1e3 * b['rollout_wall_s']:.1f} "
                   f"({b['rollout_flops_per_s'] / 1e9:.0f}, {b['rollout_cpu_over_wall']:.2f}) | "
                   f"{1e3 * b['bound_reuse_s']:.1f} | {1e3 * b['bound_recompute_s']:.1f} | {1e3 * w['am_jax']:.1f} | "
                   f"{1e3 * w['torch_am']:.1f} | {w['torch_am'] / b['bound_reuse_s']:.2f} | "
                   f"{w['torch_am'] / b['bound_recompute_s']:.2f} | {w['torch_am'] / w['am_jax']:.2f} |")
  multi = [row for row in bounds if "bound_multi" in row]
  if multi:
    n = multi[0]["bound_multi"]["devices"]
    lines += ["", f"The same bound with the rollout's paths sharded over {n} devices (`--jax_devices={n}`: XLA host "
              "devices, one per core, so the sequential rollout runs on every core), beside am_jax's step on "
              f"{n} devices (`--config.num_devices={n}`), same rounds:", "",
              f"| problem | rollout on {n} devices ms (GFLOP/s, CPU / wall) | bound, fwd reused ms | bound, fwd recomputed "
              f"ms | am_jax step on {n} devices ms | torch AM step ms | torch / bound (reused) | torch / bound "
              f"(recomputed) | torch / am_jax on {n} devices |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in multi:
      b, w = row["bound_multi"], row["wall_s"]
      step = w[f"am_jax_{n}dev"]
      lines.append(f"| {row['problem']} | {1e3 * b['rollout_wall_s']:.1f} ({b['rollout_flops_per_s'] / 1e9:.0f}, "
                   f"{b['rollout_cpu_over_wall']:.2f}) | {1e3 * b['bound_reuse_s']:.1f} | "
                   f"{1e3 * b['bound_recompute_s']:.1f} | {1e3 * step:.1f} | {1e3 * w['torch_am']:.1f} | "
                   f"{w['torch_am'] / b['bound_reuse_s']:.2f} | {w['torch_am'] / b['bound_recompute_s']:.2f} | "
                   f"{w['torch_am'] / step:.2f} |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Training to a fixed number of iterations, am_jax's metric on both


def run_training(problems, iterations: int, net: str = "socm", num_evals: int = 4, torch_threads: int = 1,
                 losses=("am",), seeds=(0,), device="cpu") -> dict:
  """Trains am_jax (AM) and torch (each of ``losses``) from the same initial weights; L2 error of every control.

  Evaluation: ``soc_training.make_evaluator`` (the config's eval_seed and eval_batch_size: the same fixed paths as
  ``experiments/soc.py``) at ``num_evals`` + 1 evenly spaced iterations; train seconds exclude evaluation (and
  compilation for am_jax); CPU seconds are process time over the training calls.
  """
  torch = _torch()
  torch.set_num_threads(torch_threads)
  out = {"machine": common.machine_info(), "torch": torch.__version__, "torch_threads": torch_threads,
         "torch_device": tr._device_name(device), "jax_device": jax.devices()[0].device_kind,  # pylint: disable=protected-access
         "iterations": iterations, "net": net, "seeds": list(seeds), "load_average": tr._load_average(),  # pylint: disable=protected-access
         "rows": []}
  every = max(iterations // num_evals, 1)
  for name, seed in [(n, s) for n in problems for s in seeds]:
    side = build_jax(name, net, seed=seed, num_iterations=iterations, eval_every=every)
    why = torch_supported(side.config)
    if why:
      print(f"{name}: training skipped ({why})", flush=True)
      continue
    cfg = side.config
    evaluate = soc_training.make_evaluator(side.problem, side.apply_fn, cfg.eval_seed, cfg.eval_batch_size)
    c0 = time.process_time()
    recs = soc_training.train_method("am", side.problem, cfg, control=(side.apply_fn, side.params),
                                     evaluate=evaluate, seed=seed)
    row = {"problem": name, "seed": seed, "net": net, "num_steps": side.problem.num_steps, "batch": side.batch,
           "runs": {}}
    row["runs"]["am_jax_am"] = {
        "iterations": [r["iteration"] for r in recs], "l2_error": [r["l2_error"] for r in recs],
        "l2_error_se": [r["l2_error_se"] for r in recs], "objective": [r["objective"] for r in recs],
        "train_seconds": recs[-1]["train_seconds"], "compile_seconds": recs[-1]["compile_seconds"],
        "process_seconds_incl_eval": time.process_time() - c0}
    print(f"{name} seed {seed} am_jax AM: L2 {recs[-1]['l2_error']:.4g} at it {iterations} "
          f"({recs[-1]['train_seconds']:.0f} s)", flush=True)
    for loss in losses:
      ref = TorchSOC(side, loss, seed=seed + 1, device=device)
      its, l2, l2_se, obj = [], [], [], []
      wall = cpu = 0.0

      def log_eval(it):
        stats = {k: float(v) for k, v in evaluate(ref.jax_params()).items()}
        its.append(it)
        l2.append(stats["l2_error"])
        l2_se.append(stats["l2_error_se"])
        obj.append(stats["objective"])

      log_eval(0)
      for it in range(1, iterations + 1):
        w0, c1 = time.perf_counter(), time.process_time()
        ref.step()
        wall += time.perf_counter() - w0
        cpu += time.process_time() - c1
        if it % every == 0 or it == iterations:
          log_eval(it)
      row["runs"][f"torch_{loss}"] = {"iterations": its, "l2_error": l2, "l2_error_se": l2_se, "objective": obj,
                                      "train_seconds": wall, "train_cpu_seconds": cpu}
      print(f"{name} seed {seed} torch {loss}: L2 {l2[-1]:.4g} at it {iterations} ({wall:.0f} s)", flush=True)
    out["rows"].append(row)
  return out


def training_markdown(out) -> str:
  m = out["machine"]
  lines = [
      f"## Control L2 error after {out['iterations']} iterations, same initial weights (net={out['net']})", "",
      f"`python -m benchmarks.torch_soc_reference --rounds=0 --train_iterations={out['iterations']} "
      f"--train_problems={','.join(dict.fromkeys(r['problem'] for r in out['rows']))} "
      f"--train_seeds={','.join(str(x) for x in out.get('seeds', [0]))} --train_losses="
      f"{','.join(k[len('torch_'):] for k in (out['rows'][0]['runs'] if out['rows'] else {}) if k.startswith('torch_'))}`"
      f"; {m['date']}, {m['machine']}, "
      f"torch {out['torch']} on {out.get('torch_device', 'cpu')} ({out['torch_threads']} thread).  L2 = am_jax's metric (`soc.evaluate_control`: "
      "E int |u - u*|^2 dt, 1024 fixed paths of the learned control, +- its standard error) on every trained control.  "
      "am_jax: `soc_training.train_method` (the key schedule of `experiments/soc.py`); torch: the same step with "
      "torch's generator.  Train seconds exclude evaluation (and am_jax's compile); shared machine.", "",
      "| problem | seed | K | B | run | L2 at " + " / ".join(
          str(i) for i in (out["rows"][0]["runs"]["am_jax_am"]["iterations"] if out["rows"] else [])) +
      " | final L2 +- se | train s (wall) |", "|---|---|---|---|---|---|---|---|"]
  for row in out["rows"]:
    for run, r in row["runs"].items():
      lines.append(f"| {row['problem']} | {row.get('seed', 0)} | {row['num_steps']} | {row['batch']} | {run} | "
                   + " / ".join(f"{v:.3g}" for v in r["l2_error"])
                   + f" | {r['l2_error'][-1]:.4g} +- {r['l2_error_se'][-1]:.2g} | {r['train_seconds']:.0f} |")
  groups = {}
  for row in out["rows"]:
    for run, r in row["runs"].items():
      groups.setdefault((row["problem"], run), []).append(r["l2_error"][-1])
  if any(len(v) > 1 for v in groups.values()):
    lines += ["", f"Final L2 at {out['iterations']} iterations, mean +- std over seeds {out.get('seeds')}:", "",
              "| problem | run | L2 mean +- std (min-max) |", "|---|---|---|"]
    for (problem, run), vals in groups.items():
      v = np.asarray(vals)
      lines.append(f"| {problem} | {run} | {v.mean():.4g} +- {v.std(ddof=1) if len(v) > 1 else 0.0:.2g} "
                   f"({v.min():.4g}-{v.max():.4g}) |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  common.jax_host_devices(f.jax_devices)
  prefix = os.path.join(f.out_dir, f.out_name)
  # Parts not run now are kept from an earlier run's file (timing and training are separate commands).
  result = {}
  if os.path.exists(prefix + ".json"):
    with open(prefix + ".json") as fh:
      result = json.load(fh)
  if f.rounds > 0:
    result["timing"] = run_timing([p for p in f.problems if p], [n for n in f.nets if n],
                                  tuple(int(n) for n in f.threads), f.rounds, f.iters, f.socm_adjoint, f.torch_device,
                                  jax_devices=f.jax_devices)
  if f.floor_rounds > 0:
    result["floor"] = run_floor([p for p in f.problems if p], f.floor_rounds, f.iters, threads=f.floor_threads,
                                parts=tuple(p for p in f.floor_parts if p), device=f.torch_device,
                                jax_devices=f.jax_devices)
  if f.train_iterations > 0:
    result["training"] = run_training([p for p in f.train_problems if p], f.train_iterations, f.train_net,
                                      losses=tuple(l for l in f.train_losses if l),
                                      seeds=tuple(int(x) for x in f.train_seeds), device=f.torch_device)
  md = [fn(result[k]) for k, fn in (("timing", timing_markdown), ("floor", floor_markdown),
                                     ("training", training_markdown)) if k in result]
  text = "# am_jax vs a PyTorch eager reference, SOC benchmarks (issue 16)\n\n" + "\n".join(md)
  print(text)
  common.write_json(prefix + ".json", result)
  with open(prefix + ".md", "w") as fh:
    fh.write(text)
  print(f"wrote {prefix}.md")


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_list("problems", list(PROBLEMS), f"Problems to time, among {list(PROBLEMS)}.")
  flags.DEFINE_list("nets", ["socm"], f"configs/soc.py nets to time, among {list(NETS)}.")
  flags.DEFINE_list("threads", ["1", "2"], "torch.set_num_threads settings of the torch AM step.")
  flags.DEFINE_bool("socm_adjoint", True, "Also time the torch SOCM_adjoint step (first thread setting).")
  flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds (0: no timing).")
  flags.DEFINE_integer("iters", 2, "Timed calls per function and round.")
  flags.DEFINE_integer("floor_rounds", 0, "Interleaved rounds of am_jax vs its network-work floor (0: none).")
  flags.DEFINE_list("floor_parts", ["all"], f"Floor parts to time, among {list(FLOOR_PARTS)}.")
  flags.DEFINE_integer("floor_threads", 1, "torch.set_num_threads of the floor comparison (with 'rollout' among "
                       "--floor_parts it also gives the lower bound on am_jax's step and torch / bound).")
  flags.DEFINE_integer("train_iterations", 0, "Train both frameworks for this many iterations (0: no training).")
  flags.DEFINE_list("train_problems", ["linear_ou", "quadratic_easy"], "Problems to train.")
  flags.DEFINE_string("train_net", "socm", "configs/soc.py net of the training comparison.")
  flags.DEFINE_list("train_losses", ["am"], f"torch losses to train, among {list(LOSSES)}.")
  flags.DEFINE_list("train_seeds", ["0"], "Seeds of the training comparison (each: same initial weights both sides).")
  flags.DEFINE_string("out_dir", "benchmarks/results", "Where the .json / .md go.")
  flags.DEFINE_string("out_name", "torch_soc_reference_cpu", "File name (without extension) of the results.")
  flags.DEFINE_integer("jax_devices", 1, "Also time am_jax's step with the paths sharded over this many devices "
                       "(on a CPU: XLA host devices, one per core, set up here; 1: not).")
  flags.DEFINE_string("torch_device", "cpu", "Device of the torch reference ('cpu' or 'cuda'; --threads is for "
                      "'cpu').  am_jax runs on jax's default device.")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
