r"""Pre-trains a base velocity model with conditional flow matching and saves it with Orbax.

    am-jax pretrain --config=configs/gmm2d.py --workdir=runs/base_ring     # or: python -m experiments.pretrain ...

Uses the ``data``, ``model``, ``schedule`` and ``pretrain`` sections of the config; the workdir is then a
``config.base_checkpoint`` for ``am-jax finetune``.  Rerun the same command to resume.
"""
from am_jax import jobs, launch


def main(cfg, workdir):
  return jobs.pretrain(cfg, workdir)


if __name__ == "__main__":
  launch.run(main)
