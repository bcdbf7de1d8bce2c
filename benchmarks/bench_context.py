"""What context costs: training steps of multiscale models vs a single-patch one, and a neighbourhood head on
100,000 cached embeddings (issue 25).

    python benchmarks/bench_context.py                 # resnet18 at 112 px, batches of 32 (~6 min on 2 cores)
    python benchmarks/bench_context.py --quick         # seconds: checks the script end to end

The same backbone, batch size and optimizer (AdamW); a multiscale model reads 6 channels per sample (the
patch and its context patch: twice the images per step) and has a head twice as wide; its variants embed
the context patch with a second encoder (``model.context_encoder=separate``) or gate it
(``model.fusion=gated``). Random inputs, one process, the device of this machine (a GPU when there is
one). Sides are alternated and each side's first ``WARMUP`` steps are not timed; each side runs in its own
process for its peak memory (RSS on the CPU, ``max_memory_allocated`` on a GPU).

The neighbourhood part (``model.context=neighbourhood``, ``train.mode=frozen``): the time to find the
neighbourhoods of 100,000 spots in 40 sections on a Visium-like lattice and average 512-feature
embeddings over them, then one epoch of a linear head (AdamW, batches of 256) over the 100,000 rows with
and without the neighbourhood half.
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

context, encoder, fusion = sys.argv[1].split(":")
backbone, size, batch, steps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
options = dict(context=context, context_encoder=encoder, fusion=fusion)
model = build_model(backbone, 50, image_size=size, **options).to(device).train()
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


SIDES = {  # label: context:context_encoder:fusion
    "none": "none:shared:concat",
    "multiscale": "multiscale:shared:concat",
    "multiscale, separate encoder": "multiscale:separate:concat",
    "multiscale, gated": "multiscale:shared:gated",
}
NEIGHBOURHOOD = r"""
import json, sys, time
import numpy as np, torch
from expreg.data.neighbours import lattice_radius, neighbourhood_matrix

spots, sections, width, epochs = int(sys.argv[1]), int(sys.argv[2]), 512, 1
rng = np.random.default_rng(0)
per = spots // sections
side = int(np.ceil(np.sqrt(per)))
grid = np.stack([np.arange(per) % side * 100.0 + (np.arange(per) // side % 2) * 50.0, np.arange(per) // side * 86.6], 1)
xy = np.concatenate([grid + rng.normal(0, 1, grid.shape) for _ in range(sections)])
names = np.repeat(np.arange(sections), per)
embeddings = rng.standard_normal((len(xy), width)).astype(np.float32)
start = time.perf_counter()
matrix = neighbourhood_matrix(names, xy, lattice_radius(names, xy))
around = np.asarray(matrix @ embeddings.astype(np.float64), dtype=np.float32)
found = time.perf_counter() - start
y = torch.from_numpy(rng.standard_normal((len(xy), 50)).astype(np.float32))

def epoch(x):
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], 50)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    start = time.perf_counter()
    for i in range(0, len(x), 256):
        loss = torch.nn.functional.mse_loss(head(x[i : i + 256]), y[i : i + 256])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start

plain = torch.from_numpy(embeddings)
both = torch.from_numpy(np.hstack([embeddings, around]))
times = {"plain": [], "neighbourhood": []}
for _ in range(3):
    times["plain"].append(epoch(plain))
    times["neighbourhood"].append(epoch(both))
print("@@" + json.dumps({"spots": len(xy), "find_and_average_s": found, "mean_size": float(np.diff(matrix.indptr).mean()),
                         **{k: sorted(v)[1] for k, v in times.items()}}))
"""


def run_side(context: str, args) -> dict:
    command = [sys.executable, "-c", SIDE, context, args.backbone, str(args.image_size), str(args.batch_size)]
    result = subprocess.run([*command, str(args.steps)], capture_output=True, text=True, cwd=REPO, check=False)
    if result.returncode != 0:
        sys.exit(f"bench_context: the {context} side failed:\n{result.stderr[-3000:]}")
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("@@"))[2:])


def main(argv=None) -> int:
    args = parse_args(argv)
    print(environment())
    found: dict[str, list[dict]] = {label: [] for label in SIDES}
    for _ in range(args.repeats):  # sides alternated
        for label, side in SIDES.items():
            found[label].append(run_side(side, args))
    rows = {}
    for label, runs in found.items():
        step = median([r["seconds_per_step"] for r in runs])
        rows[label] = (args.batch_size / step, max(r["peak_gb"] for r in runs))
    device = found["none"][0]["device"]
    print(
        f"\n{args.backbone} at {args.image_size} px, batches of {args.batch_size}, AdamW, {device}; median of "
        f"{args.repeats} x {args.steps} steps (first {WARMUP} of each untimed); peak "
        f"{'GPU memory allocated' if device == 'cuda' else 'RSS of the process'}"
    )
    single, single_peak = rows["none"]
    print(f"  {'model.context':<30}{'samples/s':>11}{'peak GB':>9}{'throughput / none':>19}{'memory / none':>15}")
    for label, (rate, peak) in rows.items():
        print(f"  {label:<30}{rate:>11.1f}{peak:>9.2f}{rate / single:>19.2f}{peak / single_peak:>15.2f}")
    neighbourhood_part(args)
    return 0


def neighbourhood_part(args) -> None:
    spots, sections = (2_000, 4) if args.quick else (100_000, 40)
    command = [sys.executable, "-c", NEIGHBOURHOOD, str(spots), str(sections)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    if result.returncode != 0:
        sys.exit(f"bench_context: the neighbourhood part failed:\n{result.stderr[-3000:]}")
    r = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("@@"))[2:])
    print(
        f"\nneighbourhood (model.context=neighbourhood): {r['spots']:,} spots in {sections} sections, 512 features; "
        f"neighbourhoods found and averaged in {r['find_and_average_s']:.2f} s ({r['mean_size']:.2f} spots each); "
        f"one linear-head epoch (batches of 256, median of 3): {r['plain']:.2f} s on the embeddings alone, "
        f"{r['neighbourhood']:.2f} s beside their neighbourhood means ({r['neighbourhood'] / r['plain']:.2f}x)"
    )


if __name__ == "__main__":
    sys.exit(main())
