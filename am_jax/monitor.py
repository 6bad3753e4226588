"""Reward-hacking monitor: a trained reward that rises while its held-out "gold" twin falls.

Host-side and pure Python/NumPy (no JAX in its state): the training loop evaluates the trained rewards
and their gold twins on a fixed batch every N steps and feeds the means to ``HackingMonitor.update``.

Definition (per reward name present in both the trained and the gold dicts).  Over the last ``window``
evaluations (steps s_1 < ... < s_W, values r_1..r_W of the trained reward and g_1..g_W of its gold twin)
the *change over the window* of a series is the least-squares line through (s_i, v_i) evaluated across
the window: Delta v = slope * (s_W - s_1), slope = sum (s_i - s_bar)(v_i - v_bar) / sum (s_i - s_bar)^2.
A least-squares fit rather than v_W - v_1 so one noisy evaluation at either end neither triggers nor masks
a flag.  Hacking is flagged at the current evaluation when

    Delta r > min_rise   and   Delta g < -margin,

both in the rewards' own units (``margin`` >= 0 is the tolerated drop of the gold reward).  Nothing is
flagged before ``window`` evaluations, or while a window holds a non-finite value.  Each flag is returned
as a one-line warning for the caller to print/log (the monitor itself prints nothing).
"""
from __future__ import annotations

import collections
import math
from typing import Mapping, Optional

import numpy as np

__all__ = ["HackingMonitor", "window_change"]


def window_change(steps, values) -> float:
  """Least-squares change of ``values`` over ``steps``: slope * (steps[-1] - steps[0]); NaN if not finite."""
  s = np.asarray(steps, np.float64)
  v = np.asarray(values, np.float64)
  if len(s) < 2 or not np.all(np.isfinite(v)):
    return float("nan")
  sc = s - s.mean()
  return float(np.sum(sc * (v - v.mean())) / np.sum(sc**2) * (s[-1] - s[0]))


def _finite_or_none(v: float):
  return v if math.isfinite(v) else None


def _none_to_nan(v) -> float:
  return float("nan") if v is None else float(v)


class HackingMonitor:
  """Flags reward hacking: a trained reward rising while its gold twin falls by more than ``margin``.

  ``update(step, trained, gold)`` takes dicts {name: scalar} (the same names pair a trained reward with
  its gold twin; names only in one dict are ignored) and returns the list of warnings for this step.
  ``state_dict()`` is JSON-ready for ``metrics.json``; ``from_state_dict`` restores it on resume.
  """

  def __init__(self, window: int = 5, margin: float = 0.0, min_rise: float = 0.0):
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 2:
      raise ValueError(f"monitor window must be an integer >= 2 (evaluations), got {window!r}.")
    for field, v in (("margin", margin), ("min_rise", min_rise)):
      if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"monitor {field} must be a finite number >= 0, got {v!r}.")
    self.window, self.margin, self.min_rise = int(window), float(margin), float(min_rise)
    self._history: dict[str, collections.deque] = {}
    self._first: dict[str, Optional[int]] = {}
    self._count: dict[str, int] = {}
    self._last_step: Optional[int] = None

  def update(self, step: int, trained: Mapping[str, float], gold: Mapping[str, float]) -> list[str]:
    """Records one evaluation at ``step`` (strictly increasing) and returns this step's warnings."""
    step = int(step)
    if self._last_step is not None and step <= self._last_step:
      raise ValueError(f"monitor steps must increase: got step {step} after {self._last_step}.")
    self._last_step = step
    warnings = []
    for name in sorted(set(trained) & set(gold)):
      hist = self._history.setdefault(name, collections.deque(maxlen=self.window))
      self._first.setdefault(name, None)
      self._count.setdefault(name, 0)
      hist.append((step, float(trained[name]), float(gold[name])))
      if len(hist) < self.window:
        continue
      steps, r, g = zip(*hist)
      d_r, d_g = window_change(steps, r), window_change(steps, g)
      if d_r > self.min_rise and d_g < -self.margin:  # False for NaN
        self._count[name] += 1
        if self._first[name] is None:
          self._first[name] = step
        warnings.append(f"reward hacking suspected at step {step}: trained reward {name!r} rose by {d_r:+.4g} "
                        f"while its gold twin changed by {d_g:+.4g} (margin {self.margin:g}) over the last "
                        f"{self.window} evaluations (steps {steps[0]}-{steps[-1]}).")
    return warnings

  @property
  def hacking_detected(self) -> bool:
    return any(c > 0 for c in self._count.values())

  def state_dict(self) -> dict:
    """JSON-ready: ``hacking_detected``, per reward the first flagged step (None if never) and the number
    of flagged evaluations, the settings, and the last ``window`` evaluations (to resume)."""
    return {
        "hacking_detected": self.hacking_detected,
        "first_flagged_step": dict(self._first),
        "num_flagged": dict(self._count),
        "window": self.window, "margin": self.margin, "min_rise": self.min_rise,
        "last_step": self._last_step,
        # Non-finite values as None: metrics.json must stay strict JSON.
        "history": {n: [[s, _finite_or_none(r), _finite_or_none(g)] for s, r, g in h]
                    for n, h in self._history.items()},
    }

  @classmethod
  def from_state_dict(cls, state: Mapping) -> "HackingMonitor":
    """The monitor ``state_dict()`` was taken from (same settings, flags and recent window)."""
    mon = cls(state["window"], state["margin"], state["min_rise"])
    mon._first = {n: (None if s is None else int(s)) for n, s in state["first_flagged_step"].items()}
    mon._count = {n: int(c) for n, c in state["num_flagged"].items()}
    mon._last_step = state["last_step"]
    for n, h in state["history"].items():
      mon._history[n] = collections.deque(((int(s), _none_to_nan(r), _none_to_nan(g)) for s, r, g in h),
                                          maxlen=mon.window)
    return mon
