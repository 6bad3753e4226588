r"""Seeded reward–diversity sweep: lambda x seeds x methods (and LoRA vs full for AM) on MNIST.

    am-jax sweep --config=mnist_sweep --workdir=runs/sweep_tiny                 # tiny, 2-core CPU
    am-jax sweep --config=mnist_sweep.py:size=full --workdir=runs/sweep         # the full grid, one GPU

Everything happens in ``am_jax.sweep.run`` (its docstring lists the metrics); writes ``sweep.json``, ``sweep.md``
(mean ± 95% t-interval over seeds), ``sweep.png`` (reward vs diversity, Pareto front) and ``grid.png``.
"""
from am_jax import launch, sweep


def main(cfg, workdir):
  return sweep.run(cfg, workdir)


if __name__ == "__main__":
  launch.run(main)
