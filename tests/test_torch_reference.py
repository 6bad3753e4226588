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


def test_torch_reference_matches_am_jax_with_the_loss_in_chunks():
  # The benchmark's am_jax step evaluates the loss in chunks of loss time steps (--chunk_loss): same step as torch's.
  torch_checks.assert_same_step(torch_reference.check_against_jax("mlp_d16", **SMALL, chunk_loss=3), loss_rtol=2e-4,
                                grad_atol=1e-4, lr=torch_reference.LEARNING_RATE)


def test_torch_runs_per_device_and_their_table():
  # CPU: one torch run per thread count; a GPU: one run, its CPU threads left alone (benchmarks/device_check.sh).
  assert torch_reference.torch_settings((1, 2), "cpu") == {"1t": 1, "2t": 2}
  assert torch_reference.torch_settings((1, 2), "cuda") == {"cuda": None}
  summary = {"median": 0.5, "min": 0.4, "max": 0.6, "per_round": [0.5]}
  row = {"workload": "toy1d", "num_loss_steps": 20, "step_s": {"am_jax": 0.01, "torch_cuda": 0.02},
         "cpu_s": {"am_jax": 0.01, "torch_cuda": 0.02}, "jax_over_torch_cuda": summary,
         "cpu_jax_over_torch_cuda": summary}
  out = {"machine": {"date": "d", "machine": "m", "jax": "j"}, "torch": "t", "threads": ["cuda"], "rounds": 1,
         "iters": 1, "rows": [row], "jax_device": "NVIDIA H100", "torch_device": "NVIDIA H100"}
  md = torch_reference.reference_markdown(out)
  assert "am_jax on NVIDIA H100, torch on NVIDIA H100" in md and "| toy1d | 20 | 10.0 / 10.0 | 20.0 / 20.0 | 0.500" in md
  # Files written before the device option list thread counts: still rendered.
  old = dict(out, threads=[1], rows=[{**row, "step_s": {"am_jax": 0.01, "torch_1t": 0.02},
                                      "cpu_s": {"am_jax": 0.01, "torch_1t": 0.02}, "jax_over_torch_1t": summary,
                                      "cpu_jax_over_torch_1t": summary}])
  assert "torch 1t ms" in torch_reference.reference_markdown(old)
  # With the loss in chunks, the one-call step's table follows.
  chunked = dict(out, chunk_loss=4, rows=[{**row, "step_s": {**row["step_s"], "am_jax_one_call": 0.015},
                                           "one_call_over_step": summary, "one_call_over_torch_cuda": summary}])
  md = torch_reference.reference_markdown(chunked)
  assert "chunks of 4 time steps" in md and "| toy1d | 20 | 15.0 | 0.500 (0.400-0.600) | 0.500 (0.400-0.600) |" in md
