"""Reward classifiers and the evaluation of image fine-tunes (digits): training, scores, grids.

``train_reward_classifiers(cfg, workdir)`` trains the reward classifier 'A' and its held-out twin 'B'
(another architecture and seed) and saves both (``builders.save_classifier``).
``evaluate(cfg, workdir, runs)`` samples the base and each fine-tuned run with the same noise and labels,
with the ODE and the memoryless SDE, without (w = 1) and with classifier-free guidance, and reports

* ``reward_A``: mean log p_A(label | x) (the training reward), ``reward_B``: the same under the held-out B;
* ``acc_A`` / ``acc_B``: class accuracy of the conditional samples;
* ``diversity``: mean pairwise distance of B-features between samples of the same label;
* ``fd``: Fréchet distance of B-features to the held-out real digits.
"""
from __future__ import annotations

import json
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from am_jax import builders, classifiers, data as data_lib, jobs, parameterisation, plots, reporting, sampling

__all__ = ["train_classifier", "train_reward_classifiers", "make_classify", "score", "evaluate", "table"]


def heldout_images(cfg):
  """The held-out real images of ``cfg.data`` (the FD reference): digits 'test' or MNIST 'heldout'."""
  return _split(cfg, "test")[0]


def _split(cfg, split: str):
  name = cfg.data.name if "data" in cfg else "digits"
  if name == "mnist":
    return data_lib.mnist("train" if split == "train" else "heldout")
  return data_lib.digits(split)


def train_classifier(arch: str, seed: int, tc, x_train, y_train, x_test, y_test):
  """Trains one classifier with noise augmentation; returns (apply_fn, features_fn, params, test_acc, seconds)."""
  image_size = int(x_train.shape[1])
  apply_fn, features_fn, params = classifiers.functional(classifiers.build(arch, seed, image_size=image_size))
  opt = optax.adamw(optax.cosine_decay_schedule(tc.learning_rate, tc.steps), weight_decay=tc.weight_decay)
  opt_state = opt.init(params)
  xs, ys = jnp.asarray(x_train), jnp.asarray(y_train)

  @jax.jit
  def step(params, opt_state, key):
    k_idx, k_noise = jax.random.split(key)
    idx = jax.random.randint(k_idx, (tc.batch_size,), 0, xs.shape[0])
    # Noise augmentation: generated images are slightly off the data manifold; the reward's input
    # gradient should still point toward cleaner digits there.
    noise_scale = tc.noise_std * jax.random.uniform(k_noise, (tc.batch_size, 1, 1, 1))
    x = xs[idx] + noise_scale * jax.random.normal(jax.random.fold_in(k_noise, 1), xs[idx].shape)
    loss, grads = jax.value_and_grad(lambda p: classifiers.cross_entropy(apply_fn, p, x, ys[idx]))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  key = jax.random.PRNGKey(seed)
  progress = reporting.Progress(f"classifier {arch}", tc.steps)
  t0 = time.perf_counter()
  for s in range(tc.steps):
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, s))
    if (s + 1) % tc.log_every == 0 or s + 1 == tc.steps:
      progress.tick(s + 1, {"loss": float(loss)})
  seconds = time.perf_counter() - t0
  logits = jax.jit(apply_fn)(params, jnp.asarray(x_test))
  acc = float(np.mean(np.argmax(np.asarray(logits), -1) == y_test))
  return apply_fn, features_fn, params, acc, seconds


def train_reward_classifiers(cfg, workdir: str) -> dict:
  """Trains and saves every classifier of ``cfg.classifiers`` (A: reward, B: held-out twin)."""
  x_train, y_train = _split(cfg, "train")
  x_test, y_test = _split(cfg, "test")
  summary = {}
  for name, cc in cfg.classifiers.items():
    _, _, params, acc, seconds = train_classifier(cc.arch, cc.seed, cfg.train, x_train, y_train, x_test, y_test)
    info = dict(arch=cc.arch, seed=cc.seed, image_size=int(x_train.shape[1]), test_accuracy=acc,
                train_seconds=seconds, train=cfg.train.to_dict())
    builders.save_classifier(workdir, name, params, info)
    summary[f"{name}_test_accuracy"] = acc
    summary[f"{name}_train_seconds"] = seconds
    reporting.info(f"classifier {name} ({cc.arch}): test accuracy {acc:.4f} ({seconds:.1f} s)")
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def make_classify(clf_a, clf_b):
  """One jit: x (N, H, W, 1) -> (log p_A (N, 10), log p_B (N, 10), B-features (N, F))."""
  (apply_a, _, pa), (apply_b, feat_b, pb) = clf_a, clf_b

  @jax.jit
  def classify(pa, pb, x):
    return jax.nn.log_softmax(apply_a(pa, x)), jax.nn.log_softmax(apply_b(pb, x)), feat_b(pb, x)

  return lambda x: classify(pa, pb, jnp.asarray(x))


def score(x, labels, classify, ref_feats) -> dict:
  """Metrics of samples x (N, H, W, 1) with labels (N,) (module docstring)."""
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


def evaluate(cfg, workdir: str, runs: Sequence[str] = ()) -> dict:
  """Evaluates the base of ``cfg`` and the fine-tuning jobs in ``runs`` (workdirs; default: ``workdir``
  itself when it holds checkpoints); writes ``<workdir>/eval.json`` and ``grid_<sampler>_w<w>.png``."""
  t0 = time.perf_counter()
  ckpt_dir = cfg.reward.checkpoint
  clf_a = builders.load_classifier(ckpt_dir, "A")[:3]
  clf_b = builders.load_classifier(ckpt_dir, "B")[:3]
  x_train, y_train = _split(cfg, "train")
  x_test, y_test = _split(cfg, "test")
  classify = make_classify(clf_a, clf_b)
  ref_feats = np.asarray(classify(x_test)[2])
  n_cls, e = classifiers.NUM_CLASSES, cfg.eval
  n = n_cls * e.samples_per_class
  sel = np.random.default_rng(0).permutation(len(x_train))[:n]
  # The classifiers were trained on the training digits: their rewards there are memorised, so also
  # report them on the held-out digits (whose FD to themselves is 0 by construction).
  out = {"real_data": score(x_train[sel], y_train[sel], classify, ref_feats),
         "real_test": score(x_test, y_test, classify, ref_feats)}
  runs = list(runs) or ([workdir] if os.path.isdir(os.path.join(workdir, "checkpoints")) else [])
  problem = None
  params_by_model = {}
  for run_dir in runs:
    problem, params = jobs.load_finetuned(cfg, run_dir)
    if problem.parameterisation not in ("full", "lora"):
      raise ValueError(f"{run_dir}: image evaluation needs a 'full' or 'lora' fine-tune.")
    params_by_model[os.path.basename(os.path.normpath(run_dir))] = problem.merged_params(params)
  if problem is None:
    problem = jobs.build_finetune_problem(cfg, workdir)
  params_by_model = {"base": problem.base_params, **params_by_model}
  labels = jnp.repeat(jnp.arange(n_cls, dtype=jnp.int32), e.samples_per_class)
  shape = (n,) + problem.sample_shape
  key = jax.random.PRNGKey(cfg.seed + 1234)  # the same noise for every model: paired comparisons
  c = problem.config
  for diffusion in ("ode", "memoryless"):
    for w in (1.0, float(e.guidance)):
      fn = parameterisation.guided(problem.base_apply, w, n_cls)
      # One compiled sampler per (diffusion, w); the params are an argument, so every model reuses it.
      draw = jax.jit(lambda p, k, fn=fn, diffusion=diffusion: sampling.sample(
          fn, p, k, shape, c.schedule, diffusion, e.num_steps, c.time_offset, noiseless_last_step=True,
          cond=(labels,)))
      setting = f"{diffusion}_w{w:g}"
      panels = []
      for name, params in params_by_model.items():
        x = np.asarray(draw(params, key))
        out.setdefault(name, {})[setting] = score(x, labels, classify, ref_feats)
        panels.append((name, x))
      if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        plots.class_grid(os.path.join(workdir, f"grid_{setting}.png"), panels, labels, e.grid_per_class,
                         title=f"{diffusion}, guidance w={w:g} (same noise per column)")
  out["eval_seconds"] = time.perf_counter() - t0
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(out, f, indent=2)
  return out


def table(metrics: dict, setting: str = "ode_w1") -> str:
  """Markdown table of one sampling setting (rows: real data, base and each run)."""
  keys = ("reward_A", "reward_B", "acc_A", "acc_B", "diversity", "fd", "ink")
  lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  for name, m in metrics.items():
    row = m if name.startswith("real_") else (m.get(setting) if isinstance(m, dict) else None)
    if row:
      lines.append(f"| {name} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + " |")
  return "\n".join(lines)
