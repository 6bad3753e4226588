"""The PyTorch eager reference of benchmarks/torch_soc_reference.py gives am_jax's SOC AM loss, gradients, Adam step.

Skipped without torch (the optional extra ``pip install -e ".[torch]"``).  Tiny sizes (d = 4, K = 8, B = 8, widths
(16, 8)) keep it fast; ``python -m benchmarks.torch_soc_reference`` times the real sizes.  Same weights and the same
draws (x0 and the Brownian increments of the am_jax objective's key).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from am_jax import soc  # noqa: E402
from benchmarks import torch_soc_reference as tsr  # noqa: E402  (after the skip: it needs torch at call time)
from tests import torch_checks  # noqa: E402

TINY = dict(batch=8, num_steps=8, hidden=(16, 8), problem_kw=dict(dim=4))


def _tiny(name):
  kw = dict(TINY, problem_kw=dict(TINY["problem_kw"]))
  if name == "double_well":  # explicit Euler needs h |b'| < 2 (b' = -40 at x = 1): K = 32; small reference tables
    kw.update(num_steps=32)
    kw["problem_kw"].update(num_x=201, num_t=100)
  return kw


# quadratic_easy covers the running cost and a fixed x0, double_well a diagonal sigma and a nonlinear drift,
# linear_ou net=default am_jax's MLP with sinusoidal time features; quadratic_hard is quadratic_easy's code.
@pytest.mark.parametrize("name,net", [
    ("linear_ou", "socm"), ("quadratic_easy", "socm"), pytest.param("double_well", "socm", marks=pytest.mark.slow),
    pytest.param("linear_ou", "default", marks=pytest.mark.slow),
    pytest.param("quadratic_hard", "socm", marks=pytest.mark.slow)])
def test_torch_soc_reference_matches_am_jax(name, net):
  torch_checks.assert_same_step(tsr.check_against_jax(name, net, **_tiny(name)), loss_rtol=1e-5, grad_atol=1e-5,
                                lr=float(tsr.load_config(name, net).learning_rate))


def test_socm_adjoint_pieces_and_weights():
  """SOCM_adjoint (torch only): on linear OU (constant Jacobian, f = 0) the trapezoidal adjoint is the lean adjoint,
  which is am_jax's ``soc.lean_adjoint``; the log path weight is -J - sqrt(h) sum_k u_k . xi_k with J am_jax's path
  cost (noise level 1); the weights round-trip to nnx; one step gives a finite loss."""
  side = tsr.build_jax("linear_ou", **TINY)
  ref = tsr.TorchSOC(side, "socm_adjoint", normalization_batches=2)
  x0, xi = soc.draw_initial_and_noise(side.problem, jax.random.PRNGKey(3), side.batch)
  traj, _, w = ref._rollout(torch.from_numpy(np.array(x0)), torch.from_numpy(np.array(xi)), weights=True)
  traj_j, us_j, cost_j = soc.rollout(side.problem, side.apply_fn, side.params, x0, xi)
  np.testing.assert_allclose(torch.stack(traj).numpy(), traj_j, rtol=1e-5, atol=1e-5)
  log_w = -cost_j - jnp.sqrt(side.problem.dt) * jnp.sum(us_j * xi, axis=(0, 2))
  np.testing.assert_allclose(np.log(w.numpy()), log_w, rtol=1e-4, atol=1e-4)
  lean_j = soc.lean_adjoint(side.problem, traj_j)
  for adj in (ref.lean_adjoint(traj), ref.trapezoid_adjoint(traj)):
    np.testing.assert_allclose(torch.stack(adj).numpy(), lean_j, rtol=1e-5, atol=1e-5)
  params = ref.jax_params()
  np.testing.assert_allclose(side.apply_fn(params, x0, jnp.zeros(side.batch)),
                             side.apply_fn(side.params, x0, jnp.zeros(side.batch)), rtol=1e-6, atol=1e-6)
  assert np.isfinite(ref.step()) and ref.itr == 1
