"""am_jax.reporting: strict-JSON metrics, no duplicated rows on resume, one honest progress line, quiet logs."""
import json
import logging
import math

import numpy as np
import pytest

from am_jax import reporting


def _strict_rows(path):
  """Rows of a JSON-lines file parsed strictly (NaN / Infinity are not JSON and raise)."""
  def no_constants(name):
    raise ValueError(f"non-JSON constant {name} in {path}")
  with open(path) as f:
    return [json.loads(line, parse_constant=no_constants) for line in f]


def test_metrics_are_strict_json(tmp_path):
  w = reporting.MetricsWriter(str(tmp_path), tensorboard=False)
  w.write(1, {"loss": float("nan"), "grad_norm": np.float32(2.5), "reward_mean": np.array(-1.25),
              "inf": float("inf"), "count": np.int64(3), "ok": True})
  w.write(2, {"loss": 0.5})
  w.final({"step": 2, "w1": float("-inf"), "nested": {"a": [1.0, float("nan")]}, "name": "gmm2d"})
  rows = _strict_rows(tmp_path / "metrics.jsonl")
  assert rows == [{"step": 1, "loss": None, "grad_norm": 2.5, "reward_mean": -1.25, "inf": None, "count": 3,
                   "ok": True},
                  {"step": 2, "loss": 0.5}]
  summary = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))
  assert summary == {"step": 2, "w1": None, "nested": {"a": [1.0, None]}, "name": "gmm2d"}


def test_resume_drops_rows_after_the_checkpoint(tmp_path):
  """A run killed at step 9 and resumed from its step-6 checkpoint replays 7..9 without duplicating them."""
  w = reporting.MetricsWriter(str(tmp_path), tensorboard=False)
  for s in range(1, 10):
    w.write(s, {"loss": 1.0 / s})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 10, "lo')  # a line cut by the kill
  w = reporting.MetricsWriter(str(tmp_path), start_step=6, tensorboard=False)
  assert [r["step"] for r in _strict_rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
  for s in range(7, 11):
    w.write(s, {"loss": 1.0 / s})
  steps = [r["step"] for r in _strict_rows(tmp_path / "metrics.jsonl")]
  assert steps == list(range(1, 11))
  # A fresh start (no checkpoint) in the same workdir drops every stale row.
  reporting.MetricsWriter(str(tmp_path), start_step=0, tensorboard=False)
  assert _strict_rows(tmp_path / "metrics.jsonl") == []


def test_tensorboard_purges_replayed_steps(tmp_path):
  pytest.importorskip("tensorboardX")
  w = reporting.MetricsWriter(str(tmp_path), tensorboard=True)
  w.write(1, {"loss": 1.0, "note": "text is skipped"})
  w.close()
  w = reporting.MetricsWriter(str(tmp_path), start_step=1, tensorboard=True)
  w.write(2, {"loss": 0.5})
  w.close()
  files = sorted((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert [f.name.rsplit(".", 1)[1] for f in files] == ["from0", "from1"]
  events = _read_events(files[1])
  # TensorBoard forgets the events at step >= 2 of the earlier file when it reads this SessionLog.START.
  assert any(e.HasField("session_log") and e.session_log.status == e.session_log.START and e.step == 2 for e in events)
  assert [(e.step, e.summary.value[0].tag) for e in events if e.HasField("summary")] == [(2, "loss")]


def _read_events(path):
  """Event protos of a TensorBoard event file (records: u64 length, u32 crc, data, u32 crc)."""
  import struct

  from tensorboardX.proto import event_pb2
  data, out, i = path.read_bytes(), [], 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    out.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
    i += 12 + n + 4
  return out


def test_progress_lines():
  p = reporting.Progress("finetune", total=100, start=20)
  t0 = p._t_create
  first, extra = p.line(21, {"loss": 0.123456, "reward_mean": -1.0}, now=t0 + 3.2)
  assert first == "[finetune] step 21/100  loss 0.1235  reward_mean -1  (1 step in 3s, compilation included)"
  assert extra == {}
  mid, extra = p.line(61, {"loss": 0.1}, now=t0 + 3.2 + 4.0)  # 40 steps in 4 s
  assert mid == "[finetune] step 61/100  loss 0.1  10 steps/s  ETA 4s"
  assert extra == {"steps_per_s": pytest.approx(10.0)}
  last, _ = p.line(100, {"loss": 0.1}, now=t0 + 3.2 + 7.9)
  assert last.endswith("10 steps/s  done in 11s")
  for text in (first, mid, last):
    assert "nan" not in text.lower() and "\n" not in text


def test_progress_prints_one_line_per_tick(capsys):
  p = reporting.Progress("pretrain", total=10)
  assert p.tick(1, {"loss": 1.0}) == {}
  assert "steps_per_s" in p.tick(5, {"loss": 0.5})
  out, err = capsys.readouterr()
  assert len(out.splitlines()) == 2 and err == ""
  assert out.splitlines()[1].startswith("[pretrain] step 5/10  loss 0.5  ") and "ETA" in out


def test_format_seconds():
  assert [reporting._format_seconds(s) for s in (0.4, 59, 65, 3600 + 7 * 60)] == ["0s", "59s", "1m05s", "1h07m"]


@pytest.fixture
def restore_log_levels():
  from absl import logging as absl_logging
  names = ("absl",) + reporting._NOISY_LOGGERS
  saved = {n: logging.getLogger(n).level for n in names}
  verbosity = absl_logging.get_verbosity()
  yield
  for n, level in saved.items():
    logging.getLogger(n).setLevel(level)
  absl_logging.set_verbosity(verbosity)


def test_quiet_libraries(restore_log_levels):
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.INFO)
  reporting.quiet_libraries()
  assert not logging.getLogger("absl").isEnabledFor(logging.INFO)  # Orbax logs through absl
  assert logging.getLogger("absl").isEnabledFor(logging.WARNING)
  assert not logging.getLogger("jax").isEnabledFor(logging.INFO)
  reporting.quiet_libraries(verbose=True)
  assert logging.getLogger("absl").isEnabledFor(logging.INFO)


def test_to_json_handles_arrays():
  import jax.numpy as jnp
  assert reporting.to_json({"a": jnp.float32(1.5), "b": jnp.array([1.0, jnp.nan]), "c": (np.bool_(True),)}) == \
      {"a": 1.5, "b": [1.0, None], "c": [True]}
  assert reporting.to_json(math.nan) is None
  assert reporting.format_summary({"step": 3, "w1": 0.123456}) == "step  3\nw1    0.1235"
