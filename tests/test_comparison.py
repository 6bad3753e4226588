"""``am_jax.comparison.network_passes``: the forward / VJP passes per step of every run of the comparison, checked
by counting the calls of instrumented networks (the runs themselves: tests/integration/test_comparison.py)."""
import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from am_jax import losses, methods, rewards
from am_jax import comparison as compare


def _counted(apply_fn, name, counts):
  """``apply_fn`` whose every forward pass and every VJP (backward pass) calls back with the rows it processes."""
  def tally(kind):
    return lambda rows: counts.update({name + kind: rows.shape[0]})

  @jax.custom_vjp
  def f(params, x, t):
    jax.debug.callback(tally("F"), t)
    return apply_fn(params, x, t)

  def fwd(params, x, t):
    jax.debug.callback(tally("F"), t)
    return apply_fn(params, x, t), (params, x, t)

  def bwd(res, ct):
    jax.debug.callback(tally("B"), ct)
    return jax.vjp(apply_fn, *res)[1](ct)

  f.defvjp(fwd, bwd)
  return lambda params, x, t, *cond: f(params, x, t)


def _sub_jaxprs(value):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _replay_callbacks(jaxpr, times=1):
  """Calls every debug callback of the program as often as it runs: a scan body ``length`` times (callbacks are
  effects, so XLA keeps each one; vmap unrolls them).  Same counts as running the compiled step (checked when
  written), without compiling it."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "debug_callback":
      for _ in range(times):
        eqn.params["callback"](*[np.zeros(v.aval.shape, v.aval.dtype) for v in eqn.invars])
    subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
    assert not (eqn.primitive.name in ("while", "cond") and any("debug_callback" in str(j) for j in subs)), eqn
    for j in subs:
      _replay_callbacks(j, times * (eqn.params["length"] if eqn.primitive.name == "scan" else 1))


@pytest.mark.parametrize("method,options", list(compare.RUNS.values()) + [("eam", {"ode_solver": "euler"}),
                                                                          ("eam", {"weights": "hutchinson"}),
                                                                          ("draft", {"k": 3}),
                                                                          ("deterministic_am", {"anchor_steps": 2})])
def test_network_passes_counts_the_network_calls(method, options):
  """``compare.network_passes`` = the forward and VJP passes of the fine-tuned and base nets in one gradient step,
  counted by instrumenting both nets (rows processed / batch)."""
  _check_network_passes(method, options, losses.AMConfig(num_steps=6, num_random_timesteps=2, num_last_timesteps=2,
                                                         loss_clip=None))


def test_network_passes_without_reusing_the_base_velocity():
  """am evaluating the base again at the loss points: M more base forwards, counted."""
  am = losses.AMConfig(num_steps=6, num_random_timesteps=2, num_last_timesteps=2, reuse_base_velocity=False)
  _check_network_passes("am", {}, am)
  assert (compare.network_passes("am", am, 2)["forward"]
          == compare.network_passes("am", dataclasses.replace(am, reuse_base_velocity=True), 2)["forward"] + 4)


def _check_network_passes(method, options, am):
  counts, batch, dim = collections.Counter(), 4, 2
  net = lambda w, x, t: jnp.tanh(x @ w + t[:, None])  # noqa: E731
  ft, base = _counted(net, "ft", counts), _counted(net, "base", counts)
  objective = methods.build(method, am, **options)
  reward = rewards.quadratic_reward(0.5 * jnp.eye(dim), jnp.ones(dim))
  step = jax.grad(lambda w: objective(ft, w, base, 0.3 * jnp.eye(dim), reward, jax.random.PRNGKey(0),
                                      (batch, dim))[0])
  _replay_callbacks(jax.make_jaxpr(step)(0.5 * jnp.eye(dim)).jaxpr)
  forward, backward = (counts["ftF"] + counts["baseF"]) / batch, (counts["ftB"] + counts["baseB"]) / batch
  assert forward > 0 and backward > 0
  assert compare.network_passes(method, am, dim, **options) == {"forward": forward, "backward": backward,
                                                                "total": forward + backward}


def test_network_passes_errors():
  with pytest.raises(ValueError, match="unknown method 'dpo'"):
    compare.network_passes("dpo", losses.AMConfig(), 2)
  with pytest.raises(ValueError, match="no option 'num_time' \\(did you mean 'num_times'"):
    compare.network_passes("eam", losses.AMConfig(), 2, num_time=4)
