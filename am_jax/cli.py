"""The ``am-jax`` command: runs a launcher of ``am_jax.experiments`` with the packaged configs.

    am-jax finetune --config=gmm2d --workdir=runs/gmm2d            # a packaged config, by name
    am-jax finetune --config=/path/to/my_config.py --workdir=runs/mine --config.finetune.steps=200
    am-jax soc --config=soc.py:linear_ou --workdir=runs/soc
    am-jax configs                                                 # lists the packaged configs

``am-jax COMMAND FLAGS...`` is ``python -m am_jax.experiments.COMMAND FLAGS...`` (the launcher runs as
``__main__``, exactly as with ``python -m``); in a source checkout that is not installed it falls back to
``experiments.COMMAND``.  ``--config`` takes a file or the name of a packaged config (``gmm2d``,
``configs/gmm2d.py``, ``soc.py:linear_ou``); ``am-jax COMMAND --help`` lists the command's flags.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import runpy
import sys
from typing import Optional, Sequence

__all__ = ["COMMANDS", "main", "launcher_module"]

# command -> (launcher module in am_jax.experiments / experiments, one-line description)
COMMANDS = {
    "finetune": ("finetune", "fine-tune a base toward p_base exp(lambda r) with any method (the main job)"),
    "pretrain": ("pretrain", "pre-train a base with flow matching"),
    "sample": ("sample", "sample a fine-tuned (or base) model from its workdir"),
    "evaluate": ("evaluate", "evaluate a fine-tuned model (rewards, distances, figures)"),
    "compare": ("compare", "compare fine-tuning methods on one task"),
    "soc": ("soc", "stochastic optimal control benchmarks (soc.py:VARIANT)"),
    "train-reward": ("train_reward", "train a reward classifier"),
    "toy-figure": ("toy_figure", "paper Fig. 2 on the exact 1-D problem, several seeds"),
    "reproduce": ("reproduce", "rerun the commands behind the README / BUILD_NOTES figures"),
    "ship-assets": ("ship_assets", "regenerate the shipped MNIST bases and reward classifiers"),
    "sweep": ("sweep", "seeded reward-diversity sweep: lambda x seeds x methods on MNIST (table, Pareto plot)"),
}


def launcher_module(command: str) -> Optional[str]:
  """The importable module name of ``command``'s launcher (installed package first), or None."""
  name = COMMANDS[command][0]
  for module in (f"am_jax.experiments.{name}", f"experiments.{name}"):
    try:
      if importlib.util.find_spec(module) is not None:
        return module
    except (ImportError, ValueError):  # the parent package is absent
      continue
  return None


def _usage() -> str:
  width = max(len(c) for c in COMMANDS)
  lines = ["usage: am-jax COMMAND --config=CONFIG --workdir=DIR [--config.a.b=value ...] [--verbose]", "",
           "commands:"]
  lines += [f"  {c:<{width}}  {d}" for c, (_, d) in COMMANDS.items()]
  lines += [f"  {'configs':<{width}}  list the packaged configs", "",
            "`am-jax COMMAND --help` lists the flags of one command."]
  return "\n".join(lines)


def _list_configs() -> str:
  from am_jax import launch
  configs = launch.list_configs()
  if not configs:
    return "no packaged configs found"
  width = max(len(n) for n in configs)
  lines = [f"packaged configs ({launch.packaged_configs_dir()}); use --config=NAME:"]
  lines += [f"  {n:<{width}}  {doc}" for n, doc in configs.items()]
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of the ``am-jax`` console script; returns the exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(_usage())
    return 0 if argv else 2
  command, rest = argv[0], argv[1:]
  if command in ("--version", "version"):
    from am_jax import __version__
    print(f"am_jax {__version__}")
    return 0
  if command == "configs":
    try:
      print(_list_configs(), flush=True)
    except BrokenPipeError:  # `am-jax configs | head`
      sys.stdout = open(os.devnull, "w")
    return 0
  if command not in COMMANDS:
    close = difflib.get_close_matches(command, list(COMMANDS) + ["configs"], n=1)
    hint = f"; did you mean {close[0]}?" if close else f" (commands: {', '.join(COMMANDS)}, configs)"
    print(f"error: unknown command {command!r}{hint}", file=sys.stderr)
    return 2
  module = launcher_module(command)
  if module is None:
    print(f"error: the launcher of {command!r} is not installed (am_jax.experiments.{COMMANDS[command][0]}); "
          "reinstall am_jax.", file=sys.stderr)
    return 2
  # Run the launcher as __main__, as `python -m` would: its `launch.run(main)` parses these flags.
  sys.argv = [f"am-jax {command}"] + rest
  try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
  except SystemExit as e:  # absl.app.run exits with main's status
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
