"""The benchmark scripts run (their figures live in benchmarks/RESULTS.md; nothing here times anything)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")


def test_gpu_check_skips_cleanly_without_a_gpu():
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU" in result.stdout and "skipped" in result.stdout


@pytest.mark.slow
def test_gpu_benchmark_runs_end_to_end_on_the_cpu():
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--smoke", "--repeats", "1", "--workers", "1"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| bf16 |")]
    assert len(rows) == 2  # without and with channels_last
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(float(c) > 0 for c in cells[2:])
    assert "data pipeline alone" in result.stdout
