"""Jitted, sharded train steps: flow-matching pre-training and Adjoint Matching fine-tuning.

Both steps are ``state -> (state, metrics)`` with ``state`` a plain pytree (``TrainState``):
one ``jax.jit`` per step with explicit in/out shardings (state replicated, everything batched
sharded over the mesh's data axis inside the step) and the state donated, so XLA updates it in
place.  The step's randomness is ``fold_in(state.rng, state.step)``: a restored checkpoint replays
exactly the same keys, which is what makes kill-and-resume bit-identical (docs/training_system.md section 6).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from am_jax import losses
from am_jax import sharding as sharding_lib
from am_jax.problem import Problem


class TrainState(NamedTuple):
  """Everything a run needs to continue: a pytree of arrays (Orbax- and sharding-friendly).

  step: () int32; params: trained pytree; opt_state: optax state; ema_params: EMA of params
  (same structure; equals params when EMA is off); rng: (2,) uint32 base key of the run.
  """

  step: jax.Array
  params: object
  opt_state: object
  ema_params: object
  rng: jax.Array


def make_optimizer(name: str = "adam", learning_rate: float = 1e-3, warmup_steps: int = 0, total_steps: int = 0,
                   decay: str = "constant", grad_clip: Optional[float] = 1.0, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
  """Adam/AdamW with linear warm-up, constant or cosine decay, and global-norm gradient clipping."""
  if name not in ("adam", "adamw"):
    raise ValueError(f"optimizer.name must be 'adam' or 'adamw', got {name!r}.")
  if learning_rate <= 0:
    raise ValueError(f"optimizer.learning_rate must be > 0, got {learning_rate}.")
  if warmup_steps < 0:
    raise ValueError(f"optimizer.warmup_steps must be >= 0, got {warmup_steps}.")
  if decay not in ("constant", "cosine"):
    raise ValueError(f"optimizer.decay must be 'constant' or 'cosine', got {decay!r}.")
  if decay == "cosine" and not warmup_steps:  # no warm-up: the first step already runs at the peak rate
    sched = optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))
  elif decay == "cosine":
    sched = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1))
  elif warmup_steps:
    sched = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps),
                                  optax.constant_schedule(learning_rate)], [warmup_steps])
  else:
    sched = learning_rate
  opt = (optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay) if name == "adamw"
         else optax.adam(sched, b1=b1, b2=b2))
  if grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(grad_clip), opt)
  return opt


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    ema_params=jax.tree.map(jnp.copy, params), rng=jax.random.PRNGKey(seed))


def _apply_update(state: TrainState, grads, optimizer, ema_decay: float):
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if ema_decay:
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
  else:
    ema = params
  return state._replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def _jit_step(step_fn, mesh, donate: bool):
  if mesh is None:
    return jax.jit(step_fn, donate_argnums=(0,) if donate else ())
  rep = sharding_lib.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(rep, rep), out_shardings=(rep, rep),
                 donate_argnums=(0,) if donate else ())


def make_finetune_step(problem: Problem, objective: Callable, optimizer: optax.GradientTransformation,
                       batch_size: int, mesh=None, ema_decay: float = 0.0, donate: bool = True):
  """Builds ``step(state, base_params) -> (state, metrics)``, one jit: sample, adjoint, loss, update.

  Args:
    problem: the ``Problem`` (base and trained networks, parameterisation, reward, condition sampler).
      The trained params are ``state.params``; the frozen base params are the step's second argument (an
      argument, not a closure constant, so they are not baked into the compiled program).
    objective: any method of ``am_jax.methods`` (``methods.build(name, problem.config, **options)``):
      ``objective(ft_apply, params, base_apply, base_params, reward_fn, key, x_shape, cond, mesh=mesh)``.
    optimizer: optax transformation of the trained params.  batch_size: global batch B.
    mesh: a ``('data',)`` mesh (``am_jax.sharding.make_mesh``) or None (single device, no constraints).
    ema_decay: 0 disables the EMA.
  """
  x_shape = problem.x_shape(batch_size)
  if mesh is not None:
    sharding_lib.check_batch_divisible(x_shape[0], mesh, "finetune.batch_size")
  cond_fn, reward_fn, base_apply = problem.cond_fn, problem.reward_fn, problem.base_apply

  def step_fn(state: TrainState, base_params):
    key = jax.random.fold_in(state.rng, state.step)
    k_cond, k_obj = jax.random.split(key)
    cond = tuple(sharding_lib.constrain_batch(c, mesh) for c in cond_fn(k_cond, x_shape[0])) if cond_fn else ()
    if problem.parameterisation == "lora":
      # Merge the adapters into the base weights ONCE per step (W + s A B) and hand the methods the plain
      # network with the merged weights: the gradient reaches the adapters through this one merge instead of
      # through a merge inside each of the ~2K network calls of the rollout, adjoint and loss.
      ft_apply, params_of = problem.net_apply, lambda p: problem.lora_merge(base_params, p)
    else:
      # Built inside the step so the base params stay a step argument.
      ft_apply, params_of = problem.finetuned_apply(base_params), lambda p: p

    def loss_fn(p):
      return objective(ft_apply, params_of(p), base_apply, base_params, reward_fn, k_obj, x_shape, cond, mesh=mesh)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = _apply_update(state, grads, optimizer, ema_decay)
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads))
    return new_state, metrics

  return _jit_step(step_fn, mesh, donate)


def eval_params(state: TrainState, ema_decay: float):
  """The parameters to evaluate / export: the EMA when it is on, else the raw parameters."""
  return state.ema_params if ema_decay else state.params


def make_pretrain_step(apply_fn: Callable, schedule, optimizer: optax.GradientTransformation, batch_size: int,
                       mesh=None, ema_decay: float = 0.0, cond_drop_prob: float = 0.0, null_label: int = -1,
                       donate: bool = True):
  """Builds ``step(state, data) -> (state, metrics)``: one flow-matching update, one jit.

  ``data`` is a tuple ``(x (N, ...), [labels (N,)])`` of the whole (small) dataset, replicated on
  the devices; the step draws a batch of indices from its key, so there is no host input pipeline
  and no host round-trip.  With labels, each label is replaced by ``null_label`` with probability
  ``cond_drop_prob`` (classifier-free guidance training).
  """
  if mesh is not None:
    sharding_lib.check_batch_divisible(batch_size, mesh, "pretrain.batch_size")

  def step_fn(state: TrainState, data):
    key = jax.random.fold_in(state.rng, state.step)
    k_idx, k_drop, k_loss = jax.random.split(key, 3)
    idx = sharding_lib.constrain_batch(jax.random.randint(k_idx, (batch_size,), 0, data[0].shape[0]), mesh)
    x1 = sharding_lib.constrain_batch(data[0][idx], mesh)
    cond = ()
    if len(data) > 1:
      labels = data[1][idx]
      if cond_drop_prob:
        drop = jax.random.bernoulli(k_drop, cond_drop_prob, labels.shape)
        labels = jnp.where(drop, null_label, labels)
      cond = (labels,)

    def loss_fn(p):
      return losses.flow_matching_loss(apply_fn, p, x1, k_loss, schedule, cond)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    new_state = _apply_update(state, grads, optimizer, ema_decay)
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  return _jit_step(step_fn, mesh, donate)
