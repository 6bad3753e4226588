"""The reward-hacking monitor in the fine-tuning job (``jobs.finetune`` -> ``_RewardWatch`` -> ``HackingMonitor``),
tiny: the SHIPPED DiT base, LoRA, 6-step grid, batch 8, the gold rewards watched on 16 fixed samples every step.

Fires: ReFL (no KL term) on the soft stroke thickness (``rewards.stroke_thickness``).  The strokes first thicken
(the binarised gold width follows the trained one, 2.7 -> 11.4 px at step 9), then the image dissolves into grey
fog: the soft width keeps rising (8.1 -> 10.2 px, steps 9-11) while the gold width of the binarised digit
collapses (11.4 -> 4.5 px), and the monitor flags it (measured: first flag at step 10, 3 flagged evaluations).
At 13-14 steps the whole frame is above the threshold and the gold width jumps to 25-27 px: the flag belongs to
the window in between.

Quiet (``test_monitor_stays_quiet_when_am_raises_reward_and_gold_together`` in test_mnist_pipeline.py, which
shares the pipeline's run): Adjoint Matching at lambda = 4 on the class reward from the null label, same monitor:
the trained reward log p_A(3 | x) and its gold twin log p_B(3 | x) rise together (measured on the 16 watched
samples: -8.4 -> -4.3 and -2.8 -> -1.3 in 6 steps).  (AM on the thickness reward hardly moves it at this size:
lambda 4, lr 3e-4, +0.06 px in 10 steps; lr 1e-3 to 3e-3, up 0.2-0.3 px then back below the start; it would be
quiet for want of change, so the quiet run uses the class reward, which does rise.)

Both use margin = 0.5 (the reward's own units: px, nats) over a window of 4 evaluations; ~25-40 s each on 2
shared CPU cores.  At full size (U-Net, 200 steps x 32 on a GPU, ``am-jax sweep --config=mnist_sweep.py:size=full``)
AM's gold curves wobble by up to 0.19 nat on 64 samples, which is why the sweep's margin is 0.25.
"""
import json
import os

from am_jax import jobs
from tests import launch_helpers

WINDOW, MARGIN = 4, 0.5


def _curves(work: str, gold: str):
  rows = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
  return {r["step"]: (r["reward"], r[f"gold/{gold}"]) for r in rows}


def test_monitor_fires_when_refl_hacks_the_soft_thickness(tmp_path, capsys):
  work = str(tmp_path / "refl")
  cfg = launch_helpers.tiny_mnist_config("reward=thickness", "refl", 1.0, 12, WINDOW, MARGIN)
  cfg.eval.at_end = False  # the monitor runs during training (final evaluation: test_mnist_pipeline.py)
  summary = jobs.finetune(cfg, work)
  assert summary["hacking_detected"] is True, summary
  first = summary["first_flagged_step"]["thickness"]
  assert WINDOW <= first <= 12 and summary["num_flagged"]["thickness"] >= 1
  curves = _curves(work, "thickness")
  # At the flag the trained (soft) width is far above the base's while the gold width has fallen from its peak.
  assert curves[first][0] > curves[1][0] + 2.0, curves
  assert curves[first][1] < max(g for s, (_, g) in curves.items() if s < first) - MARGIN, curves
  assert "warning: reward hacking suspected" in capsys.readouterr().err
  with open(os.path.join(work, "metrics.json")) as f:
    assert json.load(f)["hacking_detected"] is True
