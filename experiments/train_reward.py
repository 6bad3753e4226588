r"""Trains the digit reward classifier A and its held-out twin B (another architecture and seed).

    am-jax train-reward --config=configs/digits_reward.py --workdir=runs/digits_reward

``am_jax.image_eval.train_reward_classifiers``; the workdir is then ``config.reward.checkpoint`` of
``configs/digits_finetune.py``.
"""
from am_jax import image_eval, launch


def main(cfg, workdir):
  return image_eval.train_reward_classifiers(cfg, workdir)


if __name__ == "__main__":
  launch.run(main)
