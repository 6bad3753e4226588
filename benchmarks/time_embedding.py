r"""What the per-sample sinusoidal time embedding costs in a rollout whose batch shares one time.

    python -m benchmarks.time_embedding            # prints the medians; --out=... writes JSON

A scan of K Euler steps of ``models.MLP`` (3x128, 32-feature embedding, the gmm2d base) at batch B, four ways:
``per_sample``: the model as called today (t broadcast to (B,): B embeddings and a (B, 32) x (32, 128) product per
step); ``once``: the same maths with the embedding and its first-layer product computed once per step and
broadcast (what a shared-scalar-time contract would allow); ``no_time``: the time enters only as a bias scale (a
lower bound: no embedding at all); ``model_shared``: ``models.MLP`` with its shared-time path (the run-time
``lax.cond`` on ``all(t == t_0)``, what the library now does on CPU).  Interleaved rounds
(``benchmarks.common.interleaved``); docs/performance.md sections 12.9-12.10.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from am_jax import models
from benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 256, "Batch B.")
flags.DEFINE_integer("num_steps", 40, "Steps K of the scan.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
flags.DEFINE_string("out", "", "Write the results as JSON to this file.")


def rollouts(batch: int, num_steps: int, dim: int = 2):
  """{name: jitted rollout(params, x0)} and the params of a 3x128 ``models.MLP``."""
  apply, params = models.functional(models.MLP(dim, hidden=(128, 128, 128), shared_time=False, rngs=nnx.Rngs(0)))
  apply_shared, _ = models.functional(models.MLP(dim, hidden=(128, 128, 128), shared_time=True, rngs=nnx.Rngs(0)))
  ts = jnp.linspace(0.01, 0.99, num_steps)
  h = 1.0 / num_steps

  def hidden_tail(p, z):
    for i in (1, 2):
      z = jax.nn.silu(z @ p["hidden"][i]["kernel"][...] + p["hidden"][i]["bias"][...])
    return z @ p["out"]["kernel"][...] + p["out"]["bias"][...]

  def once(p, x, t):
    k0, b0 = p["hidden"][0]["kernel"][...], p["hidden"][0]["bias"][...]
    emb = models.sinusoidal_embedding(jnp.reshape(t, (1,)), 32)
    return hidden_tail(p, jax.nn.silu(x @ k0[:dim] + (emb @ k0[dim:] + b0)))

  def no_time(p, x, t):
    k0, b0 = p["hidden"][0]["kernel"][...], p["hidden"][0]["bias"][...]
    return hidden_tail(p, jax.nn.silu(x @ k0[:dim] + b0 * t))

  velocity = {"per_sample": lambda p, x, t: apply(p, x, jnp.full((batch,), t)), "once": once, "no_time": no_time,
              "model_shared": lambda p, x, t: apply_shared(p, x, jnp.full((batch,), t))}

  def make(v):
    def rollout(p, x):
      return jax.lax.scan(lambda x, t: (x + h * v(p, x, t), None), x, ts)[0]
    return jax.jit(rollout)

  return {name: make(v) for name, v in velocity.items()}, params


def main(argv):
  del argv
  fns, params = rollouts(FLAGS.batch, FLAGS.num_steps)
  x0 = jax.random.normal(jax.random.PRNGKey(0), (FLAGS.batch, 2))
  ref = fns["per_sample"](params, x0)
  err = float(jnp.max(jnp.abs(fns["once"](params, x0) - ref)))
  err_model = float(jnp.max(jnp.abs(fns["model_shared"](params, x0) - ref)))
  runs = {}
  for name, fn in fns.items():
    compiled, _ = common.compile_timed(fn, params, x0)
    runs[name] = (lambda c: lambda: c(params, x0))(compiled)
  times = common.interleaved(runs, FLAGS.rounds, 20)
  med = {k: v["median_s"] for k, v in times.items()}
  out = {"machine": common.machine_info(), "batch": FLAGS.batch, "num_steps": FLAGS.num_steps,
         "max_abs_diff_once_vs_per_sample": err, "median_ms": {k: 1e3 * v for k, v in med.items()},
         "max_abs_diff_model_shared_vs_per_sample": err_model,
         "per_sample_over_once": med["per_sample"] / med["once"],
         "per_sample_over_model_shared": med["per_sample"] / med["model_shared"]}
  print(f"per_sample {1e3 * med['per_sample']:.2f} ms, once {1e3 * med['once']:.2f} ms, "
        f"no_time {1e3 * med['no_time']:.2f} ms, model_shared {1e3 * med['model_shared']:.2f} ms; per_sample / once "
        f"{out['per_sample_over_once']:.3f}, per_sample / model_shared {out['per_sample_over_model_shared']:.3f} "
        f"(max |diff| {err:.1e} / {err_model:.1e})")
  common.write_json(FLAGS.out, out)


if __name__ == "__main__":
  app.run(main)
