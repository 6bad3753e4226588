r"""Evaluates an image base and its fine-tunes: rewards A/B, accuracy, diversity, Fréchet distance, grids.

    am-jax evaluate --config=configs/digits_finetune.py --workdir=runs/digits_eval \
        --runs=runs/digits_ft_lam2,runs/digits_ft_lam8

Samples the base and each fine-tuned run (``--runs``: workdirs of ``am-jax finetune``; default: the
workdir itself) with the same noise and labels, with the ODE and the memoryless SDE, without and with
classifier-free guidance (``am_jax.image_eval.evaluate``); writes ``eval.json`` and ``grid_*.png``.
"""
from absl import flags

from am_jax import image_eval, launch, reporting

flags.DEFINE_list("runs", [], "Fine-tuning workdirs to evaluate next to the base (default: --workdir).")
FLAGS = flags.FLAGS


def main(cfg, workdir):
  out = image_eval.evaluate(cfg, workdir, FLAGS.runs)
  for setting in ("ode_w1", "memoryless_w1", f"ode_w{cfg.eval.guidance:g}", f"memoryless_w{cfg.eval.guidance:g}"):
    reporting.info(f"\n{setting}\n" + image_eval.table(out, setting))
  return out


if __name__ == "__main__":
  launch.run(main)
