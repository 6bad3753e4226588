r"""Evaluates the digits base and its Adjoint-Matching fine-tunes; writes metrics.json and image grids.

    python -m experiments.evaluate --config=configs/digits_finetune.py --workdir=runs/digits_ft

For the base and every ``lam_<lambda>`` run of ``experiments.finetune_images`` in ``--workdir``,
draws ``eval.samples_per_class`` samples per digit (the same noise and labels for every model) with
the ODE and the memoryless SDE, each without (w = 1) and with classifier-free guidance
(v = v_uncond + w (v_cond - v_uncond), w = ``eval.guidance``), and reports

* ``reward_A``: mean log p_A(label | x) (the training reward), ``reward_B``: the same under the
  held-out classifier B;
* ``acc_A`` / ``acc_B``: class accuracy of the conditional samples;
* ``diversity``: mean pairwise distance of B-features between samples of the same label;
* ``fd``: Fréchet distance of B-features to the held-out real test digits (297 images).

``real_data`` gives the same metrics for N real training digits (FD noise-floor reference; its
classifier scores are memorised), ``real_test`` for the 297 test digits (held-out classifier scores).
Writes ``<workdir>/metrics.json`` and ``<workdir>/grid_<sampler>_w<w>.png`` (rows: digits 0-9;
panels: base, then each lambda, same noise).
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from am_jax import builders, classifiers, data as data_lib, sampling, sharding
from experiments import common, finetune, finetune_images, pretrain, train_reward

NULL = classifiers.NUM_CLASSES


def guided(apply_fn, w: float):
  """Classifier-free guided velocity ``apply(params, x, t, label)``; w = 1 is the plain conditional model.

  Both branches run in one batched call (2B) so the U-Net is traced once per step.
  """
  if w == 1.0:
    return apply_fn

  def fn(params, x, t, label):
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    v = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                 jnp.concatenate([label, jnp.full_like(label, NULL)]))
    v_c, v_u = v[:b], v[b:]
    return v_u + w * (v_c - v_u)

  return fn


def make_classify(clf_a, clf_b):
  """One jit: x (N, 8, 8, 1) -> (log p_A (N, 10), log p_B (N, 10), B-features (N, F))."""
  (apply_a, _, pa), (apply_b, feat_b, pb) = clf_a, clf_b

  @jax.jit
  def classify(pa, pb, x):
    return jax.nn.log_softmax(apply_a(pa, x)), jax.nn.log_softmax(apply_b(pb, x)), feat_b(pb, x)

  return lambda x: classify(pa, pb, jnp.asarray(x))


def score(x, labels, classify, ref_feats) -> dict:
  """Metrics of samples x (N, 8, 8, 1) with labels (N,) (see module docstring)."""
  x, labels = jnp.asarray(x), jnp.asarray(labels)
  logp_a, logp_b, fb = classify(x)
  fb = np.asarray(fb)
  pick = lambda lp: float(jnp.mean(jnp.take_along_axis(lp, labels[:, None], -1)))  # noqa: E731
  return {"reward_A": pick(logp_a), "reward_B": pick(logp_b),
          "acc_A": float(jnp.mean(jnp.argmax(logp_a, -1) == labels)),
          "acc_B": float(jnp.mean(jnp.argmax(logp_b, -1) == labels)),
          "diversity": classifiers.diversity(fb, np.asarray(labels)),
          "fd": classifiers.frechet_distance(fb, ref_feats),
          "ink": float(jnp.mean(classifiers.ink_reward(x)))}


def _grid(path, panels, labels, per_class: int, title: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = np.asarray(labels)
  fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels) * per_class / 8, 2.6), squeeze=False)
  for ax, (name, x) in zip(axes[0], panels):
    rows = []
    for c in range(classifiers.NUM_CLASSES):
      imgs = np.asarray(x)[labels == c][:per_class, ..., 0]  # (g, 8, 8)
      rows.append(np.concatenate(list(np.pad(imgs, ((0, 0), (1, 1), (1, 1)), constant_values=-1)), axis=1))
    ax.imshow(np.concatenate(rows, axis=0), cmap="gray_r", vmin=-1, vmax=1)
    ax.set_title(name, fontsize=8)
    ax.axis("off")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  t0 = time.perf_counter()
  mesh = sharding.make_mesh(cfg.mesh.num_devices)
  base_apply, base_params, _ = finetune.load_base(cfg.base_checkpoint, mesh)
  base_params = pretrain.to_local(base_params)
  clf_a = train_reward.load_classifier(cfg.reward_checkpoint, "A")[:3]
  clf_b = train_reward.load_classifier(cfg.reward_checkpoint, "B")[:3]
  x_test, _ = data_lib.digits("test")
  x_train, y_train = data_lib.digits("train")
  classify = make_classify(clf_a, clf_b)
  ref_feats = np.asarray(classify(x_test)[2])
  # Reference: real training digits (as many as samples, class-balanced draw not enforced).
  n_cls, e = classifiers.NUM_CLASSES, cfg.eval
  n = n_cls * e.samples_per_class
  sel = np.random.default_rng(0).permutation(len(x_train))[:n]
  out = {"real_data": score(x_train[sel], y_train[sel], classify, ref_feats)}
  # The classifiers were trained on the training digits: their rewards there are memorised, so also
  # report them on the held-out test digits (whose FD to themselves is 0 by construction).
  y_test = data_lib.digits("test")[1]
  out["real_test"] = score(x_test, y_test, classify, ref_feats)

  models = {"base": base_params}
  for lam in cfg.lambdas:
    if os.path.isdir(os.path.join(finetune_images.lam_dir(workdir, lam), "checkpoints")):
      models[f"lam_{float(lam):g}"] = finetune_images.load_finetuned(workdir, lam, base_apply, base_params, cfg)
  labels = jnp.repeat(jnp.arange(n_cls, dtype=jnp.int32), e.samples_per_class)  # (N,)
  schedule = builders.build_schedule(cfg)
  key = jax.random.PRNGKey(cfg.seed + 1234)  # the same noise for every model: paired comparisons
  for diffusion in ("ode", "memoryless"):
    for w in (1.0, float(e.guidance)):
      fn = guided(base_apply, w)
      # One compiled sampler per (diffusion, w); the params are an argument, so every model reuses it.
      draw = jax.jit(lambda p, k, fn=fn, diffusion=diffusion: sampling.sample(
          fn, p, k, (n, 8, 8, 1), schedule, diffusion, e.num_steps, cfg.am.time_offset,
          noiseless_last_step=True, cond=(labels,)))
      setting = f"{diffusion}_w{w:g}"
      panels = []
      for name, params in models.items():
        x = np.asarray(draw(params, key))
        out.setdefault(name, {})[setting] = score(x, labels, classify, ref_feats)
        panels.append((name, x))
      if jax.process_index() == 0:
        _grid(os.path.join(workdir, f"grid_{setting}.png"), panels, labels, e.grid_per_class,
              f"{diffusion}, guidance w={w:g} (same noise per column)")
  out["eval_seconds"] = time.perf_counter() - t0
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(out, f, indent=2)
  return out


def table(metrics: dict, setting: str = "ode_w1") -> str:
  """Markdown table of one sampling setting (rows: base and each lambda)."""
  keys = ("reward_A", "reward_B", "acc_A", "acc_B", "diversity", "fd", "ink")
  lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  for name, m in metrics.items():
    row = m if name.startswith("real_") else (m.get(setting) if isinstance(m, dict) else None)
    if row:
      lines.append(f"| {name} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  out = run(flags.FLAGS.config, flags.FLAGS.workdir)
  for setting in ("ode_w1", "memoryless_w1", f"ode_w{flags.FLAGS.config.eval.guidance:g}",
                  f"memoryless_w{flags.FLAGS.config.eval.guidance:g}"):
    print(f"\n{setting}\n" + table(out, setting))


if __name__ == "__main__":
  common.define_flags()
  app.run(main)
