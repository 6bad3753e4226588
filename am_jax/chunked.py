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

On a mesh whose devices each hold a slice of the batch, a chunk's gradient with respect to replicated parameters is
a sum over all devices' rows, so XLA would all-reduce it in every iteration (C reductions of the whole gradient per
step instead of one; measured in the compiled program).  Given the mesh and the batch axes of the data,
``separable_loss_in_chunks`` instead differentiates G = (devices) copies of the parameters, copy g seeing only the
rows of device g (``jax.vmap`` over the batch split into G groups), accumulates the G partial gradients, each on
its own device, and sums them once after the loop.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from am_jax import sharding as sharding_lib

__all__ = ["separable_loss_in_chunks"]


def separable_loss_in_chunks(term_fn: Callable, params, data, loss_of_terms: Callable, term_weight: Callable,
                             consts=(), *, mesh: Optional[jax.sharding.Mesh] = None, batch_axes=None):
  """(loss, terms, extras), differentiable in ``params`` only, one chunk of rows per ``lax.scan`` iteration.

  Args:
    term_fn: ``term_fn(params, consts, chunk) -> (terms (R,), extras)``: the per-row terms of one chunk (``chunk``:
      ``data`` without its leading axis) and any per-row diagnostics (a pytree, no gradient).
    params: what is differentiated (its floating-point leaves; integer leaves are constants).
    data: pytree of arrays with a leading chunk axis C (no gradient).
    loss_of_terms: ``loss_of_terms(terms (C R,)) -> scalar`` = sum_i g(terms_i), the loss's value.
    term_weight: ``term_weight(terms (R,)) -> (R,)`` = g'(terms_i), its derivative term by term (must match).
    consts: pytree of arrays every chunk uses (frozen network parameters, conditioning; no gradient).
    mesh: the ``('data',)`` mesh (``am_jax.sharding.make_mesh``) over which the batch is sharded, or None.  With G
      > 1 devices the gradient is accumulated per device (module docstring); ``batch_axes`` is then required.
    batch_axes: ``(consts_axes, chunk_axes)``, ``jax.vmap`` ``in_axes`` prefixes of ``consts`` and of one chunk
      (``data`` without its leading axis) naming each leaf's batch axis (None: not batched).  term_fn must then work
      on any number of paths (G groups of B / G each) and ``term_weight`` elementwise.

  Returns:
    (loss, terms (C R,), extras stacked with a leading C axis).  Value, terms and gradient are those of one call
    at all C R rows to float rounding; the gradient flows to ``params`` alone.  With G > 1 the rows of each chunk
    come device by device (terms and extras: (C, G, R / G) flattened), a permutation of one call's.
  """
  groups = 1 if mesh is None else sharding_lib.num_devices(mesh)
  if groups > 1 and batch_axes is None:
    raise ValueError("separable_loss_in_chunks: a mesh of several devices needs batch_axes (the batch axis of "
                     "each leaf of consts and of a chunk).")

  # Only the floating-point leaves of params are differentiated; the others (step counters, integer buffers) are
  # constants here, as they are to jax.grad(..., allow_int=True).
  leaves, treedef = jax.tree.flatten(params)
  is_float = [jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) for leaf in leaves]
  fixed = [leaf for leaf, f in zip(leaves, is_float) if not f]

  def _split(tree, axes, offset):  # each path axis -> (G, B / G); no sharding constraint (the copies carry it)
    return sharding_lib.split_paths(tree, axes, groups, offset, caller="separable_loss_in_chunks")

  def merged(float_leaves):
    it_float, it_fixed = iter(float_leaves), iter(fixed)
    return jax.tree.unflatten(treedef, [next(it_float) if f else next(it_fixed) for f in is_float])

  def forward(float_leaves, consts, data):  # the value only: no VJP when no gradient is asked for
    fn = lambda c, chunk: term_fn(merged(float_leaves), c, chunk)  # noqa: E731
    if groups > 1:  # each device its own rows, in the order of accumulate_per_device
      consts, data = _split(consts, batch_axes[0], 0), _split(data, batch_axes[1], 1)
      fn = jax.vmap(fn, in_axes=batch_axes)
    terms, extras = jax.lax.scan(lambda carry, chunk: (carry, fn(consts, chunk)), None, data)[1]
    return terms.reshape(-1), extras

  def accumulate(float_leaves, consts, data):
    def body(grad_sum, chunk):
      terms, vjp_fn, extras = jax.vjp(lambda fl: term_fn(merged(fl), consts, chunk), float_leaves, has_aux=True)
      (grad,) = vjp_fn(term_weight(terms).astype(terms.dtype))
      return jax.tree.map(jnp.add, grad_sum, grad), (terms, extras)
    grad_sum, (terms, extras) = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, float_leaves), data)
    return (terms.reshape(-1), extras), grad_sum

  def accumulate_per_device(float_leaves, consts, data):
    consts_axes, chunk_axes = batch_axes
    on_devices = lambda tree: jax.tree.map(lambda z: sharding_lib.constrain_batch(z, mesh, 0), tree)  # noqa: E731
    consts_g = _split(consts, consts_axes, 0)
    data_g = _split(data, chunk_axes, 1)  # data has the chunk axis in front
    per_group = jax.vmap(lambda fl, c, chunk: term_fn(merged(fl), c, chunk), in_axes=(0, consts_axes, chunk_axes))
    # G copies of the parameters, copy g on device g: the gradient of copy g is device g's partial sum.
    copies = on_devices([jnp.broadcast_to(leaf, (groups,) + leaf.shape) for leaf in float_leaves])

    def body(grad_sum, chunk):
      terms, vjp_fn, extras = jax.vjp(lambda c: per_group(c, consts_g, chunk), copies, has_aux=True)
      (grad,) = vjp_fn(term_weight(terms).astype(terms.dtype))
      return on_devices(jax.tree.map(jnp.add, grad_sum, grad)), (terms, extras)
    grad_sum, (terms, extras) = jax.lax.scan(body, on_devices(jax.tree.map(jnp.zeros_like, copies)), data_g)
    return (terms.reshape(-1), extras), [jnp.sum(g, axis=0) for g in grad_sum]  # the one all-reduce

  @jax.custom_vjp
  def loss_terms_extras(float_leaves, consts, data):
    terms, extras = forward(float_leaves, consts, data)
    return loss_of_terms(terms), terms, extras

  def fwd(float_leaves, consts, data):
    (terms, extras), grad_sum = (accumulate if groups == 1 else accumulate_per_device)(float_leaves, consts, data)
    return (loss_of_terms(terms), terms, extras), grad_sum

  def bwd(grad_sum, cotangents):  # only the loss's cotangent reaches params; terms and extras carry none
    return jax.tree.map(lambda g: (cotangents[0] * g).astype(g.dtype), grad_sum), None, None

  loss_terms_extras.defvjp(fwd, bwd)
  return loss_terms_extras([leaf for leaf, f in zip(leaves, is_float) if f], consts, data)

