"""Orbax checkpoints of a ``TrainState`` plus the run's config, verified on restore, safe on one or many hosts.

Layout of ``<workdir>/checkpoints/<step>/``: ``state/`` (the TrainState pytree: step, params,
opt_state, ema_params, rng -- written by every host collectively, each host its own shards),
``config/`` (the run's ConfigDict as JSON) and ``integrity/`` (JSON: the SHA-256 of every array of the
state as it was saved, with its path, dtype and shape).  The three items are one Orbax checkpoint:
Orbax writes into a temporary directory and renames it when the save is complete (atomic commit), so
a run killed during a save leaves the previous checkpoint as the latest one.  Saves are asynchronous:
the train loop continues while the arrays are written; ``wait()``/``close()`` block until the last
save is committed.

Verification (docs/training_system.md, "Reliability"): ``restore`` recomputes the SHA-256 of every
restored array and compares it with the ``integrity`` record.  ``restore(None, ...)`` walks the steps from
the newest down and returns the newest step that restores AND verifies; each rejected step is reported
on stderr with its reason (checksum mismatch naming the array, a missing/partial step, an Orbax or
tensorstore error).  Opened for training (``for_training=True``), the rejected steps are moved to
``<workdir>/checkpoints_rejected/`` (so the resumed run can write those step numbers again) and stale
``*.orbax-checkpoint-tmp*`` folders of a killed save are removed.  Checkpoints written before the
integrity record existed restore with a warning ("not verified") when no step of the directory has one.

Restores go onto the *current* mesh: the abstract target carries the replicated sharding of the
mesh in use, so a run saved on 8 devices can resume on 1 and vice versa.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import time
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from am_jax import sharding as sharding_lib

__all__ = ["Checkpointer", "CheckpointError", "abstract_state", "integrity_record", "verify_record", "save_params",
           "load_params"]

INTEGRITY_FORMAT = 1


class CheckpointError(RuntimeError):
  """No checkpoint step of a directory restores and verifies; the message lists each step and why."""


def abstract_state(state, mesh=None):
  """ShapeDtypeStructs of ``state`` carrying the target shardings (replicated on ``mesh``)."""
  def leaf(x):
    sharding = sharding_lib.replicated(mesh) if mesh is not None else getattr(x, "sharding", None)
    if sharding is None:  # a ShapeDtypeStruct target without a mesh: this process's first device
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree.map(leaf, state)


def _host_copy(x) -> Optional[np.ndarray]:
  """The full value of one leaf on this host (None for an array sharded across processes: not hashed)."""
  if isinstance(x, jax.Array):
    if x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:  # multi-host, replicated (the TrainState): every host holds all of it
      return np.asarray(x.addressable_data(0))
    return None
  return np.asarray(x)


def _leaf_digest(x) -> Optional[str]:
  arr = _host_copy(x)
  if arr is None:
    return None
  arr = np.ascontiguousarray(arr)
  h = hashlib.sha256()
  h.update(f"{arr.dtype.str}{arr.shape}".encode())
  h.update(arr.view(np.uint8).reshape(-1) if arr.size else b"")
  return h.hexdigest()


def integrity_record(state) -> dict:
  """``{"format": 1, "leaves": {path: sha256 of dtype + shape + bytes}}`` of every array of ``state``."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {"format": INTEGRITY_FORMAT,
          "leaves": {jax.tree_util.keystr(path): _leaf_digest(x) for path, x in leaves}}


def verify_record(state, record: dict) -> Optional[str]:
  """None when ``state`` matches ``record`` (``integrity_record`` of the saved state), else the reason."""
  if not isinstance(record, dict) or record.get("format") != INTEGRITY_FORMAT or "leaves" not in record:
    return "unreadable integrity record"
  expected = record["leaves"]
  got = integrity_record(state)["leaves"]
  if set(got) != set(expected):
    return f"the state has arrays {sorted(set(got) ^ set(expected))[:3]} that the integrity record does not list"
  for path, digest in expected.items():
    if digest is not None and got[path] is not None and digest != got[path]:
      return f"checksum mismatch in state{path}"
  return None


def _first_line(e: BaseException) -> str:
  lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
  return f"{type(e).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` (keep-last-N, save interval, async, atomic) with a
  SHA-256 integrity record per step, verified on restore with fallback to the newest intact step.

  Args:
    directory: ``<workdir>/checkpoints`` (local or ``gs://``).
    max_to_keep, save_interval_steps, async_save: Orbax options.
    verify: write the integrity record on save and check it on restore (``checkpoint.verify``; on by
      default: it costs one host copy + SHA-256 of the state per save, measured in docs/training_system.md).
    for_training: the directory belongs to the run that opens it (a training job, not a reader such as
      ``am-jax sample``): stale tmp folders are removed at start and rejected steps are moved aside.
  """

  def __init__(self, directory: str, max_to_keep: int = 3, save_interval_steps: int = 1,
               async_save: bool = True, verify: bool = True, for_training: bool = False):
    if max_to_keep < 1:
      raise ValueError(f"checkpoint.max_to_keep must be >= 1, got {max_to_keep}.")
    if save_interval_steps < 1:
      raise ValueError(f"checkpoint.every_steps must be >= 1, got {save_interval_steps}.")
    # Cloud paths (gs://...) are passed through; local paths must be absolute for Orbax.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self.verify = bool(verify)
    self.for_training = bool(for_training)
    self.restored_step: Optional[int] = None
    self.rejected: dict[int, str] = {}  # step -> reason, filled by restore(None, ...)
    self.removed_tmp: list[str] = []
    if for_training:
      self.removed_tmp = _remove_stale_tmp(self.directory)
    self._options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                                 enable_async_checkpointing=async_save, create=True)
    self._manager = self._open()

  def _open(self):
    return ocp.CheckpointManager(self.directory, options=self._options,
                                 item_names=("state", "config", "integrity"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, config: Optional[dict] = None, force: bool = False) -> bool:
    """Saves if ``step`` is on the save interval (or ``force``); returns whether it saved.

    The saved arrays are a fresh copy: the train steps donate their state, and the asynchronous
    writer must never read a buffer the next step has already reused (an abort on 8 devices).  With
    ``verify`` the SHA-256 of every array is computed here (a host copy of the state) and committed
    with the step.
    """
    if not (force or self._manager.should_save(int(step))):
      return False
    state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
    args = {"state": ocp.args.StandardSave(state)}
    if config is not None:
      args["config"] = ocp.args.JsonSave(config)
    if self.verify:
      args["integrity"] = ocp.args.JsonSave(integrity_record(state))
    return self._manager.save(int(step), args=ocp.args.Composite(**args), force=force)

  # ------------------------------------------------------------------------------------------ restore

  def _read_integrity(self, step: int) -> Optional[dict]:
    """The integrity record of ``step``, or None when the step has none (written before verification)."""
    path = os.path.join(self.directory, str(step), "integrity")
    if "://" not in self.directory and not os.path.isdir(path):
      return None
    return self._manager.restore(step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore()))["integrity"]

  def _any_integrity(self) -> bool:
    if "://" in self.directory:
      return True
    return any(os.path.isdir(os.path.join(self.directory, str(s), "integrity")) for s in self.all_steps())

  def _restore_step(self, step: int, abstract, verify_required: bool):
    """The verified state of ``step``; raises ``CheckpointError`` with the reason otherwise."""
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
      state = out["state"]
    except Exception as e:  # noqa: BLE001 -- any failure to read a step is a reason to reject it
      raise CheckpointError(f"cannot be read ({_first_line(e)})") from e
    if not self.verify:
      return state
    try:
      record = self._read_integrity(step)
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"unreadable integrity record ({_first_line(e)})") from e
    if record is None:
      if verify_required:
        raise CheckpointError("no integrity record (the save did not complete)")
      from am_jax import reporting
      reporting.warn(f"checkpoint step {step} in {self.directory} has no integrity record (written before "
                     "checkpoint verification existed): restored without verification.")
      return state
    reason = verify_record(state, record)
    if reason is not None:
      raise CheckpointError(reason)
    return state

  def restore(self, step: Optional[int], target, mesh=None):
    """Restores the state at ``step`` into the structure/shardings of ``target`` and verifies it.

    ``step=None``: the newest step that restores and verifies; every newer step is rejected with a
    warning naming the step and the reason (and, when ``for_training``, moved to
    ``<workdir>/checkpoints_rejected/``).  ``self.restored_step`` is the step restored.  ``target`` is a
    TrainState of arrays or of ShapeDtypeStructs.  Raises ``FileNotFoundError`` when the directory holds
    no checkpoint and ``CheckpointError`` (listing each step's reason) when no step verifies, or when an
    explicit ``step`` does not.
    """
    from am_jax import reporting
    abstract = abstract_state(target, mesh)
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    verify_required = self.verify and self._any_integrity()
    if step is not None:
      try:
        state = self._restore_step(int(step), abstract, verify_required)
      except CheckpointError as e:
        raise CheckpointError(f"checkpoint step {step} in {self.directory}: {e}.") from e
      self.restored_step = int(step)
      return state
    self.rejected = {}
    for s in reversed(steps):
      try:
        state = self._restore_step(s, abstract, verify_required)
      except CheckpointError as e:
        self.rejected[s] = str(e)
        reporting.warn(f"checkpoint step {s} in {self.directory} rejected: {e}.")
        continue
      self.restored_step = s
      if self.rejected:
        reporting.warn(f"resuming from step {s}, the newest checkpoint that verifies "
                       f"(rejected: {', '.join(str(r) for r in sorted(self.rejected))}).")
        if self.for_training:
          self._set_aside(sorted(self.rejected))
      return state
    listing = "; ".join(f"step {s}: {r}" for s, r in sorted(self.rejected.items()))
    raise CheckpointError(f"no checkpoint in {self.directory} restores and verifies ({listing}); move or delete "
                          "the directory to start again.")

  def _set_aside(self, steps):
    """Moves rejected steps to ``<workdir>/checkpoints_rejected/<step>-<time>`` (process 0), so the resumed
    run can save those step numbers again; reloads the manager."""
    self._manager.wait_until_finished()
    if "://" not in self.directory and jax.process_index() == 0:
      dest_root = os.path.join(os.path.dirname(self.directory), "checkpoints_rejected")
      os.makedirs(dest_root, exist_ok=True)
      for s in steps:
        src = os.path.join(self.directory, str(s))
        if os.path.exists(src):
          shutil.move(src, os.path.join(dest_root, f"{s}-{int(time.time())}"))
    elif "://" in self.directory:
      for s in steps:
        self._manager.delete(s)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("am_jax_checkpoint_set_aside")
    self._manager.reload()

  def stored_config(self) -> Optional[dict]:
    """The config stored with the newest step whose config item reads (None without checkpoints/config)."""
    for s in reversed(self.all_steps()):
      try:
        cfg = self.restore_config(s)
      except Exception:  # noqa: BLE001 -- a damaged step: try the previous one
        continue
      if cfg:
        return cfg
    return None

  def restore_config(self, step: Optional[int] = None) -> dict:
    step = self.latest_step() if step is None else step
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def _remove_stale_tmp(directory: str) -> list[str]:
  """Removes ``<step>.orbax-checkpoint-tmp*`` folders left by a save that was killed (process 0, local paths);
  returns their names.  Call only when no save of this directory can be in flight (a run's start)."""
  if "://" in directory or not os.path.isdir(directory) or jax.process_index() != 0:
    return []
  removed = []
  for path in sorted(glob.glob(os.path.join(directory, "*.orbax-checkpoint-tmp*"))):
    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    removed.append(os.path.basename(path))
  if removed:
    from am_jax import reporting
    reporting.info(f"removed {len(removed)} unfinished checkpoint folder(s) of an interrupted save: "
                   f"{', '.join(removed)}")
  return removed


def save_params(directory: str, params) -> None:
  """Saves a plain params pytree (a base, a classifier, LoRA adapters, exported weights) with Orbax.

  ``directory`` must not exist yet or is overwritten.  Restore with ``load_params(directory, target)``.
  """
  directory = directory if "://" in directory else os.path.abspath(directory)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, params, force=True)


def load_params(directory: str, target):
  """Restores a pytree saved by ``save_params`` into the structure/dtypes of ``target`` (arrays or
  ShapeDtypeStructs); one-line errors for a missing directory or a structure mismatch."""
  directory = directory if "://" in directory else os.path.abspath(directory)
  if "://" not in directory and not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory!r}: no such params directory.")
  # An explicit target sharding: a checkpoint written on another machine (e.g. a GPU) names devices that do
  # not exist here; restore onto this process's first device instead.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)
  with ocp.StandardCheckpointer() as ckptr:
    try:
      return ckptr.restore(directory, abstract)
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{directory!r}: the saved params do not match the model's structure "
                       f"({str(e).splitlines()[0][:200]}).") from e
