"""Fast initialisation of NNX models in tests.

Eager NNX initialisation compiles one small XLA program per parameter shape and initialiser (a U-Net took 23 s on a
busy 2-core CPU).  ``jit_init`` runs the module's own initialisers inside ONE jitted program (same kind of values;
for tests that rely on them, e.g. zero-initialised layers); ``host_init`` skips them and draws every weight with
NumPy (for tests where any non-trivial weights do).  Both take the apply function from ``nnx.eval_shape``.
"""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from am_jax import models


def jit_init(ctor):
  """(apply_fn, params) of the module ``ctor()``, its initialisers run in one jitted program."""
  apply_fn, _ = models.functional(nnx.eval_shape(ctor))
  return apply_fn, jax.jit(lambda: nnx.split(ctor())[1])()


def host_init(ctor, scale=0.2, seed=0):
  """(apply_fn, params) of ``ctor()`` with N(0, scale^2) weights drawn on the host; no initialiser runs."""
  apply_fn, abstract = models.functional(nnx.eval_shape(ctor))
  rng = np.random.default_rng(seed)
  return apply_fn, jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape).astype(np.float32)), abstract)


@contextlib.contextmanager
def embedded_rows(only_in_loss: bool = False):
  """Records the number of rows of every ``models.sinusoidal_embedding`` call traced inside (``only_in_loss``: only
  calls traced inside the losses' ``time_hints.rows_in_time_blocks``); yields the list."""
  from am_jax import time_hints
  rows, real = [], models.sinusoidal_embedding

  def counting(t, dim, **kw):
    if not only_in_loss or time_hints.time_blocks() is not None:
      rows.append(t.shape[0])
    return real(t, dim, **kw)

  models.sinusoidal_embedding = counting
  try:
    yield rows
  finally:
    models.sinusoidal_embedding = real
