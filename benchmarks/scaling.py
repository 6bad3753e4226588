r"""Step time and throughput of the fine-tune step vs K, batch and device count.

    python -m benchmarks.scaling --config=configs/gmm2d.py --out=benchmarks/results/scaling_gmm2d.json

1. K x B grid on one device (K in --ks, B in --batches): median step time, samples/s.
2. Devices: a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` times the same
   step sharded over a ('data',) mesh of 1, 2, 4 and 8 of those devices (``--devices``) at K = --device_k
   for each B in --device_batches.  Forced host devices share the machine's cores, so on a 2-core CPU
   more devices cannot be faster: the table shows the cost of the partitioned program, not a speed-up.

All timings interleave the configurations in rounds (median of the round medians).  Writes JSON
(--out) and a markdown table (--md, default next to --out).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/*.py file (overrides with --config.a.b=v).",
                                lock_config=False)
flags.DEFINE_string("out", "", "JSON output file.")
flags.DEFINE_string("md", "", "Markdown output (default: --out with .md).")
flags.DEFINE_list("ks", ["20", "40", "100", "200"], "K values of the grid.")
flags.DEFINE_list("batches", ["64", "256", "1024"], "Batch sizes of the grid.")
flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Device counts (forced CPU devices in a subprocess).")
flags.DEFINE_integer("device_k", 40, "K of the device sweep.")
flags.DEFINE_list("device_batches", ["256", "1024"], "Batch sizes of the device sweep.")
flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds.")
flags.DEFINE_integer("iters", 5, "Timed calls per configuration and round.")
flags.DEFINE_bool("worker", False, "Internal: run the device sweep in this process and print JSON.")
flags.DEFINE_bool("skip_devices", False, "Skip the device sweep.")


def _time_grid(cfg, points, rounds, iters):
  """points: list of (K, B, num_devices); num_devices 0 = no mesh.  Returns one row per point."""
  from am_jax import sharding
  from benchmarks import common
  runs, info = {}, {}
  for k, b, n in points:
    problem = common.build_problem(cfg, batch_size=b, num_steps=k)
    mesh = sharding.make_mesh(n) if n else None
    state, base_params = common.init_state(problem, mesh)
    run, t_compile, compiled = common.step_runner(common.make_step(problem, mesh), state, base_params)
    runs[(k, b, n)] = run
    info[(k, b, n)] = {"compile_s": t_compile, "total_bytes": common.memory_stats(compiled).get("total_bytes")}
    print(f"compiled K={k} B={b} devices={n or 1} in {t_compile:.1f} s", flush=True)
  times = common.interleaved(runs, rounds, iters, warm=2)
  rows = []
  for (k, b, n), t in times.items():
    rows.append({"K": k, "B": b, "devices": n or 1, "step_s": t["median_s"], "round_medians_s": t["round_medians_s"],
                 "samples_per_s": b / t["median_s"], "steps_per_s": 1.0 / t["median_s"], **info[(k, b, n)]})
  return rows


def _device_sweep_subprocess(config_path: str, overrides: list, devices, k, batches, rounds, iters) -> list:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--worker", f"--config={config_path}", f"--out={f.name}",
           f"--devices={','.join(map(str, devices))}", f"--device_k={k}",
           f"--device_batches={','.join(map(str, batches))}", f"--rounds={rounds}", f"--iters={iters}", *overrides]
    print("running", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.load(open(f.name))["rows"]


def to_markdown(out: dict) -> str:
  grid = [r for r in out["grid"]]
  ks = sorted({r["K"] for r in grid})
  bs = sorted({r["B"] for r in grid})
  cell = {(r["K"], r["B"]): r for r in grid}
  lines = [f"Step time (ms) / throughput (samples/s), 1 device; model {out['model'].get('kind')}, "
           f"parameterisation {out['parameterisation']}, M = {out['num_loss_steps']} loss steps.", "",
           "| K \\ B | " + " | ".join(str(b) for b in bs) + " |", "|" + "---|" * (len(bs) + 1)]
  for k in ks:
    lines.append(f"| {k} | " + " | ".join(
        f"{1e3 * cell[(k, b)]['step_s']:.1f} ms / {cell[(k, b)]['samples_per_s']:.0f}" if (k, b) in cell else "-"
        for b in bs) + " |")
  if out.get("devices"):
    dev = out["devices"]
    ns = sorted({r["devices"] for r in dev})
    dbs = sorted({r["B"] for r in dev})
    dcell = {(r["devices"], r["B"]): r for r in dev}
    lines += ["", f"Devices (forced CPU host devices sharing the same cores), K = {dev[0]['K']}: step time (ms) / "
              "samples/s.", "", "| devices | " + " | ".join(f"B = {b}" for b in dbs) + " |",
              "|" + "---|" * (len(dbs) + 1)]
    for n in ns:
      lines.append(f"| {n} | " + " | ".join(
          f"{1e3 * dcell[(n, b)]['step_s']:.1f} ms / {dcell[(n, b)]['samples_per_s']:.0f}" if (n, b) in dcell else "-"
          for b in dbs) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  from benchmarks import common
  cfg = FLAGS.config
  overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
  if FLAGS.worker:
    import jax
    points = [(FLAGS.device_k, int(b), int(n)) for b in FLAGS.device_batches for n in FLAGS.devices
              if int(n) <= jax.device_count()]
    rows = _time_grid(cfg, points, FLAGS.rounds, FLAGS.iters)
    common.write_json(FLAGS.out, {"rows": rows, "machine": common.machine_info()})
    return
  problem = common.build_problem(cfg)
  out = {"machine": common.machine_info(), "model": cfg.model.to_dict(),
         "parameterisation": cfg.finetune.parameterisation, "num_loss_steps": problem.num_loss_steps()}
  points = [(int(k), int(b), 0) for k in FLAGS.ks for b in FLAGS.batches]
  out["grid"] = _time_grid(cfg, points, FLAGS.rounds, FLAGS.iters)
  if not FLAGS.skip_devices:
    config_path = config_flags.get_config_filename(FLAGS["config"])
    out["devices"] = _device_sweep_subprocess(config_path, overrides, [int(n) for n in FLAGS.devices],
                                              FLAGS.device_k, [int(b) for b in FLAGS.device_batches], FLAGS.rounds,
                                              FLAGS.iters)
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
