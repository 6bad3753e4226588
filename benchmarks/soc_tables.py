r"""Numeric SOC tables (issue 16 item 4): control L2 error vs iterations and vs wall-clock, >= 3 seeds, every method.

    python -m benchmarks.soc_tables --out=docs/results/soc                 # budget 'cpu30' (~30 min on 2 cores)
    python -m benchmarks.soc_tables --out=/tmp/soc_tiny --budget=tiny      # smoke test (a minute)
    python -m benchmarks.soc_tables --out=... --budget=full --problems=linear_ou   # the shipped iteration counts

For each problem of ``configs/soc.py`` (its shipped config: net, time input, K, learning rate) and each entry of
``ENTRIES`` (AM; on the double well AM with the TD(0.9) target it ships with and the plain lean adjoint; the
discrete adjoint; the continuous adjoint) it trains ``--seeds`` seeds with ``soc_training.run`` (the same fixed
evaluation paths for every method and seed) and writes to --out:

  <problem>.csv            per method and evaluation: L2 error across seeds (mean, std (ddof 1), min, max),
                           objective, mean training seconds (``soc_training.aggregate`` rows + a label column)
  <problem>_wallclock.csv  per method and wall-clock mark: L2 error of the last evaluation at or before the mark
                           (the error the method had reached by then), across seeds
  <problem>.md             both tables in markdown (mean ± std over seeds, [min, max])
  <problem>.png            L2 error vs iteration and vs training seconds, mean over seeds with min-max band
  <problem>_meta.json      command, machine, date, load average at start / end, seconds
  summary.md               the final row of every method of every problem found in --out (problems run by separate
                           invocations, e.g. in parallel, are merged)

Budgets: 'full' keeps the shipped ``num_iterations``; 'cpu30' cuts them (``BUDGETS``) so that the whole run fits
~30 minutes on the shared 2-core CPU (the cosine schedule is stretched over the shorter run, so the final errors
are those of a shorter training, not a prefix of the full one); 'tiny' is the smoke test.  Training seconds
exclude compilation and evaluation; the methods run one after another on a shared machine, so compare times only
inside one table and read meta.json's load average.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import sys
import time

import jax
import numpy as np

from am_jax import soc, soc_training

# (label, overrides of the shipped config).  The baselines have no TD target; td_lambda applies to 'am' only.
_BASE = [("am", dict(methods=("am",))),
         ("discrete_adjoint", dict(methods=("discrete_adjoint",))),
         ("continuous_adjoint", dict(methods=("continuous_adjoint",)))]
ENTRIES = {
    "linear_ou": _BASE,
    "quadratic_easy": _BASE,
    "quadratic_hard": _BASE,
    "double_well": [("am_td0.9", dict(methods=("am",))), ("am_lean", dict(methods=("am",), td_lambda=1.0))]
                   + _BASE[1:],
}

# Iterations per problem; eval_every gives ~10 evaluations.  None: the shipped value.
BUDGETS = {
    "full": {p: dict(num_iterations=None) for p in soc.PROBLEMS},
    "cpu30": {"linear_ou": dict(num_iterations=200, eval_every=20),
              "quadratic_easy": dict(num_iterations=400, eval_every=40),
              "quadratic_hard": dict(num_iterations=100, eval_every=10),
              "double_well": dict(num_iterations=60, eval_every=6)},
    "tiny": {p: dict(num_iterations=4, eval_every=2, batch_size=8, eval_batch_size=16, hidden=(8,), num_steps=10)
             for p in soc.PROBLEMS},
}
NUM_MARKS = 8


def load_config(problem: str):
  """configs/soc.py:<problem> (from the checkout, or the installed am_jax.configs)."""
  try:
    from configs import soc as soc_config
  except ImportError:  # installed package
    from am_jax.configs import soc as soc_config
  return soc_config.get_config(problem)


def problem_config(problem: str, entry_overrides: dict, budget: str, seeds: int, chunk_loss: int = -1):
  """``chunk_loss`` >= 0 replaces the config's (0: AM's loss in one call, as in the tables made before 2026-11-27)."""
  cfg = load_config(problem)
  cfg.unlock()
  cfg.update(entry_overrides)
  if chunk_loss >= 0:
    cfg.chunk_loss = int(chunk_loss)
  b = dict(BUDGETS[budget][problem])
  if b.get("num_iterations") is None:
    b.pop("num_iterations", None)
    b.setdefault("eval_every", cfg.eval_every)
  cfg.update(b, num_seeds=seeds)
  return cfg


def wallclock_rows(records_by_label: dict, num_marks: int = NUM_MARKS) -> list:
  """L2 error at wall-clock marks: for each label, seed and mark m, the L2 error of the last evaluation with
  train_seconds <= m; across seeds mean / std (ddof 1) / min / max.  Marks: num_marks equal steps up to the
  largest mean final training time over labels."""
  finals = [np.mean([r["train_seconds"] for r in recs if r["iteration"] == max(q["iteration"] for q in recs)])
            for recs in records_by_label.values()]
  marks = np.linspace(0.0, max(finals), num_marks + 1)[1:]
  rows = []
  for label, recs in records_by_label.items():
    by_seed = {}
    for r in recs:
      by_seed.setdefault(r["seed"], []).append(r)
    for m in marks:
      vals = []
      for rs in by_seed.values():
        done = [r for r in sorted(rs, key=lambda r: r["iteration"]) if r["train_seconds"] <= m]
        vals.append(done[-1]["l2_error"])
      v = np.array(vals)
      rows.append({"method": label, "seconds": float(m), "num_seeds": len(v), "l2_mean": float(v.mean()),
                   "l2_std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "l2_min": float(v.min()),
                   "l2_max": float(v.max())})
  return rows


def _fmt(r):
  return f"{r['l2_mean']:.3g} ± {r['l2_std']:.2g} [{r['l2_min']:.3g}, {r['l2_max']:.3g}]"


def markdown(problem: str, rows: list, wall: list, meta: dict) -> str:
  """Two tables: L2 vs iteration (rows = evaluations, columns = methods) and vs wall-clock marks."""
  labels = list(dict.fromkeys(r["method"] for r in rows))
  its = sorted({r["iteration"] for r in rows})
  stride = max(1, -(-len(its) // 12))
  keep = [it for i, it in enumerate(its) if i % stride == 0 or it == its[-1]]
  at = {(r["method"], r["iteration"]): r for r in rows}
  n = rows[0]["num_seeds"]
  lines = [f"### {problem}: control L2 error E∫|u − u*|²dt, mean ± std over {n} seeds [min, max]", "",
           "vs iterations (train s: mean training seconds of the method at that iteration):", "",
           "| iteration | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
  for it in keep:
    cells = []
    for lab in labels:
      r = at.get((lab, it))
      cells.append(f"{_fmt(r)} ({r['train_seconds_mean']:.0f} s)" if r else "–")
    lines.append(f"| {it} | " + " | ".join(cells) + " |")
  lines += ["", "vs wall-clock (training seconds, compile and evaluation excluded; the error reached by then):", "",
            "| seconds | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
  wat = {(r["method"], r["seconds"]): r for r in wall}
  for s in sorted({r["seconds"] for r in wall}):
    lines.append(f"| {s:.0f} | " + " | ".join(_fmt(wat[(lab, s)]) for lab in labels) + " |")
  lines += ["", f"Budget `{meta['budget']}`: {meta['iterations'][problem]} iterations; {meta['machine']}, "
            f"{meta['date']}; command `{meta['command']}`.", ""]
  return "\n".join(lines)


def write_csv(path, rows, fields):
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def run_problem(problem: str, budget: str, seeds: int, out: str, meta: dict, log=print, chunk_loss: int = -1) -> dict:
  """Trains every entry of ``ENTRIES[problem]``; writes the problem's CSVs, markdown and plot; returns the
  final aggregated row per label."""
  from experiments import soc as soc_launcher  # the plot of the launcher (matplotlib only when called)

  records_by_label, rows = {}, []
  for label, overrides in ENTRIES[problem]:
    cfg = problem_config(problem, overrides, budget, seeds, chunk_loss)
    meta["iterations"][problem] = cfg.num_iterations
    t0 = time.perf_counter()
    _, records = soc_training.run(cfg)
    recs = [dict(r, method=label) for r in records[cfg.methods[0]]]
    records_by_label[label] = recs
    agg = soc_training.aggregate(recs)
    rows += agg
    log(f"[{problem}] {label}: L2 {agg[-1]['l2_mean']:.4g} ± {agg[-1]['l2_std']:.2g} at it {agg[-1]['iteration']}"
        f" ({seeds} seeds, {time.perf_counter() - t0:.0f} s incl. compile/eval)")
  wall = wallclock_rows(records_by_label)
  write_csv(os.path.join(out, f"{problem}.csv"), rows, ("method",) + tuple(k for k in rows[0] if k != "method"))
  write_csv(os.path.join(out, f"{problem}_wallclock.csv"), wall, tuple(wall[0]))
  with open(os.path.join(out, f"{problem}.md"), "w") as f:
    f.write(markdown(problem, rows, wall, meta))
  soc_launcher.plot(rows, os.path.join(out, f"{problem}.png"),
                    f"{problem}: control L2 error ({seeds} seeds, budget {budget})")
  return {lab: [r for r in rows if r["method"] == lab][-1] for lab in records_by_label}


def summary_markdown(out: str) -> str:
  """summary.md: the final row of every method for each problem with a ``<problem>.csv`` and
  ``<problem>_meta.json`` in ``out`` (so problems run by separate invocations, e.g. in parallel, are merged)."""
  lines = ["Final control L2 error E∫|u − u*|²dt, mean ± std over seeds [min, max]; training seconds exclude compile "
           "and evaluation.", "",
           "| problem (iterations, seeds) | method | final L2 | training s (mean) | budget, machine, date |",
           "|---|---|---|---|---|"]
  for p in soc.PROBLEMS:
    csv_path, meta_path = os.path.join(out, f"{p}.csv"), os.path.join(out, f"{p}_meta.json")
    if not (os.path.exists(csv_path) and os.path.exists(meta_path)):
      continue
    with open(meta_path) as f:
      meta = json.load(f)
    rows = list(csv.DictReader(open(csv_path)))
    for lab in dict.fromkeys(r["method"] for r in rows):
      r = {k: (float(v) if k.startswith("l2_") or k.endswith("_mean") else v)
           for k, v in [r for r in rows if r["method"] == lab][-1].items()}
      lines.append(f"| {p} ({r['iteration']}, {r['num_seeds']}) | {lab} | {_fmt(r)} | "
                   f"{r['train_seconds_mean']:.0f} | `{meta['budget']}`, {meta['machine']}, {meta['date']} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="docs/results/soc")
  parser.add_argument("--budget", default="cpu30", choices=sorted(BUDGETS))
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--problems", default=",".join(soc.PROBLEMS))
  parser.add_argument("--chunk_loss", type=int, default=-1,
                      help="AM's loss time steps per chunk (configs/soc.py chunk_loss); -1: the config's; 0: one call "
                           "(reproduces the tables made before 2026-11-27)")
  args = parser.parse_args(argv)
  problems = [p for p in args.problems.split(",") if p]
  for p in problems:
    if p not in soc.PROBLEMS:
      raise ValueError(f"--problems: unknown SOC problem {p!r}; expected some of {soc.PROBLEMS}.")
  if args.seeds < 1:
    raise ValueError(f"--seeds = {args.seeds}: must be >= 1 (the tables ask for >= 3).")
  os.makedirs(args.out, exist_ok=True)
  finals = {}
  for p in problems:
    meta = {"command": "python -m benchmarks.soc_tables " + " ".join(argv if argv is not None else sys.argv[1:]),
            "budget": args.budget, "seeds": args.seeds, "machine": f"{os.cpu_count()}-core CPU "
            f"({platform.processor() or platform.machine()}), jax {jax.__version__}, {jax.devices()[0].platform}",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_start": os.getloadavg(), "iterations": {}}
    t0 = time.perf_counter()
    finals[p] = run_problem(p, args.budget, args.seeds, args.out, meta, chunk_loss=args.chunk_loss)
    meta.update(seconds=time.perf_counter() - t0, load_end=os.getloadavg())
    with open(os.path.join(args.out, f"{p}_meta.json"), "w") as f:
      json.dump(meta, f, indent=1)
  text = summary_markdown(args.out)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(text)
  print(text)
  return finals


if __name__ == "__main__":
  main()
