"""am_jax: reward fine-tuning of flow-matching and diffusion models with Adjoint Matching, in JAX."""
__version__ = "0.1.0"
