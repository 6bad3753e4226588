"""One process of the 2-process jax.distributed test (launched by tests/integration/test_training_system.py).

    python tests/distributed_worker.py <port> <process_id> <workdir>

Runs the tiny pre-train + fine-tune job (sharded steps over the global mesh of both processes,
Orbax saves written collectively), then restores the latest checkpoint again on the global mesh,
and prints one JSON line: final loss, parameter checksum, restored == final, and the sum of this
process's shard of a batch-sharded random array (hosts must see different noise).
"""
import json
import sys

import jax
import numpy as np

sys.path.insert(0, ".")
# No TensorBoard summaries (not checked here): importing tensorboardX imports torch where torch is installed, ~2 s
# of start-up per process; reporting.MetricsWriter skips TensorBoard when tensorboardX cannot be imported.
sys.modules["tensorboardX"] = None
from tests.launch_helpers import DISTRIBUTED_OVERRIDES, tiny_config  # noqa: E402


def main():
  port, pid, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  cfg = tiny_config(**DISTRIBUTED_OVERRIDES, **{
      "distributed.enabled": True, "distributed.coordinator_address": f"127.0.0.1:{port}",
      "distributed.num_processes": 2, "distributed.process_id": pid})
  from am_jax import jobs, launch
  launch.maybe_initialize_distributed(cfg)
  assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.device_count())
  from am_jax import checkpointing, sharding
  summary, state, _ = jobs.finetune(cfg, workdir, return_state=True)
  final = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)
  # Orbax restore onto the global mesh, independently of the run.
  mesh = sharding.make_mesh(-1)
  ckpt = checkpointing.Checkpointer(workdir + "/checkpoints")
  restored = ckpt.restore(None, state, mesh)
  ckpt.close()
  same = all(np.array_equal(np.asarray(a.addressable_data(0)), b)
             for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(final)))
  noise = jax.jit(lambda k: sharding.constrain_batch(jax.random.normal(k, (8, 2)), mesh))(jax.random.PRNGKey(0))
  local = float(sum(np.sum(np.asarray(s.data)) for s in noise.addressable_shards))
  metrics = [json.loads(l) for l in open(workdir + "/metrics.jsonl")] if pid == 0 else []
  print("RESULT " + json.dumps({
      "pid": pid, "step": summary["step"], "checksum": float(sum(np.sum(np.abs(x)) for x in jax.tree.leaves(final))),
      "restored_equals_final": same, "local_noise_sum": local,
      "last_loss": metrics[-1]["loss"] if metrics else None}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
