"""Start-up cost and CPU precision: import times, time to the first training step, bf16 vs fp32.

    python benchmarks/bench_startup_precision.py [--repeats 3]

Measures, each in fresh subprocesses (medians of ``--repeats``):

1. ``import expreg`` and the imports each command-line tool needs before it can report a bad
   argument (``expreg.splits``, ``expreg.config``), against ``import torch`` as the baseline;
2. time from the command to the end of the first optimizer step of ``recipes/tiny.yaml``
   (``--dry_run`` on the example data; detected with the ``EXPREG_FAULT_PAUSE=step:1`` marker),
   against ``python -c 'import expreg.training.trainer'``;
3. training throughput of a resnet18 at 112 px, batch 16, on this CPU, with bf16 autocast and
   without (fp32), alternated in one process: the ratio says why the defaults use fp32 here.

The ratios are printed last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _time_command(args: list[str], repeats: int, until: str | None = None, **extra_env: str) -> float:
    """Median wall time of a fresh process (until a line containing ``until`` appears, if given)."""
    times = []
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra_env)
    for _ in range(repeats):
        start = time.perf_counter()
        process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
        )
        if until:
            for line in process.stdout:
                if until in line:
                    break
            elapsed = time.perf_counter() - start
            process.kill()
            process.wait()
        else:
            process.communicate()
            elapsed = time.perf_counter() - start
        times.append(elapsed)
    return statistics.median(times)


def _precision_ratio(steps: int, repeats: int) -> tuple[float, float]:
    import timm
    import torch

    model = timm.create_model("resnet18", num_classes=50)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(16, 3, 112, 112), torch.randn(16, 50)

    def run(bf16: bool) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return steps * 16 / (time.perf_counter() - start)

    run(False), run(True)  # warm-up
    fp32, bf16 = [], []
    for _ in range(repeats):
        fp32.append(run(False))
        bf16.append(run(True))
    return statistics.median(fp32), statistics.median(bf16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="training steps per precision measurement")
    args = parser.parse_args()
    py = sys.executable
    imports = {
        "import torch (baseline)": [py, "-c", "import torch"],
        "import expreg": [py, "-c", "import expreg"],
        "import expreg.splits (CLI)": [py, "-c", "import expreg.splits"],
        "import expreg.config (recipe check)": [py, "-c", "import expreg.config"],
        "import expreg.training.trainer (training)": [py, "-c", "import expreg.training.trainer"],
    }
    results = {name: _time_command(cmd, args.repeats) for name, cmd in imports.items()}
    with tempfile.TemporaryDirectory() as out:
        first_step = _time_command(
            [
                py,
                "run_regression.py",
                "recipes/tiny.yaml",
                "data.metadata_csv=data/example_metadata.csv",
                "data.num_workers=0",
                f"logging.output_dir={out}",
                "--dry_run",
            ],
            args.repeats,
            until="EXPREG_FAULT_POINT step:1",  # printed right after optimizer step 1 (expreg.training.interrupts.fault_point)
            EXPREG_FAULT_PAUSE="step:1",
        )
    fp32, bf16 = _precision_ratio(args.steps, args.repeats)
    import platform

    import torch

    print(
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, median of {args.repeats}"
    )
    for name, seconds in results.items():
        print(f"  {name:<40}{seconds:7.2f} s")
    print(f"  {'command -> first training step (tiny)':<40}{first_step:7.2f} s")
    print(f"  {'resnet18 112 px fp32 training':<40}{fp32:7.1f} img/s")
    print(f"  {'resnet18 112 px bf16 autocast training':<40}{bf16:7.1f} img/s")
    print()
    base = results["import torch (baseline)"]
    print(f"import expreg / import torch = {results['import expreg'] / base:.2f}")
    print(
        f"import expreg.splits / import torch = {results['import expreg.splits (CLI)'] / base:.2f} (the splits CLI never imports torch)"
    )
    print(
        "first training step / import expreg.training.trainer = "
        f"{first_step / results['import expreg.training.trainer (training)']:.2f}"
    )
    print(f"bf16 / fp32 training throughput on this CPU = {bf16 / fp32:.2f} (below 1: fp32 is the right default here)")


if __name__ == "__main__":
    main()
