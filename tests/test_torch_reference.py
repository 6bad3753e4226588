"""The PyTorch eager reference of benchmarks/torch_reference.py gives am_jax's AM loss, gradients and Adam step.

Skipped without torch (the optional extra ``pip install -e ".[torch]"``).  Small sizes (K = 8, B = 16, 3 of 8 loss
steps drawn at random + the last 3) keep it fast; ``python -m benchmarks.torch_reference`` times the full sizes.
Same weights and the same draws (x0, the Brownian increments and the loss steps of the am_jax objective's key).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_reference  # noqa: E402  (after the skip: it needs torch at call time)

SMALL = dict(batch=16, hidden=(16, 16), num_steps=8, num_random_timesteps=3, num_last_timesteps=3)


# The toy's check compiles a second AM objective (~3 s of CPU more): behind -m slow to keep the default suite fast.
@pytest.mark.parametrize("name", [pytest.param("toy1d", marks=pytest.mark.slow), "mlp_d16"])
def test_torch_reference_matches_am_jax(name):
  out = torch_reference.check_against_jax(name, **SMALL)
  loss_j, loss_t = out["loss"]
  assert np.isfinite(loss_j) and loss_j > 0
  np.testing.assert_allclose(loss_t, loss_j, rtol=2e-4)
  for param, (g_j, g_t) in out["grads"].items():
    assert g_j.shape == g_t.shape, param
    scale = np.max(np.abs(g_j))
    assert scale > 0, f"{param}: zero gradient (the check would be vacuous)"
    np.testing.assert_allclose(g_t, g_j, rtol=0, atol=1e-4 * scale, err_msg=param)
  lr = torch_reference.LEARNING_RATE
  for param, (p_j, p_t) in out["params_after"].items():  # Adam: lr sign(g) at the first step, except where g ~ eps
    np.testing.assert_allclose(p_t, p_j, rtol=0, atol=0.1 * lr, err_msg=param)
