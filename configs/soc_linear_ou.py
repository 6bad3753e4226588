"""Linear OU (d = 10, K = 100): A = -I + xi, sigma = I + xi, xi = 0.1 N(0, I), f = 0, g = 1 . x, x0 = 0.

Run (2-core CPU, about 3.5 min for the three methods):

    python -m experiments.soc --config=configs/soc_linear_ou.py --workdir=runs/soc_linear_ou

Measured 2026-11-25 (2-core shared CPU, jax 0.10.2): total 211 s.  J(u*) = -3.092 +- 0.079, J(0) = 0.024 +- 0.079, L2(0) = 6.14.
  am                 it 600: L2 0.000857, J -3.091 +- 0.079, L2 <= 1e-2 at it 100 (8 s), train 45 s
  discrete_adjoint   it 600: L2 0.000859, J -3.091 +- 0.079, L2 <= 1e-2 at it 100 (8 s), train 52 s
  continuous_adjoint it 600: L2 0.000533, J -3.091 +- 0.079, L2 <= 1e-2 at it 100 (10 s), train 60 s
Floor: the discrete-time optimum (the fixed point of AM and of the discrete adjoint) is 3.4e-4 from the
continuous u*(t_k); the continuous adjoint (pairing u_k with a_k) targets a point 1.9e-5 from it.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.problem = "linear_ou"
  c.methods = ("am", "discrete_adjoint", "continuous_adjoint")
  c.num_iterations = 600
  c.batch_size = 64
  c.learning_rate = 0.001
  c.lr_schedule = "cosine"          # cosine decay to lr_final_fraction * learning_rate
  c.lr_final_fraction = 0.01
  c.grad_clip = 0.0                 # 0: no gradient clipping
  c.hidden = (256, 128, 64)         # MLP widths of the control net u(x, t)
  c.time_scale = 0.01               # the net sees time_scale * t (see experiments/soc.py)
  c.seed = 0                        # network init and training noise
  c.eval_seed = 12345               # fixed evaluation paths (common random numbers)
  c.eval_every = 50
  c.eval_batch_size = 1024
  c.l2_target = 1e-2                # report the first iteration / training time with L2 error <= this
  c.time_budget_s = 0               # 0: no per-method training-time cap
  return c
