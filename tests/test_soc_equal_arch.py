"""Tests of the equal-architecture SOC variant (configs/soc.py:<problem>,net=socm; am_jax/soc_networks.py) and of
the SOC table writer (benchmarks/soc_tables.py)."""
import copy
import csv
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from am_jax import launch, models, sampling, soc, soc_networks, soc_training


def _load_config(arg):
  return launch.load_config(f"soc.py:{arg}")


def test_socm_net_shapes_and_init():
  """SOC matching's FullyConnectedUNet at d = 10, widths (256, 128, 64): 170,562 parameters (hand count of the
  nine nn.Linear layers); PyTorch-default uniform init bounded by scale / sqrt(fan_in); output (B, d); the skip
  branch of (t, x) carries the sign (the last up layer ends in a ReLU)."""
  abstract = nnx.eval_shape(lambda: soc_networks.SOCMatchingUNet(10, (256, 128, 64), rngs=nnx.Rngs(0)))
  assert soc_networks.param_count(nnx.split(abstract)[1]) == 170_562
  for scale in (1.0, 0.1):
    net = soc_networks.SOCMatchingUNet(10, (32, 16), scale, rngs=nnx.Rngs(0))
    for layer in list(net.down) + list(net.skip) + list(net.up):
      bound = scale / math.sqrt(layer.kernel.shape[0])
      assert float(jnp.max(jnp.abs(layer.bias[...]))) <= bound
      w = np.abs(np.asarray(layer.kernel[...]))
      assert w.max() <= bound and w.max() > 0.9 * bound  # uniform on the whole interval, not a narrower law
  apply_fn, params = models.functional(net)
  apply_fn = jax.jit(apply_fn)
  x = sampling.standard_normal(jax.random.PRNGKey(1), (7, 10))
  t = jnp.linspace(0.0, 1.0, 7)
  out = apply_fn(params, x, t)
  assert out.shape == (7, 10) and bool(jnp.all(jnp.isfinite(out)))
  # With the skip layer S_0 zeroed the output is a ReLU: non-negative.
  params["skip"][0]["kernel"][...] = jnp.zeros((11, 10))
  params["skip"][0]["bias"][...] = jnp.zeros(10)
  assert float(jnp.min(apply_fn(params, x, t))) >= 0.0


def test_socm_control_is_minus_sigma_transpose_grad_v():
  """init_control(control_net='socm'): u(x, t) = -sigma^T net(t, x) with raw t (Linear OU: non-symmetric sigma)."""
  p = soc.linear_ou(num_steps=10)
  apply_fn, params = soc_training.init_control(p, (16, 8), 3, 1.0, control_net="socm", init_scale=1.0)
  net_apply, params2 = models.functional(soc_networks.SOCMatchingUNet(p.dim, (16, 8), rngs=nnx.Rngs(3)))
  x = sampling.standard_normal(jax.random.PRNGKey(2), (5, p.dim))
  t = jnp.array([0.0, 0.1, 0.5, 0.9, 1.0])
  expected = -jax.jit(net_apply)(params2, x, t) @ p.info["sigma"]  # rows: (sigma^T v)^T = v^T sigma
  np.testing.assert_allclose(jax.jit(apply_fn)(params, x, t), expected, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(expected))) > 1e-2  # not zero-initialised, unlike am_jax's nets


def test_socm_variants_build():
  """configs/soc.py:<problem>,net=socm: their net, init, optimiser, batch and K for every problem; validates."""
  expected = {"linear_ou": (64, 100), "quadratic_easy": (128, 50), "quadratic_hard": (128, 50),
              "double_well": (128, 200)}
  for name, (batch, k) in expected.items():
    for arg in (f"{name},net=socm", f"problem={name}, net=socm"):
      cfg = _load_config(arg)
      soc_training.validate_config(cfg)
      assert (cfg.problem, cfg.batch_size, cfg.num_steps, cfg.control_net) == (name, batch, k, "socm")
      assert (cfg.learning_rate, cfg.lr_schedule, cfg.adam_eps, cfg.init_scale) == (1e-4, "constant", 1e-4, 1.0)
      assert tuple(cfg.hidden) == (256, 128, 64) and cfg.time_feature == "linear" and cfg.time_scale == 1.0
      assert cfg.td_lambda == 1.0 and cfg.num_iterations == 2000
    default = _load_config(f"{name},net=default")
    assert default.control_net != "socm" and default.adam_eps == 1e-8 and default.ema_decay == 0.0
    mixed = _load_config(f"{name},net=socm,opt=amjax")  # their net and batch, the shipped optimiser
    assert (mixed.control_net, mixed.batch_size, mixed.num_steps) == ("socm", batch, k)
    assert (mixed.learning_rate, mixed.lr_schedule, mixed.adam_eps) == (default.learning_rate, "cosine", 1e-8)
  for bad in ("linear_ou,net=unet", "linear_ou,width=3", "net=socm", "linear_ou,opt=amjax", "linear_ou,opt=x"):
    with pytest.raises(ValueError, match="configs/soc.py"):
      _load_config(bad)
  cfg = _load_config("linear_ou,net=socm")
  for field, value in [("adam_eps", 0.0), ("init_scale", -1.0), ("ema_decay", 1.0)]:
    bad = copy.deepcopy(cfg)
    bad.unlock()
    bad[field] = value
    with pytest.raises(ValueError, match=f"config.{field}"):
      soc_training.validate_config(bad)


def test_socm_variant_trains_with_ema():
  """Two AM iterations of the socm variant on a small Linear OU (K = 10) with a parameter EMA: finite records,
  and the evaluated control moves."""
  cfg = _load_config("linear_ou,net=socm")
  cfg.unlock()
  cfg.update(num_iterations=2, eval_every=2, batch_size=8, eval_batch_size=16, hidden=(8, 8), num_steps=10,
             methods=("am",), ema_decay=0.5)
  recs = soc_training.train_method("am", soc_training.problem_from_config(cfg), cfg)
  assert [r["iteration"] for r in recs] == [0, 2]
  assert all(np.isfinite(r["l2_error"]) for r in recs) and recs[1]["l2_error"] != recs[0]["l2_error"]


def _fake_records(label, seeds=(0, 1, 2), its=(0, 10, 20), rate=1.0):
  return [dict(method=label, seed=s, iteration=i, train_seconds=rate * i * (1 + 0.3 * s), loss=0.0,
               l2_error=1.0 / (1 + i) + 0.01 * s, l2_error_se=0.0, objective=1.0, objective_se=0.0)
          for s in seeds for i in its]


def test_soc_table_writer(tmp_path):
  """benchmarks/soc_tables: wall-clock rows (the error reached by each mark), markdown, CSV and plot on synthetic
  records (the training itself is test_soc_tables_tiny_budget, slow)."""
  from benchmarks import soc_tables
  from experiments import soc as soc_launcher
  recs = {"am": _fake_records("am"), "slow": _fake_records("slow", rate=2.0)}
  wall = soc_tables.wallclock_rows(recs, num_marks=5)
  assert [r["method"] for r in wall] == ["am"] * 5 + ["slow"] * 5
  marks = [r["seconds"] for r in wall[:5]]
  np.testing.assert_allclose(marks, np.linspace(0, 2 * 20 * 1.3, 6)[1:])  # up to the slow method's mean final time
  # First mark 10.4 s: 'am' seed 0 has reached it 10 (10 s), seeds 1-2 only it 0 (13, 16 s); 'slow' only it 0.
  first_am = [1 / 11, 1.0 + 0.01, 1.0 + 0.02]
  np.testing.assert_allclose(wall[0]["l2_mean"], np.mean(first_am))
  np.testing.assert_allclose(wall[0]["l2_std"], np.std(first_am, ddof=1))
  np.testing.assert_allclose(wall[5]["l2_mean"], np.mean([1.0, 1.01, 1.02]))
  np.testing.assert_allclose(wall[4]["l2_mean"], np.mean([1 / 21, 1 / 21 + 0.01, 1 / 21 + 0.02]))
  rows = soc_training.aggregate(recs["am"] + recs["slow"])
  meta = {"budget": "tiny", "iterations": {"linear_ou": 20}, "machine": "test", "date": "today", "command": "cmd"}
  md = soc_tables.markdown("linear_ou", rows, wall, meta)
  assert "| iteration | am | slow |" in md and "| seconds | am | slow |" in md and "3 seeds" in md
  assert md.count("\n| 20 |") == 1 and "`cmd`" in md
  soc_tables.write_csv(tmp_path / "t.csv", wall, tuple(wall[0]))
  back = list(csv.DictReader((tmp_path / "t.csv").open()))
  assert len(back) == 10 and float(back[0]["l2_mean"]) == pytest.approx(wall[0]["l2_mean"])
  soc_launcher.plot(rows, str(tmp_path / "p.png"), "t")
  assert (tmp_path / "p.png").stat().st_size > 0
  # summary.md merges every problem that has <problem>.csv and <problem>_meta.json in the directory.
  soc_tables.write_csv(tmp_path / "linear_ou.csv", rows, ("method",) + tuple(k for k in rows[0] if k != "method"))
  (tmp_path / "linear_ou_meta.json").write_text('{"budget": "tiny", "machine": "m", "date": "d"}')
  summary = soc_tables.summary_markdown(str(tmp_path))
  assert summary.count("| linear_ou (20, 3) |") == 2 and "| slow |" in summary and "quadratic" not in summary
  # --chunk_loss: -1 keeps configs/soc.py's chunks of AM's loss, 0 reruns the tables made before them (one call).
  assert soc_tables.problem_config("linear_ou", {}, "tiny", 3).chunk_loss == 10
  assert soc_tables.problem_config("linear_ou", {}, "tiny", 3, chunk_loss=0).chunk_loss == 0


@pytest.mark.slow
def test_soc_tables_tiny_budget(tmp_path):
  """The whole table command on the 'tiny' budget for Linear OU, 3 seeds: every file, one row per evaluation."""
  from benchmarks import soc_tables
  finals = soc_tables.main(["--out", str(tmp_path), "--budget", "tiny", "--problems", "linear_ou", "--seeds", "3"])
  assert set(finals["linear_ou"]) == {"am", "discrete_adjoint", "continuous_adjoint"}
  for name in ("linear_ou.csv", "linear_ou_wallclock.csv", "linear_ou.md", "linear_ou.png", "summary.md",
               "linear_ou_meta.json"):
    assert (tmp_path / name).stat().st_size > 0
  table = list(csv.DictReader((tmp_path / "linear_ou.csv").open()))
  assert len(table) == 3 * 3 and all(r["num_seeds"] == "3" for r in table)


def test_step_lower_bound_of_the_torch_comparison():
  """benchmarks/torch_soc_reference's bound: one network unit = XLA's FLOPs of a forward at the K B loss points
  (2 per multiply-add of the kernels, plus biases and ReLUs); bound = rollout + 2 or 3 units at the peak rate
  (the module imports torch only when a torch side is built)."""
  from benchmarks import torch_soc_reference as tsr  # pylint: disable=g-import-not-at-top
  side = tsr.build_jax("linear_ou", "socm", batch=8, num_steps=8, hidden=(16, 8), problem_kw=dict(dim=4))
  kernels = sum(int(x.size) for path, x in jax.tree_util.tree_leaves_with_path(side.params)
                if "kernel" in jax.tree_util.keystr(path))
  macs = kernels * 8 * 8
  flops = tsr.forward_flops(side)
  assert 2 * macs <= flops <= 1.25 * 2 * macs, (flops, macs)
  b = tsr.step_lower_bound(0.01, 2e9, 4e11)
  assert b["bound_reuse_s"] == pytest.approx(0.01 + 0.01) and b["bound_recompute_s"] == pytest.approx(0.025)
  assert b["rollout_flops_per_s"] == pytest.approx(2e11)

