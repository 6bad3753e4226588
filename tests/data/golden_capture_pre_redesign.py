"""Golden numbers of the pre-redesign code (commit f02e6c1): am, eam on the 1-D bimodal mixture, SOC linear OU."""
import json, jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from am_jax import gmm, losses, methods, rewards, models, soc

out = {}
g = gmm.bimodal_1d()
rf = rewards.linear_reward(jnp.array([1.0]))
for name in ("am", "eam"):
  cfg = methods.MethodConfig(am=losses.AMConfig(loss_clip=None))
  res = methods.finetune_mixture_method(g, rf, name, cfg, steps=20, batch_size=64, seed=0, log_every=1)
  out[name] = {"loss": [res.history[s]["loss"] for s in sorted(res.history)],
               "params_sum": float(sum(jnp.sum(jnp.abs(l)) for l in jax.tree.leaves(res.params)))}
# SOC linear OU: 20 AM iterations with the launcher's network and optimiser
p = soc.get_problem("linear_ou")
net = models.MLP(p.dim, hidden=(256, 128, 64), zero_init_output=True, rngs=nnx.Rngs(0))
net_apply, params = models.functional(net)
apply_fn = lambda q, x, t: net_apply(q, x, 0.01 * t)
opt = optax.adam(optax.cosine_decay_schedule(1e-3, 600, alpha=0.01)); st = opt.init(params)
@jax.jit
def step(params, st, key):
  (l, _), g_ = jax.value_and_grad(lambda q: soc.am_soc_objective(apply_fn, q, p, key, 64), has_aux=True)(params)
  u, st = opt.update(g_, st, params); return optax.apply_updates(params, u), st, l
key = jax.random.PRNGKey(1); ls = []
for _ in range(20):
  key, sub = jax.random.split(key); params, st, l = step(params, st, sub); ls.append(float(l))
ev = soc.evaluate_control(p, apply_fn, params, p.u_star, jax.random.PRNGKey(12345), 256)
out["soc_linear_ou_am"] = {"loss": ls, "l2_error": float(ev["l2_error"])}
json.dump(out, open("/work/main/tests/data/golden_pre_redesign.json", "w"), indent=1)
print(json.dumps({k: (v["loss"][:3], v["loss"][-1]) for k, v in out.items()}))
