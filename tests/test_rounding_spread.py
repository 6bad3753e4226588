"""``benchmarks.rounding_spread``: the per-row switch takes the per-row code at the loss points only, and a run of the
'per_row' variant (a few steps; 'blocks' is the library's default path, run by every other toy test) and the table
work."""
import numpy as np

from am_jax import models, time_hints
from benchmarks import common, rounding_spread


def test_per_row_loss_time_switch_and_a_short_run():
  with common.per_row_loss_time():
    assert models._time_blocks() is None
    with time_hints.rows_in_time_blocks(4):
      assert models._time_blocks() is None and time_hints.time_blocks() == 4
  with time_hints.rows_in_time_blocks(4):
    assert models._time_blocks() == 4
  row = rounding_spread.run_one("per_row", "memoryless", 0, steps=3)
  assert np.isfinite(row["w1"]) and 0.0 <= row["mass"] <= 1.0
  out = {"steps": 3, "machine": "test", "runs": {"memoryless/per_row": [dict(seed=0, **row), dict(seed=1, **row)]}}
  assert "| memoryless | per_row | 0,1 |" in rounding_spread.markdown(out)
