"""The PyTorch eager reference of benchmarks/torch_reference.py gives am_jax's AM loss, gradients and Adam step.

Skipped without torch (the optional extra ``pip install -e ".[torch]"``).  Small sizes (K = 8, B = 16, 3 of 8 loss
steps drawn at random + the last 3) keep it fast; ``python -m benchmarks.torch_reference`` times the full sizes.
Same weights and the same draws (x0, the Brownian increments and the loss steps of the am_jax objective's key).
"""
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_reference  # noqa: E402  (after the skip: it needs torch at call time)
from tests import torch_checks  # noqa: E402

SMALL = dict(batch=16, hidden=(16, 16), num_steps=8, num_random_timesteps=3, num_last_timesteps=3)


# The toy's check compiles a second AM objective (~3 s of CPU more): behind -m slow to keep the default suite fast.
@pytest.mark.parametrize("name", [pytest.param("toy1d", marks=pytest.mark.slow), "mlp_d16"])
def test_torch_reference_matches_am_jax(name):
  torch_checks.assert_same_step(torch_reference.check_against_jax(name, **SMALL), loss_rtol=2e-4, grad_atol=1e-4,
                                lr=torch_reference.LEARNING_RATE)
