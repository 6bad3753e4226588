r"""Every fine-tuning method of ``am_jax.methods`` with the same budget, on a 2-D exact problem and on images.

    python -m experiments.compare --task=toy2d --workdir=runs/compare_toy2d
    python -m experiments.compare --task=digits --workdir=runs/compare_digits     # needs the digits base + rewards

(The 1-D problem of paper Fig. 2, with its EAM / deterministic-AM diagnostics, is ``experiments.compare_toy``.)

toy2d: base = the exact 8-component ring mixture of ``configs/gmm2d.py`` (radius 2, std 0.25), reward
r(x) = -|x|^2 / 4 + (1, 0.5).x, lambda = 1; the exact target p_base e^r / Z is again a Gaussian mixture
(``gmm.tilt_quadratic``).  Fine-tuned = exact base + zero-initialised (64, 64) MLP residual (control
parameterisation), Adam 1e-3, batch 256, K = 40, 600 steps.  Distance = sliced W1 of 20k ODE samples to 20k exact
target samples (noise floor ~0.01).

digits: the class-conditional 8x8 U-Net base and classifiers A (reward r = log p_A(label | x)) / B (held out)
of ``configs/digits_finetune.py`` (train them first with the commands in that file); fine-tuned = full copy of
the U-Net, the config's optimizer (Adam 1e-4, 10 warm-up steps, clip 1), lambda 8, batch 16, K = 20, 120 steps.  Metrics on 200 ODE samples (20 per class, fixed
noise): reward A, held-out reward B, diversity (mean pairwise distance of B-features within a class) and FD to
the test digits on B-features.

Every run: the production step (``training.make_finetune_step``: one jit) with the method's objective; an
evaluation every ``eval_every`` steps (its time excluded from the wall-clock); "to reach" = first evaluation
whose reward passes ``reach``: toy2d: 90% of the way from the base's reward to the exact target's; digits: 70% of
the way from the base's reward A to its maximum 0.  NFE = network passes per trajectory per step (forward and
backward / VJP passes of the fine-tuned and base nets, counted from the method's algorithm:
``network_passes``); "NFE to reach" = steps to reach x NFE per step.  Peak memory = XLA's memory analysis of
the compiled step (temporaries + arguments + outputs - donated).

Writes to --workdir: compare_<task>.json (rows + histories), compare_<task>.md (table), compare_<task>.png
(reward and distance vs training wall-clock).  Measured times are in docs/comparisons.md (section 8.12).
"""
from absl import flags

from am_jax import comparison, jobs, launch, reporting

flags.DEFINE_enum("task", "toy2d", ["toy2d", "digits"], "Which comparison.")
flags.DEFINE_string("workdir", None, "Output folder (default runs/compare_<task>).")
flags.DEFINE_list("runs", None, "Subset of run names (default: all of am_jax.comparison.RUNS).")
flags.DEFINE_integer("steps", 0, "Steps per run (0: task default: toy2d 600, digits 120).")
flags.DEFINE_integer("batch_size", 0, "Trajectories per step (0: task default: toy2d 256, digits 16).")
flags.DEFINE_integer("eval_every", 0, "Evaluate every this many steps (0: task default: toy2d 50, digits 20).")
flags.DEFINE_float("lam", 0.0, "Reward multiplier lambda (0: task default: toy2d 1, digits 8).")
flags.DEFINE_integer("seed", 0, "Seed (same for every run).")
flags.DEFINE_string("toy2d_config", "gmm2d", "toy2d: config of the exact 2-D problem (its base is made exact).")
flags.DEFINE_string("digits_config", "digits_finetune", "digits: config with the base and classifier checkpoints.")
flags.DEFINE_float("eam_max_log_weight", 0.0, "EAM: clip log-weights at (max - this) (0: no clipping).")
flags.DEFINE_bool("replot", False, "Only rebuild the markdown and PNG from compare_<task>.json.")
FLAGS = flags.FLAGS

DEFAULTS = {"toy2d": (600, 256, 50, 1.0), "digits": (120, 16, 20, 8.0)}  # steps, batch, eval_every, lambda


def toy2d_config(path: str, lam: float, batch: int, seed: int):
  """The 2-D ring of ``path`` with its EXACT mixture as the base and a (64, 64) control residual, no loss clip."""
  cfg = launch.load_config(path)
  cfg.seed = seed
  cfg.model.kind = "exact"
  cfg.finetune.hidden = (64, 64)
  cfg.finetune.batch_size = batch
  cfg.am.reward_multiplier = lam
  cfg.am.loss_clip = None
  return cfg


def main(_, workdir):
  task_name = FLAGS.task
  workdir = workdir or f"runs/compare_{task_name}"
  if FLAGS.replot:
    saved = comparison.load(workdir, task_name)
  else:
    d = DEFAULTS[task_name]
    steps, batch, eval_every, lam = (FLAGS.steps or d[0], FLAGS.batch_size or d[1], FLAGS.eval_every or d[2],
                                     FLAGS.lam or d[3])
    if task_name == "toy2d":
      cfg = toy2d_config(FLAGS.toy2d_config, lam, batch, FLAGS.seed)
      task = comparison.exact_task(jobs.build_finetune_problem(cfg, workdir), batch)
    else:
      cfg = launch.load_config(FLAGS.digits_config)
      cfg.am.reward_multiplier = lam
      cfg.finetune.batch_size = batch
      cfg.mesh.num_devices = 1
      task = comparison.classifier_task(jobs.build_finetune_problem(cfg, workdir), cfg, batch)
    if FLAGS.eam_max_log_weight:
      task.setdefault("method_options", {}).setdefault("eam", {})["max_log_weight"] = FLAGS.eam_max_log_weight
    saved = comparison.run_all(task, task_name, FLAGS.runs, steps, eval_every, FLAGS.seed, lam)
  md = comparison.write(saved, workdir, task_name)
  reporting.info(md)


if __name__ == "__main__":
  launch.run(main, config=False)
