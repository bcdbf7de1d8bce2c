"""The benchmark scripts run (their figures live in benchmarks/RESULTS.md; nothing here times anything)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

HER2ST_DEV = REPO.parent / "shared" / "data" / "her2st_dev" / "metadata.csv"


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")


def _private_expreg_uses(tree: ast.AST) -> list[str]:
    """``from expreg... import _x`` and ``name._x`` where ``name`` was imported from expreg."""
    expreg_names, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("expreg"):
            for alias in node.names:
                expreg_names.add(alias.asname or alias.name)
                if alias.name.startswith("_"):
                    found.append(f"from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            expreg_names.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("expreg"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in expreg_names:
                found.append(ast.unparse(node))
    return found


def test_benchmarks_use_public_expreg_names_only():
    """Benchmarks (and the scripts they run in subprocesses) call expreg's public functions only."""
    found = []
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        trees = [tree]
        for node in ast.walk(tree):  # embedded scripts (bench_scale.py): "imports --- body"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "expreg" in node.value:
                try:
                    trees.append(ast.parse("\n".join(node.value.split("---"))))
                except SyntaxError:
                    pass
        found += [f"{path.name}: {use}" for t in trees for use in _private_expreg_uses(t)]
    assert not found


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


@pytest.mark.slow
def test_map_benchmark_runs_end_to_end_in_quick_mode(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_map.py"), "--quick", "--work_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "pixels: SlideTiles == cut_box" in out
    ratios = [float(line.split("= ")[1].split()[0]) for line in out.splitlines() if " / bare = " in line]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)  # 0 and 1 workers
    assert "peak RSS of python -m expreg.map, one level" in out
    assert all(
        any(f.name.startswith(f"map_10000px_tissue0.1_{kind}") for f in tmp_path.iterdir())
        for kind in ("pyramid", "onelevel")
    )


@pytest.mark.slow
@pytest.mark.skipif(not HER2ST_DEV.is_file(), reason=f"its default images, {HER2ST_DEV}, are absent")
def test_embeddings_benchmark_runs_end_to_end_in_quick_mode():
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_embeddings.py"), "--quick"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "resnet18: 512 features; store rows == bare loop rows" in out
    ratios = [float(line.split("= ")[1].split()[0]) for line in out.splitlines() if "ensure_embeddings / " in line]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)  # against both bare loops
    rows = [line for line in out.splitlines() if line.startswith(("| linear |", "| mlp |"))]
    assert len(rows) == 2  # one batch size, both heads
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3].split()[0]) > 0 and float(cells[4].split()[0]) > 0


@pytest.mark.slow  # about 2.5 minutes
def test_cohort_benchmark_runs_end_to_end_in_quick_mode(tmp_path):
    command = [sys.executable, str(REPO / "benchmarks" / "bench_cohort.py"), "--quick", "--work_dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "speed-up of 2 workers over 1: " in out and "shards, 2 workers" in out
    rates = [float(line.split("ratio to bare")[1].split()[0]) for line in out.splitlines() if "ratio to bare" in line]
    assert len(rates) == 6 and rates[0] == 1.0 and all(r > 0 for r in rates)  # quick-mode timings: noise, not targets
    assert "expreg, Parquet shards, 2 workers" in out and "expreg, shards + image cache, 0 workers" in out
    assert "hvg:50 on 3,000 spots" in out and "anonymous" in out
    assert "map of a cohort section" in out and "not measured" not in out.split("Stage times")[1]
    assert "one whole-slide map of a cohort section" in out and "one CV fold, one epoch" in out


def test_the_synthetic_cohort_is_seeded_and_prepare_reads_it_at_its_scale(tmp_path):
    import numpy as np

    from expreg.data.h5ad import read_h5ad
    from expreg.ingest.prepare import Options, prepare

    args = ["--sections", "2", "--spots", "150", "--genes", "600", "--um_per_px", "8", "--sections_per_patient", "1"]
    for name in ("a", "b"):
        command = [sys.executable, str(REPO / "benchmarks" / "make_cohort.py"), "--out", str(tmp_path / name), *args]
        result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.startswith("2 sections, ")
    matrix = "S001/outs/filtered_feature_bc_matrix.h5"
    assert (tmp_path / "a" / matrix).read_bytes() == (tmp_path / "b" / matrix).read_bytes()  # seeded
    summary = prepare(tmp_path / "a" / "samples.csv", tmp_path / "p", Options(patch_um=112, patch_px=14))
    for sample in summary["samples"]:
        assert sample["um_per_px"] == pytest.approx(8.0, rel=1e-4) and "hexagonal Visium" in sample["um_per_px_source"]
        assert not sample["warnings"] or all("repeated" in w for w in sample["warnings"])
        assert 100 < sample["spots_kept"] < 220
    table = read_h5ad(tmp_path / "p" / "expression.h5ad")
    counts = table.X.toarray()
    library = counts.sum(axis=1)
    assert 500 < np.median(library) < 30_000 and (counts == 0).mean() > 0.25  # ~90 % zeros at 18,000 genes
    assert any(len(v) for v in table.uns["genes_not_measured"].values())  # ~1 % of genes missing per section
    assert any(name.endswith("-1") for name in table.var_names)  # a symbol naming two ids


@pytest.mark.slow  # two training processes (~15 s)
def test_context_benchmark_runs_end_to_end_in_quick_mode():
    command = [sys.executable, str(REPO / "benchmarks" / "bench_context.py"), "--quick"]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {}  # label: samples/s, peak GB, throughput / none, memory / none
    for line in result.stdout.splitlines():
        if line.startswith("  ") and not line.split()[0] == "model.context":
            fields = line.split()
            rows[" ".join(fields[:-4])] = [float(f) for f in fields[-4:]]
    assert set(rows) == {"none", "multiscale", "multiscale, separate encoder", "multiscale, gated"}
    assert all(r[0] > 0 and r[1] > 0 for r in rows.values()) and rows["none"][2:] == [1.0, 1.0]
    for rate, peak, speed, memory in rows.values():  # the ratios are of the printed (rounded) figures
        assert speed == pytest.approx(rate / rows["none"][0], rel=0.05, abs=0.01)
        assert memory == pytest.approx(peak / rows["none"][1], rel=0.05, abs=0.01)
    assert "2,000 spots in 4 sections" in result.stdout and "neighbourhoods found and averaged in" in result.stdout
