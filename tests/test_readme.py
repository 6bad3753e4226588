"""The README's code runs as printed: the 'Use the loss from your own code' snippet and the user-task files."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks():
  return re.findall(r"```python\n(.*?)```", open(os.path.join(REPO, "README.md")).read(), re.S)


def test_own_code_snippet_runs_and_learns():
  block = [b for b in _blocks() if "def step(params, opt_state, key)" in b][0]
  scope = {}
  exec(compile(block.replace("range(200)", "range(30)"), "README.md", "exec"), scope)  # noqa: S102
  assert float(scope["aux"]["reward_mean"]) > 0.05  # the base's mean reward is 0; AM moves it up


def test_user_task_files_match_the_tested_ones():
  """The README's my_task.py / their_config.py are the files tests/integration/test_user_task.py runs."""
  from tests.integration import test_user_task
  blocks = _blocks()
  model = [b for b in blocks if "def make_model" in b][0]
  config = [b for b in blocks if "def get_config" in b][0]
  norm = lambda s: re.sub(r"\s+|#[^\n]*|\"\"\".*?\"\"\"", "", s, flags=re.S)  # noqa: E731
  assert norm(model.split("def make_model")[1]) in norm(test_user_task.USER_MODEL), "README my_task.py drifted"
  for field in ("c.data", "c.model", "c.reward", "c.am", "c.method", "c.finetune"):
    got = norm([l for l in config.splitlines() if l.strip().startswith(field)][0].split("#")[0])
    assert got[:40] in norm(test_user_task.USER_CONFIG), f"README their_config.py {field} drifted"
