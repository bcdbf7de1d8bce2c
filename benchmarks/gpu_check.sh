#!/usr/bin/env bash
# GPU check, one table each:
#  1. (issue 7) bf16 / fp16 mixed-precision training throughput of resnet50 at 224 px through expreg
#     against a bare loop on the same GPU, without and with channels_last, and the data pipeline's
#     images/s with all CPU cores (bench_gpu.py; at most 8 minutes);
#  2. (issue 14) whole-slide maps: expreg.map's tiles/s against a bare inference_mode loop over the
#     same tiles already on the GPU, resnet50 at 224 px, 0, 4 and all-core DataLoader workers, on a
#     synthetic 30,000² px tiled TIFF written once under $TMPDIR (bench_map.py; at most 2.5 minutes);
#  3. the embedding store: ensure_embeddings' images/s against bare inference_mode loops,
#     resnet50 at 224 px, all-core workers, on the her2st_dev images; then seconds per epoch of
#     train.mode=frozen's Trainer.train_one_epoch on 100,000 cached 1,024-feature embeddings at batch
#     32, 256 and 1,024, linear and MLP heads (bench_embeddings.py; at most 4 minutes).
# About 14 minutes on one GPU. Without a CUDA GPU it says so and exits 0; a part that fails or
# runs out of time is named and makes the script exit 1 after the other parts have run.
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
failed=""
echo "gpu_check: 1. mixed-precision training (bench_gpu.py)"
timeout 480 "$PYTHON" benchmarks/bench_gpu.py "$@" || failed="$failed bench_gpu.py(exit $?)"
echo "gpu_check: 2. whole-slide map (bench_map.py)"
timeout 150 "$PYTHON" benchmarks/bench_map.py --device cuda --backbone resnet50 --image_size 224 \
    --batch_size 256 --size 30000 --tissue_fraction 0.2 --workers 0 4 "$(nproc)" --repeats 2 \
    --draw_genes 4 --skip_rss --work_dir "${TMPDIR:-/tmp}/expreg-gpu-check" || failed="$failed bench_map.py(exit $?)"
echo "gpu_check: 3. embedding store and frozen heads (bench_embeddings.py)"
timeout 240 "$PYTHON" benchmarks/bench_embeddings.py --device cuda --backbones resnet50 --batch_size 256 \
    --workers "$(nproc)" --repeats 2 || failed="$failed bench_embeddings.py(exit $?)"
if [ -n "$failed" ]; then
    echo "gpu_check: failed (exit 124 = timed out):$failed"
    exit 1
fi
