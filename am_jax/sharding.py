"""Data-parallel sharding over every device with ``jax.sharding`` (Mesh + NamedSharding).

Design (docs/training_system.md section 6):

* One mesh axis, ``'data'``, over all devices of all hosts (``jax.devices()``), with
  ``AxisType.Auto`` so XLA propagates shardings through the jitted step.
* Parameters, optimiser state and keys are replicated; everything with a batch axis (initial noise,
  Brownian increments, trajectories, adjoints, data batches) is sharded along its batch axis.
* Random arrays are drawn *inside* the jitted step from one global key and constrained to the
  batch sharding.  With ``jax_threefry_partitionable`` (set below) the values do not depend on the
  number of devices, and each device -- hence each host -- computes only its own slice of the one
  global array: no two hosts ever draw the same noise, and 1 device and 8 devices give the same
  numbers.  (Folding the host index into the key would also decorrelate hosts but would make
  results depend on the host count.)
"""
from __future__ import annotations

import collections
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

try:  # jax >= 0.5
  from jax.sharding import AxisType
except ImportError:  # pragma: no cover
  AxisType = None

DATA_AXIS = "data"

# Makes jax.random values independent of how the output is sharded (see module docstring).
jax.config.update("jax_threefry_partitionable", True)


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D ``('data',)`` mesh over the first ``num_devices`` devices (all of them by default)."""
  devices = jax.devices()
  n = len(devices) if num_devices in (None, -1, 0) else int(num_devices)
  if n < 1 or n > len(devices):
    raise ValueError(f"mesh.num_devices must be in [1, {len(devices)}] (or -1 for all), got {num_devices}"
                     f"{host_devices_hint(n)}.")
  if jax.process_count() > 1 and n != len(devices):
    raise ValueError("With several processes the mesh must span all devices (mesh.num_devices = -1).")
  kwargs = {"axis_types": (AxisType.Auto,)} if AxisType is not None else {}
  return jax.make_mesh((n,), (DATA_AXIS,), devices=devices[:n], **kwargs)


def host_devices_hint(n: int) -> str:
  """'; on a CPU, XLA_FLAGS=... gives n host devices' when jax runs on a CPU and n > 1 (else ''): the end of an error
  that asked for more devices than jax has."""
  if n > 1 and jax.default_backend() == "cpu":
    return (f"; on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count={n} set before the run gives {n} host "
            "devices")
  return ""


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  """Shards axis ``batch_axis`` of an ``ndim``-dimensional array over the data axis."""
  spec = [None] * ndim
  spec[batch_axis] = DATA_AXIS
  return NamedSharding(mesh, P(*spec))


def constrain_batch(x, mesh: Optional[Mesh], batch_axis: int = 0):
  """``with_sharding_constraint`` to the batch sharding; a no-op without a mesh."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim, batch_axis))


def check_batch_divisible(batch_size: int, mesh: Mesh, field: str = "batch_size"):
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"{field}={batch_size} must be divisible by the number of devices in the mesh ({n}).")


def replicate_tree(tree, mesh: Mesh):
  """Places a fresh copy of every leaf of ``tree`` replicated on the mesh (one or many hosts).

  Always copies, so donating the result (the train steps do) never invalidates the caller's arrays.
  """
  sharding = replicated(mesh)

  def put(x):
    # An explicit copy: device_put(..., may_alias=False) onto several devices still reuses the input's buffer for
    # the shard on its own device (jax 0.10.2, measured), and donating the result then deleted the caller's array.
    x = jax.numpy.array(x, copy=True)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding, may_alias=False)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(put, tree)


def num_devices(mesh: Mesh) -> int:
  return math.prod(mesh.devices.shape)


def devices_of(mesh: Optional[Mesh]) -> int:
  """Number of devices of the mesh; 1 without one."""
  return 1 if mesh is None else num_devices(mesh)


def rows_per_step(values, batch: int, mesh: Optional[Mesh]):
  """(L,) per-step values -> (L B,) per-row values in the row order of ``rows_by_device`` (repeat(values, B)
  without a mesh)."""
  return rows_by_device(jnp.broadcast_to(values[:, None], (values.shape[0], batch)), mesh)


def rows_of_paths(x, lead: int, mesh: Optional[Mesh]):
  """(B, ...) per-path values (conditioning) -> (L B, ...), the same B rows at each of L leading indices, in the row
  order of ``rows_by_device`` (L copies stacked without a mesh)."""
  return rows_by_device(jnp.broadcast_to(x[None], (lead,) + x.shape), mesh)


def rows_by_device(x, mesh: Optional[Mesh]):
  """(L, B, ...) -> (L B, ...) network rows, device by device, sharded over the mesh on the rows axis.

  The plain ``x.reshape(L * B, ...)`` puts the L blocks of B paths one after the other; with the paths sharded,
  that merged axis cannot be split over the devices, so XLA gathers it and every device evaluates all L B rows.
  Here device g's rows are its own B / G paths at each of the L leading indices (L blocks of B / G rows), so each
  device keeps its share (a local transpose, no communication).  Without a mesh (or with one device): the plain
  reshape.  ``rows_by_device_inverse`` undoes it.
  """
  lead, b = x.shape[:2]
  g = devices_of(mesh)
  if g == 1:
    return x.reshape((lead * b,) + x.shape[2:])
  x = jnp.moveaxis(x.reshape((lead, g, b // g) + x.shape[2:]), 1, 0)   # (G, L, B / G, ...)
  return constrain_batch(x.reshape((lead * b,) + x.shape[3:]), mesh, 0)


def rows_by_device_inverse(rows, lead: int, mesh: Optional[Mesh]):
  """(L B, ...) rows of ``rows_by_device`` -> (L, B, ...), the paths sharded over the mesh on axis 1."""
  b = rows.shape[0] // lead
  g = devices_of(mesh)
  if g == 1:
    return rows.reshape((lead, b) + rows.shape[1:])
  x = jnp.moveaxis(rows.reshape((g, lead, b // g) + rows.shape[1:]), 0, 1)   # (L, G, B / G, ...)
  return constrain_batch(x.reshape((lead, b) + rows.shape[1:]), mesh, 1)


def split_paths(tree, axes, groups: int, offset: int = 0, mesh: Optional[Mesh] = None, caller: str = "split_paths"):
  """Each leaf's path axis (``axes``: a ``jax.vmap`` in_axes prefix of ``tree``, None = not per path; + ``offset``)
  of size B split into (groups, B / groups) contiguous groups, the groups axis where the path axis was; with a mesh
  the groups axis is constrained to it (group g on device g).  ValueError naming ``caller`` if B does not split."""
  def split(axis, z):
    if axis is None:
      return z
    a = axis + offset
    if z.shape[a] % groups:
      raise ValueError(f"{caller}: a path axis of size {z.shape[a]} does not split over the {groups} devices of the "
                       "mesh.")
    return constrain_batch(z.reshape(z.shape[:a] + (groups, z.shape[a] // groups) + z.shape[a + 1:]), mesh, a)

  return _prefix_map(split, axes, tree)


def _prefix_map(fn_leaf, axes, tree):
  """fn_leaf(axis, leaf) for every leaf below each entry of ``axes``, a ``jax.vmap`` in_axes-style prefix of tree."""
  return jax.tree.map(lambda ax, sub: jax.tree.map(lambda z: fn_leaf(ax, z), sub), axes, tree,
                      is_leaf=lambda x: x is None)


def grad_by_device(fn, mesh: Optional[Mesh], batch_axes, out_axes=0):
  """``fn(params, *batched) -> outputs`` rewritten so that its gradient in ``params`` is summed over devices once.

  Differentiating a function of the whole sharded batch through a loop (backprop through a ``lax.scan`` rollout:
  the discrete adjoint, DRaFT) makes XLA all-reduce the parameter cotangent in every iteration of the backward loop
  (a sum over the sharded batch axis inside it; found in the compiled programs).  Here G = (devices) copies of
  ``params`` are made, copy g applied to the paths of device g (``jax.vmap`` over the batch split into G contiguous
  groups): each device accumulates the cotangent of its own copy through the loop, and the transpose of the copy
  (a sum over G) is the one all-reduce.  Values are those of ``fn`` (the groups merged back in order); one device
  (or no mesh): ``fn`` itself.

  Args:
    fn: ``fn(params, *batched)``; must work on any number of paths (B / G per call) and act on each path
      independently.
    mesh: the ``('data',)`` mesh the paths are sharded over, or None.
    batch_axes: one ``jax.vmap`` in_axes prefix per argument of ``batched`` naming each leaf's path axis (None: the
      same for every path, e.g. shared conditioning or constants).
    out_axes: ``jax.vmap`` out_axes prefix of the outputs naming their path axis (None: not per path; then the
      output of group 0 is returned, which must equal every group's).
  """
  g = devices_of(mesh)
  if g == 1:
    return fn

  def merge(axis, z):
    if axis is None:
      return z[0]
    return constrain_batch(z.reshape(z.shape[:axis] + (-1,) + z.shape[axis + 2:]), mesh, axis)

  def wrapped(params, *batched):
    if len(batched) != len(batch_axes):
      raise ValueError(f"grad_by_device: {len(batched)} batched arguments, {len(batch_axes)} batch_axes.")
    copies = jax.tree.map(lambda z: constrain_batch(jnp.broadcast_to(z, (g,) + jnp.shape(z)), mesh, 0), params)
    groups = [split_paths(b, a, g, mesh=mesh, caller="grad_by_device") for a, b in zip(batch_axes, batched)]
    out = jax.vmap(fn, in_axes=(0,) + tuple(batch_axes), out_axes=out_axes)(copies, *groups)
    return _prefix_map(merge, out_axes, out)

  return wrapped


class InFlightLimit:
  """Keeps at most ``depth`` dispatched steps of a multi-device CPU mesh in flight, blocking on the oldest.

  XLA:CPU admits 32 computations in flight per device (``max_inflight_computations_per_device``); with a step over
  several host devices dispatched asynchronously past that, the first collective can wait forever and XLA aborts the
  process after 40 s (measured with jax 0.10.2 on 2 host devices: a step with one all-reduce deadlocks with 32 steps
  in flight, not with 24; the gmm2d pre-training deadlocked within its first 5000-step log interval).  Call it on
  an output of each step that is not donated to the next (its metrics or loss) in a training loop.  A no-op without
  a mesh, on one device and on accelerators.
  """

  def __init__(self, mesh: Optional[Mesh], depth: int = 4):
    if depth < 1:
      raise ValueError(f"InFlightLimit: depth = {depth} must be >= 1.")
    self.active = devices_of(mesh) > 1 and mesh.devices.flat[0].platform == "cpu"
    self.depth = depth
    self._queue = collections.deque()

  def __call__(self, tree):
    """Returns ``tree`` (a step's output that is not donated later), first waiting for the step ``depth`` calls back
    when active."""
    if self.active:
      self._queue.append(jax.tree.leaves(tree)[0])
      if len(self._queue) > self.depth:
        self._queue.popleft().block_until_ready()
    return tree

  @property
  def in_flight(self) -> int:
    return len(self._queue)


def to_local(tree):
  """Host NumPy copy of a (replicated) global pytree; works when it spans several processes."""
  import numpy as np
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)
