"""``am_jax.launch``: packaged config names, closest-match errors for overrides, workdir checks (one line each)."""
import os

import ml_collections
import pytest

from am_jax import cli, launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_packaged_config_names_resolve(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # configs/gmm2d.py is not a file here
  gmm2d = os.path.join(launch.packaged_configs_dir(), "gmm2d.py")
  assert os.path.samefile(gmm2d, os.path.join(REPO, "configs", "gmm2d.py"))
  for spec in ("gmm2d", "gmm2d.py", "configs/gmm2d.py"):
    assert launch.resolve_config(spec) == gmm2d
  assert launch.resolve_config("gmm2d:small") == gmm2d + ":small"  # the get_config argument is kept
  mine = tmp_path / "gmm2d.py"  # an existing file wins over the packaged config of the same name
  mine.write_text("def get_config():\n  return None\n")
  assert launch.resolve_config("gmm2d.py") == "gmm2d.py"


def test_unknown_config_names_the_packaged_ones(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(launch.UsageError, match=r"--config=gmm2: no such file, and no packaged config 'gmm2' "
                                              r"\(did you mean gmm2d\? packaged: .*gmm2d"):
    launch.resolve_config("gmm2")
  with pytest.raises(launch.UsageError, match=r"^--config=/nowhere/x.py: no such file\.$"):
    launch.resolve_config("/nowhere/x.py")


def test_list_configs(capsys):
  configs = launch.list_configs()
  assert "gmm2d" in configs and configs["gmm2d"].startswith("Main job")
  assert cli.main(["configs"]) == 0
  out = capsys.readouterr().out
  assert "gmm2d" in out and "digits_finetune" in out


def test_override_error_names_the_closest_field():
  cfg = ml_collections.ConfigDict({"seed": 0, "finetune": {"batch_size": 8, "steps": 10}})
  assert launch.override_error(cfg, "finetune.batch_size") is None
  assert launch.override_error(cfg, "finetune.batchsize") == \
      "config.finetune.batchsize: no such field; did you mean config.finetune.batch_size?"
  assert launch.override_error(cfg, "finetun.batch_size") == \
      "config.finetun.batch_size: no such field; did you mean config.finetune.batch_size?"
  assert launch.override_error(cfg, "finetune.zzz") == \
      "config.finetune.zzz: no such field (config.finetune has: batch_size, steps)."
  assert launch.override_error(cfg, "seed.x") == "config.seed.x: no such field (config.seed = 0 is not a section)."


def test_check_workdir(tmp_path):
  (tmp_path / "notes.txt").write_text("x")
  assert launch.check_workdir(str(tmp_path / "new" / "run")) == str(tmp_path / "new" / "run")
  assert launch.check_workdir("gs://bucket/run") == "gs://bucket/run"
  with pytest.raises(launch.UsageError, match=r"notes.txt is a file, not a directory\.$"):
    launch.check_workdir(str(tmp_path / "notes.txt"))
  with pytest.raises(launch.UsageError, match=r"notes.txt is a file, so the directory cannot be created\.$"):
    launch.check_workdir(str(tmp_path / "notes.txt" / "run"))
  for empty in ("", "  ", None):
    with pytest.raises(launch.UsageError, match=r"^--workdir is empty"):
      launch.check_workdir(empty)
