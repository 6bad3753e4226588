"""``benchmarks.rounding_spread``: both variants run (a few steps) and the per-row switch takes the per-row code at the
loss points only."""
import numpy as np

from am_jax import models, time_hints
from benchmarks import common, rounding_spread


def test_per_row_loss_time_switch_and_a_short_run_of_each_variant():
  with common.per_row_loss_time():
    assert models._time_blocks() is None
    with time_hints.rows_in_time_blocks(4):
      assert models._time_blocks() is None and time_hints.time_blocks() == 4
  with time_hints.rows_in_time_blocks(4):
    assert models._time_blocks() == 4
  rows = {v: rounding_spread.run_one(v, "memoryless", 0, steps=3) for v in ("blocks", "per_row")}
  for r in rows.values():
    assert np.isfinite(r["w1"]) and 0.0 <= r["mass"] <= 1.0
  out = {"steps": 3, "machine": "test", "runs": {"memoryless/blocks": [dict(seed=0, **rows["blocks"])],
                                                  "memoryless/per_row": [dict(seed=0, **rows["per_row"])]}}
  assert "| memoryless | per_row | 0 |" in rounding_spread.markdown(out)
