"""monitor.HackingMonitor on synthetic evaluation sequences: fires on hacking, stays quiet otherwise."""
import json

import numpy as np
import pytest

from am_jax import monitor


def _feed(mon, trained, gold, every=50):
  out = []
  for i, (r, g) in enumerate(zip(trained, gold)):
    out.append(mon.update((i + 1) * every, {"class": r}, {"class": g}))
  return out


def test_window_change_is_the_least_squares_change():
  steps = [0, 10, 20, 40]
  np.testing.assert_allclose(monitor.window_change(steps, [1.0, 2.0, 3.0, 5.0]), 4.0)  # exact line
  fit = np.polyfit(steps, [0.0, 3.0, 1.0, 2.0], 1)[0] * 40
  np.testing.assert_allclose(monitor.window_change(steps, [0.0, 3.0, 1.0, 2.0]), fit)
  assert np.isnan(monitor.window_change(steps, [0.0, np.nan, 1.0, 2.0]))


def test_fires_when_trained_rises_and_gold_falls():
  mon = monitor.HackingMonitor(window=4, margin=0.1)
  trained = [-2.0, -1.5, -1.0, -0.6, -0.3, -0.1, 0.0]  # rising throughout
  gold = [-2.0, -1.6, -1.3, -1.3, -1.5, -1.8, -2.2]  # first rises with it, then falls (the hack)
  warns = _feed(mon, trained, gold)
  # Least-squares gold change over each window of 4 evaluations: steps 50-200 +0.72, 100-250 +0.09
  # (no flag); 150-300 -0.51 and 200-350 -0.90 (beyond the margin, trained still rising): flagged.
  assert [bool(w) for w in warns] == [False, False, False, False, False, True, True]
  assert "'class'" in warns[5][0] and "step 300" in warns[5][0] and "margin 0.1" in warns[5][0]
  state = mon.state_dict()
  assert state["hacking_detected"] and state["first_flagged_step"] == {"class": 300}
  assert state["num_flagged"] == {"class": 2}
  json.dumps(state, allow_nan=False)  # strict JSON for metrics.json
  # Resume: the restored monitor continues exactly like the original.
  mon2 = monitor.HackingMonitor.from_state_dict(json.loads(json.dumps(state)))
  assert mon2.state_dict() == state
  assert mon.update(400, {"class": 0.1}, {"class": -2.5}) == mon2.update(400, {"class": 0.1}, {"class": -2.5})


def test_does_not_fire():
  rng = np.random.default_rng(0)
  cases = {
      # Both rise together (honest improvement), with evaluation noise.
      "both_rise": (np.linspace(-2, 0, 12) + 0.05 * rng.normal(size=12),
                    np.linspace(-2, -0.5, 12) + 0.05 * rng.normal(size=12)),
      # Gold falls but the trained reward falls too (instability, not hacking).
      "both_fall": (np.linspace(0, -1, 12), np.linspace(0, -1, 12)),
      # Gold wiggles inside the margin while the trained reward rises.
      "within_margin": (np.linspace(-1, 1, 12), -1.0 + 0.04 * np.sin(np.arange(12))),
      # One bad gold evaluation at the end of a window does not outweigh the trend: least-squares change
      # -0.08 over the last window, where last - first would be -0.25.
      "one_outlier": (np.linspace(-1, 1, 12), np.concatenate([np.linspace(-1, 0.5, 11), [-0.2]])),
  }
  for name, (trained, gold) in cases.items():
    mon = monitor.HackingMonitor(window=5, margin=0.1)
    warns = _feed(mon, trained, gold)
    assert not any(warns), (name, warns)
    assert mon.state_dict()["hacking_detected"] is False
    assert mon.state_dict()["first_flagged_step"] == {"class": None}
  # Fewer evaluations than the window: never flagged, however steep.
  mon = monitor.HackingMonitor(window=5, margin=0.0)
  assert not any(_feed(mon, [0.0, 1.0, 2.0, 3.0], [0.0, -1.0, -2.0, -3.0]))
  # A non-finite value in the window: not flagged while it is in the window; JSON stays strict.
  mon = monitor.HackingMonitor(window=3)
  warns = _feed(mon, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [0.0, float("nan"), -2.0, -3.0, -4.0, -5.0])
  assert [bool(w) for w in warns] == [False, False, False, False, True, True]
  json.dumps(mon.state_dict(), allow_nan=False)


def test_pairs_only_shared_names_and_errors():
  mon = monitor.HackingMonitor(window=2, margin=0.0)
  for s, (r, g) in enumerate([(0.0, 0.0), (1.0, -1.0)]):
    warns = mon.update(s, {"class": r, "thickness": r, "no_twin": r}, {"class": g, "thickness": -g})
  assert len(warns) == 1 and "'class'" in warns[0]
  assert set(mon.state_dict()["first_flagged_step"]) == {"class", "thickness"}
  with pytest.raises(ValueError, match="steps must increase"):
    mon.update(1, {"class": 0.0}, {"class": 0.0})
  for kw in dict(window=1), dict(window=2.5), dict(margin=-0.1), dict(margin=float("inf")), dict(min_rise=True):
    with pytest.raises(ValueError, match="window|margin|min_rise"):
      monitor.HackingMonitor(**kw)
