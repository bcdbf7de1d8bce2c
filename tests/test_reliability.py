"""Faults with real processes and real signals: kills, interrupts, bad images, non-finite losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from expreg.data.metadata import MetadataError, read_metadata

sys.path.insert(0, str(Path(__file__).parent))
from test_train import REPO, TWO_PROCESSES, _env, assert_same_run, metrics, resume, train  # noqa: E402

# Workers, augmentation and dropout on; a checkpoint every 2 optimizer steps.
COMMON = (
    "data.num_workers=2",
    "data.color_jitter=0.2",
    "model.dropout=0.2",
    "train.epochs=2",
    "train.checkpointing_steps=2",
)


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory) -> Path:
    from expreg.data.demo import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("fault_data"), 5, 12, 16, 50, seed=5)


@pytest.fixture(scope="module")
def reference(data_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fault_runs")
    train(out, "reference", f"data.metadata_csv={data_csv}", *COMMON)
    return out / "reference"


def start(out: Path, name: str, *overrides: str, pause: str | None = None, launcher=(sys.executable,)):
    """Start a training process that pauses at ``pause`` (see ``expreg.train.fault_point``)."""
    env = _env()
    if pause:
        env["EXPREG_FAULT_PAUSE"] = pause
    cmd = [
        *launcher,
        str(REPO / "run_regression.py"),
        str(REPO / "recipes" / "tiny.yaml"),
        f"logging.output_dir={out}",
        f"logging.run_name={name}",
        *overrides,
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True
    )


def wait_for_marker(process: subprocess.Popen, marker: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if marker in line:
            return
        if not line and process.poll() is not None:
            raise AssertionError(f"process ended before {marker!r}: {process.stderr.read()[-2000:]}")
    raise AssertionError(f"no {marker!r} within {timeout} s")


@pytest.mark.parametrize(
    "point",
    # the slow tier: the fast one's budget (one kill point stays in the fast tier)
    ["step:3", pytest.param("save:4", marks=pytest.mark.slow), pytest.param("save:6", marks=pytest.mark.slow)],
    ids=["during-a-step", "during-save", "during-epoch-end-save"],
)
def test_sigkill_then_resume_equals_uninterrupted(reference, data_csv, point):
    out = reference.parent
    name = f"killed_{point.replace(':', '_')}"
    process = start(out, name, f"data.metadata_csv={data_csv}", *COMMON, pause=point)
    wait_for_marker(process, f"EXPREG_FAULT_POINT {point}")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    last = out / name / "checkpoints" / "last"
    state = json.loads((last / "trainer_state.json").read_text())  # the previous checkpoint is intact
    # the checkpoint before the kill: step 2 (checkpointing_steps=2) when killed after step 3 or while
    # saving step 4; step 4 while saving the epoch-end checkpoint of step 6
    assert state["global_step"] == {"step:3": 2, "save:4": 2, "save:6": 4}[point]
    result = resume(last)
    assert "resumed at epoch" in result.stdout
    assert_same_run(reference, out / name)


@pytest.mark.slow  # three training runs (~45 s)
def test_a_multiscale_run_killed_then_resumed_equals_uninterrupted(data_csv, tmp_path):
    """``model.context=multiscale`` (each spot's patch and its context patch): the same exact resume."""
    frame = pd.read_csv(data_csv)
    frame["context_path"] = frame["path"].iloc[::-1].to_numpy()  # another image of the set as each context
    csv = data_csv.parent / "metadata_context.csv"
    frame.to_csv(csv, index=False)
    settings = (f"data.metadata_csv={csv}", "model.context=multiscale", "data.context_um=48", *COMMON)
    train(tmp_path, "reference", *settings)
    process = start(tmp_path, "killed", *settings, pause="step:3")
    wait_for_marker(process, "EXPREG_FAULT_POINT step:3")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert "resumed at epoch" in resume(tmp_path / "killed" / "checkpoints" / "last").stdout
    assert_same_run(tmp_path / "reference", tmp_path / "killed")
    config = json.loads((tmp_path / "killed" / "checkpoints" / "best" / "config.json").read_text())
    assert config["context"] == "multiscale" and config["context_um"] == 48.0


@pytest.mark.parametrize(
    "signum", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGINT], ids=["SIGTERM", "SIGINT"]
)
def test_signal_saves_a_checkpoint_and_exits_nonzero(reference, data_csv, signum):
    out = reference.parent
    name = f"signalled_{signum.name}"
    process = start(out, name, f"data.metadata_csv={data_csv}", *COMMON, pause="step:3")
    wait_for_marker(process, "EXPREG_FAULT_POINT step:3")
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum
    assert f"interrupted by {signum.name}" in stderr and "--resume" in stderr and str(out / name) in stderr
    assert metrics(out / name)["status"] == "interrupted"
    assert json.loads((out / name / "checkpoints" / "last" / "trainer_state.json").read_text())["global_step"] == 4
    resume(out / name / "checkpoints" / "last")
    assert_same_run(reference, out / name)


@pytest.mark.slow  # subprocess runs: in the slow tier to keep the fast one under 10 minutes
def test_resume_falls_back_to_the_previous_checkpoint_of_an_interrupted_swap(reference, data_csv, tmp_path):
    train(tmp_path, "swap", f"data.metadata_csv={data_csv}", *COMMON, "train.stop_after_steps=3")
    checkpoints = tmp_path / "swap" / "checkpoints"
    os.replace(checkpoints / "last", checkpoints / "last.old")  # the instant between the two renames
    result = resume(checkpoints / "last")
    assert "incomplete; resuming from" in result.stdout
    assert_same_run(reference, tmp_path / "swap")


def test_nonfinite_loss_stops_with_step_and_paths_and_keeps_the_checkpoint(data_csv, tmp_path):
    nan_at_5 = {"EXPREG_FAULT_NAN_AT_STEP": "5"}
    common = (f"data.metadata_csv={data_csv}", "train.checkpointing_steps=2")
    result = train(tmp_path, "nan", *common, env=nan_at_5, expect_ok=False)
    assert result.returncode == 1
    assert "non-finite loss at epoch 1, batch 5, after optimizer step 4 (process 0: loss nan, images images/P0" in (
        result.stderr
    )  # where, and the batch's image paths
    m = metrics(tmp_path / "nan")
    assert m["status"] == "failed" and "non-finite loss" in m["error"]
    state = json.loads((tmp_path / "nan" / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["global_step"] == 4  # the last good state
    result = train(tmp_path, "nan_skip", *common, "train.nonfinite_loss_policy=skip", env=nan_at_5)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "batch skipped (1 so far)" in result.stdout
    assert metrics(tmp_path / "nan_skip")["status"] == "finished"


@pytest.mark.slow  # subprocess runs: in the slow tier to keep the fast one under 10 minutes
def test_a_skipped_batch_that_ends_an_accumulation_window_drops_the_whole_step(data_csv, tmp_path):
    """nonfinite_loss_policy=skip with accumulation: the README's promise, on the weights themselves."""
    # test_vit: no BatchNorm, whose running statistics every forward pass updates, step or not
    common = (f"data.metadata_csv={data_csv}", "model.backbone=test_vit", "train.grad_accum_steps=2")
    common += ("train.nonfinite_loss_policy=skip",)
    train(tmp_path, "one_step", *common, "train.stop_after_steps=1")
    last_bad = train(
        tmp_path, "last_bad", *common, "train.stop_after_steps=2", env={"EXPREG_FAULT_NAN_AT_STEP": "2.2"}
    )
    assert "batch skipped (1 so far)" in last_bad.stdout
    first_bad = train(
        tmp_path, "first_bad", *common, "train.stop_after_steps=2", env={"EXPREG_FAULT_NAN_AT_STEP": "2.1"}
    )
    assert "batch skipped (1 so far)" in first_bad.stdout

    def weights(name):
        return load_file(tmp_path / name / "checkpoints" / "last" / "model.safetensors")

    before, dropped, kept = weights("one_step"), weights("last_bad"), weights("first_bad")
    assert all(torch.equal(before[k], dropped[k]) for k in before)  # step 2 dropped: its good batch too
    assert not all(torch.equal(before[k], kept[k]) for k in before)  # step 2 made from its good batch
    state = json.loads((tmp_path / "last_bad" / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["skipped_batches"] == 1


def _corrupt_one_training_image(data_csv: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the data with a split file; one training image truncated (it still exists)."""
    csv, split, _ = _corrupt_images(data_csv, tmp_path, "train", 1)
    return csv, split


def _corrupt_images(data_csv: Path, tmp_path: Path, part: str, count: int) -> tuple[Path, Path, list[str]]:
    """A copy of the data with a split file; ``count`` images of split ``part`` truncated (they still exist)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_csv.parent, data)
    from expreg.splits import main as splits_main

    split = tmp_path / "split.csv"
    assert splits_main(["--metadata_csv", str(data / "metadata.csv"), "--out_csv", str(split), "--seed", "0"]) == 0
    victims = list(pd.read_csv(split).query(f"split == '{part}'")["path"].iloc[3 : 3 + count])
    assert len(victims) == count
    for victim in victims:
        (data / victim).write_bytes((data / victim).read_bytes()[:40])
    return data / "metadata.csv", split, victims


@pytest.mark.slow  # 17 s of runs: the fast tier's budget (an unreadable validation image is tested there)
def test_image_broken_after_validation_fails_or_is_skipped(data_csv, tmp_path):
    csv, split = _corrupt_one_training_image(data_csv, tmp_path)
    common = (f"data.metadata_csv={csv}", f"data.split_csv={split}", "train.epochs=1")
    result = train(tmp_path, "fail", *common, expect_ok=False)
    assert result.returncode == 1 and "cannot be read: " in result.stderr and "Traceback" not in result.stderr
    assert "data.bad_image_policy=skip" in result.stderr
    assert metrics(tmp_path / "fail")["status"] == "failed"
    result = train(tmp_path, "skip", *common, "data.bad_image_policy=skip")
    assert "skipped 1 unreadable training image(s)" in result.stdout
    assert metrics(tmp_path / "skip")["status"] == "finished"


def test_an_unreadable_validation_image_stops_the_run_even_with_skip(data_csv, tmp_path):
    """bad_image_policy=skip is for training only: a skipped validation image would misalign every metric."""
    csv, split, (victim,) = _corrupt_images(data_csv, tmp_path, "validation", 1)
    common = (f"data.metadata_csv={csv}", f"data.split_csv={split}", "train.epochs=1")
    result = train(tmp_path, "val_skip", *common, "data.bad_image_policy=skip", expect_ok=False)
    assert result.returncode == 1 and victim in result.stderr and "cannot be read" in result.stderr
    assert "Traceback" not in result.stderr
    assert metrics(tmp_path / "val_skip")["status"] == "failed"
    assert not (tmp_path / "val_skip" / "predictions_val.csv").exists()


@pytest.mark.slow  # end-to-end; moved to the slow tier to keep the fast tier under 10 minutes
def test_image_cache_finds_unreadable_images_before_training(data_csv, tmp_path):
    csv, split, victims = _corrupt_images(data_csv, tmp_path, "train", 7)
    common = (f"data.metadata_csv={csv}", f"data.split_csv={split}", "train.epochs=1", "data.image_cache=true")
    common += (f"data.image_cache_dir={tmp_path / 'cache'}",)
    result = train(tmp_path, "fail", *common, expect_ok=False)
    assert result.returncode == 1 and "7 train image(s) cannot be decoded: " in result.stderr
    named = [v for v in victims if v in result.stderr]
    assert len(named) == 5 and "(+2 more)" in result.stderr  # up to 5 named, the rest counted
    assert "data.bad_image_policy=skip" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "fail").exists()  # nothing started
    result = train(tmp_path, "skip", *common, "data.bad_image_policy=skip")
    assert "skipped 7 unreadable training image(s)" in result.stdout
    assert metrics(tmp_path / "skip")["status"] == "finished"


@pytest.mark.slow
def test_a_failure_in_one_process_stops_all_without_deadlock(data_csv, tmp_path):
    csv, split = _corrupt_one_training_image(data_csv, tmp_path)
    cmd = [
        *TWO_PROCESSES,
        str(REPO / "run_regression.py"),
        str(REPO / "recipes" / "tiny.yaml"),
        f"data.metadata_csv={csv}",
        f"data.split_csv={split}",
        f"logging.output_dir={tmp_path}",
        "logging.run_name=ddp_fail",
        "train.epochs=1",
    ]
    start_time = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    # no deadlock: the failing process stops the other at once (a normal run of this size takes ~15 s)
    assert result.returncode != 0 and time.monotonic() - start_time < 120
    assert "cannot be read: " in result.stdout + result.stderr
    metrics_file = tmp_path / "ddp_fail" / "metrics.json"
    assert not metrics_file.exists() or metrics(tmp_path / "ddp_fail")["status"] != "finished"


def test_unwritable_output_directory_is_a_clear_error(data_csv, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the results folder should be")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "run_regression.py"),
            str(REPO / "recipes" / "tiny.yaml"),
            f"data.metadata_csv={data_csv}",
            f"logging.output_dir={blocker / 'results'}",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2 and "cannot create the run directory" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"", "unreadable image"), (b"this is not an image", "unreadable image"), ("truncate", "unreadable image")],
    ids=["zero-byte", "not-an-image", "truncated"],
)
def test_decode_check_catches_broken_files(dataset_csv, content, expected):
    frame = pd.read_csv(dataset_csv)
    target = dataset_csv.parent / frame.loc[2, "path"]
    target.write_bytes(target.read_bytes()[:60] if content == "truncate" else content)
    read_metadata(dataset_csv)  # exists: the cheap check passes
    with pytest.raises(MetadataError, match=f"column 'path', line 4: {expected}"):
        read_metadata(dataset_csv, check_images="decode")


@pytest.mark.parametrize("size", [(3, 5), (2400, 1800)], ids=["tiny", "large"])
def test_any_image_size_is_resized(size):
    from expreg.data import ImageTransform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8))
    assert ImageTransform(32)(image, "x.png").shape == (3, 32, 32)


class _Planted:
    """Unpickling this runs code: it creates the file named by ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.slow  # subprocess runs: in the slow tier to keep the fast one under 10 minutes
def test_resume_refuses_a_checkpoint_that_would_run_code(data_csv, tmp_path):
    """A malicious pickle planted in checkpoints/last: --resume stops, and the code never runs."""
    import pickle
    import shutil

    train(tmp_path, "run", f"data.metadata_csv={data_csv}", "train.stop_after_steps=1")
    last = tmp_path / "run" / "checkpoints" / "last"
    assert sorted(p.name for p in last.iterdir()) == [
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        "trainer_state.json",
    ]  # no pickled scheduler: its state is JSON in trainer_state.json
    marker = tmp_path / "code_ran"
    for victim in ("optimizer.bin", "random_states_0.pkl"):
        shutil.copy(last / victim, tmp_path / "original")
        with open(last / victim, "wb") as f:
            pickle.dump({"state": _Planted(marker)}, f)
        result = resume(last, expect_ok=False)
        assert result.returncode == 2 and not marker.exists(), victim  # refused, nothing executed
        assert "cannot be loaded safely" in result.stderr and "Nothing in it was executed" in result.stderr
        assert "Traceback" not in result.stderr
        shutil.copy(tmp_path / "original", last / victim)
    resume(last)  # the genuine files resume normally
    assert metrics(tmp_path / "run")["status"] == "finished"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"state": _Planted(marker)}, f)
    with open(tmp_path / "evil.pkl", "rb") as f:
        pickle.load(f)
    assert marker.exists()  # the planted file really runs code when unpickled without protection


def test_csv_paths_cannot_make_expreg_write_elsewhere(data_csv, tmp_path):
    import shutil

    data = tmp_path / "data" / "nested"
    shutil.copytree(data_csv.parent, data)
    frame = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    frame["path"] = ["../nested/" + p for p in frame["path"]]  # paths that climb out of the CSV's folder
    frame.to_csv(data / "metadata.csv", index=False)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*")}
    train(tmp_path / "results", "escape", f"data.metadata_csv={data / 'metadata.csv'}", "train.epochs=1")
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*")}
    assert before == after  # nothing written or touched beside the data
    assert {p.name for p in tmp_path.iterdir()} == {"data", "results"}


def _limit_file_size():
    """preexec_fn: every file this process writes is capped at 64 KiB, as if the disk were full."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get an OSError (EFBIG) instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_disk_full_is_a_clear_error_and_never_a_finished_run(data_csv, tmp_path):
    overrides = (f"data.metadata_csv={data_csv}", "train.epochs=1", "train.checkpointing_steps=1")
    result = train(tmp_path, "full", *overrides, expect_ok=False, preexec_fn=_limit_file_size)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "run_regression: error: writing" in result.stderr and "File too large" in result.stderr
    assert "Traceback" not in result.stderr
    m = metrics(tmp_path / "full")  # small files still fit: the run says why it stopped
    assert m["status"] == "failed" and "File too large" in m["error"]
    assert (
        not (tmp_path / "full" / "checkpoints" / "last").exists()
        or (tmp_path / "full" / "checkpoints" / "last" / "trainer_state.json").is_file()
    )  # a checkpoint folder is complete or absent, never half-written


def test_early_stopping_decided_before_a_kill_holds_after_resume(data_csv, tmp_path):
    # test_vit with lr=1e-12 cannot improve after epoch 1: patience 2 stops after epoch 3
    common = (
        f"data.metadata_csv={data_csv}",
        "model.backbone=test_vit",
        "train.lr=1e-12",
        "train.epochs=6",
        "train.early_stopping_patience=2",
    )
    train(tmp_path, "es", *common)
    history = metrics(tmp_path / "es")["history"]
    assert len(history) == 3
    # killed right after the checkpoint that holds the stopping decision replaced checkpoints/last
    process = start(tmp_path, "es_killed", *common, pause=f"saved:{history[-1]['step']}")
    wait_for_marker(process, "EXPREG_FAULT_POINT saved:")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    state = json.loads((tmp_path / "es_killed" / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["epoch"] == 3 and state["bad_epochs"] == 2 and state["global_step"] == history[-1]["step"]
    assert metrics(tmp_path / "es_killed")["status"] == "running"  # killed before it could finish
    result = resume(tmp_path / "es_killed" / "checkpoints" / "last")
    assert "early stopping: no improvement in 2 epochs" in result.stdout
    assert "epoch 4/6" not in result.stdout + result.stderr  # the saved decision is honoured: no epoch runs
    assert metrics(tmp_path / "es_killed")["history"] == history
    assert metrics(tmp_path / "es_killed")["status"] == "finished"


@pytest.mark.slow
def test_nonfinite_loss_on_one_process_is_reported_with_that_process_batch(data_csv, tmp_path):
    env = dict(_env(), EXPREG_FAULT_NAN_AT_STEP="2@1")  # only process 1
    cmd = [
        *TWO_PROCESSES,
        str(REPO / "run_regression.py"),
        str(REPO / "recipes" / "tiny.yaml"),
        f"data.metadata_csv={data_csv}",
        f"logging.output_dir={tmp_path}",
        "logging.run_name=nan2",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode != 0
    m = metrics(tmp_path / "nan2")
    assert m["status"] == "failed" and "process 1: loss nan, images images/" in m["error"]
    assert "process 0:" not in m["error"]  # the finite process is not blamed


@pytest.mark.slow
def test_sigterm_to_accelerate_launch_saves_a_checkpoint_and_resumes(data_csv, tmp_path):
    """A scheduler's SIGTERM to the launcher of 2 processes: a resumable checkpoint, status interrupted."""
    process = start(tmp_path, "term", f"data.metadata_csv={data_csv}", *COMMON, pause="step:3", launcher=TWO_PROCESSES)
    wait_for_marker(process, "EXPREG_FAULT_POINT step:3")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode != 0
    assert "interrupted by SIGTERM" in stderr and "--resume" in stderr
    assert metrics(tmp_path / "term")["status"] == "interrupted"
    state = json.loads((tmp_path / "term" / "checkpoints" / "last" / "trainer_state.json").read_text())
    # at an optimizer step boundary (3 or 4: when each process saw the signal), on both processes
    assert state["global_step"] in (3, 4) and state["num_processes"] == 2
    resume(tmp_path / "term" / "checkpoints" / "last", launcher=TWO_PROCESSES)
    train(tmp_path, "whole", f"data.metadata_csv={data_csv}", *COMMON, launcher=TWO_PROCESSES)
    assert_same_run(tmp_path / "whole", tmp_path / "term")


@pytest.mark.slow
def test_unconnected_multi_gpu_processes_are_refused(data_csv, tmp_path):
    """``--multi_gpu`` without GPUs or ACCELERATE_USE_CPU=1 starts independent processes: refused, nothing trained."""
    env = {k: v for k, v in _env().items() if k != "ACCELERATE_USE_CPU"}
    cmd = [*TWO_PROCESSES, str(REPO / "run_regression.py"), str(REPO / "recipes" / "tiny.yaml")]
    cmd += [f"data.metadata_csv={data_csv}", f"logging.output_dir={tmp_path}", "logging.run_name=alone"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode != 0
    assert "2 processes were launched but they are not connected" in result.stderr
    assert "ACCELERATE_USE_CPU=1" in result.stderr and not (tmp_path / "alone").exists()
