"""The benchmarks' am_jax steps with the batch over several devices (``--jax_devices``): the one-device numbers.

No torch needed: only the am_jax sides of benchmarks/torch_reference.py and benchmarks/torch_soc_reference.py.
"""
import jax
import numpy as np
import pytest

from am_jax import sharding as sharding_lib
from benchmarks import common


def test_torch_comparison_steps_on_two_devices_match_one_device():
  """benchmarks/torch_soc_reference --jax_devices=2: the timed multi-device step (paths sharded, parameters
  replicated) gives the one-device losses, and the rollout floor on a mesh the one-device end states; a mesh is
  refused for the other floor parts, --jax_devices < 1 or above the device count is refused naming the flag."""
  from benchmarks import torch_soc_reference as tsr  # pylint: disable=g-import-not-at-top
  side = tsr.build_jax("linear_ou", "socm", batch=8, num_steps=8, hidden=(16, 8), problem_kw=dict(dim=4))
  mesh = sharding_lib.make_mesh(2)
  one, two = tsr.jax_runner(side)[0], tsr.jax_runner(side, mesh)[0]
  for _ in range(2):
    np.testing.assert_allclose(float(two()), float(one()), rtol=1e-5)
  ends = [tsr.jax_floor_runner(side, "rollout", m)[0]()["x_end"] for m in (None, mesh)]
  assert ends[1].sharding.spec[0] == sharding_lib.DATA_AXIS
  np.testing.assert_allclose(np.asarray(ends[1]), np.asarray(ends[0]), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="part 'rollout'"):
    tsr.jax_floor_runner(side, "loss", mesh)
  assert common.jax_host_devices(1) == jax.device_count()
  for bad in (0, jax.device_count() + 1):
    with pytest.raises(ValueError, match=f"--jax_devices={bad}"):
      common.jax_host_devices(bad)


def test_torch_reference_step_on_two_devices_matches_one_device():
  """benchmarks/torch_reference --jax_devices=2: the timed AM step with the batch sharded (chunked loss and one call)
  gives the one-device losses; a batch that does not split is refused naming it."""
  from benchmarks import torch_reference as tr  # pylint: disable=g-import-not-at-top
  setup = tr.build_jax("mlp_d16", "m20", batch=16, hidden=(16, 16), num_steps=8, num_random_timesteps=3,
                       num_last_timesteps=3)
  mesh = sharding_lib.make_mesh(2)
  for chunk in (0, 3):
    one, two = tr.jax_runner(setup, chunk_loss=chunk)[0], tr.jax_runner(setup, mesh, chunk_loss=chunk)[0]
    for _ in range(2):
      np.testing.assert_allclose(float(two()), float(one()), rtol=1e-5)
  with pytest.raises(ValueError, match="batch=16 must be divisible"):
    setup.make_step(mesh=sharding_lib.make_mesh(3))
