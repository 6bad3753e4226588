"""The LoRA fine-tuning step merges the adapters once per step (``training.make_finetune_step``) and gives the same
loss, gradients and update as the adapters merged inside every network call (``Problem.finetuned_apply``)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from am_jax import losses, lora, methods, models, rewards, training
from am_jax.problem import Problem
from tests.model_helpers import host_init


def _problem():
  base_apply, base_params = host_init(lambda: models.MLP(2, hidden=(16, 16), time_embed_dim=8,
                                                         rngs=__import__("flax").nnx.Rngs(0)))
  adapters = lora.init(base_params, 2, jax.random.PRNGKey(1))
  # B = 0 at init would make every gradient but B's zero: give the adapters a non-trivial delta.
  adapters = jax.tree.map(lambda a: a + 0.1, adapters)
  return Problem(base_apply=base_apply, base_params=base_params, net_apply=base_apply, init_params=adapters,
                 parameterisation="lora", config=losses.AMConfig(num_steps=6, reward_multiplier=2.0),
                 reward_fn=rewards.linear_reward(jnp.array([1.0, 0.0])), sample_shape=(2,),
                 lora_merge=lambda bp, ad: lora.merge(bp, ad))


def test_lora_step_merges_once_and_matches_the_per_call_merge():
  problem = _problem()
  objective = methods.build("am", problem.config)
  opt = optax.sgd(1e-2)
  state = training.init_state(problem.init_params, opt, 0)
  step = training.make_finetune_step(problem, objective, opt, 8, donate=False)
  new, metrics = step(state, problem.base_params)
  # Reference: the objective differentiated through the per-call merge of Problem.finetuned_apply.
  key = jax.random.fold_in(state.rng, state.step)
  _, k_obj = jax.random.split(key)

  def loss_fn(p):
    return objective(problem.finetuned_apply(problem.base_params), p, problem.base_apply, problem.base_params,
                     problem.reward_fn, k_obj, problem.x_shape(8), ())

  (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), new.params,
               jax.tree.map(lambda p, g: p - 1e-2 * g, state.params, grads))
  # The step traces the merge once (inside every network call it would be traced once per traced call site).
  traced = []
  counting = problem.replace(lora_merge=lambda bp, ad: (traced.append(1), lora.merge(bp, ad))[1])
  training.make_finetune_step(counting, objective, opt, 8, donate=False).lower(state, problem.base_params)
  assert len(traced) == 1
  traced.clear()
  jax.jit(jax.value_and_grad(lambda p: objective(counting.finetuned_apply(problem.base_params), p,
                                                 problem.base_apply, problem.base_params, problem.reward_fn, k_obj,
                                                 problem.x_shape(8), ())[0])).lower(state.params)
  assert len(traced) > 1
