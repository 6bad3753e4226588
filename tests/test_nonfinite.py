"""Non-finite values blamed on their source (``am_jax.jobs`` guards): each runtime check inside a jitted step
raises its own message -- trajectory, label, adjoint, loss, gradient, parameters -- and the 'skip' policy drops the
update and counts it.  Tiny functions, no training (the whole-job versions: tests/integration/test_reliability.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from am_jax import jobs


def _raises(fn, *args, source):
  with pytest.raises(Exception) as err:
    jax.block_until_ready(fn(*args))
  msg = jobs.runtime_check_message(err.value)
  assert msg == jobs.NONFINITE_MESSAGES[source], msg
  return msg


def _problem(reward_fn=None, cond_fn=None, null_label=None):
  from am_jax import losses
  from am_jax.problem import Problem
  v = lambda p, x, t, *c: x  # noqa: E731
  return Problem(base_apply=v, base_params={}, net_apply=v, init_params={}, parameterisation="control",
                 config=losses.AMConfig(), reward_fn=reward_fn or (lambda x, *c: jnp.sum(x, -1)), sample_shape=(2,),
                 cond_fn=cond_fn, null_label=null_label)


def test_nan_trajectory_is_blamed_on_the_trajectory_not_the_reward():
  g = jobs.guard_problem(_problem())
  x = jnp.ones((4, 2)).at[1, 0].set(jnp.nan)
  # As in adjoint.terminal_adjoint: the reward and its gradient (whose own check would blame the reward).
  value_and_grad = jax.jit(lambda x: jax.value_and_grad(lambda y: jnp.sum(g.reward_fn(y)))(x))
  _raises(value_and_grad, x, source="trajectory")
  np.testing.assert_array_equal(jax.jit(g.reward_fn)(jnp.ones((4, 2))), 2.0)


def test_out_of_range_label_is_named():
  g = jobs.guard_problem(_problem(cond_fn=lambda key, b: (jnp.full((b,), 11, jnp.int32),), null_label=10))
  _raises(jax.jit(lambda k: g.cond_fn(k, 4)), jax.random.PRNGKey(0), source="label")
  ok = jobs.guard_problem(_problem(cond_fn=lambda key, b: (jnp.full((b,), 10, jnp.int32),), null_label=10))
  assert int(jax.jit(lambda k: ok.cond_fn(k, 4))(jax.random.PRNGKey(0))[0][0]) == 10  # the null label is valid


@pytest.mark.parametrize("target_norm, loss, source", [(jnp.inf, jnp.inf, "adjoint"), (1.0, jnp.nan, "loss")])
def test_adjoint_is_checked_before_the_loss(target_norm, loss, source):
  objective = jobs.guard_objective(lambda p: (p * loss, {"target_norm": p * target_norm}))
  _raises(jax.jit(lambda p: objective(p)[0]), jnp.ones(()), source=source)
  fine = jobs.guard_objective(lambda p: (p * 2.0, {"target_norm": p}))
  assert float(jax.jit(lambda p: jax.grad(lambda q: fine(q)[0])(p))(jnp.ones(()))) == 2.0


def test_gradient_and_parameters_are_checked_before_the_update():
  params = {"w": jnp.ones((3,))}
  opt = jobs.guard_optimizer(optax.sgd(1.0))
  state = opt.init(params)
  step = jax.jit(lambda g, s, p: optax.apply_updates(p, opt.update(g, s, p)[0]))
  _raises(step, {"w": jnp.array([1.0, jnp.nan, 0.0])}, state, params, source="gradient")
  _raises(step, {"w": jnp.array([1.0, -3e38, 0.0])}, state, {"w": jnp.array([0.0, 3e38, 0.0])}, source="parameters")
  np.testing.assert_array_equal(step({"w": jnp.ones((3,))}, state, params)["w"], 0.0)


def test_skip_policy_drops_the_update_and_counts_it():
  params = {"w": jnp.ones((3,))}
  opt = jobs.guard_optimizer(optax.adam(0.1), "skip")
  state = opt.init(params)

  @jax.jit
  def step(g, s, p):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  p1, s1 = step({"w": jnp.array([1.0, jnp.nan, 0.0])}, state, params)
  np.testing.assert_array_equal(p1["w"], params["w"])  # dropped
  assert int(s1.skipped) == 1 and int(s1.inner[0].count) == 0  # the optimizer state did not advance
  p2, s2 = step({"w": jnp.ones((3,))}, s1, p1)
  assert int(s2.skipped) == 1 and bool(jnp.all(p2["w"] < 1.0))


def test_a_failed_check_becomes_one_line_naming_the_step():
  try:
    jax.block_until_ready(jobs.guard_objective(lambda p: (p * jnp.nan, {}))(jnp.ones(())))
  except Exception as e:  # noqa: BLE001
    err = jobs._nonfinite_error(e, "finetune", 7, 5)
  assert "\n" not in str(err)
  assert str(err).startswith("[finetune] step 7: the loss became non-finite") and "newest checkpoint is step 5" in str(err)
  assert jobs._nonfinite_error(ValueError("unrelated"), "finetune", 7, None) is None


def test_skip_policy_turns_an_overflowed_loss_into_a_dropped_update():
  """An overflowed loss can have a finite gradient (|u - target| finite, its square not): under 'skip' the guarded
  objective makes that gradient NaN, so the optimizer guard drops the update."""
  objective = jobs.guard_objective(lambda p: (jnp.sum(p * 1e20) ** 2, {"target_norm": jnp.sum(p * 1e20) ** 2}), "skip")
  g = jax.jit(jax.grad(lambda p: objective(p)[0]))(jnp.ones(()))
  assert not bool(jnp.isfinite(g))
  fine = jobs.guard_objective(lambda p: (p * 2.0, {"target_norm": p}), "skip")
  assert float(jax.jit(jax.grad(lambda p: fine(p)[0]))(jnp.ones(()))) == 2.0
