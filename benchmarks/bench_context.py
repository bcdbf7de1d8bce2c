"""What a context patch costs: training steps of a multiscale model vs a single-patch one (issue 25).

    python benchmarks/bench_context.py                 # resnet18 at 112 px, batches of 32 (~3 min on 2 cores)
    python benchmarks/bench_context.py --quick         # seconds: checks the script end to end

The same backbone, batch size and optimizer (AdamW); the multiscale model reads 6 channels per sample (the
patch and its context patch through the one encoder: twice the images per step) and has a head twice as
wide. Random inputs, one process, the device of this machine (a GPU when there is one). Sides are
alternated and each side's first ``WARMUP`` steps are not timed; each side runs in its own process for its
peak memory (RSS on the CPU, ``max_memory_allocated`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _common import REPO, environment, median

WARMUP = 2
SIDE = r"""
import json, resource, sys, time
import torch
from expreg.modeling.model import build_model

context, backbone, size, batch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = build_model(backbone, 50, image_size=size, context=context).to(device).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
channels = 6 if context == "multiscale" else 3
x = torch.randn(batch, channels, size, size, device=device)
y = torch.randn(batch, 50, device=device)
times = []
for step in range(steps + WARMUP):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = model(pixel_values=x, labels=y).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    if step >= WARMUP:
        times.append(time.perf_counter() - start)
peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print("@@" + json.dumps({"seconds_per_step": sorted(times)[len(times) // 2], "peak_gb": peak, "device": device}))
""".replace("WARMUP", str(WARMUP))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="test_resnet at 32 px, 2 steps, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.backbone, args.image_size, args.batch_size, args.steps, args.repeats = "test_resnet", 32, 8, 2, 1
    return args


def run_side(context: str, args) -> dict:
    command = [sys.executable, "-c", SIDE, context, args.backbone, str(args.image_size), str(args.batch_size)]
    result = subprocess.run([*command, str(args.steps)], capture_output=True, text=True, cwd=REPO, check=False)
    if result.returncode != 0:
        sys.exit(f"bench_context: the {context} side failed:\n{result.stderr[-3000:]}")
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("@@"))[2:])


def main(argv=None) -> int:
    args = parse_args(argv)
    print(environment())
    found: dict[str, list[dict]] = {"none": [], "multiscale": []}
    for _ in range(args.repeats):  # sides alternated
        for context in found:
            found[context].append(run_side(context, args))
    rows = {}
    for context, runs in found.items():
        step = median([r["seconds_per_step"] for r in runs])
        rows[context] = (args.batch_size / step, max(r["peak_gb"] for r in runs))
    device = found["none"][0]["device"]
    print(
        f"\n{args.backbone} at {args.image_size} px, batches of {args.batch_size}, AdamW, {device}; median of "
        f"{args.repeats} x {args.steps} steps (first {WARMUP} of each untimed); peak "
        f"{'GPU memory allocated' if device == 'cuda' else 'RSS of the process'}"
    )
    print(f"  {'model.context':<14}{'samples/s':>11}{'peak GB':>9}")
    for context, (rate, peak) in rows.items():
        print(f"  {context:<14}{rate:>11.1f}{peak:>9.2f}")
    (single, single_peak), (multi, multi_peak) = rows["none"], rows["multiscale"]
    print(f"  multiscale / single: throughput {multi / single:.2f}, peak memory {multi_peak / single_peak:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
