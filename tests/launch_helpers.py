"""Small configs and process helpers shared by the training-system tests."""
import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """configs/gmm2d.py shrunk so a whole pre-train + fine-tune + eval takes seconds."""
  sys.path.insert(0, REPO)
  from configs import gmm2d
  c = gmm2d.get_config()
  c.data.num_samples = 4000
  c.model.hidden = (32, 32)
  c.pretrain.steps = 60
  c.pretrain.batch_size = 64
  c.pretrain.log_every = 30
  c.pretrain.checkpoint.every_steps = 30
  c.am.num_steps = 8
  c.am.num_random_timesteps = 2
  c.am.num_last_timesteps = 2
  c.finetune.steps = 12
  c.finetune.batch_size = 32
  c.finetune.hidden = (16,)
  c.finetune.log_every = 4
  c.finetune.ema_decay = 0.9
  c.checkpoint.every_steps = 5
  c.eval.num_samples = 512
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def tiny_mnist_config(arg: str, method: str, lam: float, steps: int, window: int = 4, margin: float = 0.5):
  """``mnist.py:arch=dit,<arg>,param=lora`` shrunk (the SHIPPED DiT base, LoRA, 6-step grid, batch 8, lr 3e-3) with
  the gold rewards watched on 16 fixed samples every step by a monitor of ``window`` evaluations and ``margin``;
  16 evaluation samples at the end (tests/integration/test_mnist_monitor.py, test_mnist_pipeline.py)."""
  from am_jax import launch
  cfg = launch.load_config(f"mnist.py:arch=dit,{arg},param=lora")
  cfg.mesh.num_devices = 1
  cfg.method.name = method
  cfg.am.reward_multiplier = lam
  cfg.am.num_steps = cfg.eval.num_steps = 6
  cfg.finetune.steps, cfg.finetune.batch_size, cfg.finetune.log_every = steps, 8, 1
  cfg.finetune.optimizer.learning_rate, cfg.finetune.optimizer.warmup_steps = 3e-3, 0
  cfg.eval.every, cfg.eval.watch_samples, cfg.eval.num_samples = 1, 16, 16
  cfg.eval.monitor.window, cfg.eval.monitor.margin, cfg.eval.monitor.min_rise = window, margin, 0.0
  cfg.checkpoint.async_save = False
  return cfg


# The 2-process test's job: pre-training and fine-tuning cut to a few steps (each process pays its own JAX start-up
# and compilations; the numbers, not the quality, are compared: no end-of-run evaluation, ``eval.at_end``).
DISTRIBUTED_OVERRIDES = {"pretrain.steps": 4, "pretrain.log_every": 2, "pretrain.checkpoint.every_steps": 2,
                         "finetune.steps": 6, "finetune.log_every": 3, "checkpoint.every_steps": 3,
                         "eval.at_end": False}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(num_devices: int, plain: bool = False):
  """This process's environment for a child with ``num_devices`` forced CPU devices (and the suite's
  ``JAX_DISABLE_MOST_OPTIMIZATIONS``, tests/conftest.py, so that a run continued in-process computes what the child
  would have); ``plain=True``: XLA's default optimisation, as the golden numbers were captured."""
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  if not plain:  # the suite's compile-time flags (tests/conftest.py)
    e["XLA_FLAGS"] += "".join(" " + f for f in os.environ.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
  if plain:
    e.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
  return e


def json_from_fresh_python(code: str, timeout: int = 600):
  """Runs ``code`` in a fresh Python with one CPU device at XLA's default optimisation (``env(1, plain=True)``) and
  returns the JSON it prints on its last line: numbers as users (and the benchmarks) compute them, not at the
  suite's reduced optimisation."""
  proc = subprocess.run([sys.executable, "-c", code], env=env(1, plain=True), cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def python(args, num_devices: int, stdout_file=None, **kw):
  """Starts ``python args`` with forced CPU devices; output to pipes, or both streams to ``stdout_file``."""
  if stdout_file is not None:
    return subprocess.Popen([sys.executable] + list(args), env=env(num_devices), cwd=REPO, stdout=stdout_file,
                            stderr=subprocess.STDOUT, text=True, **kw)
  return subprocess.Popen([sys.executable] + list(args), env=env(num_devices), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)
