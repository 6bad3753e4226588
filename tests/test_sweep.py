"""The sweep's statistics, Pareto front, writers and config checks (``am_jax.sweep``); no training (fast).

The sweep itself runs in ``am-jax sweep --config=mnist_sweep`` (tiny, ~4 min on 2 CPU cores) and on a GPU
(``size=full``); those numbers are in the report, not re-run here.
"""
import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from am_jax import launch, sweep
from am_jax.errors import ConfigError


# ------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("values, confidence", [([1.0, 2.0, 3.0, 4.0], 0.95), ([0.3, -1.2, 5.5], 0.95),
                                                ([2.0, 2.5], 0.9)])
def test_t_interval_matches_scipy(values, confidence):
  got = sweep.t_interval(values, confidence)
  v = np.asarray(values)
  lo, hi = stats.t.interval(confidence, df=len(v) - 1, loc=v.mean(), scale=stats.sem(v))
  assert got["n"] == len(v) and got["dropped"] == 0
  assert got["mean"] == pytest.approx(v.mean(), rel=1e-12)
  assert got["half"] == pytest.approx((hi - lo) / 2, rel=1e-12)


def test_t_interval_known_numbers_and_diverged_runs():
  # mean 2.5, s = sqrt(5/3), t_{0.975, 3} = 3.18245: half = 3.18245 * 1.29099 / 2 = 2.05426.
  assert sweep.t_interval([1.0, 2.0, 3.0, 4.0])["half"] == pytest.approx(2.05426, abs=1e-5)
  # A diverged seed (NaN / None) is left out and counted; one finite value has no interval.
  got = sweep.t_interval([1.0, float("nan"), 3.0, None])
  assert (got["mean"], got["n"], got["dropped"]) == (2.0, 2, 2)
  assert got["half"] == pytest.approx(stats.t.ppf(0.975, 1) * np.std([1.0, 3.0], ddof=1) / math.sqrt(2))
  assert sweep.t_interval([5.0]) == {"mean": 5.0, "half": None, "n": 1, "dropped": 0}
  assert sweep.t_interval([float("inf")])["mean"] is None


def _rows():
  rows = []
  for method, param, lam, rewards in (("am", "lora", 1.0, [-1.0, -2.0, -3.0]), ("am", "full", 1.0, [-2.0, -2.0, -2.5]),
                                      ("refl", "lora", 1.0, [0.0, -0.1, float("nan")])):
    for seed, r in enumerate(rewards):
      rows.append({"method": method, "param": param, "lam": lam, "seed": seed, "reward": r, "gold": r / 2,
                   "diversity": 10.0 + seed if method == "am" else 3.0, "gold_accuracy": 0.9,
                   "ms_per_step": 80.0, "hacking_detected": method == "refl" and seed == 0})
  return rows


def test_aggregate_groups_seeds_and_counts_monitor_flags():
  agg = sweep.aggregate(_rows())
  assert [(a["method"], a["param"]) for a in agg] == [("am", "lora"), ("am", "full"), ("refl", "lora")]
  am = agg[0]
  assert am["seeds"] == [0, 1, 2] and am["reward"]["mean"] == pytest.approx(-2.0)
  assert am["reward"]["half"] == pytest.approx(stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3))
  assert "fd" not in am  # only metrics the runs have
  refl = agg[2]
  assert refl["reward"]["n"] == 2 and refl["reward"]["dropped"] == 1 and refl["hacking_flagged"] == 1


# ------------------------------------------------------------------------------------------- Pareto front


def test_pareto_front_maximises_both_and_skips_non_finite():
  xs = [1.0, 2.0, 3.0, 2.0, 0.5, float("nan"), 3.0]
  ys = [5.0, 4.0, 1.0, 3.0, 5.0, 9.0, 1.0]
  # (2, 3) is dominated by (2, 4); (0.5, 5) by (1, 5); the NaN point is never on it; of the two (3, 1) the first.
  assert sweep.pareto_front(xs, ys) == [0, 1, 2]
  assert sweep.pareto_front([1.0], [None]) == []
  assert sweep.pareto_front([1.0, 1.0], [1.0, 2.0]) == [1]


def test_mark_pareto_includes_the_base():
  agg = sweep.aggregate(_rows())
  base = {"reward": -19.0, "gold": -9.0, "diversity": 17.0}
  sweep.mark_pareto(agg, base)
  # base: most diverse; refl: highest reward; am/lora (diversity 11, reward -2) beats am/full (10, -2.17).
  assert base["pareto"] == ["reward", "gold"]
  assert [a["pareto"] for a in agg] == [["reward", "gold"], [], ["reward", "gold"]]


# ------------------------------------------------------------------------------------------- writers


def _saved():
  agg = sweep.aggregate(_rows())
  base = {"reward": -19.0, "gold": -9.0, "diversity": 17.0, "gold_accuracy": 0.12, "blank_fraction": 0.8}
  sweep.mark_pareto(agg, base)
  refs = {"real held-out 3s": {"reward": -0.01, "gold": -0.02, "diversity": 9.0, "gold_accuracy": 0.99}}
  meta = {"config": "test", "steps": 3, "batch_size": 4, "seeds": [0, 1, 2], "confidence": 0.95, "gold": "class",
          "num_steps": 6, "eval_samples": 8, "eval_steps": 6, "machine": "cpu", "date": "today"}
  return {"meta": meta, "base": base, "references": refs, "runs": _rows(), "settings": agg}


def test_markdown_table_rows_and_intervals():
  md = sweep.markdown(_saved())
  lines = md.splitlines()
  assert lines[0].startswith("| method | param | λ | reward (eval) | gold reward | gold acc. | diversity |")
  assert lines[0].endswith("| hacking flagged | Pareto |")
  assert lines[2].startswith("| base | - | - | -19.000 | -9.000 | 0.120 | 17.00 |")
  assert lines[3].startswith("| real held-out 3s | - | - | -0.010 |")
  half = stats.t.ppf(0.975, 2) / math.sqrt(3)
  assert f"| am | lora | 1 | -2.000 ± {half:.3f} |" in md
  assert "(1 diverged)" in md and "| 1/3 | reward, gold |" in md
  assert "mean ± 95% Student-t half-width over seeds [0, 1, 2]" in md


def test_write_and_replot(tmp_path):
  saved = _saved()
  x = np.full((4, 28, 28, 1), -1.0, np.float32)
  md = sweep.write(saved, str(tmp_path), [("base", x), ("am/lora λ=1", x)])
  for name in ("sweep.json", "sweep.md", "sweep.png", "grid.png"):
    assert os.path.getsize(tmp_path / name) > 0, name
  with open(tmp_path / "sweep.json") as f:
    loaded = json.load(f)  # strict JSON: the NaN reward of refl became null
  assert loaded["runs"][8]["reward"] is None
  (tmp_path / "sweep.md").unlink()
  assert sweep.replot(str(tmp_path)) == md


def test_blank_fraction():
  x = np.full((2, 4, 4, 1), -1.0)
  x[0, :2] = 1.0  # half the first image is ink
  x[1] = -0.5  # grey fog: no pixel blank
  assert sweep.blank_fraction(x) == pytest.approx(0.25)


# ------------------------------------------------------------------------------------------- config


def _cfg(arg=""):
  return launch.load_config(f"mnist_sweep.py:{arg}" if arg else "mnist_sweep")


def test_settings_grid_and_variants():
  cfg = _cfg()
  s = sweep.settings(cfg)
  # am with lora and full, eam, draft, refl (lora): 5 programs per lambda.
  assert len(s) == 5 * len(cfg.sweep.lambdas)
  assert [x.label for x in s[:3]] == ["am/lora λ=1", "am/lora λ=4", "am/full λ=1"]
  full = _cfg("size=full")
  assert len(full.sweep.lambdas) >= 4 and len(full.sweep.seeds) == 3 and full.model.kind == "unet"
  assert _cfg("reward=thickness").reward.name == "thickness"
  with pytest.raises(ValueError, match="size must be one of"):
    _cfg("size=huge")


@pytest.mark.parametrize("field, value, message", [
    ("sweep.methods", ("am", "dpo"), "config.sweep.methods = .*distinct method names"),
    ("sweep.lambdas", (), "config.sweep.lambdas = \\(\\): must be a non-empty tuple"),
    ("sweep.lambdas", (1.0, -2.0), "config.sweep.lambdas = .*lambdas > 0"),
    ("sweep.seeds", (0, 0), "config.sweep.seeds = .*distinct integer seeds"),
    ("sweep.am_params", ("lora", "control"), "config.sweep.am_params = .*parameterisations"),
    ("finetune.parameterisation", "control", "config.finetune.parameterisation = 'control'"),
    ("sweep.options.eam", "score_tim=0.9", "config.sweep.options.eam: .*no option 'score_tim'.*score_time"),
    ("sweep.learning_rates.full", 0.0, "config.sweep.learning_rates.full = 0.0"),
    ("sweep.grid_samples", 10_000, "config.sweep.grid_samples = 10000: must be an integer in \\[0, sweep.eval"),
    ("sweep.confidence", 1.0, "config.sweep.confidence = 1.0: must be in \\(0, 1\\)"),
    ("mesh.num_devices", 8, "config.mesh.num_devices = 8: must be 1"),
    ("finetune.guidance", 2.0, "config.finetune.guidance = 2: guidance needs class-conditional samples"),
    ("finetune.batch_size", 0, "config.finetune.batch_size = 0: must be a positive integer"),
])
def test_validate_names_the_field(field, value, message):
  cfg = _cfg()
  node = cfg
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  with cfg.unlocked():
    node[leaf] = value
  with pytest.raises(ConfigError, match=message) as e:
    sweep.validate(cfg)
  assert "\n" not in str(e.value)


def test_validate_accepts_the_packaged_variants():
  """Each packaged variant passes the checks (``validate`` returns None, raises nothing) with its own settings, and
  the same config with one field broken does not (so the checks did read the variant)."""
  variants = {"": ("transformer", "target_class", 5), "size=full": ("unet", "target_class", 5),
              "reward=combo": ("transformer", "weighted", 5),
              "size=full,arch=dit,reward=thickness": ("transformer", "thickness", 5),
              "size=full,reward=thickness,guidance=2": ("unet", "thickness", 2)}
  for arg, (kind, reward, programs_per_lambda) in variants.items():
    cfg = _cfg(arg)
    assert sweep.validate(cfg) is None, arg
    assert (cfg.model.kind, cfg.reward.name) == (kind, reward), arg
    assert len(sweep.settings(cfg)) == programs_per_lambda * len(cfg.sweep.lambdas), arg
    with cfg.unlocked():
      cfg.sweep.seeds = ()
    with pytest.raises(ConfigError, match="config.sweep.seeds"):
      sweep.validate(cfg)
