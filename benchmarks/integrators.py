r"""Euler vs the exponential integrator (docs/maths.md section 6) on the exact mixture problems.

    python -m benchmarks.integrators --part=base       # base process / ODE accuracy at K = 10, 20, 40 (~1 min)
    python -m benchmarks.integrators --part=finetune   # 1-D Fig. 2 and 2-D ring fine-tunes, 3 seeds each (~15 min)
    python -m benchmarks.integrators --part=fixed_point  # s*: is the exact tilt each scheme's loss minimiser? (~1 min)
    python -m benchmarks.integrators --part=reuse      # trajectory reuse R = 1, 2, 4, 8 at a fixed wall-clock budget
    python -m benchmarks.integrators --part=multistep  # DPM-Solver++(2M) sampler at K = 10 / 20 vs Euler K = 40 (~2 min)
    python -m benchmarks.integrators --part=sde_k10    # memoryless SDE at K = 10: 2M / 2M-Heun / 3M x 4 grids (~3 min)

``base``: the exact base velocity sampled with each integrator (memoryless SDE and ODE), 20k samples, 3 seeds:
W1 to the exact CDF (1-D bimodal) or sliced W1 to an exact sample (2-D ring of the main job) next to the noise
floor (two exact samples).  ``finetune``: ``toy.finetune_mixture`` (exact base + zero-initialised control MLP,
Adam 1e-3, 1000 steps, default AMConfig apart from the integrator / K), evaluated with the Euler ODE on the K = 40
grid (``toy.evaluate_against_target``): 1-D bimodal with r(x) = x (batch 512; W1 to the exact tilt's CDF,
right-mode mass, target 0.881) and the 2-D ring with the main job's quadratic reward (batch 256, hidden (64, 64);
sliced W1 to the exact tilt and its noise floor).  Writes ``benchmarks/results/integrators_<part>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from am_jax import gmm, losses, metrics, rewards, sampling, schedules, toy
from am_jax import multistep as multistep_lib

S = schedules.LinearSchedule()
RING = dict(num=8, radius=2.0, std=0.25)
RING_REWARD = (0.5 * jnp.eye(2), jnp.array([1.0, 0.5]))  # r(x) = -|x|^2/4 + (1, 0.5).x, configs/gmm2d.py


def _summary(values):
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}


def base_accuracy(seeds=(0, 1, 2), n=20000):
  out = {}
  for name, mix in [("1d_bimodal", gmm.bimodal_1d()), ("2d_ring", gmm.ring_2d(**RING))]:
    vf = lambda x, t, mix=mix: gmm.velocity(mix, x, t, S)  # noqa: E731
    for diffusion in ("memoryless", "ode"):
      for integrator in ("euler", "exponential"):
        for k in (10, 20, 40):
          dists, floors = [], []
          for seed in seeds:
            coeffs = sampling.make_coefficients(S, diffusion, k, 0.5, True, integrator)
            k0, kn, k1, k2 = jax.random.split(jax.random.PRNGKey(seed), 4)
            x0 = jax.random.normal(k0, (n, mix.dim))
            xs = jax.jit(lambda x0, kn: sampling.simulate(vf, x0, sampling.draw_noise(kn, k, x0.shape), coeffs)[-1])(
                x0, kn)
            if mix.dim == 1:
              dists.append(metrics.wasserstein1_to_cdf(xs, lambda z: np.asarray(gmm.cdf_1d(mix, z))))  # noqa: B023
              floors.append(0.0)
            else:
              ref, ref2 = gmm.sample(mix, k1, n), gmm.sample(mix, k2, n)
              dists.append(float(metrics.sliced_wasserstein1(xs, ref)))
              floors.append(float(metrics.sliced_wasserstein1(ref2, ref)))
          key = f"{name}/{diffusion}/{integrator}/K={k}"
          out[key] = {"distance": _summary(dists), "noise_floor": _summary(floors)}
          print(f"{key:45s} {np.mean(dists):.4f} +- {np.std(dists, ddof=1):.4f}  (floor {np.mean(floors):.4f})",
                flush=True)
  return out


def finetune(seeds=(0, 1, 2), steps=1000, runs=None):
  runs = runs or [("euler", 40), ("exponential", 40), ("exponential", 20)]
  out = {}
  problems = [("1d_bimodal", gmm.bimodal_1d(), rewards.linear_reward(1.0), gmm.tilt_linear(gmm.bimodal_1d(), 1.0),
               dict(batch_size=512)),
              ("2d_ring", gmm.ring_2d(**RING), rewards.quadratic_reward(*RING_REWARD),
               gmm.tilt_quadratic(gmm.ring_2d(**RING), *RING_REWARD), dict(batch_size=256, hidden=(64, 64)))]
  for name, base, reward, target, kw in problems:
    for integrator, k in runs:
      rows = []
      for seed in seeds:
        config = losses.AMConfig(integrator=integrator, num_steps=k)
        t0 = time.perf_counter()
        res = toy.finetune_mixture(base, reward, config, steps=steps, seed=seed, log_fn=None, **kw)
        ev = toy.evaluate_against_target(res, target, diffusion="ode", num_steps=40)
        row = {"seed": seed, "distance": float(ev.get("distance_to_cdf", ev["distance"])),
               "noise_floor": float(ev["noise_floor"]), "mode_mass": [float(m) for m in ev["mode_mass"]],
               "train_seconds": res.seconds, "wall_seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{name} {integrator} K={k} seed {seed}: distance {row['distance']:.4f} (floor "
              f"{row['noise_floor']:.4f}) mass {np.round(row['mode_mass'], 3).tolist()} train {res.seconds:.0f} s",
              flush=True)
      out[f"{name}/{integrator}/K={k}"] = {
          "distance": _summary([r["distance"] for r in rows]), "noise_floor": _summary([r["noise_floor"] for r in rows]),
          "target_mass": [float(w) for w in target.weights], "runs": rows}
  return out


def fixed_point(n=40000, seed=3):
  """The scale s* minimising each scheme's loss along v_base + s (v_tilt - v_base) on the exact tilt's trajectories
  (1-D bimodal, r(x) = x): 1 if the scheme's discrete optimum is the exact tilted velocity.  Global and per step."""
  from am_jax import adjoint
  mix = gmm.bimodal_1d()
  target = gmm.tilt_linear(mix, 1.0)
  vb = lambda x, t: gmm.velocity(mix, x, t, S)  # noqa: E731
  vs = lambda x, t: gmm.velocity(target, x, t, S)  # noqa: E731
  out = {}
  for k_steps in (40, 10):
    for integrator in ("euler", "exponential"):
      c = sampling.make_coefficients(S, "memoryless", k_steps, 0.5, True, integrator)
      k0, kn = jax.random.split(jax.random.PRNGKey(seed))
      x0 = jax.random.normal(k0, (n, 1))
      traj = sampling.simulate(vs, x0, sampling.draw_noise(kn, k_steps, x0.shape), c)
      a1, _ = adjoint.terminal_adjoint(rewards.linear_reward(1.0), traj[-1], 1.0)
      adj = adjoint.lean_adjoint(vb, traj, a1, c)
      num, den = [], []
      for k in range(k_steps):
        t = jnp.full((n,), c.tau[k])
        u = (1 + c.loss_drift_scale[k]) / c.loss_sigma[k] * (vs(traj[k], t) - vb(traj[k], t))
        tgt = -c.loss_sigma[k] * adj[k + 1]
        num.append(float(jnp.sum(u * tgt)))
        den.append(float(jnp.sum(u * u)))
      per_step = (np.array(num) / np.array(den)).tolist()
      out[f"{integrator}/K={k_steps}"] = {"global": sum(num) / sum(den), "per_step": per_step}
      print(f"{integrator:12s} K={k_steps}: s* {sum(num) / sum(den):.3f}; per step (every K/10) "
            + " ".join(f"{v:.2f}" for v in per_step[::max(1, k_steps // 10)]), flush=True)
  return out


def reuse(seeds=(0, 1, 2), budget_s=60.0, repeats=(1, 2, 4, 8), integrator="euler", eval_every_s=5.0,
          only=("1d_bimodal", "2d_ring"), optimiser_steps=0):
  """Trajectory reuse: each simulated batch (trajectories + lean adjoint) feeds R Adam steps, each with its own
  loss time steps; wall-clock (training only; evaluation not timed) to a fixed distance on both exact problems.

  ``optimiser_steps`` > 0: instead of a wall-clock budget at Adam 1e-3, a fixed number of optimiser steps with
  ``toy.TUNED_OPTIMISER`` (cosine decay over those steps, EMA 0.99 of the params evaluated at the end), so R = 2
  simulates half as many batches for the same optimiser steps."""
  import optax
  from flax import nnx

  from am_jax import models
  from am_jax import parameterisation as param_lib
  out = {}
  problems = [("1d_bimodal", gmm.bimodal_1d(), rewards.linear_reward(1.0), gmm.tilt_linear(gmm.bimodal_1d(), 1.0),
               512, (64, 64)),
              ("2d_ring", gmm.ring_2d(**RING), rewards.quadratic_reward(*RING_REWARD),
               gmm.tilt_quadratic(gmm.ring_2d(**RING), *RING_REWARD), 256, (64, 64))]
  config = losses.AMConfig(integrator=integrator)
  for name, base, reward, target, batch, hidden in problems:
    if name not in only:
      continue
    base_apply = toy.mixture_base(base, S)
    for r in repeats:
      rows = []
      for seed in seeds:
        net_apply, params = models.functional(models.MLP(base.dim, hidden=hidden, zero_init_output=True,
                                                         rngs=nnx.Rngs(seed)))
        ft = param_lib.residual_model(base_apply, base, net_apply, S, "control")
        tuned = optimiser_steps > 0
        opt = optax.adam(toy.learning_rate_schedule(toy.TUNED_OPTIMISER["learning_rate"], optimiser_steps,
                                                    toy.TUNED_OPTIMISER["lr_schedule"]) if tuned else 1e-3)
        ema_decay = toy.TUNED_OPTIMISER["ema_decay"]
        ema = optax.ema(ema_decay, debias=True)
        opt_state = opt.init(params)
        ema_state = ema.init(params)

        @jax.jit
        def simulate(params, key):
          return losses.make_am_batch(ft, params, base_apply, base, reward, key, (batch, base.dim), config)

        @jax.jit
        def update(params, opt_state, ema_state, am_batch, key):
          grads = jax.grad(lambda p: losses.adjoint_matching_loss(ft, p, base_apply, base, am_batch, key, config)[0])(
              params)
          updates, opt_state = opt.update(grads, opt_state, params)
          params = optax.apply_updates(params, updates)
          if tuned:  # the EMA in the same program as the step (static flag: the constant-rate loop does without)
            ema_state = ema.update(params, ema_state)[1]
          return params, opt_state, ema_state

        def evaluate(params):
          res = toy.ToyResult(params, ft, {}, 0.0, config)
          ev = toy.evaluate_against_target(res, target, diffusion="ode", num_steps=40, num_samples=20000)
          return float(ev.get("distance_to_cdf", ev["distance"])), float(ev["noise_floor"])

        key = jax.random.PRNGKey(seed)
        # Compile outside the clock.
        b0 = simulate(params, key)
        jax.block_until_ready(update(params, opt_state, ema_state, b0, key))
        elapsed, steps, curve, next_eval = 0.0, 0, [], eval_every_s
        if tuned:
          while steps < optimiser_steps:
            t0 = time.perf_counter()
            key, k_sim = jax.random.split(key)
            am_batch = simulate(params, k_sim)
            for _ in range(min(r, optimiser_steps - steps)):
              key, k_loss = jax.random.split(key)
              params, opt_state, ema_state = update(params, opt_state, ema_state, am_batch, k_loss)
              steps += 1
            jax.block_until_ready(params)
            elapsed += time.perf_counter() - t0
          eval_params = jax.tree.map(lambda e: e / (1.0 - ema_decay ** ema_state.count), ema_state.ema)
          d, floor = evaluate(eval_params)
          curve.append((elapsed, steps, d))
        while not tuned and elapsed < budget_s:
          t0 = time.perf_counter()
          key, k_sim = jax.random.split(key)
          am_batch = simulate(params, k_sim)
          for _ in range(r):
            key, k_loss = jax.random.split(key)
            params, opt_state, ema_state = update(params, opt_state, ema_state, am_batch, k_loss)
            steps += 1
          jax.block_until_ready(params)
          elapsed += time.perf_counter() - t0
          if elapsed >= next_eval or elapsed >= budget_s:
            d, floor = evaluate(params)
            curve.append((elapsed, steps, d))
            next_eval += eval_every_s
        rows.append({"seed": seed, "curve": curve, "final": curve[-1][2], "noise_floor": floor, "steps": steps})
        print(f"{name} R={r} seed {seed}: {steps} steps in {elapsed:.0f} s, final distance {curve[-1][2]:.4f} "
              f"(floor {floor:.4f}); curve " + " ".join(f"{c[0]:.0f}s:{c[2]:.3f}" for c in curve), flush=True)
      out[f"{name}/R={r}"] = {"final": _summary([row["final"] for row in rows]), "runs": rows}
  return out


# ------------------------------------------------------------------------------------------------ multistep
GRID_POWER = {"uniform": 1.0, "late1.5": 1.5}


def sde_grid(k: int, grid: str):
  """Grids of the K = 10 SDE study: 'uniform', 'late<p>' = 1 - (1 - u)^p, or 'logsnr<lo>:<hi>' (uniform in the half
  log-SNR lambda = log(t / (1 - t)) between lo and hi, plus t = 0 and t = 1)."""
  if grid.startswith("logsnr"):
    lo, hi = (float(a) for a in grid[len("logsnr"):].split(":"))
    t = jax.nn.sigmoid(jnp.linspace(lo, hi, k - 1))
    return jnp.concatenate([jnp.zeros(1), t, jnp.ones(1)])
  if grid.startswith("late"):
    return multistep_lib.multistep_grid(k, float(grid[len("late"):]))
  return multistep_lib.multistep_grid(k, GRID_POWER[grid])


def sde_multistep(velocity_fn, x, key, t, variant: str):
  """Memoryless-SDE (eta = 1) DPM-Solver++ variants for the K = 10 study (benchmark-only, Python-unrolled): '2m'
  (midpoint, = ``multistep.dpm_solver_2m``), '2m_heun' (the Heun-type correction coefficient 1 - (1 - e^{-2h}) / 2h)
  and '3m' (third order from the last three data predictions; Lu et al. 2022 / k-diffusion's 3M SDE form)."""
  k_steps = t.shape[0] - 1
  ts = t.at[0].set(1e-4)
  lam = jnp.log(S.alpha(ts) / S.beta(jnp.minimum(ts, 1.0 - 1e-6)))
  ds, hs = [], []
  keys = jax.random.split(key, k_steps)
  for k in range(k_steps):
    s, tn = ts[k], t[k + 1]
    v = velocity_fn(x, jnp.full((x.shape[0],), s))
    d = (S.beta(s) * v - S.beta_dot(s) * x) / (S.alpha_dot(s) * S.beta(s) - S.alpha(s) * S.beta_dot(s))
    if k == k_steps - 1:
      return d
    h = lam[k + 1] - lam[k]
    one_minus = -jnp.expm1(-2.0 * h)
    phi2 = 1.0 - one_minus / (2.0 * h)
    x_new = (S.beta(tn) / S.beta(s)) * jnp.exp(-h) * x + S.alpha(tn) * one_minus * d
    if variant == "3m" and len(ds) >= 2:
      r0, r1 = hs[-1] / h, hs[-2] / h
      d10, d11 = (d - ds[-1]) / r0, (ds[-1] - ds[-2]) / r1
      d1, d2 = d10 + (d10 - d11) * r0 / (r0 + r1), (d10 - d11) / (r0 + r1)
      x_new = x_new + S.alpha(tn) * (phi2 * d1 - (phi2 / (2.0 * h) - 0.5) * d2)
    elif ds:
      coef = 0.5 * one_minus if variant == "2m" else phi2
      x_new = x_new + S.alpha(tn) * coef * (d - ds[-1]) / (hs[-1] / h)
    x = x_new + S.beta(tn) * jnp.sqrt(one_minus) * jax.random.normal(keys[k], x.shape)
    ds.append(d)
    hs.append(h)
  return x


def sde_k10(seeds=(0, 1, 2), n=20000, k=10):
  """Can any velocity-only stochastic scheme sample the memoryless SDE at K = 10 as closely as Euler at K = 40?"""
  out = {}
  for name, mix in [("1d_bimodal", gmm.bimodal_1d()), ("2d_ring", gmm.ring_2d(**RING))]:
    vf = lambda x, t, mix=mix: gmm.velocity(mix, x, t, S)  # noqa: E731
    for variant in ("2m", "2m_heun", "3m"):
      for grid in ("uniform", "late1.5", "logsnr-4:4", "logsnr-3:5"):
        dists = []
        for seed in seeds:
          k0, kn, k1 = jax.random.split(jax.random.PRNGKey(seed), 3)
          x0 = jax.random.normal(k0, (n, mix.dim))
          xs = jax.jit(lambda x0, kn: sde_multistep(vf, x0, kn, sde_grid(k, grid), variant))(x0, kn)  # noqa: B023
          if mix.dim == 1:
            dists.append(metrics.wasserstein1_to_cdf(xs, lambda z: np.asarray(gmm.cdf_1d(mix, z))))  # noqa: B023
          else:
            dists.append(float(metrics.sliced_wasserstein1(xs, gmm.sample(mix, k1, n))))
        key_name = f"{name}/memoryless/{variant}/{grid}/K={k}"
        out[key_name] = {"distance": _summary(dists)}
        print(f"{key_name:45s} {np.mean(dists):.4f} +- {np.std(dists, ddof=1):.4f}", flush=True)
  return out


def multistep(seeds=(0, 1, 2), n=20000):
  """Is a second-order exponential (multistep) sampler at K = 10 / 20 as close to the data as Euler at K = 40?"""
  out = {}
  for name, mix in [("1d_bimodal", gmm.bimodal_1d()), ("2d_ring", gmm.ring_2d(**RING))]:
    vf = lambda x, t, mix=mix: gmm.velocity(mix, x, t, S)  # noqa: E731
    runs = [(f"euler/{d}/K=40", None) for d in ("memoryless", "ode")]
    runs += [(f"2M/{d}/{g}/K={k}", (d, g, k)) for g in ("uniform", "late1.5") for k in (10, 20)
             for d in ("memoryless", "ode")]
    for key_name, spec in runs:
      dists = []
      for seed in seeds:
        k0, kn, k1 = jax.random.split(jax.random.PRNGKey(seed), 3)
        x0 = jax.random.normal(k0, (n, mix.dim))
        if spec is None:
          diffusion = key_name.split("/")[1]
          coeffs = sampling.make_coefficients(S, diffusion, 40, 0.5, True)
          xs = jax.jit(lambda x0, kn: sampling.simulate(vf, x0, sampling.draw_noise(kn, 40, x0.shape), coeffs)[-1])(
              x0, kn)
        else:
          d, g, k = spec
          xs = jax.jit(lambda x0, kn: multistep_lib.dpm_solver_2m(  # noqa: B023
              vf, x0, kn, S, k, d == "memoryless", GRID_POWER[g]))(x0, kn)  # noqa: B023
        if mix.dim == 1:
          dists.append(metrics.wasserstein1_to_cdf(xs, lambda z: np.asarray(gmm.cdf_1d(mix, z))))  # noqa: B023
        else:
          dists.append(float(metrics.sliced_wasserstein1(xs, gmm.sample(mix, k1, n))))
      out[f"{name}/{key_name}"] = {"distance": _summary(dists)}
      print(f"{name}/{key_name:32s} {np.mean(dists):.4f} +- {np.std(dists, ddof=1):.4f}", flush=True)
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--part", choices=["base", "finetune", "reuse", "fixed_point", "multistep", "sde_k10"], default="base")
  parser.add_argument("--budget_s", type=float, default=60.0)
  parser.add_argument("--repeats", default="1,2,4,8")
  parser.add_argument("--integrator", default="euler")
  parser.add_argument("--optimiser_steps", type=int, default=0,
                      help="reuse: > 0 runs this many optimiser steps with toy.TUNED_OPTIMISER instead of --budget_s")
  parser.add_argument("--tag", default="", help="suffix of the results file name")
  parser.add_argument("--problems", default="1d_bimodal,2d_ring")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--runs", default="euler:40,exponential:40,exponential:20")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args()
  seeds = tuple(int(s) for s in args.seeds.split(","))
  if args.part == "base":
    result = base_accuracy(seeds)
  elif args.part == "fixed_point":
    result = fixed_point()
  elif args.part == "multistep":
    result = multistep(seeds)
  elif args.part == "sde_k10":
    result = sde_k10(seeds)
  elif args.part == "reuse":
    result = reuse(seeds, args.budget_s, tuple(int(r) for r in args.repeats.split(",")), args.integrator,
                   only=tuple(args.problems.split(",")), optimiser_steps=args.optimiser_steps)
  else:
    runs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.runs.split(",")]
    result = finetune(seeds, args.steps, runs)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"integrators_{args.part}{args.tag}.json"), "w") as f:
    json.dump({"command": "python -m benchmarks.integrators " + " ".join(
                   f"--{k}={v}" for k, v in vars(args).items() if k != "out" and v != ""),
               "machine": "2-core shared CPU", "date": time.strftime("%Y-%m-%d"),
               "result": result}, f, indent=1)


if __name__ == "__main__":
  main()
