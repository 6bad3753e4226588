r"""Pre-trains a class-conditional flow-matching U-Net on scikit-learn's 8x8 digits (bundled, offline).

    python -m experiments.pretrain --config=configs/digits_pretrain.py --workdir=runs/digits_base

Labels are dropped to the null label with probability ``pretrain.cond_drop_prob`` so classifier-free
guidance works.  The image fine-tuning workload (evaluation, rewards) is issue 4; this config
exercises the U-Net + image pre-training path of the training system.
"""
import ml_collections

from configs import gmm2d


def get_config():
  c = gmm2d.get_config()
  c.data = dict(name="digits", num_samples=1500)
  c.model = dict(kind="unet", channels=(32, 64), time_embed_dim=64, num_classes=10)
  c.pretrain = dict(
      steps=4000, batch_size=128, ema_decay=0.999, log_every=250, cond_drop_prob=0.1,
      optimizer=dict(name="adam", learning_rate=1e-3, warmup_steps=200, decay="cosine", grad_clip=1.0,
                     weight_decay=0.0),
      checkpoint=dict(every_steps=1000, max_to_keep=2))
  return ml_collections.ConfigDict(c)
