#!/usr/bin/env bash
# GPU checks for a lent CUDA machine (no package index there): one short run, under 12 minutes (the first DeepSpeedCPUAdam build included).
# Usage: bash tests/gpu/run_gpu_checks.sh   (results also go to $OUT when it is set)
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export OMP_NUM_THREADS=4 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
status=0

# --- LightRFTFSDP (issue 3): bf16-mixed on nccl, DCP round trip, CPU offload
timeout 300 $PY -m pytest tests/test_fsdp.py -m gpu -x -q -s 2>&1 | tee "$OUT/fsdp_gpu.txt" || status=1

# --- LightRFTDeepSpeed (issue 4): fp32/bf16/fp16 ZeRO-2/3 on nccl, checkpoint round trip, HF export
timeout 420 $PY -m pytest tests/test_deepspeed.py -m gpu -x -q -s 2>&1 | tee "$OUT/deepspeed_gpu.txt" || status=1

# --- LightRFT port (issue 15): offload_model / maybe_offload_optimizer move bytes off the GPU and back
timeout 120 $PY -m pytest tests/test_lightrft_port.py -m gpu -x -q -s 2>&1 | tee "$OUT/lightrft_port_gpu.txt" || status=1

exit $status
