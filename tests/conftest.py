import os

# Tests run on CPU; 8 virtual devices let the sharding tests run on one machine.  Must be set
# before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
