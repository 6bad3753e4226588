"""Exact Gaussian-mixture ground truth: velocity field, marginals and reward-tilted targets.

Data distribution p_1 = sum_j w_j N(mu_j, S_j) in R^d.  Under a schedule (alpha_t, beta_t), the
marginal of Xbar_t = beta_t Xbar_0 + alpha_t Xbar_1 is the mixture with components
N(alpha mu_j, C_j), C_j = alpha^2 S_j + beta^2 I, and the velocity is

    v(x, t) = sum_j p(j | x, t) [alphadot E[X1 | x, j] + betadot E[X0 | x, j]],
    E[X1 | x, j] = mu_j + alpha S_j C_j^{-1} (x - alpha mu_j),
    E[X0 | x, j] = beta C_j^{-1} (x - alpha mu_j),
    p(j | x, t) = softmax_j(log w_j + log N(x; alpha mu_j, C_j)).

Tilting by an exp-quadratic reward r(x) = -x^T A x / 2 + b^T x (A symmetric; A = 0 gives a
linear reward) gives again a Gaussian mixture:
    P_j' = S_j^{-1} + A,  S_j' = P_j'^{-1},  mu_j' = S_j' (S_j^{-1} mu_j + b),
    log w_j' = log w_j + (log|S_j'| - log|S_j|)/2 + (mu_j'^T P_j' mu_j' - mu_j^T S_j^{-1} mu_j)/2 + const.
For the linear reward r = c^T x this is mu_j' = mu_j + S_j c, log w_j' = log w_j + c^T mu_j + c^T S_j c / 2.
"""
from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from am_jax.dynamics import validate_time


class GaussianMixture(NamedTuple):
  """weights (J,), means (J, d), covs (J, d, d).  A pytree: works as ``params`` of an apply_fn."""

  weights: jax.Array
  means: jax.Array
  covs: jax.Array

  @property
  def dim(self) -> int:
    return self.means.shape[-1]


def make_mixture(weights, means, stds) -> GaussianMixture:
  """Builds an isotropic or diagonal mixture: ``stds`` of shape (J,) or (J, d)."""
  weights = jnp.asarray(weights, jnp.float32)
  means = jnp.asarray(means, jnp.float32)
  if means.ndim == 1:
    means = means[:, None]
  stds = jnp.asarray(stds, jnp.float32)
  if stds.ndim == 1:
    stds = jnp.broadcast_to(stds[:, None], means.shape)
  covs = jax.vmap(jnp.diag)(stds**2)
  if weights.shape[0] != means.shape[0]:
    raise ValueError(f"weights {weights.shape} and means {means.shape} disagree on the number of components.")
  return GaussianMixture(weights / weights.sum(), means, covs)


def _posterior_terms(gmm: GaussianMixture, x, t, schedule):
  """Vectorised over the batch.  x (B, d), t (B,).  Returns p(j|x) (B, J), E[X1|x,j], E[X0|x,j] (B, J, d).

  Uses S_j = Q_j diag(l_j) Q_j^T so C_j = Q_j diag(alpha^2 l_j + beta^2) Q_j^T is inverted
  elementwise: O(B J d^2) per call instead of a Cholesky per sample.
  """
  lam, q = jnp.linalg.eigh(gmm.covs)  # (J, d), (J, d, d)
  a, b = schedule.alpha(t)[:, None, None], schedule.beta(t)[:, None, None]  # (B, 1, 1)
  resid = x[:, None, :] - a * gmm.means[None]  # (B, J, d)
  y = jnp.einsum("jde,bjd->bje", q, resid)  # Q^T resid
  var = a**2 * lam[None] + b**2  # (B, J, d)
  z = y / var
  logp = jnp.log(gmm.weights)[None] - 0.5 * jnp.sum(y * z, -1) - 0.5 * jnp.sum(jnp.log(var), -1)
  post = jax.nn.softmax(logp, axis=-1)
  cinv_resid = jnp.einsum("jde,bje->bjd", q, z)  # C^{-1} resid
  e_x1 = gmm.means[None] + a * jnp.einsum("jde,bje->bjd", q, lam[None] * z)
  e_x0 = b * cinv_resid
  return post, e_x1, e_x0


def velocity(gmm: GaussianMixture, x, t, schedule):
  """Exact v(x, t).  x: (B, d); t: scalar or (B,) in [0, 1].  Returns (B, d).

  Has the ``apply_fn(params, x, t)`` signature with ``params = gmm``, so an exact mixture can
  be the frozen base model of a fine-tune.
  """
  x = jnp.asarray(x)
  chex.assert_rank(x, 2)
  chex.assert_axis_dimension(x, 1, gmm.dim)
  t = validate_time(jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1]))
  post, e_x1, e_x0 = _posterior_terms(gmm, x, t, schedule)
  v_j = schedule.alpha_dot(t)[:, None, None] * e_x1 + schedule.beta_dot(t)[:, None, None] * e_x0
  return jnp.einsum("bj,bjd->bd", post, v_j)


def log_prob(gmm: GaussianMixture, x):
  """log p_1(x) of the data mixture; x: (B, d) -> (B,)."""
  d = gmm.dim
  chol = jnp.linalg.cholesky(gmm.covs)
  resid = x[:, None, :] - gmm.means[None]  # (B, J, d)
  white = jax.vmap(lambda r: jax.scipy.linalg.solve_triangular(chol, r[..., None], lower=True)[..., 0])(resid)
  logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
  logp = jnp.log(gmm.weights) - 0.5 * jnp.sum(white**2, -1) - 0.5 * logdet - 0.5 * d * jnp.log(2 * jnp.pi)
  return jax.scipy.special.logsumexp(logp, axis=-1)


def marginal(gmm: GaussianMixture, t, schedule) -> GaussianMixture:
  """The mixture law of Xbar_t at scalar t."""
  a, b = schedule.alpha(t), schedule.beta(t)
  return GaussianMixture(gmm.weights, a * gmm.means, a**2 * gmm.covs + b**2 * jnp.eye(gmm.dim))


def sample(gmm: GaussianMixture, key, n: int):
  """n samples (n, d) from the mixture."""
  kc, kz = jax.random.split(key)
  comp = jax.random.categorical(kc, jnp.log(gmm.weights), shape=(n,))
  z = jax.random.normal(kz, (n, gmm.dim), gmm.means.dtype)
  chol = jnp.linalg.cholesky(gmm.covs)
  return gmm.means[comp] + jnp.einsum("nde,ne->nd", chol[comp], z)


def tilt_quadratic(gmm: GaussianMixture, a_mat, b_vec) -> GaussianMixture:
  """Exact p_1(x) exp(-x^T A x / 2 + b^T x) / Z as a GaussianMixture (see module docstring).

  Raises if some S_j^{-1} + A is not positive definite (the tilt is then not normalisable).
  """
  d = gmm.dim
  a_mat = jnp.broadcast_to(jnp.asarray(a_mat, jnp.float32), (d, d))
  b_vec = jnp.broadcast_to(jnp.asarray(b_vec, jnp.float32), (d,))
  prec = jnp.linalg.inv(gmm.covs)
  new_prec = prec + a_mat
  if not np.all(np.linalg.eigvalsh(np.asarray(new_prec)) > 0):
    raise ValueError("Tilted precision S^-1 + A is not positive definite: exp(r) is not integrable.")
  new_cov = jnp.linalg.inv(new_prec)
  new_mean = jnp.einsum("jde,je->jd", new_cov, jnp.einsum("jde,je->jd", prec, gmm.means) + b_vec)
  _, logdet_old = jnp.linalg.slogdet(gmm.covs)
  _, logdet_new = jnp.linalg.slogdet(new_cov)
  quad_new = jnp.einsum("jd,jde,je->j", new_mean, new_prec, new_mean)
  quad_old = jnp.einsum("jd,jde,je->j", gmm.means, prec, gmm.means)
  logw = jnp.log(gmm.weights) + 0.5 * (logdet_new - logdet_old) + 0.5 * (quad_new - quad_old)
  return GaussianMixture(jax.nn.softmax(logw), new_mean, 0.5 * (new_cov + jnp.swapaxes(new_cov, -1, -2)))


def tilt_linear(gmm: GaussianMixture, c_vec) -> GaussianMixture:
  """Exact p_1(x) exp(c^T x) / Z: means shift by S_j c, log-weights by c^T mu_j + c^T S_j c / 2."""
  c_vec = jnp.broadcast_to(jnp.asarray(c_vec, jnp.float32), (gmm.dim,))
  shift = jnp.einsum("jde,e->jd", gmm.covs, c_vec)
  logw = jnp.log(gmm.weights) + gmm.means @ c_vec + 0.5 * jnp.einsum("jd,d->j", shift, c_vec)
  return GaussianMixture(jax.nn.softmax(logw), gmm.means + shift, gmm.covs)


def bimodal_1d() -> GaussianMixture:
  """0.5 N(-1, 0.3^2) + 0.5 N(1, 0.3^2): the project's 1-D test problem."""
  return make_mixture([0.5, 0.5], [[-1.0], [1.0]], [0.3, 0.3])


def ring_2d(num: int = 8, radius: float = 2.0, std: float = 0.25) -> GaussianMixture:
  """num equal-weight isotropic components on a circle: the project's 2-D test problem."""
  ang = 2 * np.pi * np.arange(num) / num
  means = radius * np.stack([np.cos(ang), np.sin(ang)], -1)
  return make_mixture(np.ones(num) / num, means, np.full(num, std))


def cdf_1d(gmm: GaussianMixture, x):
  """CDF of a 1-D mixture at points x (any shape)."""
  if gmm.dim != 1:
    raise ValueError("cdf_1d needs a 1-D mixture.")
  x = jnp.asarray(x)[..., None]
  std = jnp.sqrt(gmm.covs[:, 0, 0])
  return jnp.sum(gmm.weights * jax.scipy.stats.norm.cdf((x - gmm.means[:, 0]) / std), -1)
