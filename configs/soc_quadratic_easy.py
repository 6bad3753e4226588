"""Quadratic OU, easy (d = 20, K = 50): A = 0.2 I, P = 0.2 I, Q = 0.1 I, sigma = I, x0 = 0.5 N(0, I) fixed.

Run (2-core CPU, about 2-3 min for the three methods):

    python -m experiments.soc --config=configs/soc_quadratic_easy.py --workdir=runs/soc_quadratic_easy

Measured 2026-11-25 (2-core shared CPU, jax 0.10.2): total 128 s.  J(u*) = 5.981 +- 0.045, J(0) = 7.314 +- 0.059, L2(0) = 2.79.
  am                 it 1500: L2 0.0071, J 5.983 +- 0.045, L2 <= 1e-2 at it 1300 (23 s), train 25 s
  discrete_adjoint   it 1500: L2 0.00683, J 5.983 +- 0.045, L2 <= 1e-2 at it 1200 (26 s), train 32 s
  continuous_adjoint it 1500: L2 0.0056, J 5.984 +- 0.045, L2 <= 1e-2 at it 1200 (42 s), train 55 s
Floor from the K = 50 Euler discretisation: the discrete-time optimum is 1.1e-3 from the continuous u*.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.problem = "quadratic_easy"
  c.methods = ("am", "discrete_adjoint", "continuous_adjoint")
  c.num_iterations = 1500
  c.batch_size = 64
  c.learning_rate = 0.003
  c.lr_schedule = "cosine"          # cosine decay to lr_final_fraction * learning_rate
  c.lr_final_fraction = 0.01
  c.grad_clip = 0.0                 # 0: no gradient clipping
  c.hidden = (256, 128, 64)         # MLP widths of the control net u(x, t)
  c.time_scale = 0.01               # the net sees time_scale * t (see experiments/soc.py)
  c.seed = 0                        # network init and training noise
  c.eval_seed = 12345               # fixed evaluation paths (common random numbers)
  c.eval_every = 100
  c.eval_batch_size = 1024
  c.l2_target = 1e-2                # report the first iteration / training time with L2 error <= this
  c.time_budget_s = 0               # 0: no per-method training-time cap
  return c
