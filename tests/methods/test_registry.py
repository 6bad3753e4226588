"""``am_jax.methods`` (the registry, ``build``, ``options``, ``_common``): one-line errors naming the unknown method
or option and its closest match; every factory checks its options when the objective is built; every method runs
in the sharded production step with the shared signature and keeps its sharding constraints."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from am_jax import gmm, losses, methods, rewards, sharding, toy, training
from am_jax.problem import Problem
from tests.methods import helpers


def test_registry_and_build_errors():
  assert set(methods.METHODS) == {"am", "basic_am", "continuous_adjoint", "discrete_adjoint", "draft", "refl",
                                  "am_const_sigma", "eam", "deterministic_am"}
  for match, call in [("unknown method 'eamm' \\(did you mean 'eam'\\?\\)", lambda: methods.build("eamm")),
                      ("no option 'num_time' \\(did you mean 'num_times'\\?\\)",
                       lambda: methods.build("eam", helpers.SMALL, num_time=4)),
                      ("'am' has no option 'sigma'; it takes no options", lambda: methods.build("am", sigma=1.0))]:
    with pytest.raises(ValueError, match=match) as err:
      call()
    assert "\n" not in str(err.value)
  assert methods.options("draft", k=3) == {"k": 3}
  assert methods.options("am_const_sigma") == {"sigma": 1.0}


@pytest.mark.parametrize("factory,kwargs,match", [
    (methods.draft, {"config": losses.AMConfig(num_steps=4), "k": 5},
     "draft: k must be an int in \\[1, config.num_steps=4\\]"),
    (methods.draft, {"k": 1.5}, "draft: k must be an int"),
    (methods.deterministic_am, {"regulariser": "l1"}, "regulariser must be one of"),
    (methods.deterministic_am, {"truncation": 0.0}, "truncation must be in"),
    (methods.deterministic_am, {"regulariser_power": 1.0}, "regulariser_power must be > 1"),
    (methods.deterministic_am, {"anchor_steps": -1}, "anchor_steps"),
    (methods.refl, {"t_range": (0.9, 0.5)}, "refl: t_range must be"),
    (methods.refl, {"config": losses.AMConfig(num_steps=4), "t_range": (0.8, 0.9)}, "contains no interior node"),
    (methods.eam, {"weights": "exactly"}, "eam: weights must be one of"),
    (methods.eam, {"ode_solver": "rk4"}, "ode_solver"),
    (methods.eam, {"num_times": 0}, "num_times"),
    (methods.eam, {"time_range": (0.5, 0.2)}, "time_range"),
    (methods.eam, {"score_time": 1.0}, "score_time"),
    (methods.eam, {"time_power": 0.5}, "time_power"),
    (methods.eam, {"max_log_weight": -1.0}, "max_log_weight"),
    (methods.am_const_sigma, {"sigma": 0.0}, "am_const_sigma: sigma must be"),
    (methods.discrete_adjoint, {"config": losses.AMConfig(diffusion="ode")}, "discrete_adjoint: needs a stochastic"),
    (methods.continuous_adjoint, {"config": losses.AMConfig(diffusion=0.0)}, "sigma > 0"),
    (methods.basic_am, {"config": losses.AMConfig(diffusion="ode")}, "sigma > 0"),
])
def test_options_are_checked_when_the_objective_is_built(factory, kwargs, match):
  with pytest.raises(ValueError, match=match) as err:
    factory(**kwargs)
  assert "\n" not in str(err.value)


def test_config_must_be_an_am_config():
  with pytest.raises(TypeError, match="methods.eam: config must be a losses.AMConfig, got dict"):
    methods.eam({"num_steps": 3})


def _ring_problem():
  """(ring params, base apply, net params, Problem): a 2-D ring base, a random residual MLP, a quadratic reward."""
  ring = gmm.ring_2d(num=3)
  base = toy.mixture_base(ring, helpers.S)
  net_apply, params = helpers.random_net(dim=2)
  problem = Problem(base_apply=base, base_params=ring, net_apply=net_apply, init_params=params,
                    parameterisation="control", config=helpers.SMALL,
                    reward_fn=rewards.quadratic_reward(0.5 * jnp.eye(2), jnp.array([1.0, -0.5])), sample_shape=(2,))
  return ring, base, params, problem


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_method_runs_in_the_sharded_production_step(name):
  """The shared signature, with a 2-device mesh: the objective's batch-axis intermediates carry sharding
  constraints, and two steps of ``training.make_finetune_step`` (one jit, sharded, state donated) give finite
  losses and a finite, non-zero gradient, and move the parameters."""
  ring, base, params, problem = _ring_problem()
  objective = helpers.small(name)
  mesh = sharding.make_mesh(2)
  jaxpr = jax.make_jaxpr(lambda p: objective(problem.finetuned_apply(), p, base, ring, problem.reward_fn,
                                             jax.random.PRNGKey(0), (8, 2), mesh=mesh))(params)
  assert str(jaxpr).count("sharding_constraint") >= 2, name

  start = [np.asarray(x) for x in jax.tree.leaves(params)]  # the step donates its state
  opt = training.make_optimizer("adam", 1e-2)
  step = training.make_finetune_step(problem, objective, opt, 8, mesh)
  state = sharding.replicate_tree(training.init_state(params, opt, 0), mesh)
  bp = sharding.replicate_tree(ring, mesh)
  for _ in range(2):
    state, m = step(state, bp)
  assert {"loss", "reward_mean", "grad_norm"} <= set(m)
  assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["reward_mean"]))
  assert np.isfinite(float(m["grad_norm"])) and float(m["grad_norm"]) > 0.0
  moved = [float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(jax.tree.leaves(sharding.to_local(state.params)),
                                                                    start)]
  assert max(moved) > 1e-3 and int(sharding.to_local(state.step)) == 2


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_method_evaluates_only_its_own_paths_on_each_device(name):
  """8 devices, B = 64 paths: no matrix product of the compiled step has B or more rows (each device holds B / 8
  paths; the stacked K B or M B rows of a one-call loss were gathered onto every device before
  ``sharding.rows_by_device``), while the one-device step has them; no all-reduce inside a loop (backprop through
  the sampling loop, discrete_adjoint and draft, all-reduced the gradient once per step of it before
  ``sharding.grad_by_device``); and the first losses agree."""
  from tests.hlo_checks import while_body_ops  # pylint: disable=g-import-not-at-top
  ring, base, params, problem = _ring_problem()
  objective = helpers.small(name)
  opt = training.make_optimizer("adam", 1e-2)
  loss = {}
  for n in (1, 8):
    mesh = sharding.make_mesh(n)
    step = training.make_finetune_step(problem, objective, opt, 64, mesh)
    state = sharding.replicate_tree(training.init_state(params, opt, 0), mesh)
    bp = sharding.replicate_tree(ring, mesh)
    hlo = step.lower(state, bp).compile().as_text()
    # Rows of the network's matrix products (dots and library dot fusions): B, K B or M B on one device.
    rows = {int(m.group(1)) for line in hlo.splitlines() if " dot(" in line or "kCustom" in line
            for m in [re.search(r"= f32\[(\d+)[,\]]", line)] if m}
    assert (max(rows) >= 64) == (n == 1), (n, sorted(rows))
    assert while_body_ops(hlo, "all-reduce") == 0, n
    loss[n] = float(step(state, bp)[1]["loss"])
  np.testing.assert_allclose(loss[8], loss[1], rtol=1e-4)
