"""Trace-time hints about the times of a network call's rows: where ``models.MLP`` may embed a time once.

Samplers and adjoints call the network with t = tau_k broadcast to every row (``batch_shares_time``); the losses
call it at M blocks of B rows, one time per block (``rows_in_time_blocks``, below); pre-training calls it with a
different time per row.  ``models.MLP`` can compute its time embedding once for a batch at one time, behind a run-time
``lax.cond`` on ``all(t == t_0)`` (so any t stays valid input); the cond pays where rows do differ and the call is
differentiated in the parameters (measured +33% on a loss-sized value_and_grad of a (64, 64) MLP on CPU).  So the
model takes the guarded path only inside ``batch_shares_time()``, which the library's sampler and adjoint steps
enter; everywhere else it runs its per-row code, unchanged.

The hint is read while JAX traces (it is Python state, not part of any array): a function traced inside the block
and cached by an inner ``jax.jit`` keeps the guarded path when called later outside it, which is still correct
(the run-time check), only not free under differentiation.  It never changes a result beyond float rounding.

Time blocks: the losses call the network at M B points whose times are M contiguous blocks of B rows, each block at
one time (t = repeat(tau[idx], B), built by the loss itself).  Inside ``rows_in_time_blocks(M)`` ``models.MLP``
computes the embedding and its first-layer product once per block (M rows instead of M B) with NO run-time branch: a
``lax.cond`` there costs most of the gain under differentiation (measured: value_and_grad of the toy's (64, 64) MLP
at 40 x 512 rows, per-row 19.9 ms, blocks 7.1 ms, blocks behind a cond 17.7 ms).  The caller promises the layout;
the model checks it on the device and returns NaN where it does not hold (a function cached by an inner ``jax.jit``
while traced inside the block and called later, outside it, on other times) instead of a wrong number.
"""
from __future__ import annotations

import contextlib
import contextvars

__all__ = ["batch_shares_time", "rows_in_time_blocks", "shares_time", "time_blocks"]

_SHARED = contextvars.ContextVar("am_jax_batch_shares_time", default=False)
_BLOCKS = contextvars.ContextVar("am_jax_time_blocks", default=None)


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


@contextlib.contextmanager
def rows_in_time_blocks(num_blocks: int):
  """Network calls traced inside get N rows in ``num_blocks`` contiguous blocks of N / num_blocks rows, each block
  at one time (t.reshape(num_blocks, -1) constant along its rows): the losses' M B loss points."""
  if int(num_blocks) < 1:
    raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
  token = _BLOCKS.set(int(num_blocks))
  try:
    yield
  finally:
    _BLOCKS.reset(token)


def time_blocks() -> int | None:
  """The number of time blocks promised by the enclosing ``rows_in_time_blocks``, or None outside it."""
  return _BLOCKS.get()
