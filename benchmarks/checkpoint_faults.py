"""Checkpoint faults (issue 15): single-bit flips in the latest step's array data, detected or not, and the cost of
verification.

    python -m benchmarks.checkpoint_faults [--flips 40] [--seed 0] [--out benchmarks/results/checkpoint_faults.json]

1. A tiny fine-tuning run (``tests.launch_helpers.tiny_config`` with the exact ring base: no pre-training) saves
   steps 15, 20, 25.  For each trial one random bit of the latest step's array data (the OCDBT data files under
   ``25/state/``, chosen uniformly over their bytes) is flipped in a fresh copy, and the run's own restore
   (``Checkpointer.restore(None, ...)``) is asked for the newest intact step: *detected* = step 25 rejected with a
   reason (it resumes from 20), *silent* = step 25 restored with values that differ from the intact ones,
   *harmless* = step 25 restored bit-identical (the flip hit bytes no value depends on).  The same flips without
   verification (``verify=False``, the behaviour before issue 15) are counted too.
2. The cost of verification: ``integrity_record`` (host copy + SHA-256 of every array) of the tiny state and of a
   100 MB state (25 M float32), and one save + restore of each with ``verify`` on and off.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from am_jax import checkpointing, jobs, reporting, training  # noqa: E402


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _data_files(ckdir: str, step: int):
  return [f for f in glob.glob(os.path.join(ckdir, str(step), "state", "**", "d", "*"), recursive=True)
          if os.path.isfile(f)]


def _flip(files, rng):
  sizes = np.array([os.path.getsize(f) for f in files])
  pos = int(rng.integers(sizes.sum()))
  i = int(np.searchsorted(np.cumsum(sizes), pos, side="right"))
  offset = pos - int(sizes[:i].sum())
  bit = int(rng.integers(8))
  with open(files[i], "r+b") as f:
    f.seek(offset)
    b = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([b ^ (1 << bit)]))
  return os.path.relpath(files[i]), offset, bit


def _classify(ckdir, target, intact, verify: bool):
  import contextlib
  import io
  ckpt = checkpointing.Checkpointer(ckdir, verify=verify)
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err):
      state = ckpt.restore(None, target)
  except Exception as e:  # noqa: BLE001
    return "error", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
  finally:
    ckpt.close()
  if ckpt.restored_step != 25:
    return "detected", ckpt.rejected.get(25, "")
  got = _leaves(state)
  if all(np.array_equal(a, b, equal_nan=True) for a, b in zip(got, intact)):
    return "harmless", ""
  worst = max(float(np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.dtype.kind == "f" else
              float(np.any(a != b)) for a, b in zip(got, intact))
  nonfinite = any(a.dtype.kind == "f" and not np.all(np.isfinite(a)) for a in got)
  return "silent", f"max |change| {worst:.3g}{', non-finite' if nonfinite else ''}"


def bit_flips(n: int, seed: int, work: str) -> dict:
  from tests.launch_helpers import tiny_config
  cfg = tiny_config(**{"model.kind": "exact", "mesh.num_devices": 1, "finetune.steps": 25,
                       "checkpoint.every_steps": 5, "checkpoint.max_to_keep": 3, "eval.num_samples": 64})
  run = os.path.join(work, "run")
  _, state, _ = jobs.finetune(cfg, run, return_state=True)
  ckdir = os.path.join(run, "checkpoints")
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  ckpt = checkpointing.Checkpointer(ckdir)
  intact = _leaves(ckpt.restore(25, target))
  ckpt.close()
  rng = np.random.default_rng(seed)
  trials = []
  for _ in range(n):
    copy = os.path.join(work, "copy")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(ckdir, copy)
    where = _flip(_data_files(copy, 25), rng)
    verified = _classify(copy, target, intact, verify=True)
    unverified = _classify(copy, target, intact, verify=False)
    trials.append({"flip": where, "verified": verified, "unverified": unverified})
  count = lambda key: {k: sum(t[key][0] == k for t in trials) for k in ("detected", "silent", "harmless", "error")}  # noqa: E731
  data_bytes = sum(os.path.getsize(f) for f in _data_files(ckdir, 25))
  return {"flips": n, "seed": seed, "state_data_bytes": data_bytes, "verified": count("verified"),
          "unverified": count("unverified"), "trials": trials}


def _time(fn, repeat=3):
  best = float("inf")
  for _ in range(repeat):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def verify_cost(work: str) -> dict:
  out = {}
  for name, size in (("tiny (1.3 k floats)", 1300), ("100 MB (25 M floats)", 25_000_000)):
    params = {"w": jnp.arange(size, dtype=jnp.float32) * 1e-3}
    state = training.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=(), ema_params=params,
                                rng=jnp.zeros((2,), jnp.uint32))
    row = {"record_s": _time(lambda: checkpointing.integrity_record(state))}
    for verify in (False, True):
      d = os.path.join(work, f"cost_{size}_{verify}")

      def save_restore():
        shutil.rmtree(d, ignore_errors=True)
        ck = checkpointing.Checkpointer(d, async_save=False, verify=verify)
        ck.save(1, state, force=True)
        ck.restore(None, state)
        ck.close()
      row[f"save_restore_s_verify_{verify}"] = _time(save_restore)
    out[name] = row
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--flips", type=int, default=40)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="benchmarks/results/checkpoint_faults.json")
  args = parser.parse_args()
  reporting.quiet_libraries()
  with tempfile.TemporaryDirectory() as work:
    flips = bit_flips(args.flips, args.seed, work)
    cost = verify_cost(work)
  result = {"command": f"python -m benchmarks.checkpoint_faults --flips {args.flips} --seed {args.seed}",
            "bit_flips": flips, "verify_cost": cost}
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(reporting.to_json(result), f, indent=2)
  print(json.dumps({"verified": flips["verified"], "unverified": flips["unverified"], "verify_cost": cost}, indent=1))


if __name__ == "__main__":
  main()
