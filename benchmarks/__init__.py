"""Performance benchmarks (issue 6): train-step time vs the network-work floor, sampling, memory, scaling.

Run from the repository root, e.g. ``python -m benchmarks.train_step --config=configs/gmm2d.py``.
Results and the commands that produced them: ``docs/performance.md`` (raw JSON: ``benchmarks/results/``).
"""
