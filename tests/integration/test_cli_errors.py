"""The ``am-jax`` command and the launchers as processes: user errors are ONE line on stderr with exit status 2
(was 55 lines of chained tracebacks from absl / ml_collections), before any work."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args, cwd):
  """Runs a command outside the repo (so configs/ is not the working directory's) with the repo importable."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable] + list(args), cwd=str(cwd), env=env, capture_output=True, text=True,
                        timeout=120)


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
