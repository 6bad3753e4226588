"""The sweep's comparison of the two classifier-free-guidance modes (issue 13 item 6) and its log reader; no training.

The full comparison ran on a GPU (``am-jax sweep --config=mnist_sweep.py:size=full,reward=thickness,guidance=2``,
docs/results/mnist_sweep_guidance_h200*); here: the settings, the checks, the problems each mode trains and samples,
and the table, on the shipped bases' configs (nothing is trained).
"""
import jax
import numpy as np
import pytest

from am_jax import launch, parameterisation, sweep
from am_jax.errors import ConfigError


def test_guidance_variant_compares_both_modes_with_am_lora():
  cfg = launch.load_config("mnist_sweep.py:reward=thickness,guidance=2")
  sweep.validate(cfg)
  assert cfg.finetune.guidance == 2.0 and sweep.guidance_modes(cfg) == ("base", "sampling")
  got = sweep.settings(cfg)
  assert [(s.method, s.param, s.guidance) for s in got] == [("am", "lora", "base")] * 2 + [("am", "lora", "sampling")] * 2
  assert got[0].label == "am/lora cfg-base λ=1"
  # Without guidance nothing changes: one mode '' and the old labels.
  plain = launch.load_config("mnist_sweep.py")
  assert sweep.guidance_modes(plain) == ("",) and sweep.settings(plain)[0].label == "am/lora λ=1"


def test_guidance_config_errors_name_the_field():
  with pytest.raises(ValueError, match="guidance needs class-conditional"):
    launch.load_config("mnist_sweep.py:guidance=2")  # the class reward samples the null label
  with pytest.raises(ValueError, match="guidance must be a number"):
    launch.load_config("mnist_sweep.py:reward=thickness,guidance=lots")
  cfg = launch.load_config("mnist_sweep.py:reward=thickness,guidance=2")
  cfg.sweep.guidance_modes = ("base", "sideways")
  with pytest.raises(ConfigError, match="sweep.guidance_modes"):
    sweep.validate(cfg)


def test_each_mode_trains_and_samples_its_own_velocity(tiny_sweep_problems):
  problems, reference = tiny_sweep_problems
  base_mode, sampling_mode = problems[("lora", "base")], problems[("lora", "sampling")]
  # 'sampling': the conditional base is tilted; guidance w is applied when sampling.
  assert sampling_mode is reference and reference.sample_guidance == 2.0
  assert sampling_mode.base_apply is reference.base_apply
  # 'base': the GUIDED base is tilted; the fine-tuned network is sampled without guidance.
  assert base_mode.sample_guidance == 1.0
  x = np.zeros((1, 28, 28, 1), np.float32) + 0.1
  t, labels = np.full((1,), 0.5, np.float32), np.array([3], np.int32)
  guided = parameterisation.guided(reference.base_apply, 2.0, reference.null_label)
  # One compiled program for both (eager NNX calls compile op by op: ~4x slower here).
  got, want = jax.jit(lambda p: (base_mode.base_apply(p, x, t, labels), guided(p, x, t, labels)))(
      reference.base_params)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  evals = sweep._eval_problems(problems, reference)
  assert evals["sampling"] is reference and evals["base"].sample_guidance == 1.0
  assert evals["base"].base_apply is reference.base_apply  # the plain network: merged weights, no guidance


@pytest.fixture(scope="module")
def tiny_sweep_problems():
  cfg = launch.load_config("mnist_sweep.py:reward=thickness,guidance=2")
  return sweep._problems(cfg)


LOG = """\
[sweep] base: reward 2.638  gold 2.785  diversity 5.46  fd 7.384  blank_fraction 0.8118
[sweep] 2 settings x 2 seeds, 200 steps of batch 32 (seeds vmapped; 6 compile thread(s))
[sweep 1/2] am/lora cfg-base λ=4: compiled in 56.7 s (+3.9 s tracing)
[sweep 1/2] am/lora cfg-base λ=4 seed 0: 200 steps, 145.6 ms/step  train_reward 2.8  reward 2.9  gold 3.1  diversity 5.7  fd 7.3
[sweep 1/2] am/lora cfg-base λ=4 seed 1: 200 steps, 145.6 ms/step  train_reward 3.0  reward 3.1  gold 3.3  diversity 5.9  fd 7.1
[sweep 2/2] refl/lora λ=4 seed 0: 200 steps, 67.7 ms/step  train_reward 16.02  reward 15.11  gold 0  diversity 0.08  fd 308.7  hacking flagged
[sweep 2/2] refl/lora λ=4 seed 1: 200 steps, 67.7 ms/step  train_reward 12.1  reward 9.5  gold 0  diversity 0.1  fd 308.5  DIVERGED
"""


def test_rows_from_log_and_summary(tmp_path):
  base, rows = sweep.rows_from_log(LOG)
  assert base == {"reward": 2.638, "gold": 2.785, "diversity": 5.46, "fd": 7.384, "blank_fraction": 0.8118}
  assert len(rows) == 4 and rows[0]["guidance"] == "base" and "guidance" not in rows[2]
  assert rows[1] == {"method": "am", "param": "lora", "lam": 4.0, "seed": 1, "steps": 200, "ms_per_step": 145.6,
                     "diverged": False, "guidance": "base", "train_reward": 3.0, "reward": 3.1, "gold": 3.3,
                     "diversity": 5.9, "fd": 7.1}
  assert rows[2]["hacking_detected"] is True and rows[3]["diverged"] is True
  log = tmp_path / "sweep.log"
  log.write_text(LOG)
  table = sweep.summarise_log(str(log), str(tmp_path / "out"), gold="thickness")
  row = next(line for line in table.splitlines() if line.startswith("| am | lora | base | 4 |"))
  assert "3.200 ± 1.271" in row  # gold: mean 3.2, half-width t_{0.975,1} * 0.1414 / sqrt(2) = 1.2706
  assert (tmp_path / "out" / "sweep.png").exists() and (tmp_path / "out" / "sweep.json").exists()
  with pytest.raises(ValueError, match="not the log"):
    sweep.rows_from_log("nothing here")
