r"""Bias / variance breakdown of the fine-tuned distance on the exact problems, and the optimiser that removes the
variance (issue 14 item 3; docs/maths.md section 7).

    python -m benchmarks.convergence --part=breakdown   # (a) discretisation, (b) capacity, (c) optimisation noise
    python -m benchmarks.convergence --part=noise --problems=1d_bimodal --tag=_1d   # optimiser settings side by side
    python -m benchmarks.convergence --part=noise --problems=2d_ring --tag=_2d      #   at equal CPU budget
    python -m benchmarks.convergence --part=asymptote --steps=4000 --seeds=0   # AM with 8x the compute (not run yet)
    python -m benchmarks.convergence --part=main        # configs/gmm2d.py main job: old vs new finetune block
    python -m benchmarks.convergence --part=fixed_points  # where each diffusion's loss optimum lies (1-D, Fig. 2)

CPU time (2026-11-26): a 1000-step toy run is ~18 s of process CPU; breakdown ~15 runs' worth, noise 24 runs per
problem (8 settings x 3 seeds; stopped after 5 settings on an overloaded machine), main 3 x (pre-train + 2 fine-tunes),
~5 min when the 2 cores are free (31 min at load average 15-25).

Problems (as ``benchmarks/integrators.py``): 1-D bimodal, r(x) = x, lambda = 1 (batch 512; W1 of Euler-ODE samples on
the K = 40 training grid to the exact tilt's CDF, right-mode mass, target 0.881) and the 2-D ring of the main job with
its quadratic reward, exact base velocity (batch 256; sliced W1 to an exact tilt sample of 20k; noise floor = two exact
samples).  Fine-tuned model: exact base + zero-initialised control MLP (64, 64) (``toy.finetune_mixture``).

``breakdown``: (a) the exact tilted velocity sampled by the evaluation sampler (ODE, and the memoryless SDE, K = 40) and
v_base + s*_k (v_tilt - v_base), s*_k the per-step minimiser of the AM loss along that line (how far the loss's
discrete optimum is from the tilt, within that family); (b) the MLP fitted by plain regression to the exact control
u* = 2 (v_tilt - v_base) / sigma on the exact tilt's training states (no adjoint noise; 2000 cosine-decayed Adam
steps): what the network can represent; (c) today's default (Adam 1e-3 constant, 1000 steps), 3 seeds: spread over
seeds and the swing of one run between its checkpoints (steps 600-1000, every 100).

``noise``: each setting trained with the same CPU budget as today's default (steps rescaled by the CPU time per
step, calibrated on 100 steps), 3 seeds, evaluated at the end.  ``main``: ``am-jax finetune --config=gmm2d`` with the
old (Adam constant 1e-3, no EMA) and new finetune block, same pre-trained base per seed.  ``fixed_points``: the
exact optimum of the AM loss for the memoryless and the constant-sigma diffusions on the 1-D problem (no training:
``fixed_point_velocity``), sampled as Fig. 2 samples its trained models.

Writes ``benchmarks/results/convergence_<part>.{json,md}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from am_jax import adjoint, gmm, losses, metrics, models, rewards, sampling, schedules, toy

S = schedules.LinearSchedule()
RING = dict(num=8, radius=2.0, std=0.25)
RING_REWARD = (0.5 * jnp.eye(2), jnp.array([1.0, 0.5]))  # r(x) = -|x|^2/4 + (1, 0.5).x, configs/gmm2d.py
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def problems(only=("1d_bimodal", "2d_ring")):
  """name -> (base mixture, reward_fn, exact tilt, finetune_mixture kwargs)."""
  one = gmm.bimodal_1d()
  ring = gmm.ring_2d(**RING)
  out = {"1d_bimodal": (one, rewards.linear_reward(1.0), gmm.tilt_linear(one, 1.0), dict(batch_size=512)),
         "2d_ring": (ring, rewards.quadratic_reward(*RING_REWARD), gmm.tilt_quadratic(ring, *RING_REWARD),
                     dict(batch_size=256))}
  return {k: v for k, v in out.items() if k in only}


def _summary(values):
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}


def _pm(s, digits=3):
  return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def evaluate(apply_fn, params, target, diffusion="ode", config=losses.AMConfig()) -> dict:
  """distance (1-D: W1 to the exact CDF; 2-D: sliced W1 to an exact sample), noise floor, mass error."""
  res = toy.ToyResult(params, apply_fn, {}, 0.0, config)
  ev = toy.evaluate_against_target(res, target, diffusion=diffusion, num_samples=20000)
  mass, tgt = np.asarray(ev["mode_mass"]), np.asarray(ev["target_mass"])
  out = {"distance": float(ev.get("distance_to_cdf", ev["distance"])), "noise_floor": float(ev["noise_floor"]),
         "mass_tv": float(0.5 * np.abs(mass - tgt).sum())}
  if target.dim == 1:
    out["noise_floor"] = 0.0  # W1 to the exact CDF: no second sample
    out["right_mass"] = float(mass[1])
  return out


# ------------------------------------------------------------------------------------------------ breakdown
def per_step_scale(base, target, reward, config=losses.AMConfig(), n=40000, seed=3):
  """s*_k minimising the AM loss of step k along v_base + s (v_tilt - v_base), on the exact tilt's trajectories."""
  vb = lambda x, t: gmm.velocity(base, x, t, S)  # noqa: E731
  vs = lambda x, t: gmm.velocity(target, x, t, S)  # noqa: E731
  c = sampling.make_coefficients(S, "memoryless", config.num_steps, config.time_offset, config.noiseless_last_step,
                                 config.integrator)
  k0, kn = jax.random.split(jax.random.PRNGKey(seed))
  x0 = jax.random.normal(k0, (n, base.dim))
  traj = sampling.simulate(vs, x0, sampling.draw_noise(kn, config.num_steps, x0.shape), c)
  a1, _ = adjoint.terminal_adjoint(reward, traj[-1], config.reward_multiplier)
  adj = adjoint.lean_adjoint(vb, traj, a1, c)
  s = []
  for k in range(config.num_steps):
    t = jnp.full((n,), c.tau[k])
    u = (1 + c.loss_drift_scale[k]) / c.loss_sigma[k] * (vs(traj[k], t) - vb(traj[k], t))
    tgt = -c.loss_sigma[k] * adj[k + 1]
    s.append(float(jnp.sum(u * tgt) / jnp.sum(u * u)))
  return np.asarray(c.tau), np.asarray(s)


def fit_exact_control(base, target, seed=0, steps=2000, batch=512, hidden=(64, 64), lr=1e-3):
  """The control MLP fitted by regression to u* = 2 (v_tilt - v_base) / sigma on the exact tilt's memoryless
  training states (every step of the K = 40 grid): network capacity without the adjoint's noise."""
  from am_jax import parameterisation as param_lib
  config = losses.AMConfig()
  c = sampling.make_coefficients(S, "memoryless", config.num_steps, config.time_offset, True, "euler")
  vb = lambda x, t: gmm.velocity(base, x, t, S)  # noqa: E731
  vs = lambda x, t: gmm.velocity(target, x, t, S)  # noqa: E731
  net_apply, params = models.functional(models.MLP(base.dim, hidden=hidden, zero_init_output=True,
                                                   rngs=nnx.Rngs(seed)))
  ft = param_lib.residual_model(lambda p, x, t: vb(x, t), None, net_apply, S, "control")
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps))
  opt_state = opt.init(params)
  tau = jnp.asarray(c.tau)

  @jax.jit
  def step(params, opt_state, key):
    k0, kn = jax.random.split(key)
    x0 = jax.random.normal(k0, (batch, base.dim))
    traj = sampling.simulate(vs, x0, sampling.draw_noise(kn, config.num_steps, x0.shape), c)[:-1]  # (K, B, d)
    x = traj.reshape(-1, base.dim)
    t = jnp.repeat(tau, batch)
    sig = S.memoryless_sigma(t)[:, None]
    u_star = 2.0 * (vs(x, t) - vb(x, t)) / sig

    def loss(p):
      return jnp.mean(jnp.sum((net_apply(p, x, t) - u_star) ** 2, -1))
    val, g = jax.value_and_grad(loss)(params)
    up, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, up), opt_state, val

  key = jax.random.PRNGKey(seed + 1000)
  for _ in range(steps):
    key, sub = jax.random.split(key)
    params, opt_state, val = step(params, opt_state, sub)
  return ft, params, float(val)


def breakdown(seeds=(0, 1, 2), steps=1000, only=("1d_bimodal", "2d_ring")):
  out = {}
  for name, (base, reward, target, kw) in problems(only).items():
    row = {}
    exact = lambda p, x, t: gmm.velocity(p, x, t, S)  # noqa: E731
    for diffusion in ("ode", "memoryless"):
      row[f"a_exact_tilt_{diffusion}"] = evaluate(exact, target, target, diffusion)
    tau, s = per_step_scale(base, target, reward)
    tau_j, s_j = jnp.asarray(tau), jnp.asarray(s)

    def scaled(p, x, t, tau_j=tau_j, s_j=s_j, base=base):
      sk = jnp.interp(jnp.broadcast_to(t, x.shape[:1]), tau_j, s_j)[:, None]
      vb = gmm.velocity(base, x, t, S)
      return vb + sk * (gmm.velocity(p, x, t, S) - vb)
    row["a_loss_optimum_proxy_ode"] = dict(evaluate(scaled, target, target, "ode"), s_star=s.tolist())
    fits = []
    for seed in seeds:
      ft, params, final_loss = fit_exact_control(base, target, seed)
      fits.append(dict(evaluate(ft, params, target, "ode"), final_regression_loss=final_loss))
      print(f"{name} capacity fit seed {seed}: {fits[-1]}", flush=True)
    row["b_capacity_fit_ode"] = {"distance": _summary([f["distance"] for f in fits]), "runs": fits}
    runs = []
    for seed in seeds:
      res = toy.finetune_mixture(base, reward, losses.AMConfig(), steps=steps, seed=seed, log_fn=None,
                                 log_every=max(1, steps // 10),
                                 eval_fn=lambda a, p: evaluate(a, p, target, "ode"), **kw)  # noqa: B023
      curve = {int(k): v["distance"] for k, v in res.history.items()}
      late = [d for k, d in curve.items() if k >= 0.6 * steps]
      runs.append({"seed": seed, "final": curve[steps - 1], "curve": curve, "late_std": float(np.std(late, ddof=1)),
                   "late_mean": float(np.mean(late)), **{k: v for k, v in evaluate(res.apply_fn, res.params, target)
                                                         .items() if k != "distance"}})
      print(f"{name} default seed {seed}: final {runs[-1]['final']:.4f}, checkpoints 600-1000 "
            f"{np.round(late, 3).tolist()}", flush=True)
    row["c_default_optimisation"] = {
        "final": _summary([r["final"] for r in runs]), "late_mean": _summary([r["late_mean"] for r in runs]),
        "checkpoint_std": _summary([r["late_std"] for r in runs]), "runs": runs}
    out[name] = row
  return out


def breakdown_markdown(res):
  lines = ["| problem | (a) exact tilt, ODE K=40 | (a) exact tilt, SDE K=40 | (a) loss optimum proxy "
           "| (b) capacity fit "
           "(3 seeds) | (c) default AM: final (3 seeds) | (c) spread between checkpoints 600-1000 | noise floor |",
           "|---|---|---|---|---|---|---|---|"]
  for name, r in res.items():
    c = r["c_default_optimisation"]
    lines.append(f"| {name} | {r['a_exact_tilt_ode']['distance']:.3f} | {r['a_exact_tilt_memoryless']['distance']:.3f} "
                 f"| {r['a_loss_optimum_proxy_ode']['distance']:.3f} | {_pm(r['b_capacity_fit_ode']['distance'])} | "
                 f"{_pm(c['final'])} | {c['checkpoint_std']['mean']:.3f} | "
                 f"{r['a_exact_tilt_ode']['noise_floor']:.3f} |")
  return "\n".join(lines)


def asymptote(seeds=(0,), steps=4000, only=("1d_bimodal", "2d_ring"), batch_mult=2):
  """Where AM at K = 40 goes with far more compute than the budget: ``steps`` cosine-decayed Adam steps (peak 3e-3),
  EMA 0.99, batch x ``batch_mult`` -- an estimate of the loss's discrete optimum (bias (a) + (b))."""
  out = {}
  for name, (base, reward, target, kw) in problems(only).items():
    runs = []
    for seed in seeds:
      res = toy.finetune_mixture(base, reward, losses.AMConfig(), steps=steps, seed=seed, log_fn=None,
                                 lr_schedule="cosine", learning_rate=3e-3, ema_decay=0.99,
                                 batch_size=kw["batch_size"] * batch_mult)
      ev = {d: evaluate(res.apply_fn, res.params, target, d) for d in ("ode", "memoryless")}
      runs.append({"seed": seed, "steps": steps, "cpu_seconds": res.cpu_seconds, **ev})
      print(f"{name} asymptote seed {seed}: {ev}", flush=True)
    out[name] = {"distance_ode": _summary([r["ode"]["distance"] for r in runs]),
                 "distance_memoryless": _summary([r["memoryless"]["distance"] for r in runs]), "runs": runs}
  return out


def asymptote_markdown(res):
  lines = ["| problem | ODE distance | memoryless SDE distance | right-mode mass (1-D) / mass TV (2-D), ODE "
           "| noise floor |",
           "|---|---|---|---|---|"]
  for name, r in res.items():
    ode = r["runs"][0]["ode"]
    mass = ode.get("right_mass", ode["mass_tv"])
    lines.append(f"| {name} | {_pm(r['distance_ode'])} | {_pm(r['distance_memoryless'])} | {mass:.3f} | "
                 f"{ode['noise_floor']:.3f} |")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ noise
def settings():
  """name -> (finetune_mixture kwargs, AMConfig overrides).  lr peak 1e-3 unless named."""
  all_times = dict(num_random_timesteps=30, random_timestep_fraction=1.0, num_last_timesteps=10)
  return {  # in order of priority (a loaded machine may not finish the tail; results are written after each)
      "constant (today)": ({}, {}),
      "cosine decay": (dict(lr_schedule="cosine"), {}),
      "cosine, lr 3e-3 + EMA 0.99": (dict(lr_schedule="cosine", learning_rate=3e-3, ema_decay=0.99), {}),
      "cosine, lr 2e-2 + EMA 0.99 (toy.TUNED_OPTIMISER)": (dict(toy.TUNED_OPTIMISER), {}),
      "cosine, lr 1e-2 + EMA 0.99": (dict(lr_schedule="cosine", learning_rate=1e-2, ema_decay=0.99), {}),
      "constant + EMA 0.99": (dict(ema_decay=0.99), {}),
      "cosine, batch x2": (dict(lr_schedule="cosine", batch_mult=2), {}),
      "cosine, all 40 loss times": (dict(lr_schedule="cosine"), all_times),
      "linear decay": (dict(lr_schedule="linear"), {}),
      "cosine, lr 3e-3": (dict(lr_schedule="cosine", learning_rate=3e-3), {}),
  }


def _cpu_per_step(base, reward, config, kw, n=100):
  r1 = toy.finetune_mixture(base, reward, config, steps=n, seed=0, log_fn=None, **kw)
  return r1.cpu_seconds / (n - 1)


def noise(seeds=(0, 1, 2), steps=1000, only=("1d_bimodal", "2d_ring"), names=None, checkpoint=None):
  """``checkpoint(out)`` is called after each setting (partial results on disk)."""
  out = {}
  for name, (base, reward, target, pkw) in problems(only).items():
    per_step = {}
    rows = {}
    for sname, (kw, cfg_over) in settings().items():
      if names and sname not in names:
        continue
      kw = dict(kw)
      mult = kw.pop("batch_mult", 1)
      run_kw = dict(pkw, **kw)
      run_kw["batch_size"] = pkw["batch_size"] * mult
      config = dataclasses.replace(losses.AMConfig(), **cfg_over)
      per_step[sname] = _cpu_per_step(base, reward, config, run_kw)
      ratio = per_step[sname] / per_step["constant (today)"]
      n_steps = int(round(steps / ratio)) if (mult > 1 or cfg_over) else steps
      runs = []
      for seed in seeds:
        res = toy.finetune_mixture(base, reward, config, steps=n_steps, seed=seed, log_fn=None, **run_kw)
        ev = evaluate(res.apply_fn, res.params, target)
        runs.append(dict(ev, seed=seed, steps=n_steps, train_seconds=res.seconds, cpu_seconds=res.cpu_seconds))
        print(f"{name} [{sname}] seed {seed}: {n_steps} steps, distance {ev['distance']:.4f}, mass_tv "
              f"{ev['mass_tv']:.3f}{', right mass %.3f' % ev['right_mass'] if 'right_mass' in ev else ''}, "
              f"cpu {res.cpu_seconds:.0f} s, wall {res.seconds:.0f} s", flush=True)
      rows[sname] = {"distance": _summary([r["distance"] for r in runs]),
                     "mass_tv": _summary([r["mass_tv"] for r in runs]),
                     "cpu_seconds": _summary([r["cpu_seconds"] for r in runs]),
                     "wall_seconds": _summary([r["train_seconds"] for r in runs]),
                     "noise_floor": _summary([r["noise_floor"] for r in runs]),
                     "steps": n_steps, "cpu_per_step_ratio": ratio, "runs": runs}
      if "right_mass" in runs[0]:
        rows[sname]["right_mass"] = _summary([r["right_mass"] for r in runs])
      out[name] = rows
      if checkpoint:
        checkpoint(out)
  return out


def noise_markdown(res):
  lines = ["| problem | setting | steps | distance (3 seeds) | right-mode mass / mass TV | CPU s (ratio to today) "
           "| noise floor |", "|---|---|---|---|---|---|---|"]
  for name, rows in res.items():
    base_cpu = rows.get("constant (today)", next(iter(rows.values())))["cpu_seconds"]["mean"]
    for sname, r in rows.items():
      mass = _pm(r["right_mass"]) if "right_mass" in r else _pm(r["mass_tv"])
      lines.append(f"| {name} | {sname} | {r['steps']} | {_pm(r['distance'])} | {mass} | "
                   f"{r['cpu_seconds']['mean']:.0f} ({r['cpu_seconds']['mean'] / base_cpu:.2f}) | "
                   f"{r['noise_floor']['mean']:.3f} |")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main job
OLD_FINETUNE = dict(ema_decay=0.0, optimizer=dict(name="adam", learning_rate=1e-3, warmup_steps=0, decay="constant",
                                                  grad_clip=0.0, weight_decay=0.0))


def base_tilt_distance(cfg, base_dir, n=200_000, m=20_000):
  """Sliced W1 from the pre-trained base's own tilt (ODE samples reweighted by exp(lambda r), resampled) to the exact
  tilt: what the main job can reach with a perfect fine-tune (base error + sampler at K)."""
  from am_jax import builders
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.base_checkpoint = base_dir
  apply_fn, params = builders.load_base(cfg, None)
  problem = builders.build_problem(cfg, apply_fn, params)
  key = jax.random.PRNGKey(cfg.seed + 77)
  xs = jax.jit(lambda p, k: problem.sample(p, k, n, "ode", cfg.am.num_steps, (), "base"))(params, key)
  logw = cfg.am.reward_multiplier * problem.reward_fn(xs)
  w = np.asarray(jax.nn.softmax(logw), np.float64)
  ess = 1.0 / np.sum(w ** 2)
  idx = np.random.default_rng(cfg.seed).choice(n, size=m, p=w / w.sum())
  target = problem.exact_target
  ref = np.asarray(gmm.sample(target, jax.random.PRNGKey(cfg.seed + 5), m))
  return float(metrics.sliced_wasserstein1(np.asarray(xs)[idx], ref)), float(ess)


def main_job(seeds=(0, 1, 2), workdir="runs/convergence_main"):
  import ml_collections

  from am_jax import jobs
  from configs import gmm2d
  out = {}
  for seed in seeds:
    cfg = gmm2d.get_config()
    cfg.seed = seed
    base_dir = os.path.join(workdir, f"base_seed{seed}")
    shutil.rmtree(base_dir, ignore_errors=True)
    t0 = time.perf_counter()
    pre = jobs.pretrain(cfg, base_dir)
    pre_s = time.perf_counter() - t0
    reach, ess = base_tilt_distance(cfg, base_dir)
    print(f"seed {seed}: base tilt by importance resampling -> sliced W1 {reach:.4f} (ESS {ess:.0f})", flush=True)
    for label, block in (("old", OLD_FINETUNE), ("new", None)):
      c = gmm2d.get_config()
      c.seed = seed
      c.base_checkpoint = base_dir
      if block is not None:
        c.finetune.ema_decay = block["ema_decay"]
        c.finetune.optimizer = ml_collections.ConfigDict(block["optimizer"])
      wd = os.path.join(workdir, f"{label}_seed{seed}")
      shutil.rmtree(wd, ignore_errors=True)  # a finished workdir would return its stored summary
      t0, c0 = time.perf_counter(), time.process_time()
      summary = jobs.finetune(c, wd)
      row = {k: summary[k] for k in summary if isinstance(summary[k], (int, float))}
      row.update(wall_seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
                 pretrain_seconds=pre_s, base_tilt_sliced_w1=reach, base_tilt_ess=ess,
                 base_to_data_sliced_w1=pre.get("base_to_data_sliced_w1"))
      out.setdefault(label, []).append(row)
      print(f"seed {seed} [{label}]: ODE {row['finetuned_ode_to_target_sliced_w1']:.4f}, memoryless "
            f"{row['finetuned_memoryless_to_target_sliced_w1']:.4f}, floor {row['target_noise_floor_sliced_w1']:.4f}, "
            f"wall {row['wall_seconds']:.0f} s (+ pretrain {pre_s:.0f} s)", flush=True)
  keys = ("finetuned_ode_to_target_sliced_w1", "finetuned_memoryless_to_target_sliced_w1",
          "target_noise_floor_sliced_w1", "base_tilt_sliced_w1", "reward_mean_finetuned_ode",
          "exact_target_reward_mean",
          "wall_seconds", "cpu_seconds", "pretrain_seconds", "base_to_data_sliced_w1")
  return {label: {"summary": {k: _summary([r[k] for r in rows]) for k in keys if rows[0].get(k) is not None},
                  "runs": rows} for label, rows in out.items()}


def main_markdown(res):
  lines = ["| finetune block | fine-tuned ODE | fine-tuned memoryless SDE | noise floor | base's own tilt (reachable) "
           "| reward (exact target) | fine-tune wall s | + pretrain s |", "|---|---|---|---|---|---|---|---|"]
  for label, r in res.items():
    s = r["summary"]
    lines.append(f"| {label} | {_pm(s['finetuned_ode_to_target_sliced_w1'])} | "
                 f"{_pm(s['finetuned_memoryless_to_target_sliced_w1'])} | {_pm(s['target_noise_floor_sliced_w1'])} | "
                 f"{_pm(s['base_tilt_sliced_w1'])} | {_pm(s['reward_mean_finetuned_ode'], 2)} "
                 f"({s['exact_target_reward_mean']['mean']:.2f}) | {s['wall_seconds']['mean']:.0f} | "
                 f"{s['pretrain_seconds']['mean']:.0f} |")
  return "\n".join(lines)

# ------------------------------------------------------------------------------------------------ speed
SPEED_THRESHOLDS = (0.10, 0.08, 0.06, 0.05, 0.04)


def speed_settings():
  """name -> finetune_mixture kwargs: the default before issue 14 vs the tuned optimiser (``toy.TUNED_OPTIMISER``,
  peak 2e-2) at 3 schedule lengths and the main job's peak 1e-2."""
  tuned = dict(toy.TUNED_OPTIMISER)
  return {
      # a constant rate's run does not depend on its length: its first 1000 steps ARE the old default's run.
      "Adam 1e-3 constant, 3000 steps (before; 3x its budget)": dict(steps=3000),
      "tuned, 1000 steps": dict(tuned, steps=1000),
      "cosine from 1e-2 + EMA 0.99 (configs/gmm2d.py), 1000 steps": dict(tuned, learning_rate=1e-2, steps=1000),
      "tuned, 500 steps": dict(tuned, steps=500),
      "tuned, 250 steps": dict(tuned, steps=250),
  }


def _sampler_eval(target, num_samples=20000, config=losses.AMConfig()):
  """eval_fn for finetune_mixture: sliced W1 (2-D) / W1 to the CDF (1-D) of ODE samples on the training grid; one
  compiled sampler per apply_fn (the timing excludes it: finetune_mixture stops its clock around eval_fn)."""
  cache = {}
  k_model, k_ref = jax.random.split(jax.random.PRNGKey(1))
  ref = np.asarray(gmm.sample(target, k_ref, num_samples))

  def eval_fn(apply_fn, params):
    if apply_fn not in cache:
      cache.clear()
      cache[apply_fn] = jax.jit(lambda p: sampling.sample(apply_fn, p, k_model, (num_samples, target.dim),
                                                          config.schedule, "ode", config.num_steps,
                                                          config.time_offset))
    xs = np.asarray(cache[apply_fn](params))
    if target.dim == 1:
      return {"distance": float(metrics.wasserstein1_to_cdf(xs, lambda z: np.asarray(gmm.cdf_1d(target, z))))}
    return {"distance": float(metrics.sliced_wasserstein1(xs, ref))}
  return eval_fn


def _reach_times(curve):
  """{threshold: first wall-clock at which the distance is <= threshold} and {threshold: wall-clock from which every
  later evaluation stays <= threshold} (None: never).  The second is the accuracy a run can be stopped at without
  luck: a noisy run dips below a threshold long before it stays there."""
  first, stays = {}, {}
  for thr in SPEED_THRESHOLDS:
    hit = [w for _, w, d in curve if d <= thr]
    first[str(thr)] = hit[0] if hit else None
    settled = None
    for _, w, d in reversed(curve):
      if d > thr:
        break
      settled = w
    stays[str(thr)] = settled
  return first, stays


SPEED_EVAL_EVERY = 25


def speed(seeds=(0, 1, 2), only=("2d_ring",), eval_every=SPEED_EVAL_EVERY):
  """Wall-clock (training only, evaluations excluded) at which each setting first reaches each accuracy.

  Seeds are interleaved across settings (setting A seed 0, setting B seed 0, ...) so that a load change on the
  shared machine hits every setting alike.
  """
  out = {}
  for name, (base, reward, target, pkw) in problems(only).items():
    eval_fn = _sampler_eval(target)
    runs = {s: [] for s in speed_settings()}
    for seed in seeds:
      for sname, kw in speed_settings().items():
        kw = dict(kw)
        steps = kw.pop("steps")
        res = toy.finetune_mixture(base, reward, losses.AMConfig(), steps=steps, seed=seed, log_fn=None,
                                   log_every=eval_every, eval_fn=eval_fn, **dict(pkw, **kw))
        curve = [(step, h["wall_s"], h["distance"]) for step, h in sorted(res.history.items())]
        first, stays = _reach_times(curve)
        runs[sname].append(dict(seed=seed, steps=steps, final=curve[-1][2], train_seconds=res.seconds,
                                cpu_seconds=res.cpu_seconds, first_reached_s=first, stays_below_s=stays, curve=curve))
        print(f"{name} [{sname}] seed {seed}: final {curve[-1][2]:.4f} in {res.seconds:.1f} s; reached and stays "
              + ", ".join(f"{t}: {'-' if v is None else f'{v:.1f} s'}" for t, v in stays.items()), flush=True)
    rows = {}
    for sname, rs in runs.items():
      row = {"final": _summary([r["final"] for r in rs]), "train_seconds": _summary([r["train_seconds"] for r in rs]),
             "runs": rs, "first_reached_s": {}, "stays_below_s": {}}
      for key in ("first_reached_s", "stays_below_s"):
        for thr in SPEED_THRESHOLDS:
          vals = [r[key][str(thr)] for r in rs]
          # A setting "reaches" an accuracy only if every seed does; the time is then the mean over seeds.
          row[key][str(thr)] = None if any(v is None for v in vals) else _summary(vals)
      rows[sname] = row
    out[name] = rows
  return out


def speed_markdown(res):
  before_name = "Adam 1e-3 constant, 3000 steps (before; 3x its budget)"
  lines = []
  for name, rows in res.items():
    for key, what in (("stays_below_s", "from which the distance stays below"),
                      ("first_reached_s", "at which the distance first drops below (one dip is enough: favours noisy "
                                          "runs)")):
      head = " | ".join(f"{t}" for t in SPEED_THRESHOLDS)
      lines += [f"**{name}: training wall-clock (s) {what} each accuracy** (ODE samples on "
                f"the K = 40 grid vs the exact tilt, evaluated every {SPEED_EVAL_EVERY} steps, evaluations excluded from the clock; "
                f"every seed must reach it; mean ± std over seeds)", "",
                f"| setting | final distance | training s | {head} |",
                "|---|---|---|" + "---|" * len(SPEED_THRESHOLDS)]
      for sname, r in rows.items():
        cells = " | ".join("not reached" if r[key][str(t)] is None else _pm(r[key][str(t)], 1)
                           for t in SPEED_THRESHOLDS)
        lines.append(f"| {sname} | {_pm(r['final'])} | {r['train_seconds']['mean']:.1f} | {cells} |")
      before = rows.get(before_name)
      if before:
        lines.append("")
        for thr in SPEED_THRESHOLDS:
          b = before[key][str(thr)]
          best = [(r[key][str(thr)]["mean"], s) for s, r in rows.items()
                  if s != before_name and r[key][str(thr)] is not None]
          if best:
            t, s = min(best)
            ratio = (f"before {b['mean']:.1f} s: **{b['mean'] / t:.1f}x** less wall-clock" if b is not None else
                     f"before: not reached in {before['train_seconds']['mean']:.0f} s (3x its budget): "
                     f"**> {before['train_seconds']['mean'] / t:.1f}x**")
            lines.append(f"- accuracy {thr}: fastest tuned setting ({s}) {t:.1f} s; {ratio}")
      lines.append("")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ fixed points
def fixed_point_velocity(base, slope, diffusion, num_steps=40, num_paths=2048, grid=np.linspace(-4.0, 4.0, 161),
                         seed=0):
  """The fine-tuned velocity at the fixed point of the AM loss with ``diffusion``, on the 1-D problem r(x) = slope x.

  The loss's minimiser is the SOC optimum of the discretised base process with that diffusion (paper Eq. 17 for a
  constant sigma, whose optimum is biased): each step's optimal transition is the base transition tilted by
  exp V_{k+1}, V_k(x) = log E[exp(r(X_K)) | X_k = x] on the Euler grid of the training (K steps, offset 0.5), so
  u_k(x) = sigma_k grad V_{k+1}(x + h_k b_k(x)) (the tilt of a Gaussian step of variance sigma_k^2 h_k shifts its mean by
  sigma_k^2 h_k grad V) and v_ft = v_base + sigma_k u_k / (1 + c_k) (``methods.am_const_sigma``).  grad V_{k+1} is the
  pathwise derivative of a log-mean-exp over ``num_paths`` base paths (common noise across the x grid), interpolated
  linearly.  Returns ``velocity(x, t)`` for t equal to a training time tau_k (what the ODE sampler on the training grid
  queries)."""
  co = sampling.make_coefficients(S, diffusion, num_steps, 0.5, True)
  vb = lambda x, t: gmm.velocity(base, x, t, S)  # noqa: E731
  xg = jnp.asarray(grid, jnp.float32)

  def log_value(k, x, key):  # V_k(x): log E[exp(slope X_K) | X_k = x] under the discretised base process
    xi = sampling.draw_noise(key, num_steps, (num_paths, 1))

    def body(j, xx):
      s = sampling.step_at(co, j)
      xn = sampling.euler(vb, xx, xi[j], s)
      return jnp.where(j >= k, xn, xx)

    x1 = jax.lax.fori_loop(0, num_steps, body, jnp.full((num_paths, 1), x, jnp.float32))
    return jax.scipy.special.logsumexp(slope * x1[:, 0]) - jnp.log(num_paths)

  grad_v = jax.jit(jax.vmap(jax.grad(log_value, argnums=1), in_axes=(None, 0, None)))
  keys = jax.random.split(jax.random.PRNGKey(seed), num_steps)
  table = jnp.stack([grad_v(k + 1, xg, keys[k]) if k + 1 < num_steps else jnp.full_like(xg, slope)
                     for k in range(num_steps)])  # (K, grid): grad V_{k+1}; V_K = r

  def velocity(x, t):
    k = jnp.argmin(jnp.abs(co.tau - t[0]))
    s = sampling.step_at(co, k)
    v = vb(x, t)
    x_mean = x + s.dt * sampling.drift_of(v, x, s)
    return v + s.sigma ** 2 * jnp.interp(x_mean[:, 0], xg, table[k])[:, None] / (1.0 + s.drift_scale)

  return velocity


def fixed_points(seeds=(0, 1, 2), diffusions=("memoryless", 1.0, 0.2), num_paths=2048, n=20000):
  """W1 to the exact tilt and right-mode mass of each diffusion's fixed point (1-D, r(x) = x), sampled by the ODE on
  the training grid as Fig. 2 samples its trained models; seeds = sampling seeds (one fixed-point estimate each)."""
  base = gmm.bimodal_1d()
  target = gmm.tilt_linear(base, 1.0)
  out = {}
  for diffusion in diffusions:
    w1s, masses = [], []
    for seed in seeds:
      velocity = fixed_point_velocity(base, 1.0, diffusion, num_paths=num_paths, seed=100 + seed)
      xs = jax.jit(lambda key, velocity=velocity: sampling.sample(lambda p, x, t: velocity(x, t), None, key, (n, 1),
                                                                   S, "ode", 40, 0.5))(jax.random.PRNGKey(seed))
      w1s.append(metrics.wasserstein1_to_cdf(xs, lambda z: np.asarray(gmm.cdf_1d(target, z))))
      masses.append(float(metrics.mode_mass(xs, target.means)[1]))
    out[str(diffusion)] = {"w1_to_target": _summary(w1s), "right_mode_mass": _summary(masses),
                           "target_mass": float(target.weights[1])}
    print(f"{str(diffusion):10s} fixed point: W1 {_pm(out[str(diffusion)]['w1_to_target'])}, right-mode mass "
          f"{_pm(out[str(diffusion)]['right_mode_mass'])} (target {float(target.weights[1]):.3f})", flush=True)
  return out


def fixed_points_markdown(res):
  lines = ["| diffusion while fine-tuning | fixed point: W1 to the exact tilt | right-mode mass (target 0.881) |",
           "|---|---|---|"]
  for name, r in res.items():
    lines.append(f"| {name} | {_pm(r['w1_to_target'])} | {_pm(r['right_mode_mass'])} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--part", choices=["breakdown", "noise", "asymptote", "main", "speed", "fixed_points"], default="noise")
  parser.add_argument("--problems", default="1d_bimodal,2d_ring")
  parser.add_argument("--settings", default="", help="';'-separated subset of the noise settings (default: all)")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--workdir", default="runs/convergence_main")
  parser.add_argument("--out", default=RESULTS)
  parser.add_argument("--tag", default="")
  parser.add_argument("--num_paths", type=int, default=2048, help="fixed_points: base paths per value estimate")
  parser.add_argument("--diffusions", default="memoryless,1.0,0.2", help="fixed_points: diffusions")
  args = parser.parse_args()
  seeds = tuple(int(s) for s in args.seeds.split(","))
  only = tuple(args.problems.split(","))
  t0 = time.perf_counter()
  command = "python -m benchmarks.convergence " + " ".join(
      f"--{k}={v}" for k, v in vars(args).items()
      if k not in ("out",) and v not in ("",) and (k != "workdir" or args.part == "main")
      and (k not in ("num_paths", "diffusions") or args.part == "fixed_points"))
  stem = os.path.join(args.out, f"convergence_{args.part}{args.tag}")
  os.makedirs(args.out, exist_ok=True)

  def write(result, table, final=False):
    meta = {"command": command, "machine": "2-core shared CPU", "date": datetime.date.today().isoformat(),
            "total_wall_seconds": time.perf_counter() - t0, "complete": final}
    with open(stem + ".json", "w") as f:
      json.dump(dict(meta, result=result), f, indent=1)
    with open(stem + ".md", "w") as f:
      f.write(f"`{command}` ({meta['machine']}, {meta['date']}, {meta['total_wall_seconds']:.0f} s"
              f"{'' if final else ', partial'})\n\n{table}\n")

  if args.part == "breakdown":
    result = breakdown(seeds, args.steps, only)
    table = breakdown_markdown(result)
  elif args.part == "asymptote":
    result = asymptote(seeds, args.steps, only)
    table = asymptote_markdown(result)
  elif args.part == "noise":
    result = noise(seeds, args.steps, only, [s for s in args.settings.split(";") if s] or None,
                   checkpoint=lambda r: write(r, noise_markdown(r)))
    table = noise_markdown(result)
  elif args.part == "speed":
    result = speed(seeds, only)
    table = speed_markdown(result)
  elif args.part == "fixed_points":
    result = fixed_points(seeds, tuple(d if d == "memoryless" else float(d) for d in args.diffusions.split(",")),
                          args.num_paths)
    table = fixed_points_markdown(result)
  else:
    result = main_job(seeds, args.workdir)
    table = main_markdown(result)
  print(table)
  write(result, table, final=True)

if __name__ == "__main__":
  main()
