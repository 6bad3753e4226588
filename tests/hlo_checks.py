"""Checks on compiled XLA programs (HLO text) shared by the tests."""
import re


def while_body_ops(hlo_text: str, op: str) -> int:
  """How many ``op`` instructions sit directly in the while-loop bodies of a compiled HLO module's text."""
  bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo_text))
  count, current = 0, None
  for line in hlo_text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m:
      current = m.group(1)
    elif current in bodies and re.search(rf"\b{op}(-start)?\(", line):
      count += 1
  return count
