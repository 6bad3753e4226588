"""Verified checkpoints (``am_jax.checkpointing``): every step carries a SHA-256 record of its arrays; a restore
recomputes it, and ``restore(None, ...)`` falls back to the newest step that restores and verifies, naming each
rejected step and why.  Small pytrees, no training: each test takes well under a second of Orbax I/O."""
import glob
import os

import jax.numpy as jnp
import numpy as np
import pytest

from am_jax import checkpointing
from am_jax.training import TrainState


def _state(step: int):
  w = jnp.arange(64, dtype=jnp.float32).reshape(8, 8) * 0.01 + step
  return TrainState(step=jnp.asarray(step, jnp.int32), params={"w": w, "b": jnp.full((8,), float(step))},
                    opt_state=(jnp.zeros((8, 8)),), ema_params={"w": w * 0.5, "b": jnp.zeros((8,))},
                    rng=jnp.asarray([0, step], jnp.uint32))


def _write(directory, steps=(10, 15, 20), **kw):
  ckpt = checkpointing.Checkpointer(str(directory), max_to_keep=5, async_save=False, **kw)
  for s in steps:
    ckpt.save(s, _state(s), {"seed": 0, "step_written": s}, force=True)
  ckpt.close()


def _data_files(directory, step):
  """The array-data files of a step (OCDBT data blocks), largest first."""
  files = [f for f in glob.glob(os.path.join(str(directory), str(step), "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  return sorted(files, key=os.path.getsize, reverse=True)


def _flip_bit(path, offset):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ 0x10]))


def _restore(directory, **kw):
  ckpt = checkpointing.Checkpointer(str(directory), **kw)
  try:
    state = ckpt.restore(None, _state(0))
    return ckpt, state
  finally:
    ckpt.close()


@pytest.fixture
def ckdir(tmp_path):
  """``<workdir>/checkpoints`` (rejected steps go to ``<workdir>/checkpoints_rejected``)."""
  return tmp_path / "checkpoints"


def test_intact_checkpoint_verifies(ckdir):
  _write(ckdir)
  assert os.path.isdir(ckdir / "20" / "integrity")
  ckpt, state = _restore(ckdir)
  assert ckpt.restored_step == 20 and not ckpt.rejected
  np.testing.assert_array_equal(state.params["w"], _state(20).params["w"])


def test_record_names_the_changed_array():
  record = checkpointing.integrity_record(_state(3))
  assert checkpointing.verify_record(_state(3), record) is None
  bad = _state(3)._replace(ema_params={"w": _state(3).ema_params["w"].at[2, 2].add(1e-6), "b": jnp.zeros((8,))})
  assert checkpointing.verify_record(bad, record) == "checksum mismatch in state.ema_params['w']"


def test_bit_flip_in_latest_step_falls_back_with_a_reason(ckdir, capsys):
  _write(ckdir)
  data = _data_files(ckdir, 20)[0]
  _flip_bit(data, os.path.getsize(data) // 2)
  ckpt, state = _restore(ckdir, for_training=True)
  assert ckpt.restored_step == 15 and set(ckpt.rejected) == {20}
  np.testing.assert_array_equal(state.params["w"], _state(15).params["w"])
  err = capsys.readouterr().err
  assert "checkpoint step 20" in err and "rejected" in err and "resuming from step 15" in err
  # The rejected step was moved aside, so the resumed run can write step 20 again.
  assert not os.path.exists(ckdir / "20")
  assert [d.split("-")[0] for d in os.listdir(ckdir.parent / "checkpoints_rejected")] == ["20"]
  _write(ckdir, steps=(20,))
  assert _restore(ckdir)[0].restored_step == 20


@pytest.mark.parametrize("damage", ["manifest", "metadata", "empty", "integrity"])
def test_missing_or_partial_latest_step_falls_back(ckdir, damage, capsys):
  _write(ckdir)
  step_dir = ckdir / "20"
  if damage == "manifest":
    os.remove(step_dir / "state" / "manifest.ocdbt")
  elif damage == "metadata":
    os.remove(step_dir / "state" / "_METADATA")
  elif damage == "empty":
    import shutil
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
  else:
    import shutil
    shutil.rmtree(step_dir / "integrity")
  ckpt, state = _restore(ckdir)
  assert ckpt.restored_step == 15, ckpt.rejected
  assert 20 in ckpt.rejected and "checkpoint step 20" in capsys.readouterr().err
  np.testing.assert_array_equal(state.params["b"], _state(15).params["b"])


def test_no_intact_step_is_one_error_listing_every_step(ckdir):
  _write(ckdir, steps=(10, 15))
  for s in (10, 15):
    data = _data_files(ckdir, s)[0]
    _flip_bit(data, os.path.getsize(data) // 2)
  with pytest.raises(checkpointing.CheckpointError, match="step 10: .*step 15: .*delete the directory"):
    _restore(ckdir)


def test_legacy_checkpoints_without_records_restore_with_a_warning(ckdir, capsys):
  _write(ckdir, steps=(10,), verify=False)
  assert not os.path.exists(ckdir / "10" / "integrity")
  ckpt, _ = _restore(ckdir)
  assert ckpt.restored_step == 10 and "without verification" in capsys.readouterr().err


def test_stale_tmp_folders_are_removed_at_a_training_start(ckdir):
  _write(ckdir, steps=(10,))
  stale = ckdir / "15.orbax-checkpoint-tmp-1234"
  os.makedirs(stale / "state")
  checkpointing.Checkpointer(str(ckdir)).close()  # a reader (am-jax sample) leaves it alone
  assert stale.exists()
  ckpt = checkpointing.Checkpointer(str(ckdir), for_training=True)
  ckpt.close()
  assert not stale.exists() and ckpt.removed_tmp == ["15.orbax-checkpoint-tmp-1234"]
