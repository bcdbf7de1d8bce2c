#!/usr/bin/env bash
# GPU check (issue 7): bf16 / fp16 mixed-precision training throughput of resnet50 at 224 px
# through expreg against a bare loop on the same GPU, without and with channels_last, and the
# data pipeline's images/s with all CPU cores; prints one table. Under 8 minutes on one GPU.
# Without a CUDA GPU it says so and exits 0.
#
#   bash benchmarks/gpu_check.sh [extra bench_gpu.py options, e.g. --metadata_csv CSV]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to torch; skipped"
    exit 0
fi
"$PYTHON" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)'
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec timeout 480 "$PYTHON" benchmarks/bench_gpu.py "$@"
