"""Shared launcher plumbing: distributed start-up, metrics files, progress lines with ETA."""
from __future__ import annotations

import json
import os
import time

import jax
from absl import logging
from etils import epath


def maybe_initialize_distributed(cfg):
  """``jax.distributed.initialize`` when ``cfg.distributed.enabled`` (call before touching devices).

  On TPU pods and SLURM/Kubernetes GPU clusters the arguments are discovered automatically; on
  CPU or bare machines pass ``coordinator_address``, ``num_processes`` and ``process_id``.
  """
  d = cfg.get("distributed", None)
  if not d or not d.enabled:
    return
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
    # CPU collectives across processes need an implementation; gloo ships with jaxlib.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if d.coordinator_address:
    kwargs["coordinator_address"] = d.coordinator_address
  if d.num_processes:
    kwargs["num_processes"] = int(d.num_processes)
  if d.process_id >= 0:
    kwargs["process_id"] = int(d.process_id)
  jax.distributed.initialize(**kwargs)
  logging.info("process %d / %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


class MetricsWriter:
  """Writes ``metrics.jsonl`` (one JSON object per logged step) and ``metrics.json`` (final summary).

  Only process 0 writes.  TensorBoard summaries are added when ``tensorboardX`` is importable.
  """

  def __init__(self, workdir: str):
    self.workdir = epath.Path(workdir)  # local or cloud (gs://) paths
    self.active = jax.process_index() == 0
    self._tb = None
    if self.active:
      self.workdir.mkdir(parents=True, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter  # optional
        self._tb = SummaryWriter(str(self.workdir / "tb"))
      except ImportError:
        self._tb = None

  def write(self, step: int, metrics: dict):
    if not self.active:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with (self.workdir / "metrics.jsonl").open("a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step":
          self._tb.add_scalar(k, v, step)

  def final(self, summary: dict):
    if not self.active:
      return
    with (self.workdir / "metrics.json").open("w") as f:
      json.dump(summary, f, indent=2, default=float)
    if self._tb is not None:
      self._tb.flush()


class Progress:
  """Periodic progress lines: step, selected metrics, steps/s and ETA."""

  def __init__(self, name: str, total: int, start: int = 0):
    self.name, self.total, self.start = name, total, start
    self.t0 = None
    self.s0 = start

  def tick(self, step: int, metrics: dict) -> float:
    """Call after step ``step`` (1-based count of completed steps) has finished; returns steps/s."""
    now = time.perf_counter()
    if self.t0 is None:  # first call: after compilation; measure from here
      self.t0, self.s0 = now, step
      rate = float("nan")
    else:
      rate = (step - self.s0) / max(now - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate == rate and rate > 0 else float("nan")
    shown = "  ".join(f"{k} {float(v):.4g}" for k, v in metrics.items())
    msg = f"[{self.name}] step {step}/{self.total}  {shown}  {rate:.1f} steps/s  ETA {eta:.0f}s"
    logging.info(msg)
    if jax.process_index() == 0:
      print(msg, flush=True)
    return rate


def define_flags():
  """``--config=configs/X.py`` (with ``--config.a.b=value`` overrides) and ``--workdir``; idempotent."""
  from absl import flags
  from ml_collections import config_flags
  if "config" not in flags.FLAGS:
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
  if "workdir" not in flags.FLAGS:
    flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics, figures).")
  flags.mark_flags_as_required(["config", "workdir"])
