r"""Sampling only: ``sampling.simulate`` with 'scan' vs 'diffrax' vs the floor of K forward passes.

    python -m benchmarks.sampling --config=configs/gmm2d.py --out=benchmarks/results/sampling_gmm2d.json

For each K in --ks it times (interleaved rounds, median) the memoryless fine-tuning trajectory of the
config's fine-tuned model at batch B (the work of the sampling part of a train step: X_0 and noise
drawn inside, (K+1, B, ...) trajectory out) with both solvers, and the floor: a ``lax.scan`` of K bare
forward passes x <- x + v(x, t) / K (``benchmarks.common.make_floor(parts=('forward',))``).
"""
from __future__ import annotations

import dataclasses

import jax
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/*.py file (overrides with --config.a.b=v).",
                                lock_config=False)
flags.DEFINE_string("out", "", "JSON output file.")
flags.DEFINE_list("ks", ["20", "40", "100", "200"], "Numbers of steps.")
flags.DEFINE_list("solvers", ["scan", "diffrax"], "Solvers.")
flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.")
flags.DEFINE_integer("iters", 10, "Timed calls per function and round.")


def run(cfg, ks, solvers, rounds, iters) -> dict:
  out = {"machine": common.machine_info(), "model": cfg.model.to_dict(),
         "parameterisation": cfg.finetune.parameterisation, "rows": []}
  for k in ks:
    problem = common.build_problem(cfg, num_steps=k)
    base = jax.tree.map(jax.numpy.asarray, problem.base_params)
    runs, compile_s = {}, {}
    runs["floor"], compile_s["floor"] = common.floor_runner(problem, problem.params, base, parts=("forward",))
    for solver in solvers:
      sample, _, _ = common.make_pieces(problem, dataclasses.replace(problem.am_config, solver=solver))
      key = jax.random.PRNGKey(1)
      cond = problem.cond_fn(jax.random.PRNGKey(2), problem.batch) if problem.cond_fn else ()
      compiled, compile_s[solver] = common.compile_timed(sample, problem.params, base, key, cond)
      runs[solver] = lambda compiled=compiled, key=key, cond=cond: compiled(problem.params, base, key, cond)
    times = common.interleaved(runs, rounds, iters)
    row = {"K": k, "B": problem.batch, "floor_s": times["floor"]["median_s"], "compile_s": compile_s}
    for solver in solvers:
      row[f"{solver}_s"] = times[solver]["median_s"]
      row[f"{solver}_over_floor"] = times[solver]["median_s"] / times["floor"]["median_s"]
    out["rows"].append(row)
    print(f"K={k:4d} B={problem.batch}  floor {1e3 * row['floor_s']:8.2f} ms  " + "  ".join(
        f"{s} {1e3 * row[f'{s}_s']:8.2f} ms ({row[f'{s}_over_floor']:.2f}x, compile {compile_s[s]:.1f} s)"
        for s in solvers), flush=True)
  return out


def main(argv):
  del argv
  out = run(FLAGS.config, [int(k) for k in FLAGS.ks], FLAGS.solvers, FLAGS.rounds, FLAGS.iters)
  common.write_json(FLAGS.out, out)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
