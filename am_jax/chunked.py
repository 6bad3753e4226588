"""A separable loss over many rows, evaluated chunk by chunk with its gradient accumulated on the way.

The regression losses here (fine-tuning, ``losses.loss_at_timesteps``; SOC, ``soc.am_loss``) are sums of one term
per row over M B rows (loss time steps x paths), each term a function of the network at that row:

    L(theta) = sum_i g(e_i(theta)),    e_i = the squared error at row i,

with g known per term (g(e) = e / N for a mean, min(e, c) / N for a clipped mean).  So dL / d e_i = g'(e_i) is
known as soon as a chunk's terms are, and the chunk's contribution to the gradient is one VJP of the network at
those rows with that cotangent.  ``separable_loss_in_chunks`` runs a ``lax.scan`` over the chunks that takes each
chunk's VJP inside its iteration and adds it to a running gradient; a ``jax.custom_vjp`` then returns that sum
times the incoming cotangent.  No chunk's activations outlive its iteration and nothing is recomputed (a
``jax.checkpoint`` per chunk would run every forward twice).

Why: at M B rows in one call the network's activations outgrow a CPU's cache and every pass slows down
(docs/performance.md section 12.14: 1.2-1.6x faster steps on 2 CPU cores for the U-Nets, the 3x256 MLP and the SOC
control nets).  On a GPU one large call is usually the efficient shape.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["separable_loss_in_chunks"]


def separable_loss_in_chunks(term_fn: Callable, params, data, loss_of_terms: Callable, term_weight: Callable,
                             consts=()):
  """(loss, terms, extras), differentiable in ``params`` only, one chunk of rows per ``lax.scan`` iteration.

  Args:
    term_fn: ``term_fn(params, consts, chunk) -> (terms (R,), extras)``: the per-row terms of one chunk (``chunk``:
      ``data`` without its leading axis) and any per-row diagnostics (a pytree, no gradient).
    params: what is differentiated (its floating-point leaves; integer leaves are constants).
    data: pytree of arrays with a leading chunk axis C (no gradient).
    loss_of_terms: ``loss_of_terms(terms (C R,)) -> scalar`` = sum_i g(terms_i), the loss's value.
    term_weight: ``term_weight(terms (R,)) -> (R,)`` = g'(terms_i), its derivative term by term (must match).
    consts: pytree of arrays every chunk uses (frozen network parameters, conditioning; no gradient).

  Returns:
    (loss, terms (C R,), extras stacked with a leading C axis).  Value, terms and gradient are those of one call
    at all C R rows to float rounding; the gradient flows to ``params`` alone.
  """

  # Only the floating-point leaves of params are differentiated; the others (step counters, integer buffers) are
  # constants here, as they are to jax.grad(..., allow_int=True).
  leaves, treedef = jax.tree.flatten(params)
  is_float = [jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) for leaf in leaves]
  fixed = [leaf for leaf, f in zip(leaves, is_float) if not f]

  def merged(float_leaves):
    it_float, it_fixed = iter(float_leaves), iter(fixed)
    return jax.tree.unflatten(treedef, [next(it_float) if f else next(it_fixed) for f in is_float])

  def forward(float_leaves, consts, data):  # the value only: no VJP when no gradient is asked for
    def body(carry, chunk):
      return carry, term_fn(merged(float_leaves), consts, chunk)
    terms, extras = jax.lax.scan(body, None, data)[1]
    return terms.reshape(-1), extras

  def accumulate(float_leaves, consts, data):
    def body(grad_sum, chunk):
      terms, vjp_fn, extras = jax.vjp(lambda fl: term_fn(merged(fl), consts, chunk), float_leaves, has_aux=True)
      (grad,) = vjp_fn(term_weight(terms).astype(terms.dtype))
      return jax.tree.map(jnp.add, grad_sum, grad), (terms, extras)
    grad_sum, (terms, extras) = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, float_leaves), data)
    return (terms.reshape(-1), extras), grad_sum

  @jax.custom_vjp
  def loss_terms_extras(float_leaves, consts, data):
    terms, extras = forward(float_leaves, consts, data)
    return loss_of_terms(terms), terms, extras

  def fwd(float_leaves, consts, data):
    (terms, extras), grad_sum = accumulate(float_leaves, consts, data)
    return (loss_of_terms(terms), terms, extras), grad_sum

  def bwd(grad_sum, cotangents):  # only the loss's cotangent reaches params; terms and extras carry none
    return jax.tree.map(lambda g: (cotangents[0] * g).astype(g.dtype), grad_sum), None, None

  loss_terms_extras.defvjp(fwd, bwd)
  return loss_terms_extras([leaf for leaf, f in zip(leaves, is_float) if f], consts, data)
