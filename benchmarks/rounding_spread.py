r"""How far float rounding alone moves the Fig. 2 numbers: the same runs with and without the loss's time-block path.

    python -m benchmarks.rounding_spread --seeds=0,1,2,3,4,5,6,7,8,9 --diffusions=memoryless
    python -m benchmarks.rounding_spread --seeds=0,1,2,3,4,5 --diffusions=1.0

Each run is one Fig. 2 run (``am-jax toy-figure``: ``toy.finetune_mixture`` on the exact 1-D bimodal base, linear
reward, 2000 steps x 512, ``toy.TUNED_OPTIMISER``), evaluated as the figure is (ODE samples, W1 to the exact tilted
CDF, right-mode mass).  Variants: ``blocks`` = the library as it is; ``per_row`` = the same with ``models.MLP``
evaluated per row at the loss points (``common.per_row_loss_time``: the code before the time-block path, issue 17).
The two compute the same gradients to ~1e-6 of their largest entry (docs/performance.md section 12.12); over 2000
Adam steps at a peak learning rate of 2e-2 that difference grows into a different run, so the comparison is between
distributions over seeds.  ~45 s per run on 2 idle CPU cores; accuracy only (no timing), one JSON line per run
printed as it finishes.  Writes ``benchmarks/results/<out>.{json,md}``.

Measured 2026-11-26 (session 9; the numbers in BUILD_NOTES.md section 5 and docs/maths.md section 5): memoryless,
seeds 0-9: 0.025 ± 0.006 / mass 0.867 ± 0.005 (blocks) vs 0.023 ± 0.004 / 0.869 ± 0.004 (per_row); sigma 1.0, seeds
0-5: 0.201 ± 0.029 / 0.811 ± 0.017 vs 0.207 ± 0.016 / 0.812 ± 0.010.
"""
from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

from benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
flags.DEFINE_list("diffusions", ["memoryless"], "Fine-tuning diffusions: 'memoryless' or a constant sigma.")
flags.DEFINE_list("variants", ["blocks", "per_row"], "blocks (the library) and / or per_row (before time blocks).")
flags.DEFINE_integer("steps", 2000, "Fine-tuning steps per run (the Fig. 2 budget).")
flags.DEFINE_string("out", "fig2_time_blocks_seed_study", "Results name under benchmarks/results/.")


def run_one(variant: str, diffusion, seed: int, steps: int) -> dict:
  """One Fig. 2 run; {'w1': ..., 'mass': ...}."""
  import contextlib

  from am_jax import gmm, losses, rewards, toy
  base = gmm.bimodal_1d()
  target = gmm.tilt_linear(base, 1.0)
  config = losses.AMConfig(loss_clip=None, diffusion=diffusion)
  with common.per_row_loss_time() if variant == "per_row" else contextlib.nullcontext():
    res = toy.finetune_mixture(base, rewards.linear_reward(1.0), config, steps=steps, batch_size=512, seed=seed,
                               log_fn=None, **toy.TUNED_OPTIMISER)
  ev = toy.evaluate_against_target(res, target, diffusion="ode")
  return {"w1": float(ev["distance_to_cdf"]), "mass": float(ev["mode_mass"][1])}


def markdown(out: dict) -> str:
  lines = [f"# Fig. 2 runs with / without the loss's time-block path ({out['steps']} steps)", "",
           "`python -m benchmarks.rounding_spread`; " + out["machine"], "",
           "| diffusion | variant | seeds | W1 (mean ± std) | right-mode mass (mean ± std; exact 0.881) | W1 > 0.2 |",
           "|---|---|---|---|---|---|"]
  for key, runs in out["runs"].items():
    diffusion, variant = key.split("/")
    w = np.array([r["w1"] for r in runs])
    m = np.array([r["mass"] for r in runs])
    sd = lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0  # noqa: E731
    lines.append(f"| {diffusion} | {variant} | {','.join(str(r['seed']) for r in runs)} | {w.mean():.4f} ± {sd(w):.4f}"
                 f" | {m.mean():.4f} ± {sd(m):.4f} | {int((w > 0.2).sum())} / {len(w)} |")
  return "\n".join(lines) + "\n"


def main(_):
  for v in FLAGS.variants:
    if v not in ("blocks", "per_row"):
      raise app.UsageError(f"--variants: 'blocks' or 'per_row', got {v!r}.")
  diffusions = [d if d == "memoryless" else float(d) for d in FLAGS.diffusions]
  info = common.machine_info()
  out = {"steps": FLAGS.steps, "machine_info": info, "runs": {},
         "machine": ", ".join(f"{k} {v}" for k, v in info.items() if isinstance(v, (str, int, float)))}
  for diffusion in diffusions:
    for variant in FLAGS.variants:
      rows = out["runs"].setdefault(f"{diffusion}/{variant}", [])
      for seed in (int(s) for s in FLAGS.seeds):
        row = dict(seed=seed, **run_one(variant, diffusion, seed, FLAGS.steps))
        rows.append(row)
        print(json.dumps({"diffusion": str(diffusion), "variant": variant, **row}), flush=True)
  path = os.path.join("benchmarks", "results", FLAGS.out)
  with open(path + ".json", "w") as f:
    json.dump(out, f, indent=1)
  with open(path + ".md", "w") as f:
    f.write(markdown(out))
  print(markdown(out))


if __name__ == "__main__":
  app.run(main)
