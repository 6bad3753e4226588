"""Double well (d = 10, K = 200): b = -grad Psi, kappa = 5 (i < 3) / 1, g = sum nu_i (x_i^2 - 1)^2, nu = 3 / 1, x0 = 0.

Run (2-core CPU, about 4 min (incl. ~20 s reference solve) for the three methods):

    python -m experiments.soc --config=configs/soc_double_well.py --workdir=runs/soc_double_well

Measured 2026-11-25 (2-core shared CPU, jax 0.10.2): total 240 s.  J(u*) = 2.188 +- 0.026, J(0) = 2.546 +- 0.030, L2(0) = 0.67.
  am                 it 500: L2 0.647, J 2.533 +- 0.030, L2 1e-2 not reached, train 54 s
  discrete_adjoint   it 500: L2 0.647, J 2.534 +- 0.030, L2 1e-2 not reached, train 59 s
  continuous_adjoint it 500: L2 0.646, J 2.533 +- 0.030, L2 1e-2 not reached, train 72 s
Reduced budget (500 iterations): no method gets far; the adjoint targets are noise-dominated here
(per-path target variance ~32 vs signal E int |u*|^2 = 0.67; BUILD_NOTES.md section 9).
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.problem = "double_well"
  c.methods = ("am", "discrete_adjoint", "continuous_adjoint")
  c.num_iterations = 500
  c.batch_size = 64
  c.learning_rate = 0.003
  c.lr_schedule = "cosine"          # cosine decay to lr_final_fraction * learning_rate
  c.lr_final_fraction = 0.01
  c.grad_clip = 0.0                 # 0: no gradient clipping
  c.hidden = (256, 128, 64)         # MLP widths of the control net u(x, t)
  c.time_scale = 1.0               # the net sees time_scale * t (see experiments/soc.py)
  c.seed = 0                        # network init and training noise
  c.eval_seed = 12345               # fixed evaluation paths (common random numbers)
  c.eval_every = 50
  c.eval_batch_size = 1024
  c.l2_target = 1e-2                # report the first iteration / training time with L2 error <= this
  c.time_budget_s = 0               # 0: no per-method training-time cap
  return c
