#!/usr/bin/env bash
# The GPU numbers of issues 16 and 17 in one command, sized for one device call (<= ~9 min; the lease is 15 min).
#
#   bash benchmarks/device_check.sh            # on the GPU machine, from the repository root; results under $OUT
#
# Through the device tool: run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=600), where
# .whl/ (git-ignored) holds the wheels the GPU image lacks (ml_collections, mlxtend): make it here first with
# `bash benchmarks/device_wheels.sh`.  Each stage runs under what is left of a fixed deadline, so a slow stage cuts the
# later ones short instead of losing everything; every stage writes its own files.
#
#   1. am_jax vs torch eager on CUDA, one AM step (toy 1-D, 3x256 MLP d = 2 / 16; M = 20 and 40):
#      benchmarks.torch_reference --torch_device=cuda                       -> torch_reference_gpu.{json,md}
#   2. SOC at equal architecture, am_jax vs torch on CUDA, per iteration and against each one's network floor:
#      benchmarks.torch_soc_reference --torch_device=cuda                   -> torch_soc_reference_gpu.{json,md}
#   3. train step vs its floor (gmm2d, digits U-Net, MNIST U-Net):  benchmarks.train_step -> train_step_*_gpu.json
set -u
DEADLINE=${DEADLINE:-540}   # seconds of this script's own time (the device call adds its start and transfers)
TORCH_DEVICE=${TORCH_DEVICE:-cuda}   # TORCH_DEVICE=cpu DEADLINE=300 bash benchmarks/device_check.sh: a dry run on CPU
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
LOG="$OUT/device_check.log"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__,
torch.cuda.is_available() and torch.cuda.get_device_name(0))"
} >"$LOG" 2>&1

stage() {  # stage NAME SECONDS_AT_MOST COMMAND...: runs under min(SECONDS_AT_MOST, what is left - 10 s)
  local name=$1 most=$2
  shift 2
  local left=$((DEADLINE - SECONDS - 10))
  ((left > most)) && left=$most
  if ((left < 30)); then
    echo "== $name: skipped (${left}s left)" >>"$LOG"
    return
  fi
  echo "== $name (at most ${left}s): $*" >>"$LOG"
  local t0=$SECONDS
  timeout "$left" "$@" >>"$LOG" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0))s" >>"$LOG"
}

stage torch_reference 200 python3 -m benchmarks.torch_reference --torch_device=$TORCH_DEVICE --rounds=5 --iters=5 \
  --out_dir="$OUT" --out_name=torch_reference_gpu
stage torch_soc_reference 200 python3 -m benchmarks.torch_soc_reference --torch_device=$TORCH_DEVICE --rounds=5 --iters=2 \
  --floor_rounds=3 --floor_parts=all,rollout,loss --out_dir="$OUT" --out_name=torch_soc_reference_gpu
for cfg in gmm2d digits_pretrain mnist; do
  stage "train_step $cfg" 90 python3 -m benchmarks.train_step --config="configs/$cfg.py" --solvers=scan \
    --rounds=5 --iters=5 --out="$OUT/train_step_${cfg}_gpu.json"
done
echo "done after ${SECONDS}s" >>"$LOG"
tail -n 60 "$LOG"
