"""Orbax checkpoints of a ``TrainState`` plus the run's config, safe on one or many hosts.

Layout of ``<workdir>/checkpoints/<step>/``: ``state/`` (the TrainState pytree: step, params,
opt_state, ema_params, rng -- written by every host collectively, each host its own shards) and
``config/`` (the run's ConfigDict as JSON).  Orbax writes into a temporary directory and renames it
when the save is complete (atomic commit), so a run killed during a save leaves the previous
checkpoint as the latest one.  Saves are asynchronous: the train loop continues while the arrays
are written; ``wait()``/``close()`` block until the last save is committed.

Restores go onto the *current* mesh: the abstract target carries the replicated sharding of the
mesh in use, so a run saved on 8 devices can resume on 1 and vice versa.
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import orbax.checkpoint as ocp

from am_jax import sharding as sharding_lib


def abstract_state(state, mesh=None):
  """ShapeDtypeStructs of ``state`` carrying the target shardings (replicated on ``mesh``)."""
  def leaf(x):
    sharding = sharding_lib.replicated(mesh) if mesh is not None else getattr(x, "sharding", None)
    if sharding is None:  # a ShapeDtypeStruct target without a mesh: this process's first device
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree.map(leaf, state)


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` (keep-last-N, save interval, async, atomic)."""

  def __init__(self, directory: str, max_to_keep: int = 3, save_interval_steps: int = 1,
               async_save: bool = True):
    if max_to_keep < 1:
      raise ValueError(f"checkpoint.max_to_keep must be >= 1, got {max_to_keep}.")
    if save_interval_steps < 1:
      raise ValueError(f"checkpoint.every_steps must be >= 1, got {save_interval_steps}.")
    # Cloud paths (gs://...) are passed through; local paths must be absolute for Orbax.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "config"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step: int, state, config: Optional[dict] = None, force: bool = False) -> bool:
    """Saves if ``step`` is on the save interval (or ``force``); returns whether it saved.

    The saved arrays are a fresh copy: the train steps donate their state, and the asynchronous
    writer must never read a buffer the next step has already reused (an abort on 8 devices).
    """
    if not (force or self._manager.should_save(int(step))):
      return False
    state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
    args = {"state": ocp.args.StandardSave(state)}
    if config is not None:
      args["config"] = ocp.args.JsonSave(config)
    return self._manager.save(int(step), args=ocp.args.Composite(**args), force=force)

  def restore(self, step: Optional[int], target, mesh=None):
    """Restores the state at ``step`` (latest if None) into the structure/shardings of ``target``.

    ``target`` is a TrainState of arrays or of ShapeDtypeStructs.  Returns the restored state.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    abstract = abstract_state(target, mesh)
    out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return out["state"]

  def restore_config(self, step: Optional[int] = None) -> dict:
    step = self.latest_step() if step is None else step
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


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
