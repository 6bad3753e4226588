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

quadratic_hard -- Quadratic OU, hard (d = 20): A = I, P = I, Q = 0.5 I, sigma = I, x0 = 0.5 N(0, I) fixed.
Since issue 16: K = 100 (num_steps; the K = 50 Euler discrete optimum is 0.030 from u*, the K = 100 one 0.0076:
soc.lq_discrete_optimum) and the grad_g control net.  AM only, 3 seeds, about 10 min per seed on the loaded
2-core CPU (2026-11-26; 0.37 s/iteration at load ~13):

    python -m experiments.soc --config=configs/soc.py:quadratic_hard --workdir=runs/soc_quadratic_hard \
        --config.methods='("am",)' --config.num_seeds=3

  Measured: L2 at it 1500 = 0.0106 +- 0.0012 (std over seeds 0-2; min 0.0099, max 0.0120), J 29.445 (J(u*) =
  29.450 +- 0.173 on the same paths, J(0) = 98.07).  Before issue 16 (K = 50, plain MLP): AM 0.205, discrete
  adjoint 0.159, continuous adjoint 0.140 (seed 0).

double_well -- Double well (d = 10, K = 200): b = -grad Psi, kappa = 5 (i < 3) / 1, g = sum nu_i (x_i^2 - 1)^2,
nu = 3 / 1, x0 = 0.  Since issue 16: grad_g control net, log(time-to-go) time input, AM with the TD(0.9) lean
adjoint (soc.bootstrapped_adjoint), lr 1e-2, 1000 iterations.  All three methods, seed 0: 40 min on the loaded
2-core CPU (2026-11-26, load ~12; 0.67 / 0.76 / 0.83 s per iteration):

    python -m experiments.soc --config=configs/soc.py:double_well --workdir=runs/soc_double_well

  Measured: J(u*) = 2.188 +- 0.026, J(0) = 2.546 +- 0.030, L2(0) = 0.670.
    am                 it 1000: L2 0.0151 +- 0.0005, J 2.194, L2 < 0.1 from it 300
    discrete_adjoint   it 1000: L2 0.0642 +- 0.0009, J 2.220 (same net; no TD for the baselines)
    continuous_adjoint it 1000: L2 0.0553 +- 0.0009, J 2.217
  AM with 3 seeds (add --config.methods='("am",)' --config.num_seeds=3; 22 min): L2 at it 1000 =
  0.0152 +- 0.0001 (min 0.0151, max 0.0153), below 0.1 from it 400 for every seed (docs/soc.md, issue 16).
  Before issue 16 (plain MLP, lr 3e-3, 500 iterations) every method stayed at 0.65: the AM target was
  noise-dominated and the plain net slow to represent the control that lives in the last ~5 % of [0, T].

Equal architecture (issue 16 item 3): ``--config=configs/soc.py:NAME,net=socm`` swaps in the SOC-matching
authors' control network (``am_jax.soc_networks.SOCMatchingUNet``: grad V from raw (t, x), u = -sigma^T grad V,
PyTorch-default init), their optimiser (Adam 1e-4 constant, eps 1e-4) and their batch / K (linear OU 64 / 100,
quadratic 128 / 50, double well 128 / 200), 2000 iterations (the issue's comparison point; their README runs
60000-80000).  ``NAME,net=socm,opt=amjax`` keeps their net, init, batch and K but the problem's shipped
optimiser (e.g. linear OU: Adam 1e-3, cosine to 1 %).  Loss, adjoint and evaluation stay am_jax's.  Linear OU,
AM, seed 0, 2-core shared CPU at load ~14 (2026-11-26, docs/soc.md):

    python -m experiments.soc --config=configs/soc.py:linear_ou,net=socm --config.methods='("am",)' \
        --workdir=runs/eqarch/lou_socm

  Measured 0.0082 at it 2000 (below the 0.015 of SOC matching's own code quoted in issue 16; 0.85 s/it at
  load 14-19); with ``net=socm,opt=amjax`` and --config.num_iterations=600: 0.0081 at it 600 (docs/soc.md).

Self-contained (no imports from ``configs``): the configs are installed as package data.
"""
import ml_collections

VARIANTS = ("linear_ou", "quadratic_easy", "quadratic_hard", "double_well")

# What differs between the benchmarks; every other field is shared (get_config).
_OVERRIDES = {
    "linear_ou": dict(num_iterations=600, learning_rate=0.001, time_scale=0.01, eval_every=50),
    "quadratic_easy": dict(num_iterations=1500, learning_rate=0.003, time_scale=0.01, eval_every=100),
    "quadratic_hard": dict(num_iterations=1500, learning_rate=0.003, time_scale=0.01, eval_every=100,
                           num_steps=100, control_net="grad_g"),
    "double_well": dict(num_iterations=1000, learning_rate=0.01, time_scale=1.0, eval_every=100,
                        control_net="grad_g", time_feature="log_time_to_go", td_lambda=0.9),
}


# net=socm: the SOC-matching authors' control network, init and optimiser (their public code, facts in
# am_jax/soc_networks.py) with their per-problem batch and K; everything else (problem, loss, evaluation) is
# am_jax's.  2000 iterations: the comparison point of issue 16 (their README runs 60000-80000).
_SOCM_COMMON = dict(control_net="socm", hidden=(256, 128, 64), time_feature="linear", time_scale=1.0,
                    init_scale=1.0, learning_rate=1e-4, lr_schedule="constant", adam_eps=1e-4, grad_clip=0.0,
                    td_lambda=1.0, num_iterations=2000, eval_every=200)
_SOCM = {
    "linear_ou": dict(batch_size=64, num_steps=100),
    "quadratic_easy": dict(batch_size=128, num_steps=50),
    "quadratic_hard": dict(batch_size=128, num_steps=50),
    "double_well": dict(batch_size=128, num_steps=200),
}
# Options after the problem name (``NAME,key=value,...``) and their values; the first value is the default.
OPTIONS = {"net": ("default", "socm"),    # socm: the SOC-matching net, init, optimiser, batch and K (_SOCM)
           "opt": ("socm", "amjax")}      # with net=socm: amjax keeps the problem's shipped optimiser instead
_OPTIMISER_FIELDS = ("learning_rate", "lr_schedule", "lr_final_fraction", "adam_eps", "grad_clip")


def _parse(arg):
  """``NAME[,net=NET][,opt=OPT]`` (or ``problem=NAME,...``) -> (problem, options); one-line ValueError otherwise."""
  parts = [p.strip() for p in (arg or "").split(",")]
  problem, options = parts[0], {k: v[0] for k, v in OPTIONS.items()}
  if problem.startswith("problem="):
    problem = problem[len("problem="):]
  if problem not in VARIANTS:
    raise ValueError(f"configs/soc.py needs a problem: --config=configs/soc.py:NAME with NAME one of "
                     f"{', '.join(VARIANTS)} (got {arg!r}).")
  for part in parts[1:]:
    key, _, value = part.partition("=")
    if value not in OPTIONS.get(key, ()):
      raise ValueError(f"configs/soc.py:{arg}: unknown option {part!r}; expected "
                       + "; ".join(f"{k}=" + "|".join(v) for k, v in OPTIONS.items()) + ".")
    options[key] = value
  if options["opt"] != "socm" and options["net"] != "socm":
    raise ValueError(f"configs/soc.py:{arg}: opt= only applies with net=socm.")
  return problem, options


def get_config(arg=None):
  problem, options = _parse(arg)
  c = ml_collections.ConfigDict()
  c.problem = problem
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
  c.num_steps = 0                   # K of the Euler grid; 0: the problem's default (50 / 100 / 200)
  c.control_net = "mlp"             # 'mlp' (models.MLP on (x, t)) or 'grad_g' (soc_training.GradGControl)
  c.time_feature = "linear"         # the net's time input: 'linear' (time_scale t) or 'log_time_to_go'
  c.td_lambda = 1.0                 # AM only: 1 = lean adjoint; < 1 = soc.bootstrapped_adjoint (TD(lambda))
  c.num_seeds = 1                   # seeds seed, seed + 1, ...: mean / std / min / max across them
  c.adam_eps = 1e-8                 # Adam's epsilon (optax default; SOC matching uses 1e-4)
  c.init_scale = 1.0                # control_net='socm' only: scale of the PyTorch-default initialisation
  c.ema_decay = 0.0                 # > 0: evaluate an exponential moving average of the params (0: off)
  # AM only: the loss at most 10 time steps (x B rows) at a time (the largest divisor of K not above 10), the
  # gradient accumulated chunk by chunk (soc.am_loss): the same loss and gradient, 1.4-1.6x faster steps on 2 CPU
  # cores (docs/soc.md).  0: one call at all K B rows, which reproduces runs made before 2026-11-27 bit for bit.
  c.chunk_loss = 10
  # Devices the batch of paths (training and evaluation) is sharded over: 1 = one device, no sharding (the programs
  # of the runs above); -1 = all; batch_size and eval_batch_size must divide by it.  On a CPU, N XLA host devices
  # (XLA_FLAGS=--xla_force_host_platform_device_count=N, one per core) run the sequential rollout on every core:
  # 1.05-1.23x faster steps on 2 cores at net=socm (docs/soc.md, "Two host devices").
  c.num_devices = 1
  c.update(_OVERRIDES[c.problem])
  if options["net"] == "socm":
    shipped = {f: c[f] for f in _OPTIMISER_FIELDS}
    c.update(_SOCM_COMMON, **_SOCM[c.problem])
    if options["opt"] == "amjax":  # their net, init, batch and K; the problem's shipped optimiser
      c.update(shipped)
  return c
