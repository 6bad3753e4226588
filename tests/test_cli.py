"""The ``am-jax`` command and am_jax.launch: packaged config names, one-line errors with exit status 2."""
import os
import subprocess
import sys

import ml_collections
import pytest

from am_jax import cli, launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, cwd):
  """Runs a command outside the repo (so configs/ is not the working directory's) with the repo importable."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable] + list(args), cwd=str(cwd), env=env, capture_output=True, text=True,
                        timeout=120)


# --------------------------------------------------------------------------------------------- configs


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


def test_cli_usage_and_unknown_command(capsys):
  assert cli.main([]) == 2 and "usage: am-jax COMMAND" in capsys.readouterr().out
  assert cli.main(["--help"]) == 0
  assert cli.main(["finetun"]) == 2
  assert capsys.readouterr().err.strip() == "error: unknown command 'finetun'; did you mean finetune?"
  for command in cli.COMMANDS:  # every command names a launcher that exists
    assert cli.launcher_module(command) is not None, command


# --------------------------------------------------------------------------------------------- errors


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


def test_misspelled_override_is_one_line(tmp_path):
  """Was 55 lines of chained tracebacks (KeyError -> KeyError -> AttributeError) from absl / ml_collections."""
  r = _run(["-m", "am_jax.cli", "finetune", "--config=gmm2d", "--config.finetune.batchsize=3",
            f"--workdir={tmp_path / 'run'}"], tmp_path)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines() == [
      "error: config.finetune.batchsize: no such field; did you mean config.finetune.batch_size?"]
  assert not (tmp_path / "run").exists()


def test_workdir_that_is_a_file_is_one_line(tmp_path):
  (tmp_path / "notes.txt").write_text("x")
  r = _run(["-m", "experiments.finetune", f"--config={REPO}/configs/gmm2d.py", "--workdir=notes.txt"], tmp_path)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines() == ["error: --workdir=notes.txt is a file, not a directory."]


def test_config_validation_error_is_one_line(tmp_path):
  """builders.ConfigError raised inside the job (before any work) becomes one line naming the field."""
  r = _run(["-m", "am_jax.cli", "finetune", "--config=configs/gmm2d.py", "--config.finetune.batch_size=0",
            f"--workdir={tmp_path / 'run'}"], tmp_path)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: config.finetune.batch_size = 0: "), r.stderr
