"""Run output: metrics files that stay valid JSON, one progress line per interval, quiet libraries.

* ``MetricsWriter(workdir, start_step)``: ``metrics.jsonl`` (one strict-JSON object per logged step) and
  ``metrics.json`` (the final summary).  Non-finite numbers are written as ``null`` (``json`` would write
  ``NaN``, which is not JSON and breaks ``jq``, pandas and browsers).  A run resumed from step N first drops
  the rows logged after N by the interrupted run, so ``metrics.jsonl`` never holds a step twice.
  TensorBoard summaries are added when ``tensorboardX`` is installed (``pip install "am_jax[tensorboard]"``),
  with ``purge_step`` so that TensorBoard also forgets the replayed steps.
* ``Progress(name, total, start)``: one line per logged interval, ``[finetune] step 200/1000  loss 0.12
  ...  23.1 steps/s  ETA 35s``; the first line after a (re)start says how long compilation took instead
  of a meaningless rate.
* ``quiet_libraries()``: Orbax logs every checkpoint save at INFO through absl (about 450 stderr lines for
  one ``configs/gmm2d.py`` run); the launchers drop library INFO logs unless ``--verbose`` is given.
* ``info`` / ``warn``: the launchers' own messages ("resuming from step N", "already finished").

Why not CLU: ``clu.metric_writers`` and ``clu.periodic_actions`` import TensorFlow at import time
(``ModuleNotFoundError: tensorflow`` with clu 0.0.12 and no TensorFlow), a multi-GB dependency for
writing JSON lines.  Why not a tqdm bar: it redraws one line with carriage returns, which a log file of a
batch job (SLURM, TPU VM) keeps as one unreadable line, and the launchers only synchronise with the
device at log intervals anyway; a plain line per interval keeps the loss history readable.

Only process 0 writes or prints (multi-host runs).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Mapping, Optional

__all__ = ["MetricsWriter", "Progress", "quiet_libraries", "info", "warn", "to_json", "format_summary",
           "is_main_process"]

# Loggers whose INFO messages are library chatter in a training run (Orbax logs through absl).
_NOISY_LOGGERS = ("absl", "orbax", "jax", "jax._src", "flax", "tensorstore", "etils")


def is_main_process() -> bool:
  """True on process 0 (and in single-process runs); jax is only asked when it is already imported."""
  jax = sys.modules.get("jax")
  return jax is None or jax.process_index() == 0


def to_json(value: Any) -> Any:
  """``value`` with numpy / JAX scalars as Python numbers and non-finite floats as ``None`` (strict JSON).

  Dicts, lists and tuples are converted element-wise; other objects are converted with ``str``.
  """
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, int):
    return int(value)
  if isinstance(value, float):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, Mapping):
    return {str(k): to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json(v) for v in value]
  if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy / JAX arrays and scalars
    import numpy as np
    arr = np.asarray(value)
    if arr.dtype == np.bool_:
      return arr.tolist()
    if arr.ndim == 0:
      item = arr.item()
      return to_json(item)
    return to_json(arr.tolist())
  if hasattr(value, "item"):
    return to_json(value.item())
  return str(value)


def _dumps(value: Any, **kwargs) -> str:
  return json.dumps(to_json(value), allow_nan=False, **kwargs)


def _atomic_write(path: str, text: str):
  """Writes ``text`` to ``path`` through a temporary file and a rename (no half-written file on a kill)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


class MetricsWriter:
  """``metrics.jsonl`` (one strict-JSON object per logged step) and ``metrics.json`` (final summary).

  Args:
    workdir: output directory (created).  Local paths only for the JSON files' truncation on resume;
      cloud paths (``gs://``) are written through ``etils.epath`` without it.
    start_step: the step the run starts (or resumes) from: rows with ``step > start_step`` left by an
      interrupted run are dropped first, so a resumed run replays them without duplicates.
    tensorboard: write TensorBoard summaries to ``<workdir>/tb``; None: when ``tensorboardX`` is importable.
  """

  def __init__(self, workdir: str, start_step: int = 0, tensorboard: Optional[bool] = None):
    self.workdir = str(workdir)
    self.start_step = int(start_step)
    self.active = is_main_process()
    self._tb = None
    if not self.active:
      return
    from etils import epath  # local or cloud (gs://) paths
    self._dir = epath.Path(self.workdir)
    self._dir.mkdir(parents=True, exist_ok=True)
    self._truncate(self.start_step)
    if tensorboard is None or tensorboard:
      try:
        from tensorboardX import SummaryWriter  # optional: pip install "am_jax[tensorboard]"
      except ImportError:
        if tensorboard:
          raise ImportError("MetricsWriter(tensorboard=True) needs tensorboardX: pip install 'am_jax[tensorboard]'.")
      else:
        # purge_step: TensorBoard discards the events an interrupted run wrote after start_step.  The suffix
        # keeps a resumed run's event file apart from the first one (their names could share a second).
        self._tb = SummaryWriter(str(self._dir / "tb"), purge_step=self.start_step + 1 if self.start_step else None,
                                 filename_suffix=f".from{self.start_step}")

  def _truncate(self, start_step: int):
    """Keeps the rows of ``metrics.jsonl`` with ``step <= start_step`` (and drops a half-written last line)."""
    path = self._dir / "metrics.jsonl"
    if not path.exists():
      return
    kept = []
    for line in path.read_text().splitlines():
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut by a kill
      if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= start_step:
        kept.append(line)
    text = "".join(line + "\n" for line in kept)
    if str(path).startswith(("gs://", "s3://")):
      path.write_text(text)
    else:
      _atomic_write(str(path), text)

  def write(self, step: int, metrics: Mapping[str, Any]):
    """Appends ``{"step": step, **metrics}`` (non-finite values as null) and the TensorBoard scalars."""
    if not self.active:
      return
    row = {"step": int(step), **to_json(dict(metrics))}
    with (self._dir / "metrics.jsonl").open("a") as f:
      f.write(_dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, int(step))

  def final(self, summary: Mapping[str, Any]):
    """Writes ``metrics.json`` (strict JSON, indented) and flushes TensorBoard."""
    if not self.active:
      return
    text = _dumps(dict(summary), indent=2) + "\n"
    path = self._dir / "metrics.json"
    if str(path).startswith(("gs://", "s3://")):
      path.write_text(text)
    else:
      _atomic_write(str(path), text)
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _format_seconds(seconds: float) -> str:
  """``42s``, ``3m05s``, ``2h07m``."""
  s = int(round(seconds))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _format_value(v: Any) -> str:
  try:
    f = float(v)
  except (TypeError, ValueError):
    return str(v)
  return f"{f:.4g}"


class Progress:
  """One progress line per logged interval: step, the given metrics, steps/s and ETA.

  The first ``tick`` after a (re)start includes the jit compilation, so it reports the time since the
  ``Progress`` was made ("first step(s) in 3.2s, compilation included") and no rate; later ticks report the
  rate since that first tick and the ETA.  Create it right before the training loop.
  """

  def __init__(self, name: str, total: int, start: int = 0, stream=None):
    self.name, self.total, self.start = name, int(total), int(start)
    self.stream = stream
    self._t_create = time.perf_counter()
    self._t0: Optional[float] = None
    self._s0 = self.start

  def line(self, step: int, metrics: Mapping[str, Any], now: Optional[float] = None) -> tuple[str, dict]:
    """(progress line, {"steps_per_s": rate} or {} on the first tick) for ``step`` completed steps."""
    now = time.perf_counter() if now is None else now
    shown = "  ".join(f"{k} {_format_value(v)}" for k, v in metrics.items())
    head = f"[{self.name}] step {step}/{self.total}" + (f"  {shown}" if shown else "")
    if self._t0 is None:
      self._t0, self._s0 = now, step
      n = step - self.start
      return f"{head}  ({n} step{'s' if n != 1 else ''} in {_format_seconds(now - self._t_create)}, " \
             "compilation included)", {}
    rate = (step - self._s0) / max(now - self._t0, 1e-9)
    if step >= self.total:
      tail = f"{rate:.3g} steps/s  done in {_format_seconds(now - self._t_create)}"
    elif rate > 0:
      tail = f"{rate:.3g} steps/s  ETA {_format_seconds((self.total - step) / rate)}"
    else:  # a second tick at the same step: no rate yet
      return head, {}
    return f"{head}  {tail}", {"steps_per_s": rate}

  def tick(self, step: int, metrics: Mapping[str, Any]) -> dict:
    """Prints the line for ``step`` (process 0); returns ``{"steps_per_s": rate}``, or {} on the first tick."""
    text, extra = self.line(step, metrics)
    if is_main_process():
      print(text, file=self.stream or sys.stdout, flush=True)
    return extra


def info(message: str):
  """A launcher message on stdout (process 0 only)."""
  if is_main_process():
    print(message, flush=True)


def warn(message: str):
  """A warning on stderr (process 0 only), prefixed ``warning:``."""
  if is_main_process():
    print(f"warning: {message}", file=sys.stderr, flush=True)


def format_summary(summary: Mapping[str, Any]) -> str:
  """``key: value`` lines (4 significant digits) for the end of a run."""
  width = max((len(str(k)) for k in summary), default=0)
  return "\n".join(f"{str(k):<{width}}  {_format_value(v) if isinstance(v, float) else v}"
                   for k, v in summary.items())


def quiet_libraries(verbose: bool = False):
  """Drops library INFO logs (Orbax checkpoint chatter via absl, jax, flax); warnings and errors still show.

  ``verbose=True`` restores INFO (the launchers' ``--verbose`` flag).  Call after absl parsed the flags
  (``absl.app.run`` resets the absl verbosity from ``--verbosity`` while parsing).
  """
  level = logging.INFO if verbose else logging.WARNING
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
  except ImportError:
    pass
  for name in _NOISY_LOGGERS:
    logging.getLogger(name).setLevel(level)
  # A failed runtime check inside a jitted step (``dynamics.checked``: a NaN's source) is logged by JAX as a
  # 20-line "pure_callback failed" traceback before the exception reaches the launcher, which reports it in
  # one line (``jobs``: "[finetune] step k: the adjoint became non-finite ...").
  logging.getLogger("jax._src.callback").setLevel(logging.INFO if verbose else logging.CRITICAL)
