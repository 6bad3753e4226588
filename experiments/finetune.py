r"""Fine-tunes a flow-matching / diffusion base toward p_base exp(lambda r) with any method: the main job.

    am-jax finetune --config=configs/gmm2d.py --workdir=runs/gmm2d        # or: python -m experiments.finetune ...

One launcher for every task: the 2-D ring (``configs/gmm2d.py``), the digits (``configs/digits_finetune.py``),
and a user's own model and reward (a config naming ``"my_pkg.models:make_model"`` and
``"my_pkg.rewards:my_reward"``; README "Your own model and reward").  Everything happens in
``am_jax.jobs.finetune``: validate the whole config, pre-train a base into ``<workdir>/base`` when
``config.base_checkpoint`` is empty, build the ``Problem``, fine-tune with one jitted sharded step per
iteration (Orbax checkpoints in ``<workdir>/checkpoints``; rerun the same command to resume), then
evaluate (``metrics.json``, ``scatter.png`` / ``grid.png``).
"""
from am_jax import jobs, launch


def main(cfg, workdir):
  return jobs.finetune(cfg, workdir)


if __name__ == "__main__":
  launch.run(main)
