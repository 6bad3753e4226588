r"""Reruns the commands behind the figures and tables of README.md / BUILD_NOTES.md (one command for all).

    am-jax reproduce --only=fig2,main --workdir=runs/reproduce            # a subset
    am-jax reproduce --workdir=runs/reproduce --update_docs               # everything, then copy figures to docs/
    am-jax reproduce --dry_run                                            # print the commands only

Each recipe is a list of ``am-jax`` commands (run as subprocesses, so recipes never import launchers) and the
figures it refreshes in ``docs/``.  A recipe's runs go to ``<workdir>/<recipe>``; runs already there are resumed or
kept (the launchers resume), so regenerate figures after a code change in a NEW ``--workdir``.  Seeds are part of each command (``--seeds`` / ``--config.seed``); headline
numbers use three seeds.  Wall-clock on 2 CPU cores: fig2 ~5 min, main ~6 min, compare_toy2d ~3 min,
compare_toy ~20 min, soc ~15 min, digits ~20 min, compare_digits ~15 min (after digits).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from absl import flags

from am_jax import launch, reporting

flags.DEFINE_list("only", [], "Recipes to run (default: all, in order).")
flags.DEFINE_bool("dry_run", False, "Print the commands without running them.")
flags.DEFINE_bool("update_docs", False, "Copy each recipe's figures into docs/ after it succeeds.")
FLAGS = flags.FLAGS

SEEDS = (0, 1, 2)

# name -> (commands with {w} = the recipe's workdir, {(source in {w}, destination in docs/)})
RECIPES = {
    "fig2": (["am-jax toy-figure --workdir={w} --seeds=0,1,2"],
             {"toy_fig2.png": "toy_fig2.png", "toy_fig2.json": "toy_fig2.json"}),
    "main": ([f"am-jax finetune --config=gmm2d --workdir={{w}}/seed{s} --config.seed={s}" for s in SEEDS],
             {"seed0/scatter.png": "gmm2d_scatter.png", "summary.json": "gmm2d_seeds.json"}),
    "compare_toy2d": (["am-jax compare --task=toy2d --workdir={w}"], {"compare_toy2d.png": "compare_toy2d.png"}),
    "compare_toy": (["{python} -m {pkg}.compare_toy --workdir={w}"], {"compare_toy.png": "compare_toy.png"}),
    "soc": ([f"am-jax soc --config=soc.py:{v} --workdir={{w}}/{v}"
             for v in ("linear_ou", "quadratic_easy", "quadratic_hard", "double_well")],
            {f"{v}/{v}_l2.png": f"soc_{v}_l2.png" for v in ("linear_ou", "quadratic_easy", "quadratic_hard",
                                                            "double_well")}),
    "digits": (["am-jax pretrain --config=digits_pretrain --config.pretrain.steps=3000 --workdir=runs/digits_base",
                "am-jax train-reward --config=digits_reward --workdir=runs/digits_reward",
                "am-jax finetune --config=digits_finetune --config.am.reward_multiplier=2 --workdir={w}/lam2",
                "am-jax finetune --config=digits_finetune --config.am.reward_multiplier=8 --workdir={w}/lam8",
                "am-jax evaluate --config=digits_finetune --workdir={w}/eval --runs={w}/lam2,{w}/lam8"],
               {"eval/grid_ode_w1.png": "digits_grid_ode.png"}),
    "compare_digits": (["am-jax compare --task=digits --workdir={w}"], {"compare_digits.png": "compare_digits.png"}),
}


def _package() -> str:
  """Where the launchers are importable from: the installed ``am_jax.experiments`` or the repo's ``experiments``."""
  import importlib.util
  try:
    if importlib.util.find_spec("am_jax.experiments") is not None:
      return "am_jax.experiments"
  except ImportError:
    pass
  return "experiments"


def _seed_summary(workdir: str) -> dict:
  """Mean and sample std over the seeds of the main job's numeric metrics."""
  import numpy as np
  rows = []
  for s in SEEDS:
    with open(os.path.join(workdir, f"seed{s}", "metrics.json")) as f:
      rows.append(json.load(f))
  keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
  out = {"seeds": list(SEEDS)}
  for k in keys:
    vals = np.array([r[k] for r in rows if r.get(k) is not None], float)
    out[k] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
  return out


def main(_, workdir):
  names = FLAGS.only or list(RECIPES)
  unknown = [n for n in names if n not in RECIPES]
  if unknown:
    raise launch.UsageError(f"--only: unknown recipes {unknown}; choose from {list(RECIPES)}.")
  docs = os.path.join(os.getcwd(), "docs")
  done = {}
  for name in names:
    commands, figures = RECIPES[name]
    w = os.path.join(workdir, name)
    for template in commands:
      cmd = template.format(w=w, python=shlex.quote(sys.executable), pkg=_package())
      reporting.info(f"[reproduce {name}] {cmd}")
      if FLAGS.dry_run:
        continue
      t0 = time.perf_counter()
      subprocess.run(shlex.split(cmd), check=True)
      reporting.info(f"[reproduce {name}] done in {time.perf_counter() - t0:.0f} s")
    if FLAGS.dry_run:
      continue
    if name == "main":
      with open(os.path.join(w, "summary.json"), "w") as f:
        json.dump(_seed_summary(w), f, indent=2)
    if FLAGS.update_docs:
      for src, dst in figures.items():
        shutil.copy(os.path.join(w, src), os.path.join(docs, dst))
    done[name] = w
  return done


if __name__ == "__main__":
  flags.DEFINE_string("workdir", "runs/reproduce", "Where each recipe's outputs go (<workdir>/<recipe>).")
  launch.run(main, config=False)
