r"""Peak memory of the fine-tune step vs K and batch, with and without the bounded-memory options.

    python -m benchmarks.memory --config=configs/gmm2d.py --out=runs/bench/memory_gmm2d.json
    python -m benchmarks.memory --config=configs/digits_pretrain.py --config.finetune.parameterisation=full \
        --batches=32,64,256 --time_batch=32 --out=runs/bench/memory_digits.json

For every (K, B) of the sweep and every mode it compiles the step of ``experiments/finetune.py``
(``training.make_finetune_step``) and reads XLA's memory analysis of the executable
(``jax.jit(f).lower(...).compile().memory_analysis()``): ``total_bytes`` = temporaries + arguments +
outputs - donated (aliased) bytes.  Modes:

* ``off``: both options off, whatever the config sets (the (K+1, B, ...) trajectory, adjoint and noise are stored;
  the loss in one call at M * B points);
* ``remat``: ``AMConfig.remat_segments = S`` (the divisor of K closest to sqrt K);
* ``chunk``: ``AMConfig.chunk_loss = True`` (one loss time step per chunk, the gradient accumulated per chunk);
* ``remat+chunk``: both.

Then it times the step of every mode at ``--time_k`` x ``--time_batch`` (interleaved rounds) to give the
trade-off (memory ratio vs step-time ratio).  Results: JSON (``--out``) and a markdown table (``--md``,
default: next to --out).
"""
from __future__ import annotations

import dataclasses
import math
import time

from absl import app, flags
from ml_collections import config_flags

from benchmarks import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/*.py file (overrides with --config.a.b=v).",
                                lock_config=False)
flags.DEFINE_string("out", "", "JSON output file.")
flags.DEFINE_string("md", "", "Markdown output file (default: --out with .md).")
flags.DEFINE_list("ks", ["20", "40", "100", "200"], "Numbers of steps K for the memory sweep.")
flags.DEFINE_list("batches", ["64", "256", "1024"], "Batch sizes for the memory sweep (at the largest K, and "
                  "the first one for the K sweep).")
flags.DEFINE_list("modes", ["off", "remat", "chunk", "remat+chunk"], "Modes.")
flags.DEFINE_integer("time_k", 200, "K of the timed comparison (0: skip timing).")
flags.DEFINE_integer("time_batch", 256, "Batch of the timed comparison.")
flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds.")
flags.DEFINE_integer("iters", 3, "Timed calls per mode and round.")


def segments_for(k: int) -> int:
  """The divisor of k closest to sqrt(k) (memory ~ S + K / S is smallest there)."""
  divisors = [d for d in range(1, k + 1) if k % d == 0]
  return min(divisors, key=lambda d: (abs(d - math.sqrt(k)), d))


def mode_overrides(mode: str, k: int) -> dict:
  kw = {"remat_segments": 0, "chunk_loss": 0}  # 'off' is off whatever the config sets (the U-Net configs chunk)
  if "remat" in mode:
    kw["remat_segments"] = segments_for(k)
  if "chunk" in mode:
    kw["chunk_loss"] = True
  return kw


def compiled_step(cfg, k, b, mode):
  problem = common.build_problem(cfg, batch_size=b, num_steps=k)
  config = dataclasses.replace(problem.am_config, **mode_overrides(mode, k))
  state, base_params = common.init_state(problem)
  step = common.make_step(problem, None, config)
  compiled, t_compile = common.compile_timed(step, state, base_params)
  return problem, compiled, t_compile, state, base_params


def run(cfg, ks, batches, modes, time_k, time_batch, rounds, iters) -> dict:
  out = {"machine": common.machine_info(), "model": cfg.model.to_dict(),
         "parameterisation": cfg.finetune.parameterisation, "modes": modes, "memory": [], "timing": {}}
  points = [(k, batches[0]) for k in ks] + [(ks[-1], b) for b in batches[1:]]
  for k, b in points:
    for mode in modes:
      _, compiled, t_compile, _, _ = compiled_step(cfg, k, b, mode)
      mem = common.memory_stats(compiled)
      row = {"K": k, "B": b, "mode": mode, **mode_overrides(mode, k), "compile_s": t_compile, **mem}
      out["memory"].append(row)
      print(f"K={k:4d} B={b:5d} {mode:12s} total {mem['total_bytes'] / 2**20:9.2f} MiB  "
            f"temp {mem['temp_size_in_bytes'] / 2**20:9.2f} MiB  compile {t_compile:5.1f} s", flush=True)
  if time_k:
    runs = {}
    for mode in modes:
      _, compiled, _, state, base_params = compiled_step(cfg, time_k, time_batch, mode)
      holder = [state]

      def run_step(compiled=compiled, holder=holder, base_params=base_params):
        holder[0], m = compiled(holder[0], base_params)
        return m["loss"]

      runs[mode] = run_step
    t0 = time.perf_counter()
    times = common.interleaved(runs, rounds, iters, warm=1)
    ref_mem = {r["mode"]: r["total_bytes"] for r in out["memory"] if r["K"] == time_k and r["B"] == time_batch}
    for mode in modes:
      times[mode]["step_over_off"] = times[mode]["median_s"] / times["off"]["median_s"] if "off" in times else None
      if mode in ref_mem and "off" in ref_mem:
        times[mode]["memory_off_over_mode"] = ref_mem["off"] / ref_mem[mode]
      print(f"time K={time_k} B={time_batch} {mode:12s} {1e3 * times[mode]['median_s']:9.1f} ms"
            + (f"  x{times[mode]['step_over_off']:.2f} time" if times[mode]["step_over_off"] else "")
            + (f"  /{times[mode]['memory_off_over_mode']:.1f} memory" if "memory_off_over_mode" in times[mode]
               else ""), flush=True)
    out["timing"] = {"K": time_k, "B": time_batch, "seconds": time.perf_counter() - t0, "modes": times}
  return out


def to_markdown(out: dict) -> str:
  modes = out["modes"]
  lines = [f"Peak memory of the compiled step (MiB, XLA memory analysis: temp + args + outputs - donated); "
           f"model {out['model'].get('kind')}, parameterisation {out['parameterisation']}.", "",
           "| K | B | " + " | ".join(modes) + " | off / best |", "|" + "---|" * (len(modes) + 3)]
  rows = {}
  for r in out["memory"]:
    rows.setdefault((r["K"], r["B"]), {})[r["mode"]] = r["total_bytes"] / 2**20
  for (k, b), v in rows.items():
    best = min(v.values())
    lines.append(f"| {k} | {b} | " + " | ".join(f"{v.get(m, float('nan')):.2f}" for m in modes)
                 + f" | {v.get('off', float('nan')) / best:.1f}x |")
  t = out.get("timing")
  if t:
    lines += ["", f"Step time at K = {t['K']}, B = {t['B']} (median of {len(next(iter(t['modes'].values()))['round_medians_s'])} "
              f"interleaved rounds):", "", "| mode | step (ms) | time vs off | memory off / mode |", "|---|---|---|---|"]
    for m, v in t["modes"].items():
      lines.append(f"| {m} | {1e3 * v['median_s']:.1f} | {v.get('step_over_off') or float('nan'):.2f}x | "
                   f"{v.get('memory_off_over_mode', float('nan')):.1f}x |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  out = run(FLAGS.config, [int(k) for k in FLAGS.ks], [int(b) for b in FLAGS.batches], FLAGS.modes, FLAGS.time_k,
            FLAGS.time_batch, FLAGS.rounds, FLAGS.iters)
  common.write_json(FLAGS.out, out)
  md = to_markdown(out)
  print(md)
  md_path = FLAGS.md or (FLAGS.out.rsplit(".", 1)[0] + ".md" if FLAGS.out else "")
  if md_path:
    with open(md_path, "w") as f:
      f.write(md)
    print(f"wrote {md_path}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
