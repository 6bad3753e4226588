r"""SOC-matching benchmarks: Adjoint Matching vs the discrete and continuous adjoint methods (``am_jax.soc``).

The argument after ``:`` picks the problem (big_vision ``configs/common.py:parse_arg`` style; a bare name or
``problem=NAME``); every field can be overridden, e.g. ``--config.num_iterations=100``.  Outputs in --workdir:
metrics.jsonl (one row per evaluation), metrics.json (summary per method + the objective of u* and of u = 0
on the same paths), l2_error.png.  Times: 2-core shared CPU, jax 0.10.2, measured 2026-11-25 with the three
methods in sequence; J = control objective, L2 = E int |u - u*|^2 dt on 1024 fixed evaluation paths.

linear_ou -- Linear OU (d = 10, K = 100): A = -I + xi, sigma = I + xi, xi = 0.1 N(0, I), f = 0, g = 1 . x,
x0 = 0.  About 2-3.5 min:

    python -m experiments.soc --config=configs/soc.py:linear_ou --workdir=runs/soc_linear_ou

  Measured total 211 s (126 s rerun through the redesigned code, every number below identical).
  J(u*) = -3.092 +- 0.079, J(0) = 0.024 +- 0.079, L2(0) = 6.14.
    am                 it 600: L2 0.000857, J -3.091 +- 0.079, L2 <= 1e-2 at it 100 (8 s), train 45 s
    discrete_adjoint   it 600: L2 0.000859, J -3.091 +- 0.079, L2 <= 1e-2 at it 100 (8 s), train 52 s
    continuous_adjoint it 600: L2 0.000533, J -3.091 +- 0.079, L2 <= 1e-2 at it 100 (10 s), train 60 s
  Floor: the discrete-time optimum (the fixed point of AM and of the discrete adjoint) is 3.4e-4 from the
  continuous u*(t_k); the continuous adjoint (pairing u_k with a_k) targets a point 1.9e-5 from it.

quadratic_easy -- Quadratic OU, easy (d = 20, K = 50): A = 0.2 I, P = 0.2 I, Q = 0.1 I, sigma = I,
x0 = 0.5 N(0, I) fixed.  About 2-3 min:

    python -m experiments.soc --config=configs/soc.py:quadratic_easy --workdir=runs/soc_quadratic_easy

  Measured total 128 s.  J(u*) = 5.981 +- 0.045, J(0) = 7.314 +- 0.059, L2(0) = 2.79.
    am                 it 1500: L2 0.0071, J 5.983 +- 0.045, L2 <= 1e-2 at it 1300 (23 s), train 25 s
    discrete_adjoint   it 1500: L2 0.00683, J 5.983 +- 0.045, L2 <= 1e-2 at it 1200 (26 s), train 32 s
    continuous_adjoint it 1500: L2 0.0056, J 5.984 +- 0.045, L2 <= 1e-2 at it 1200 (42 s), train 55 s
  Floor from the K = 50 Euler discretisation: the discrete-time optimum is 1.1e-3 from the continuous u*.

quadratic_hard -- Quadratic OU, hard (d = 20, K = 50): A = I, P = I, Q = 0.5 I, sigma = I, x0 = 0.5 N(0, I)
fixed.  About 3 min (reduced budget: 1500 iterations):

    python -m experiments.soc --config=configs/soc.py:quadratic_hard --workdir=runs/soc_quadratic_hard

  Measured total 168 s.  J(u*) = 29.675 +- 0.177, J(0) = 96.735 +- 0.803, L2(0) = 139.
    am                 it 1500: L2 0.205, J 29.747 +- 0.181, L2 1e-2 not reached, train 42 s
    discrete_adjoint   it 1500: L2 0.159, J 29.726 +- 0.180, L2 1e-2 not reached, train 49 s
    continuous_adjoint it 1500: L2 0.14, J 29.738 +- 0.179, L2 1e-2 not reached, train 43 s
  Floor: the exact discrete-time (K = 50 Euler) optimum is itself 0.030 from the continuous u* in this L2
  error, so 1e-2 is unreachable at K = 50 for every method (docs/soc.md).

double_well -- Double well (d = 10, K = 200): b = -grad Psi, kappa = 5 (i < 3) / 1, g = sum nu_i (x_i^2 - 1)^2,
nu = 3 / 1, x0 = 0.  About 4-4.5 min (reduced budget: 500 iterations):

    python -m experiments.soc --config=configs/soc.py:double_well --workdir=runs/soc_double_well

  Measured total 240 s (272 s rerun through the redesigned code on a busier machine, reference solve 1.6 s;
  the same numbers to the digits shown).  J(u*) = 2.188 +- 0.026, J(0) = 2.546 +- 0.030, L2(0) = 0.67.
    am                 it 500: L2 0.647, J 2.533 +- 0.030, L2 1e-2 not reached, train 54 s
    discrete_adjoint   it 500: L2 0.647, J 2.534 +- 0.030, L2 1e-2 not reached, train 59 s
    continuous_adjoint it 500: L2 0.646, J 2.533 +- 0.030, L2 1e-2 not reached, train 72 s
  No method gets far: the adjoint targets are noise-dominated here (per-path target variance ~32 vs the
  signal E int |u*|^2 = 0.67; docs/soc.md).

Self-contained (no imports from ``configs``): the configs are installed as package data.
"""
import ml_collections

VARIANTS = ("linear_ou", "quadratic_easy", "quadratic_hard", "double_well")

# What differs between the benchmarks; every other field is shared (get_config).
_OVERRIDES = {
    "linear_ou": dict(num_iterations=600, learning_rate=0.001, time_scale=0.01, eval_every=50),
    "quadratic_easy": dict(num_iterations=1500, learning_rate=0.003, time_scale=0.01, eval_every=100),
    "quadratic_hard": dict(num_iterations=1500, learning_rate=0.003, time_scale=0.01, eval_every=100),
    "double_well": dict(num_iterations=500, learning_rate=0.003, time_scale=1.0, eval_every=50),
}


def _variant(arg) -> str:
  """The problem named by ``arg``: ``NAME`` or ``problem=NAME`` (one-line ValueError otherwise)."""
  text = (arg or "").strip()
  if text.startswith("problem="):
    text = text[len("problem="):]
  if text not in VARIANTS:
    raise ValueError(f"configs/soc.py needs a problem: --config=configs/soc.py:NAME with NAME one of "
                     f"{', '.join(VARIANTS)} (got {arg!r}).")
  return text


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.problem = _variant(arg)
  c.methods = ("am", "discrete_adjoint", "continuous_adjoint")  # names of the method registry (soc.METHODS)
  c.num_iterations = 0              # per problem (_OVERRIDES)
  c.batch_size = 64
  c.learning_rate = 0.0             # per problem
  c.lr_schedule = "cosine"          # 'cosine': decay to lr_final_fraction * learning_rate; or 'constant'
  c.lr_final_fraction = 0.01
  c.grad_clip = 0.0                 # 0: no gradient clipping
  c.hidden = (256, 128, 64)         # MLP widths of the control net u(x, t)
  c.time_scale = 1.0                # the net sees time_scale * t (soc_training.init_control); per problem
  c.seed = 0                        # network init and training noise
  c.eval_seed = 12345               # fixed evaluation paths (common random numbers)
  c.eval_every = 50                 # per problem
  c.eval_batch_size = 1024
  c.l2_target = 1e-2                # report the first iteration / training time with L2 error <= this
  c.time_budget_s = 0.0             # 0: no per-method training-time cap
  c.update(_OVERRIDES[c.problem])
  return c
