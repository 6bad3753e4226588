"""A trace-time hint that the rows of a network call share one time: where ``models.MLP`` may take its shared path.

Samplers and adjoints call the network with t = tau_k broadcast to every row; losses and pre-training call it with
a different time per row.  ``models.MLP`` can compute its time embedding once for a batch at one time, behind a run-time
``lax.cond`` on ``all(t == t_0)`` (so any t stays valid input); the cond pays where rows do differ and the call is
differentiated in the parameters (measured +33% on a loss-sized value_and_grad of a (64, 64) MLP on CPU).  So the
model takes the guarded path only inside ``batch_shares_time()``, which the library's sampler and adjoint steps
enter; everywhere else it runs its per-row code, unchanged.

The hint is read while JAX traces (it is Python state, not part of any array): a function traced inside the block
and cached by an inner ``jax.jit`` keeps the guarded path when called later outside it, which is still correct
(the run-time check), only not free under differentiation.  It never changes a result beyond float rounding.
"""
from __future__ import annotations

import contextlib
import contextvars

__all__ = ["batch_shares_time", "shares_time"]

_SHARED = contextvars.ContextVar("am_jax_batch_shares_time", default=False)


@contextlib.contextmanager
def batch_shares_time():
  """Network calls traced inside get one time for all rows (t = tau broadcast to (B,))."""
  token = _SHARED.set(True)
  try:
    yield
  finally:
    _SHARED.reset(token)


def shares_time() -> bool:
  """Whether the current trace is inside ``batch_shares_time()``."""
  return _SHARED.get()
