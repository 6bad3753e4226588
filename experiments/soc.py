"""Adjoint Matching as an SOC solver vs the discrete / continuous adjoint methods, on the SOC-matching benchmarks.

    python -m experiments.soc --config=configs/soc.py:linear_ou --workdir=runs/soc_linear_ou

Variants, times and expected results: ``configs/soc.py``.  The training and evaluation are
``am_jax.soc_training.run``; this launcher writes to --workdir:

  metrics.jsonl  one row per evaluation: step (= iteration), method, train_seconds (excl. compile and
                 evaluation), loss, objective(_se), l2_error(_se)
  metrics.json   final summary per method + the objective of u* and of u = 0 on the same paths
  l2_error.png   L2 error vs iteration and vs training seconds (log scale), one line per method
"""
from __future__ import annotations

import os

from am_jax import launch, reporting, soc_training


def plot(records_by_method, path, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for method, recs in records_by_method.items():
    l2 = [r["l2_error"] for r in recs]
    axes[0].plot([r["iteration"] for r in recs], l2, label=method, marker=".")
    axes[1].plot([r["train_seconds"] for r in recs], l2, label=method, marker=".")
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
    reporting.info(f"[{rec['method']}] it {it:5d}/{total}  L2 {rec['l2_error']:.3e}  J {rec['objective']:.4f} "
                   f"+- {rec['objective_se']:.4f}  loss {rec['loss']:.3e}  train {rec['train_seconds']:.1f}s  "
                   f"ETA {eta:.0f}s")

  summary, records = soc_training.run(config, on_record=on_record, on_problem=on_problem)
  writer.final(summary)
  writer.close()
  plot(records, os.path.join(workdir, "l2_error.png"), f"{summary['problem']}: control L2 error")
  short = {"workdir": workdir, "total_seconds": summary["total_seconds"]}
  for method, s in summary["methods"].items():
    short[f"{method}/final_l2_error"] = s["final_l2_error"]
    short[f"{method}/final_objective"] = s["final_objective"]
  return short


if __name__ == "__main__":
  launch.run(main)
