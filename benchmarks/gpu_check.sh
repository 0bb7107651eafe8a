#!/usr/bin/env bash
# GPU check: everything this CPU-only CI cannot run, in one go, under 5 minutes on one GPU.
#   1. the tests that need CUDA (named *cuda*: no host sync inside step() under
#      torch.cuda.set_sync_debug_mode("error"), targets following the device, ...), failing if they skip;
#   2. a real training run on CUDA in fp16 with GradScaler (synthetic data: no dataset needed);
#   3. the optimizer-step overhead benchmark on CUDA (--quick, printed, results/ left alone);
#   4. with two or more GPUs: the same training on 2 ranks with torchrun (NCCL).
# Usage: bash benchmarks/gpu_check.sh [LOG_DIR]   (default: gpu-check-logs/; each step's output is kept there)
set -euo pipefail
cd "$(dirname "$0")/.."
logs=${1:-gpu-check-logs}
mkdir -p "$logs"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 1 ]; then
  echo "gpu_check: torch sees no CUDA device (torch $(python -c 'import torch; print(torch.__version__)'))" >&2
  exit 1
fi
echo "gpu_check: $gpus GPU(s): $(python -c 'import torch; print(torch.cuda.get_device_name(0))')"

echo "== 1/4 CUDA tests"
python -m pytest -q -rs -k cuda tests/ 2>&1 | tee "$logs/tests.log"
if grep -q "SKIPPED.*CUDA" "$logs/tests.log"; then echo "gpu_check: a CUDA test was skipped" >&2; exit 1; fi
if ! grep -qE "[0-9]+ passed" "$logs/tests.log"; then echo "gpu_check: no CUDA test ran" >&2; exit 1; fi

train=(train --recipe fmnist-smoke --set dataset=synthetic --set train_subset=4096 --epochs 2
       --set device=cuda --set precision=fp16 --quiet)
echo "== 2/4 training on CUDA, fp16 + GradScaler"
python -m fixnorm "${train[@]}" --run-dir "$logs/run-1gpu" 2>&1 | tee "$logs/train.log"

echo "== 3/4 step overhead on CUDA"
python benchmarks/step_overhead.py --device cuda --quick --no-write 2>&1 | tee "$logs/step_overhead.log"

echo "== 4/4 two ranks, NCCL"
if [ "$gpus" -ge 2 ]; then
  python -m torch.distributed.run --standalone --nproc_per_node=2 -m fixnorm "${train[@]}" \
    --run-dir "$logs/run-2gpu" 2>&1 | tee "$logs/ddp.log"
  python -c "import json, sys; s = json.load(open(sys.argv[1])); w = s['environment']['world_size']; \
assert w == 2, w; print('gpu_check: 2 ranks finished, world_size', w)" "$logs/run-2gpu/summary.json"
else
  echo "gpu_check: one GPU: the NCCL run is skipped"
fi
echo "gpu_check: all passed (logs in $logs)"
