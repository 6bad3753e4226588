r"""Times one Adjoint Matching fine-tune step against the floor of its network work.

    python -m benchmarks.train_step --config=configs/gmm2d.py --out=runs/bench/train_step_gmm2d.json
    python -m benchmarks.train_step --config=configs/digits_pretrain.py \
        --config.finetune.parameterisation=full --config.finetune.batch_size=64 --out=...

Builds the step of ``experiments/finetune.py`` (``am_jax.training.make_finetune_step``: one jit, shardings,
donation) on a freshly initialised base, and reports (printed and written as JSON):

* ``compile_s``: lower + compile of the step; ``step``: median warm step time;
* ``pieces``: sampling / adjoint (terminal + lean) / loss + update, each jitted separately with the
  step's shapes (their sum differs from the step by what XLA fuses across the boundaries);
* ``floor``: a jitted function with only the network work (``benchmarks.common.make_floor``) and
  ``step_over_floor``;
* per solver in ``--solvers`` (default scan and diffrax), and the compiled memory analysis;
* ``floor_per_row`` / ``scan/step_per_row``: the floor and the step compiled with ``models.MLP``'s per-row time
  embedding (``common.per_row_time``: the code before its shared-time path), in the same interleaved rounds, and
  ``floor_per_row_over_step`` = today's floor / the new step (issue 17's ">= 1.2x below the floor");
* ``scan/step_unchunked`` (when the config sets ``am.chunk_loss``): the step with the loss in one call at all M B
  points, and ``unchunked_over_step``; ``--other_chunk_sizes=1,2,4``: the step with each of those chunk sizes
  (``chunk_sizes``: step time and floor / step), to pick ``am.chunk_loss`` for a model and machine;
* ``scan/step_base_in_loss``: the step evaluating ft - v_base at the loss points instead of the residual network
  alone (``common.base_in_loss``; the same program for full / LoRA models), and ``base_in_loss_over_step``.
"""
from __future__ import annotations

import dataclasses

import jax
from absl import app, flags
from ml_collections import config_flags

from am_jax import sharding
from benchmarks import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/*.py file (overrides with --config.a.b=v).",
                                lock_config=False)
flags.DEFINE_string("out", "", "Write the results as JSON to this file.")
flags.DEFINE_list("solvers", ["scan", "diffrax"], "Solvers to time.")
flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds (the median of the round medians is reported).")
flags.DEFINE_integer("iters", 10, "Timed calls per function and round.")
flags.DEFINE_integer("num_devices", 1, "Devices in the data mesh (-1: all).")
flags.DEFINE_bool("pieces", True, "Also time sampling / adjoint / loss+update and the floor of each separately.")
flags.DEFINE_string("network_dtype", "", "Override AMConfig.network_dtype ('float32' / 'bfloat16').")
flags.DEFINE_integer("remat_segments", -1, "Override AMConfig.remat_segments (-1: config value).")
flags.DEFINE_integer("chunk_loss", None, "Override AMConfig.chunk_loss (loss time steps per chunk; "
                     "0: one call at all M B loss points).")
flags.DEFINE_list("other_chunk_sizes", [], "Also time the scan step with AMConfig.chunk_loss = each of these (loss "
                  "time steps per chunk; 0: one call), in the same rounds.")
flags.DEFINE_bool("fast_conv_vjp", True, "U-Net convolutions with models.conv_general_dilated_fast_vjp "
                  "(False: JAX's own VJPs, the 'before' of docs/performance.md section 12.2).")


def run(cfg, solvers=("scan", "diffrax"), rounds=5, iters=10, num_devices=1, pieces=True, overrides=None,
        other_chunk_sizes=()) -> dict:
  """Builds, compiles and times everything; returns the JSON-able results."""
  overrides = dict(overrides or {})
  problem = common.build_problem(cfg, **overrides)
  mesh = sharding.make_mesh(num_devices)
  out = {"machine": common.machine_info(), "config": {
      "model": problem.cfg.model.to_dict(), "parameterisation": problem.cfg.finetune.parameterisation,
      "x_shape": list(problem.x_shape), "num_steps": problem.am_config.num_steps,
      "num_loss_steps": problem.num_loss_steps(), "devices": num_devices,
      "fast_conv_vjp": overrides.get("fast_conv_vjp", True),
      "am": {k: str(v) for k, v in dataclasses.asdict(problem.am_config).items() if k != "schedule"}}}
  base_local = jax.tree.map(jax.numpy.asarray, problem.base_params)
  runs, compile_s, memory = {}, {}, {}
  runs["floor"], compile_s["floor"] = common.floor_runner(problem, problem.params, base_local)
  with common.per_row_time():  # the floor of the code before models.MLP's shared-time path (issue 17)
    runs["floor_per_row"], compile_s["floor_per_row"] = common.floor_runner(problem, problem.params, base_local)
  if pieces:  # the floor of each piece: forwards (sampling), VJPs (adjoint), loss value_and_grad
    for name, part in (("sample", "forward"), ("adjoint", "vjp"), ("loss_update", "loss")):
      runs[f"floor/{name}"], compile_s[f"floor/{name}"] = common.floor_runner(problem, problem.params, base_local,
                                                                              parts=(part,))
  for solver in solvers:
    config = dataclasses.replace(problem.am_config, solver=solver)
    state, base_params = common.init_state(problem, mesh)
    runs[f"{solver}/step"], compile_s[f"{solver}/step"], compiled = common.step_runner(
        common.make_step(problem, mesh, config), state, base_params)
    memory[solver] = common.memory_stats(compiled)
    if solver == "scan" and config.reuse_base_velocity and not config.remat_segments:
      # The same step evaluating the base network again at the loss points (the step before the adjoint's
      # evaluations were reused; the floor counts those evaluations too), timed in the same rounds.
      state, base_params = common.init_state(problem, mesh)
      runs["scan/step_recompute"], compile_s["scan/step_recompute"], _ = common.step_runner(
          common.make_step(problem, mesh, dataclasses.replace(config, reuse_base_velocity=False)), state,
          base_params)
    if solver == "scan" and config.reuse_base_velocity:
      # The same step evaluating ft - v_base at the loss points (the base forward inside a residual model) instead
      # of the residual network alone (issue 17; identical for full / LoRA models).
      state, base_params = common.init_state(problem, mesh)
      with common.base_in_loss():
        runs["scan/step_base_in_loss"], compile_s["scan/step_base_in_loss"], _ = common.step_runner(
            common.make_step(problem, mesh, config), state, base_params)
    if solver == "scan" and config.chunk_loss:
      # The same step evaluating the loss in one call at all M B points (chunk_loss = 0; the floor does too).
      state, base_params = common.init_state(problem, mesh)
      runs["scan/step_unchunked"], compile_s["scan/step_unchunked"], _ = common.step_runner(
          common.make_step(problem, mesh, dataclasses.replace(config, chunk_loss=0)), state, base_params)
    for n in other_chunk_sizes if solver == "scan" else ():
      # The step with the loss in chunks of n time steps, in the same rounds (which n suits this model and CPU).
      state, base_params = common.init_state(problem, mesh)
      runs[f"scan/step_chunk{n}"], compile_s[f"scan/step_chunk{n}"], _ = common.step_runner(
          common.make_step(problem, mesh, dataclasses.replace(config, chunk_loss=int(n))), state, base_params)
    if solver == "scan":
      state, base_params = common.init_state(problem, mesh)
      with common.per_row_time():
        runs["scan/step_per_row"], compile_s["scan/step_per_row"], _ = common.step_runner(
            common.make_step(problem, mesh, config), state, base_params)
    if pieces:
      state_l, _ = common.init_state(problem, None)
      for name, r in common.piece_runners(problem, state_l, base_local, config).items():
        if name == "loss_update" and "loss_update" in runs:
          continue  # does not depend on the solver
        runs[f"{solver}/{name}" if name != "loss_update" else name] = r
  print(f"compiled {len(runs)} functions; timing {rounds} interleaved rounds x {iters} calls", flush=True)
  times = common.interleaved(runs, rounds, iters)
  med = {k: v["median_s"] for k, v in times.items()}
  out["times"] = times
  out["compile_s"] = compile_s
  out["memory"] = memory
  out["floor_s"] = med["floor"]
  print(f"floor {1e3 * med['floor']:.2f} ms" + ("  (parts: " + ", ".join(
      f"{k.split('/')[1]} {1e3 * v:.2f}" for k, v in med.items() if k.startswith("floor/")) + ")" if pieces else ""))
  for solver in solvers:
    step_s = med[f"{solver}/step"]
    res = {"step_s": step_s, "compile_s": compile_s[f"{solver}/step"], "step_over_floor": step_s / med["floor"],
           "samples_per_s": problem.batch / step_s}
    if pieces:
      res["pieces_s"] = {"sample": med[f"{solver}/sample"], "adjoint": med[f"{solver}/adjoint"],
                         "loss_update": med["loss_update"]}
      res["pieces_over_floor"] = {k: v / med[f"floor/{k}"] for k, v in res["pieces_s"].items()}
    if solver == "scan" and "scan/step_recompute" in med:
      res["step_recompute_s"] = med["scan/step_recompute"]
      res["floor_over_step"] = med["floor"] / step_s
      res["recompute_over_step"] = med["scan/step_recompute"] / step_s
    if solver == "scan" and "scan/step_base_in_loss" in med:
      res["step_base_in_loss_s"] = med["scan/step_base_in_loss"]
      res["base_in_loss_over_step"] = med["scan/step_base_in_loss"] / step_s
    if solver == "scan" and "scan/step_unchunked" in med:
      res["step_unchunked_s"] = med["scan/step_unchunked"]
      res["unchunked_over_step"] = med["scan/step_unchunked"] / step_s
      res["floor_over_unchunked"] = med["floor"] / med["scan/step_unchunked"]
    if solver == "scan" and other_chunk_sizes:
      res["chunk_sizes"] = {int(n): {"step_s": med[f"scan/step_chunk{n}"],
                                     "floor_over_step": med["floor"] / med[f"scan/step_chunk{n}"]}
                            for n in other_chunk_sizes}
    if solver == "scan":
      res["step_per_row_s"] = med["scan/step_per_row"]
      res["floor_per_row_s"] = med["floor_per_row"]
      res["floor_per_row_over_step"] = med["floor_per_row"] / step_s
    out[solver] = res
    line = (f"{solver:8s} step {1e3 * step_s:8.2f} ms  compile {res['compile_s']:5.1f} s  "
            f"step/floor {res['step_over_floor']:.3f}")
    if pieces:
      line += "  pieces " + " ".join(f"{k} {1e3 * v:.2f} ({res['pieces_over_floor'][k]:.2f}x)"
                                     for k, v in res["pieces_s"].items())
    print(line, flush=True)
    if "base_in_loss_over_step" in res:
      print(f"{'':8s} residual network alone in the loss: step with the base in the loss "
            f"{1e3 * res['step_base_in_loss_s']:.2f} ms, base_in_loss/step {res['base_in_loss_over_step']:.3f}",
            flush=True)
    if "floor_per_row_over_step" in res:
      print(f"{'':8s} shared-time MLP path: today's floor (per-row time) {1e3 * res['floor_per_row_s']:.2f} ms, "
            f"step (per-row time) {1e3 * res['step_per_row_s']:.2f} ms; floor_per_row/step "
            f"{res['floor_per_row_over_step']:.3f}", flush=True)
    if "unchunked_over_step" in res:
      print(f"{'':8s} loss in chunks of {int(problem.am_config.chunk_loss)} time step(s): the step with the loss in "
            f"one call {1e3 * res['step_unchunked_s']:.2f} ms, unchunked/step {res['unchunked_over_step']:.3f}, "
            f"floor/unchunked {res['floor_over_unchunked']:.3f}", flush=True)
    for n, r in res.get("chunk_sizes", {}).items():
      print(f"{'':8s} loss in chunks of {n} time step(s): {1e3 * r['step_s']:.2f} ms, floor/step "
            f"{r['floor_over_step']:.3f}", flush=True)
    if "floor_over_step" in res:
      print(f"{'':8s} base evaluations reused: floor/step {res['floor_over_step']:.3f}, "
            f"recompute/step {res['recompute_over_step']:.3f} (recompute {1e3 * res['step_recompute_s']:.2f} ms)",
            flush=True)
  return out


def main(argv):
  del argv
  overrides = {}
  if FLAGS.network_dtype:
    overrides["network_dtype"] = FLAGS.network_dtype
  if FLAGS.remat_segments >= 0:
    overrides["remat_segments"] = FLAGS.remat_segments
  if FLAGS.chunk_loss is not None:
    overrides["chunk_loss"] = FLAGS.chunk_loss
  if not FLAGS.fast_conv_vjp:
    overrides["fast_conv_vjp"] = False
  out = run(FLAGS.config, FLAGS.solvers, FLAGS.rounds, FLAGS.iters, FLAGS.num_devices, FLAGS.pieces, overrides,
            tuple(int(n) for n in FLAGS.other_chunk_sizes))
  common.write_json(FLAGS.out, out)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
