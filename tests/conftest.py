import os

# Tests run on CPU; 8 virtual devices let the sharding tests run on one machine.  Must be set
# before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
  """One tiny 2-D ring base (``tests.launch_helpers.tiny_config``), pre-trained once per test session."""
  from am_jax import jobs
  from tests.launch_helpers import tiny_config
  d = str(tmp_path_factory.mktemp("tiny_base"))
  jobs.pretrain(tiny_config(**{"mesh.num_devices": 1}), d)
  return d
