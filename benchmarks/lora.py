r"""LoRA vs full fine-tuning of the same shipped MNIST base at the same lambda, side by side in one run.

    python -m benchmarks.lora --out=benchmarks/results/lora_cpu.json                     # small: 2-core CPU, ~10 min
    python -m benchmarks.lora --steps=201 --rounds=20 --batch=64 --num_steps=20 --eval_samples=1000 \
        --out=benchmarks/results/lora_h200.json                                          # full, one GPU

For each architecture (``--archs``: the shipped U-Net and DiT, ``configs/mnist.py``) and each parameterisation
(``lora``: rank ``finetune.lora_rank`` adapters on every kernel, only they trained; ``full``: every weight), the
adjoint-matching step of ``am-jax finetune`` (``training.make_finetune_step`` with the config's method) is
compiled once and reported with:

* ``step_ms``: time per step, compile excluded: the two parameterisations of an architecture train in
  interleaved rounds (``benchmarks.common.interleaved``: ``--rounds`` rounds of ``iters`` timed steps each after
  ``warm`` untimed ones, median of the round medians), so a shared machine's load hits both alike.  The timed
  steps ARE the training steps: ``--steps`` = warm + rounds * iters;
* ``peak memory``: XLA's memory analysis of the compiled step (``profiling.memory_stats``: temporaries +
  arguments + outputs - donated bytes), and its parts;
* trainable parameter count and the bytes on disk of the trained parameters saved with
  ``checkpointing.save_params`` (adapters vs every weight);
* rewards after ``--steps`` steps: the training reward (raw r, here log p_A(target | x)) and its held-out gold
  twin (classifier B) on ``--eval_samples`` ODE samples drawn with the SAME noise for the base, LoRA and full
  (LoRA sampled with merged weights: one compiled sampler), plus the diversity of classifier-B features and
  the mean training-batch reward of the last ``iters`` steps.

Each parameterisation uses its config's learning rate (LoRA 1e-3, full 1e-4; ``--lr_lora`` / ``--lr_full``),
lambda is ``am.reward_multiplier`` (``--lam``) for both.  Results: JSON (``--out``) and a markdown table
(``--md``, default: --out with .md).
"""
from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from am_jax import builders, checkpointing, classifiers, jobs, launch, profiling, reporting, training
from benchmarks import common

__all__ = ["build_run", "run", "run_arch", "to_markdown"]

FLAGS = flags.FLAGS
flags.DEFINE_list("archs", ["unet", "dit"], "Architectures (configs/mnist.py arch=...).")
flags.DEFINE_list("params", ["lora", "full"], "Parameterisations compared.")
flags.DEFINE_string("reward", "class", "configs/mnist.py reward=... (class | thickness | combo | prompt).")
flags.DEFINE_integer("steps", 41, "Training steps per run = warm + rounds * iters (every one of them timed but warm).")
flags.DEFINE_integer("rounds", 4, "Interleaved timing rounds.")
flags.DEFINE_integer("batch", 16, "Batch size B.")
flags.DEFINE_integer("num_steps", 10, "K: steps of the memoryless SDE grid (and of the evaluation ODE).")
flags.DEFINE_float("lam", 4.0, "lambda (am.reward_multiplier), the same for both parameterisations.")
flags.DEFINE_float("lr_lora", 0.0, "LoRA learning rate (0: the config's, 1e-3).")
flags.DEFINE_float("lr_full", 0.0, "Full fine-tuning learning rate (0: the config's, 1e-4).")
flags.DEFINE_integer("eval_samples", 128, "ODE samples for the final rewards (same noise for every model).")
flags.DEFINE_string("out", "", "JSON output file.")
flags.DEFINE_string("md", "", "Markdown output file (default: --out with .md).")


def _bytes_on_disk(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def build_run(arch: str, param: str, reward: str, batch: int, num_steps: int, steps: int, lam: float,
              lr: float = 0.0, workdir: str = "") -> dict:
  """Config, Problem, compiled step and initial state of one (arch, parameterisation) run."""
  cfg = launch.load_config(f"mnist.py:arch={arch},reward={reward},param={param}")
  cfg.mesh.num_devices = 1
  cfg.finetune.batch_size, cfg.finetune.steps = int(batch), int(steps)
  cfg.am.num_steps = cfg.eval.num_steps = int(num_steps)
  cfg.am.reward_multiplier = float(lam)
  if lr:
    cfg.finetune.optimizer.learning_rate = float(lr)
  problem = jobs.build_finetune_problem(cfg, workdir)
  objective = builders.build_method(cfg, problem.config)
  optimizer = builders.build_optimizer(cfg, "finetune.optimizer", cfg.finetune.steps)
  step = training.make_finetune_step(problem, objective, optimizer, cfg.finetune.batch_size, None,
                                     float(cfg.finetune.ema_decay))
  state = training.init_state(problem.init_params, optimizer, cfg.seed)
  base_params = jax.tree.map(jnp.asarray, problem.base_params)
  compiled, compile_s = common.compile_timed(step, state, base_params)
  return {"cfg": cfg, "problem": problem, "compiled": compiled, "compile_s": compile_s, "state": state,
          "base_params": base_params, "rewards": []}


def _runner(r: dict):
  def run_step():
    r["state"], m = r["compiled"](r["state"], r["base_params"])
    r["rewards"].append(m["reward_mean"])
    return m["loss"]
  return run_step


def run_arch(arch: str, params, reward: str, batch: int, num_steps: int, steps: int, rounds: int, lam: float,
             lrs: dict, eval_samples: int) -> dict:
  """Every parameterisation of one architecture: compile, train + time interleaved, evaluate, save."""
  iters = (steps - 1) // rounds
  if iters < 1:
    raise ValueError(f"--steps={steps} must be > --rounds={rounds} (steps = warm + rounds * iters, warm >= 1).")
  warm = steps - rounds * iters
  with tempfile.TemporaryDirectory() as tmp:
    runs = {p: build_run(arch, p, reward, batch, num_steps, steps, lam, lrs.get(p, 0.0), tmp) for p in params}
    for p, r in runs.items():
      print(f"{arch:5s} {p:5s} compiled in {r['compile_s']:.1f} s; "
            f"{profiling.memory_stats(r['compiled']).get('total_bytes', 0) / 2**20:.1f} MiB", flush=True)
    t0 = time.perf_counter()
    times = common.interleaved({p: _runner(r) for p, r in runs.items()}, rounds, iters, warm)
    train_s = time.perf_counter() - t0
    # Final rewards: the base, then every run, sampled by ONE compiled sampler (merged weights) with one noise.
    first = next(iter(runs.values()))
    problem, cfg = first["problem"], first["cfg"]
    key = jax.random.PRNGKey(cfg.seed + 99)
    cond = tuple(problem.cond_fn(jax.random.fold_in(key, 1), eval_samples)) if problem.cond_fn else ()
    draw = jax.jit(lambda p: problem.sample(p, key, eval_samples, "ode", cond=cond, which="base"))
    report = jax.jit(lambda x: problem.reward_report(x, cond))
    _, feats_b, params_b, _ = builders.load_classifier(cfg.reward.checkpoint, "B")
    feats = jax.jit(feats_b)

    def evaluate(merged):
      x = draw(merged)
      out = {k: float(v) for k, v in report(x).items()}
      labels = np.asarray(cond[0]) if cond else None
      out["diversity"] = classifiers.diversity(np.asarray(feats(params_b, x)), labels)
      return out

    result = {"base": evaluate(problem.base_params), "runs": {}}
    for p, r in runs.items():
      trained = training.eval_params(r["state"], float(r["cfg"].finetune.ema_decay))
      ckpt_dir = os.path.join(tmp, f"{arch}_{p}_params")
      checkpointing.save_params(ckpt_dir, trained)
      mem = profiling.memory_stats(r["compiled"])
      rewards = [float(v) for v in r["rewards"]]
      result["runs"][p] = {
          "step_ms": 1e3 * times[p]["median_s"], "round_medians_ms": [1e3 * t for t in times[p]["round_medians_s"]],
          "compile_s": r["compile_s"], "memory": mem, "peak_mib": mem.get("total_bytes", 0) / 2**20,
          "trainable_params": _count(trained), "base_params": _count(r["problem"].base_params),
          "checkpoint_bytes": _bytes_on_disk(ckpt_dir), "learning_rate": float(r["cfg"].finetune.optimizer.learning_rate),
          "train_reward_last": float(np.mean(rewards[-iters:])), "train_reward_curve": rewards,
          "final": evaluate(r["problem"].merged_params(trained))}
  return dict(result, arch=arch, model=cfg.model.to_dict(), steps=steps, warm=warm, rounds=rounds, iters=iters,
              train_seconds=train_s)


def run(archs, params, reward: str, batch: int, num_steps: int, steps: int, rounds: int, lam: float, lrs: dict,
        eval_samples: int) -> dict:
  out = {"machine": common.machine_info(), "reward": reward, "batch": batch, "num_steps": num_steps, "lambda": lam,
         "steps": steps, "eval_samples": eval_samples, "archs": {}}
  t0 = time.perf_counter()
  for arch in archs:
    out["archs"][arch] = run_arch(arch, params, reward, batch, num_steps, steps, rounds, lam, lrs, eval_samples)
  out["seconds"] = time.perf_counter() - t0
  return out


def _gold(scores: dict, key) -> str:
  return f"{scores[key]:.3f}" if key else "-"


def to_markdown(out: dict) -> str:
  m = out["machine"]
  lines = [(f"LoRA vs full fine-tuning of the shipped MNIST bases (reward `{out['reward']}`, lambda = {out['lambda']:g}, "
            f"B = {out['batch']}, K = {out['num_steps']}, {out['steps']} steps; {m['machine']}, {m['date']}, "
            f"jax {m['jax']}; {out['seconds'] / 60:.1f} min)."), "",
           ("Step time: median of interleaved rounds, compile excluded.  Peak memory: XLA memory analysis of the "
            "compiled step.  Checkpoint: trained parameters on disk (`checkpointing.save_params`).  Rewards: "
            f"{out['eval_samples']} ODE samples, the same noise for every row; train = raw training reward, gold = "
            "its held-out twin, diversity = mean within-condition distance of classifier-B features."), "",
           ("| arch | params | step (ms) | peak memory (MiB) | trainable params | checkpoint (KiB) | lr | "
            "train reward | gold reward | diversity |"), "|" + "---|" * 10]
  for arch, a in out["archs"].items():
    base = a["base"]
    gold = next((k for k in base if k.startswith("gold/")), None)
    lines.append(f"| {arch} | base | - | - | - | - | - | {base['reward']:.3f} | {_gold(base, gold)} | "
                 f"{base['diversity']:.2f} |")
    for p, r in a["runs"].items():
      f = r["final"]
      lines.append(f"| {arch} | {p} | {r['step_ms']:.1f} | {r['peak_mib']:.1f} | {r['trainable_params']:,} "
                   f"({r['trainable_params'] / r['base_params']:.1%}) | {r['checkpoint_bytes'] / 1024:.0f} | "
                   f"{r['learning_rate']:g} | {f['reward']:.3f} | {_gold(f, gold)} | {f['diversity']:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  reporting.quiet_libraries()
  lrs = {"lora": FLAGS.lr_lora, "full": FLAGS.lr_full}
  out = run(FLAGS.archs, FLAGS.params, FLAGS.reward, FLAGS.batch, FLAGS.num_steps, FLAGS.steps, FLAGS.rounds,
            FLAGS.lam, lrs, FLAGS.eval_samples)
  common.write_json(FLAGS.out, out)
  md = to_markdown(out)
  print(md)
  md_path = FLAGS.md or (FLAGS.out.rsplit(".", 1)[0] + ".md" if FLAGS.out else "")
  if md_path:
    with open(md_path, "w") as f:
      f.write(md)
    print(f"wrote {md_path}")


if __name__ == "__main__":
  app.run(main)
