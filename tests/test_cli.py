"""``am_jax.cli``: the ``am-jax`` command's usage, closest-match errors and the launcher of every command (the
one-line errors of a real ``am-jax`` process: tests/integration/test_cli_errors.py)."""
from am_jax import cli


def test_cli_usage_and_unknown_command(capsys):
  assert cli.main([]) == 2 and "usage: am-jax COMMAND" in capsys.readouterr().out
  assert cli.main(["--help"]) == 0
  assert cli.main(["finetun"]) == 2
  assert capsys.readouterr().err.strip() == "error: unknown command 'finetun'; did you mean finetune?"
  for command in cli.COMMANDS:  # every command names a launcher that exists
    assert cli.launcher_module(command) is not None, command

