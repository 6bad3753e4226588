"""Launcher plumbing: flags, packaged configs, workdir checks, distributed start-up, one-line errors.

Every launcher in ``experiments/`` is ``main(cfg, workdir) -> summary`` plus ``launch.run(main)``::

    from am_jax import jobs, launch

    def main(cfg, workdir):
      return jobs.finetune(cfg, workdir)

    if __name__ == "__main__":
      launch.run(main)

``run`` defines ``--config`` (a config file ``path[:arg]``, or the name of a packaged config such as
``gmm2d`` or ``soc.py:linear_ou``; ``am-jax configs`` lists them) with ``--config.a.b=value`` overrides,
``--workdir`` and ``--verbose``; parses them; silences library INFO logs; checks the workdir; starts
``jax.distributed`` when the config asks; calls ``main`` and prints its summary.  A mistake the user can
fix is reported as ONE line on stderr with exit code 2 instead of a chained traceback:

    error: config.finetune.batchsize: no such field; did you mean config.finetune.batch_size?
    error: --workdir=/tmp/notes.txt is a file, not a directory.
    error: config.finetune.batch_size = 3: must be divisible by the 8 devices ...   (builders.ConfigError)

A run that stops for a reason it can name exits with status 1 after one line: a NaN/inf inside a step
(``errors.NonFiniteError``: "error: [finetune] step 3: the adjoint became non-finite ...") or a checkpoint
directory where no step verifies (``checkpointing.CheckpointError``).  ``--allow_config_changes=a.b,c`` lets a run
resume although those fields differ from the config stored with its checkpoints (``config.resume.allow_changes``;
``jobs.check_config_drift``).

``--verbose`` shows the full traceback (and the library logs) instead.
"""
from __future__ import annotations

import difflib
import os
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

__all__ = ["UsageError", "define_flags", "run", "check_workdir", "resolve_config", "packaged_configs_dir",
           "list_configs", "load_config", "maybe_initialize_distributed", "override_error", "EXIT_USAGE", "EXIT_RUNTIME"]

EXIT_USAGE = 2  # like argparse: the command line or the config is wrong
EXIT_RUNTIME = 1  # the run stopped: a non-finite step (errors.NonFiniteError), no checkpoint verifies


class UsageError(ValueError):
  """A mistake in the command line or the config that the user can fix; ``run`` prints it as one line."""


def define_flags(config: bool = True, workdir: bool = True):
  """``--config=FILE[:ARG]`` (with ``--config.a.b=value`` overrides), ``--workdir`` and ``--verbose``.

  Idempotent: a flag the launcher already defined (e.g. its own ``--workdir`` with a default) is kept.
  ``config`` / ``workdir``: define that flag (required) when absent.
  """
  from absl import flags
  from ml_collections import config_flags
  required = []
  if config and "config" not in flags.FLAGS:
    config_flags.DEFINE_config_file(
        "config", None, "Config file (path[:arg]) or the name of a packaged config (`am-jax configs` lists "
        "them); override fields with --config.a.b=value.", lock_config=True)
    required.append("config")
  if workdir and "workdir" not in flags.FLAGS:
    flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics, figures); created if absent.")
    required.append("workdir")
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "Show library INFO logs (Orbax, absl) and full tracebacks of config errors.")
  if config and "allow_config_changes" not in flags.FLAGS:
    flags.DEFINE_string("allow_config_changes", "", "Resume a run although these config fields (comma-separated "
                        "paths, e.g. am.reward_multiplier,seed; 'all') differ from the config stored with its "
                        "checkpoints (sets config.resume.allow_changes).")
  if required:
    flags.mark_flags_as_required(required)


# --------------------------------------------------------------------------------------------- configs


def packaged_configs_dir() -> Optional[str]:
  """The directory of the configs shipped with am_jax (``am_jax/configs`` installed, ``configs/`` in a checkout)."""
  import importlib.util
  try:
    spec = importlib.util.find_spec("am_jax.configs")
  except (ImportError, ValueError):
    spec = None
  if spec is not None and spec.submodule_search_locations:
    return list(spec.submodule_search_locations)[0]
  # A checkout used without installing (PYTHONPATH=.): configs/ beside the am_jax package.
  repo_configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  return repo_configs if os.path.isdir(repo_configs) else None


def list_configs() -> dict[str, str]:
  """{name: first docstring line} of the packaged configs (read without executing them)."""
  import ast
  directory = packaged_configs_dir()
  out = {}
  if directory is None:
    return out
  for fname in sorted(os.listdir(directory)):
    if not fname.endswith(".py") or fname.startswith("_"):
      continue
    with open(os.path.join(directory, fname)) as f:
      try:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
      except SyntaxError:
        doc = ""
    out[fname[:-3]] = doc.strip().splitlines()[0] if doc.strip() else ""
  return out


def resolve_config(spec: str) -> str:
  """``spec`` (``path[:arg]``) with the path replaced by the packaged config it names when it is not a file.

  ``configs/gmm2d.py``, ``gmm2d.py`` and ``gmm2d`` all name the packaged ``gmm2d.py``; the ``:arg`` part
  (``soc.py:linear_ou``) is kept.  An existing file always wins.  Raises ``UsageError`` naming the packaged
  configs when neither exists.
  """
  path, sep, arg = spec.partition(":")
  if not path:
    raise UsageError("--config is empty: give a config file or a packaged config name (`am-jax configs`).")
  if os.path.exists(os.path.expanduser(path)):
    return spec
  directory = packaged_configs_dir()
  name = os.path.basename(path)
  name = name[:-3] if name.endswith(".py") else name
  # Only names that could be a packaged config (no directory, or the repo's configs/ directory).
  parent = os.path.dirname(path).replace("\\", "/").rstrip("/")
  if directory is not None and parent in ("", "configs", "am_jax/configs"):
    candidate = os.path.join(directory, name + ".py")
    if os.path.isfile(candidate):
      return candidate + sep + arg
  if parent not in ("", "configs", "am_jax/configs"):
    raise UsageError(f"--config={spec}: no such file.")
  names = sorted(list_configs())
  close = difflib.get_close_matches(name, names, n=1)
  hint = f"did you mean {close[0]}? " if close else ""
  raise UsageError(f"--config={spec}: no such file, and no packaged config {name!r} ({hint}packaged: "
                   f"{', '.join(names) or 'none'}).")


def load_config(spec: str):
  """The ``ConfigDict`` of ``spec`` (``path[:arg]`` or a packaged config name, as ``--config`` takes):
  the file's ``get_config()`` (or ``get_config(arg)``), for code that builds configs itself (the notebook,
  the comparison launcher, tests)."""
  import importlib.util
  path, sep, arg = resolve_config(spec).partition(":")
  mod_spec = importlib.util.spec_from_file_location(f"am_jax_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg) if sep else module.get_config()


def _resolve_config_argv(argv: Sequence[str]) -> list[str]:
  """``argv`` with the value of ``--config=X`` / ``--config X`` passed through ``resolve_config``."""
  out = list(argv)
  for i, a in enumerate(out):
    if i == 0:
      continue
    for prefix in ("--config=", "-config="):
      if a.startswith(prefix):
        out[i] = prefix + resolve_config(a[len(prefix):])
    if a in ("--config", "-config") and i + 1 < len(out):
      out[i + 1] = resolve_config(out[i + 1])
  return out


# --------------------------------------------------------------------------------------------- errors


def _config_value(argv: Sequence[str]) -> Optional[str]:
  for i, a in enumerate(argv):
    if a.startswith(("--config=", "-config=")):
      return a.split("=", 1)[1]
    if a in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _overrides(argv: Sequence[str]) -> list[str]:
  """Field paths of the ``--config.a.b=value`` arguments (``--noconfig.a.b`` too)."""
  out = []
  for a in argv:
    for prefix in ("--config.", "-config.", "--noconfig.", "-noconfig."):
      if a.startswith(prefix):
        out.append(a[len(prefix):].split("=", 1)[0])
  return out


def override_error(config: Any, path: str) -> Optional[str]:
  """The one-line error for the override ``--config.<path>`` when ``path`` is not a field of ``config``.

  Returns None when the field exists.  Suggests the closest field name (``difflib``) at the first missing
  level: ``config.finetune.batchsize: no such field; did you mean config.finetune.batch_size?``.
  """
  node, done = config, ["config"]
  for part in path.split("."):
    keys = _keys(node)
    if keys is None:
      return f"config.{path}: no such field ({'.'.join(done)} = {node!r} is not a section)."
    if part not in keys:
      where = ".".join(done)
      close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
      if close:
        rest = path.split(".")[len(done):]
        fixed = ".".join(done[1:] + close + rest)
        if rest and override_error(config, fixed) is None:  # the rest of the path exists under the match
          return f"config.{path}: no such field; did you mean config.{fixed}?"
        return f"config.{path}: no such field; did you mean {where}.{close[0]}?"
      return f"config.{path}: no such field ({where} has: {', '.join(sorted(keys))})."
    node = node[part] if isinstance(node, Mapping) or hasattr(node, "keys") else getattr(node, part)
    done.append(part)
  return None


def _keys(node) -> Optional[list[str]]:
  import dataclasses
  if hasattr(node, "keys") and callable(node.keys):
    return [str(k) for k in node.keys()]
  if dataclasses.is_dataclass(node):
    return [f.name for f in dataclasses.fields(node)]
  return None


def _innermost_line(exc: BaseException) -> str:
  """The last line of the innermost cause's message (ml_collections wraps config-file errors in tracebacks)."""
  while (exc.__cause__ or exc.__context__) is not None:
    exc = exc.__cause__ or exc.__context__
  lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
  return f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")


def _flags_error_line(exc: Exception, argv: Sequence[str]) -> str:
  """One line for an exception raised while parsing the command line."""
  import re

  from absl import flags
  config_spec = _config_value(argv)
  # A misspelled override: ml_collections raises KeyError / AttributeError from deep inside absl.
  if config_spec is not None and _overrides(argv) and "config" in flags.FLAGS:
    try:
      config = flags.FLAGS["config"].parser.parse(config_spec)
      for path in _overrides(argv):
        msg = override_error(config, path)
        if msg is not None:
          return msg
    except Exception:  # the config itself does not load: reported below
      pass
  text = str(exc).strip()
  m = re.match(r"flag --(\S+?)=None: Flag --\S+ must have a value other than None", text)
  if m:
    return f"--{m.group(1)} is required."
  if isinstance(exc, flags.UnrecognizedFlagError):
    m = re.match(r"Unknown command line flag '(\S+)'\. Did you mean: (\S+?) ?\?", text)
    if m:
      return f"unknown flag --{m.group(1)}; did you mean --{m.group(2)}?"
    return text.splitlines()[0].replace("Unknown command line flag '", "unknown flag --").replace("'", "", 1)
  if "Error whilst parsing config file" in text or not isinstance(exc, flags.Error):
    return f"--config={config_spec}: cannot load the config ({_innermost_line(exc)})."
  return text.splitlines()[0].removeprefix("flag ")


def _verbose_requested(argv: Sequence[str]) -> bool:
  verbose = False
  for a in argv[1:]:
    if a in ("--verbose", "-verbose") or a.lower() in ("--verbose=true", "--verbose=1"):
      verbose = True
    elif a in ("--noverbose", "-noverbose") or a.lower() in ("--verbose=false", "--verbose=0"):
      verbose = False
  return verbose


def _fail(message: str, code: int = EXIT_USAGE):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _user_error_message(exc: BaseException) -> Optional[str]:
  """The one-line message for an exception the user can act on, else None (a bug: full traceback).

  User errors: ``UsageError``, ``builders.ConfigError``, a ``ValueError`` / ``TypeError`` whose message
  names a config field or a flag (starts with ``config.`` or ``--``), and ``FileNotFoundError``.
  """
  cls_names = {c.__name__ for c in type(exc).__mro__}
  text = str(exc).strip()
  first = text.splitlines()[0] if text else type(exc).__name__
  if isinstance(exc, UsageError) or "ConfigError" in cls_names:
    return first
  if isinstance(exc, (ValueError, TypeError)) and text.startswith(("config.", "--")):
    return first
  if isinstance(exc, FileNotFoundError):
    return first if exc.filename is None else f"{exc.filename}: {exc.strerror or first}"
  if cls_names & {"NonFiniteError", "CheckpointError"}:  # a run that cannot continue: what happened, where
    return first
  return None


def _exit_code(exc: BaseException) -> int:
  """``EXIT_USAGE`` (2) for a mistake in the command line or config; ``EXIT_RUNTIME`` (1) for a run that stopped
  (a non-finite step, no checkpoint that verifies)."""
  names = {c.__name__ for c in type(exc).__mro__}
  return EXIT_RUNTIME if names & {"NonFiniteError", "CheckpointError"} else EXIT_USAGE


def _with_allowed_changes(cfg, allowed: str):
  """``cfg`` with ``resume.allow_changes`` set from ``--allow_config_changes`` (appended to the config's own)."""
  if not allowed or cfg is None or not hasattr(cfg, "unlocked"):
    return cfg
  with cfg.unlocked():
    if "resume" not in cfg or cfg.resume is None:
      import ml_collections
      cfg.resume = ml_collections.ConfigDict({"allow_changes": ""})
    own = cfg.resume.get("allow_changes", "") or ""
    cfg.resume.allow_changes = ",".join(p for p in (own, allowed) if p)
  return cfg


# --------------------------------------------------------------------------------------------- workdir


def check_workdir(path: Optional[str], flag: str = "--workdir") -> str:
  """``path`` if it can be the output directory (it need not exist yet); ``UsageError`` otherwise.

  Fails at start, in one line, for an empty value, an existing file, or a path under a file or an
  unwritable directory.  Cloud paths (``gs://...``) are not checked.
  """
  if path is None or not str(path).strip():
    raise UsageError(f"{flag} is empty: give an output directory, e.g. {flag}=runs/my_run.")
  path = str(path)
  if "://" in path:
    return path
  full = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(full) and not os.path.isdir(full):
    raise UsageError(f"{flag}={path} is a file, not a directory.")
  parent = full
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UsageError(f"{flag}={path}: {parent} is a file, so the directory cannot be created.")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UsageError(f"{flag}={path}: {parent} is not writable.")
  return path


# --------------------------------------------------------------------------------------------- distributed


def maybe_initialize_distributed(cfg):
  """``jax.distributed.initialize`` when ``cfg.distributed.enabled`` (call before touching devices).

  On TPU pods and SLURM/Kubernetes GPU clusters the arguments are discovered automatically; on
  CPU or bare machines pass ``coordinator_address``, ``num_processes`` and ``process_id``.
  """
  d = cfg.get("distributed", None) if cfg is not None and hasattr(cfg, "get") else None
  if not d or not d.enabled:
    return
  import jax
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
    # CPU collectives across processes need an implementation; gloo ships with jaxlib.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if d.coordinator_address:
    kwargs["coordinator_address"] = d.coordinator_address
  if d.num_processes:
    kwargs["num_processes"] = int(d.num_processes)
  if d.process_id >= 0:
    kwargs["process_id"] = int(d.process_id)
  jax.distributed.initialize(**kwargs)
  from am_jax import reporting
  reporting.info(f"process {jax.process_index()} / {jax.process_count()}, {jax.local_device_count()} local / "
                 f"{jax.device_count()} global devices")


# --------------------------------------------------------------------------------------------- run


def run(main: Callable[[Any, Optional[str]], Any], *, argv: Optional[Sequence[str]] = None, config: bool = True,
        workdir: bool = True):
  """Parses the flags and runs ``main(cfg, workdir)`` under ``absl.app.run``; prints the returned summary.

  Args:
    main: ``main(cfg, workdir) -> summary`` (a mapping printed as ``key  value`` lines, or None).  ``cfg``
      is ``--config`` (None when ``config=False``), ``workdir`` is ``--workdir`` (checked by
      ``check_workdir``; None when the launcher has no such flag).
    argv: the command line (default ``sys.argv``); ``argv[0]`` is the program name.
    config, workdir: define the required ``--config`` / ``--workdir`` flags (a launcher may define its own
      ``--workdir`` with a default first; it is kept).

  Errors the user can fix (see the module docstring) exit with status 2 after one ``error:`` line on
  stderr; ``--verbose`` re-raises them with the full traceback.
  """
  from absl import app, flags

  from am_jax import reporting
  define_flags(config=config, workdir=workdir)
  for name in ("config", "workdir", "verbose"):  # listed by the launcher's --help (absl shows __main__'s flags)
    if name in flags.FLAGS:
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
  argv = list(sys.argv if argv is None else argv)
  verbose = _verbose_requested(argv)
  try:
    argv = _resolve_config_argv(argv) if config else argv
  except UsageError as e:
    if verbose:
      raise
    _fail(str(e))

  def parse(args):
    try:
      return flags.FLAGS(args)
    except Exception as e:  # noqa: BLE001 -- anything raised while parsing is about the command line
      if verbose:
        raise
      _fail(_flags_error_line(e, args))

  def wrapped(rest):
    reporting.quiet_libraries(verbose=flags.FLAGS.verbose)
    try:
      if len(rest) > 1:
        raise UsageError(f"unexpected argument(s) {' '.join(rest[1:])!r}: flags are --name=value.")
      cfg = flags.FLAGS.config if "config" in flags.FLAGS else None
      if type(cfg).__name__ == "_ErrorConfig":  # ml_collections' placeholder for a config that failed to load
        cfg._ReportError()
      wd = flags.FLAGS.workdir if "workdir" in flags.FLAGS else None
      if "workdir" in flags.FLAGS and (workdir or wd is not None):
        wd = check_workdir(wd)
      if "allow_config_changes" in flags.FLAGS:
        cfg = _with_allowed_changes(cfg, flags.FLAGS.allow_config_changes)
      maybe_initialize_distributed(cfg)
      result = main(cfg, wd)
    except Exception as e:  # noqa: BLE001 -- re-raised unless it is a user error
      message = _user_error_message(e)
      if message is None and isinstance(e, OSError) and "earlier failure to load" in str(e):
        message = f"--config: cannot load the config ({_innermost_line(e)})."
      if message is None or flags.FLAGS.verbose:
        raise
      _fail(message, _exit_code(e))
    if isinstance(result, Mapping) and reporting.is_main_process():
      print(reporting.format_summary(result), flush=True)
    elif result is not None and reporting.is_main_process():
      print(result, flush=True)
    return 0

  app.run(wrapped, argv=argv, flags_parser=parse)
