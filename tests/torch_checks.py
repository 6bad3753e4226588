"""Shared assertion of the PyTorch-reference tests: torch and am_jax made the same training step."""
import numpy as np


def assert_same_step(out: dict, loss_rtol: float, grad_atol: float, lr: float):
  """``out`` from a ``check_against_jax`` (benchmarks/torch_reference.py, benchmarks/torch_soc_reference.py): the
  same loss (rtol ``loss_rtol``), the same gradients (within ``grad_atol`` of each parameter's largest entry; a zero
  gradient would make the check vacuous) and the same parameters after one Adam step (Adam moves each entry by
  ~lr sign(g) at the first step, except where g ~ eps: within 0.1 lr)."""
  loss_j, loss_t = out["loss"]
  assert np.isfinite(loss_j) and loss_j > 0
  np.testing.assert_allclose(loss_t, loss_j, rtol=loss_rtol)
  for param, (g_j, g_t) in out["grads"].items():
    assert g_j.shape == g_t.shape, param
    scale = np.max(np.abs(g_j))
    assert scale > 0, f"{param}: zero gradient (the check would be vacuous)"
    np.testing.assert_allclose(g_t, g_j, rtol=0, atol=grad_atol * scale, err_msg=param)
  for param, (p_j, p_t) in out["params_after"].items():
    np.testing.assert_allclose(p_t, p_j, rtol=0, atol=0.1 * lr, err_msg=param)
