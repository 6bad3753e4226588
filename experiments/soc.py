"""Adjoint Matching as an SOC solver vs the discrete / continuous adjoint methods, on the SOC-matching benchmarks.

    python -m experiments.soc --config=configs/soc.py:linear_ou --workdir=runs/soc_linear_ou

Variants, times and expected results: ``configs/soc.py``.  The training and evaluation are
``am_jax.soc_training.run``; this launcher writes to --workdir:

  metrics.jsonl  one row per evaluation: step (= iteration), method, train_seconds (excl. compile and
                 evaluation), loss, objective(_se), l2_error(_se)
  metrics.json   final summary per method (per seed, and mean / std / min / max across the
                 ``num_seeds`` seeds) + the objective of u* and of u = 0 on the same paths
  l2_table.csv   per method and evaluation: L2 error across seeds (mean, std, min, max), objective, mean
                 training seconds (``soc_training.aggregate``)
  l2_table.md    the same as a markdown table (every other evaluation when there are more than 12)
  l2_error.png   L2 error vs iteration and vs training seconds (log scale): the mean over seeds per method,
                 min-max band across seeds

Three seeds of one benchmark: ``--config.num_seeds=3``.
"""
from __future__ import annotations

import csv
import os

from am_jax import launch, reporting, soc_training

TABLE_FIELDS = ("method", "iteration", "num_seeds", "l2_mean", "l2_std", "l2_min", "l2_max", "objective_mean",
                "objective_std", "train_seconds_mean")


def write_tables(rows, workdir, title):
  """l2_table.csv (every row of ``soc_training.aggregate``) and l2_table.md (at most ~12 evaluations per method)."""
  with open(os.path.join(workdir, "l2_table.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
  lines = [f"{title}", "", "| method | iteration | train s (mean) | L2 error mean ± std (min-max) | objective J |",
           "|---|---|---|---|---|"]
  for method in dict.fromkeys(r["method"] for r in rows):
    mine = [r for r in rows if r["method"] == method]
    stride = max(1, -(-len(mine) // 12))
    for i, r in enumerate(mine):
      if i % stride and i != len(mine) - 1:
        continue
      lines.append(f"| {method} | {r['iteration']} | {r['train_seconds_mean']:.1f} | {r['l2_mean']:.3g} ± "
                   f"{r['l2_std']:.2g} ({r['l2_min']:.3g}-{r['l2_max']:.3g}) | {r['objective_mean']:.4f} |")
  with open(os.path.join(workdir, "l2_table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def plot(rows, path, title):
  """L2 error (mean over seeds, min-max band) vs iteration and vs mean training seconds, one colour per method."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for method in dict.fromkeys(r["method"] for r in rows):
    mine = [r for r in rows if r["method"] == method]
    for ax, xs in zip(axes, ([r["iteration"] for r in mine], [r["train_seconds_mean"] for r in mine])):
      line, = ax.plot(xs, [r["l2_mean"] for r in mine], label=method, marker=".")
      if mine[0]["num_seeds"] > 1:
        ax.fill_between(xs, [r["l2_min"] for r in mine], [r["l2_max"] for r in mine], color=line.get_color(),
                        alpha=0.2)
  for ax, xlabel in zip(axes, ["iteration", "training seconds (excl. compile/eval)"]):
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("L2 error  E int |u - u*|^2 dt")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(config, workdir):
  soc_training.validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  jsonl = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(jsonl):  # a fresh run: the rows of an earlier run in this workdir are dropped
    os.remove(jsonl)
  writer = reporting.MetricsWriter(workdir, tensorboard=False)

  def on_problem(problem, setup_seconds, ref):
    reporting.info(f"problem {problem.name}: d={problem.dim} K={problem.num_steps} (setup incl. reference solve "
                   f"{setup_seconds:.1f}s); methods {list(config.methods)}")
    reporting.info(f"reference: J(u*) = {ref['u_star']['objective']:.4f} +- {ref['u_star']['objective_se']:.4f}, "
                   f"J(0) = {ref['zero']['objective']:.4f} +- {ref['zero']['objective_se']:.4f}, "
                   f"L2(0) = {ref['zero']['l2_error']:.3e}")

  def on_record(rec):  # one line per evaluation; rate and ETA from the training clock (compilation excluded)
    writer.write(rec["iteration"], {k: v for k, v in rec.items() if k != "iteration"})
    it, total = rec["iteration"], config.num_iterations
    eta = rec["train_seconds"] / max(it - 1, 1) * (total - it)
    reporting.info(f"[{rec['method']} seed {rec['seed']}] it {it:5d}/{total}  L2 {rec['l2_error']:.3e}  J {rec['objective']:.4f} "
                   f"+- {rec['objective_se']:.4f}  loss {rec['loss']:.3e}  train {rec['train_seconds']:.1f}s  "
                   f"ETA {eta:.0f}s")

  summary, records = soc_training.run(config, on_record=on_record, on_problem=on_problem)
  writer.final(summary)
  writer.close()
  rows = soc_training.aggregate([r for recs in records.values() for r in recs])
  title = (f"{summary['problem']} (K = {summary['num_steps']}, {config.num_seeds} seed(s)): control L2 error "
           "E int |u - u*|^2 dt")
  write_tables(rows, workdir, title)
  plot(rows, os.path.join(workdir, "l2_error.png"), title)
  short = {"workdir": workdir, "total_seconds": summary["total_seconds"]}
  for method, s in summary["methods"].items():
    short[f"{method}/final_l2_error"] = s["final_l2_error"]
    short[f"{method}/final_objective"] = s["final_objective"]
    if config.num_seeds > 1:
      short[f"{method}/final_l2_mean+-std"] = f"{s['final_l2_mean']:.4g} +- {s['final_l2_std']:.2g}"
  return short


if __name__ == "__main__":
  launch.run(main)
