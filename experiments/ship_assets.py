r"""Regenerates the pre-trained MNIST bases (U-Net, DiT) and reward classifiers shipped in ``am_jax/assets``.

    am-jax ship-assets --workdir=runs/assets                       # writes into the package's assets folder
    am-jax ship-assets --workdir=runs/assets --out=/tmp/regen      # elsewhere (compare with the shipped set)

``am_jax.assets.ship``: classifiers A/B (3000 steps each), then each base's flow-matching pre-training
(``configs/mnist.py``: 20,000 steps, batch 128) exported as EMA params, and ``manifest.json`` (checksums and
quality numbers).  Measured on one H100 (docs/images.md): a few minutes in all; on 2 CPU cores, hours.
"""
from absl import flags

from am_jax import assets, launch

flags.DEFINE_string("out", "", "Output folder (default: the installed package's assets folder).")
flags.DEFINE_integer("pretrain_steps", 0, "Override the bases' pre-training steps (0: configs/mnist.py's).")
flags.DEFINE_integer("classifier_steps", 3000, "Training steps of each classifier.")
flags.DEFINE_list("archs", list(assets.ARCHS), "Which bases.")
FLAGS = flags.FLAGS


def main(_, workdir):
  return assets.ship(workdir, FLAGS.out or None, FLAGS.pretrain_steps or None, FLAGS.classifier_steps,
                     tuple(FLAGS.archs))


if __name__ == "__main__":
  launch.run(main, config=False)
