"""What a compiled step costs: XLA's memory analysis (used by the comparison and the benchmarks)."""
from __future__ import annotations

__all__ = ["memory_stats"]


def memory_stats(compiled) -> dict:
  """Bytes from XLA's memory analysis of a compiled executable (``jax.jit(f).lower(...).compile()``).

  ``total_bytes`` = temp + arguments + outputs - aliased (donated) bytes: the live-memory bound of one
  call, used as "peak memory" in the benchmarks.  (``peak_memory_in_bytes`` is also recorded as
  ``xla_peak_bytes``, but on XLA:CPU it can be smaller than the temporaries.)  {} where the backend has none.
  """
  try:
    ma = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (not every backend implements it)
    return {}
  if ma is None:
    return {}
  out = {k: int(getattr(ma, k)) for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                                          "alias_size_in_bytes") if hasattr(ma, k)}
  out["total_bytes"] = (out.get("temp_size_in_bytes", 0) + out.get("argument_size_in_bytes", 0)
                        + out.get("output_size_in_bytes", 0) - out.get("alias_size_in_bytes", 0))
  peak = getattr(ma, "peak_memory_in_bytes", None)
  if peak is not None:
    out["xla_peak_bytes"] = int(peak)
  return out
