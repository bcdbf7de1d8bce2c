"""Checkpoints and exact resume: ``checkpoints/last`` (``accelerator.save_state`` + ``trainer_state.json``),
``checkpoints/best`` (``save_pretrained``), and the checks ``--resume`` makes before anything is written
(the run's own config, the same data, loadable random states).

Exact resume: the shuffling order, augmentation and worker seeds are functions of
(seed, epoch, sample) (see ``expreg.data``), checkpoints are taken only at optimizer-step
boundaries with the number of batches done, and a resumed epoch skips those batches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from expreg.config import ConfigError, RunConfig, config_from_dict, parse_overrides
from expreg.run_dir import (
    CONFIG_FILE,
    TRAINER_STATE_FILE,
    RunDirError,
    atomic_write_text,
    file_sha256,
    read_status,
    replace_dir,
    write_json,
)
from expreg.training.interrupts import fault_point

logger = logging.getLogger("expreg")
# Keys that may change when a run is resumed; any other difference is an error.
RESUMABLE_OVERRIDES = {"train.stop_after_steps", "logging.report_to", "train.push_to_hub", "train.hub_model_id"}


@dataclass
class TrainerState:
    """Loop position and bookkeeping, saved with every checkpoint (``trainer_state.json``)."""

    epoch: int = 0
    batches_done: int = 0  # batches of ``epoch`` already trained (per process)
    global_step: int = 0  # optimizer steps
    # Per process: running sum of loss x samples in this epoch and the samples counted. Kept per
    # process so that a resumed epoch adds up the same numbers in the same order.
    loss_sums: list[float] = field(default_factory=list)
    loss_counts: list[int] = field(default_factory=list)
    best_spearman: float | None = None  # None while no epoch had a defined mean Spearman
    best_epoch: int | None = None
    num_processes: int = 1  # a resumed run must use the same number (per-process positions and sums)
    skipped_images: int = 0  # unreadable training images skipped (bad_image_policy=skip), all processes
    skipped_batches: int = 0  # batches with a non-finite loss skipped (nonfinite_loss_policy=skip)
    scheduler: dict = field(default_factory=dict)  # the LR scheduler's state (JSON: no pickle to load)
    data_sha256: dict = field(default_factory=dict)  # metadata CSV and split file: --resume refuses other data
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)


@contextlib.contextmanager
def writing(what: Path):
    """Report any failure while writing ``what`` as an ``OSError`` naming it.

    safetensors and torch.save raise their own types on a full disk (SafetensorError,
    RuntimeError); callers and users should see one kind of write error.
    """
    try:
        yield
    except OSError as err:
        raise OSError(err.errno, f"writing {what}: {err.strerror or err}") from err
    except Exception as err:  # noqa: BLE001 - see docstring
        raise OSError(f"writing {what}: {type(err).__name__}: {err}") from err


def save_checkpoint(accelerator, run_dir: Path, state: TrainerState, scheduler) -> None:
    """``accelerator.save_state`` into a temporary folder, then an atomic swap to ``checkpoints/last``.

    A process killed at any moment leaves ``checkpoints/last`` (or, for the instant of the swap,
    ``checkpoints/last.old``) complete; ``trainer_state.json`` is written last inside the folder.
    """
    tmp = run_dir / "checkpoints" / ".last.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with writing(tmp):
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.scheduler = scheduler.state_dict()
        with writing(tmp):
            write_json(tmp / TRAINER_STATE_FILE, asdict(state))
        fault_point("save", state.global_step)
        replace_dir(tmp, run_dir / "checkpoints" / "last")
        fault_point("saved", state.global_step)
    accelerator.wait_for_everyone()


def save_best_model(accelerator, model, run_dir: Path, card: str) -> None:
    """``save_pretrained`` and the model card into a temporary folder, then an atomic swap to ``checkpoints/best``."""
    tmp = run_dir / "checkpoints" / ".best.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    with writing(tmp):
        accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
        atomic_write_text(tmp / "README.md", card)
    replace_dir(tmp, run_dir / "checkpoints" / "best")


def load_checkpoint(accelerator, checkpoint: str, scheduler) -> TrainerState:
    path = resolve_checkpoint(checkpoint)
    state = TrainerState(**json.loads((path / TRAINER_STATE_FILE).read_text()))
    if state.num_processes != accelerator.num_processes:
        raise RunDirError(
            f"--resume {checkpoint}: the run was trained with {state.num_processes} process(es), this launch has "
            f"{accelerator.num_processes}; resume with the same number (an exact resume depends on it)"
        )
    _check_rng_state(path, accelerator.process_index, checkpoint)
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as err:  # weights_only=True refused a pickle that would run code
        raise RunDirError(
            f"--resume {checkpoint}: a checkpoint file cannot be loaded safely ({str(err).splitlines()[0]}); "
            "it was not written by expreg or was tampered with. Nothing in it was executed"
        ) from err
    scheduler.load_state_dict(state.scheduler)
    return state


def _check_rng_state(path: Path, rank: int, checkpoint: str) -> None:
    """accelerate skips an unloadable RNG state file with an info line, which would silently break an
    exact resume (and hide a tampered file): load it first, safely, and refuse on failure."""
    from accelerate.utils.other import load

    rng_file = path / f"random_states_{rank}.pkl"
    try:
        load(rng_file)  # weights_only=True: never runs code
    except Exception as err:  # noqa: BLE001 - missing, truncated, or a pickle that would run code
        raise RunDirError(
            f"--resume {checkpoint}: {rng_file.name} cannot be loaded safely ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); without it the run would not resume exactly. "
            "Nothing in it was executed"
        ) from err


def data_fingerprint(cfg: RunConfig) -> dict:
    """SHA-256 of the files a run's data come from (the metadata CSV and the split file)."""
    return {
        "metadata_csv": file_sha256(cfg.data.metadata_csv),
        "split_csv": file_sha256(cfg.data.split_csv) if cfg.data.split_csv else None,
        **({"expression_file": file_sha256(cfg.data.expression_file)} if cfg.data.expression_file else {}),
    }


def check_resume_data(cfg: RunConfig, checkpoint: str, allow_change: bool, gene_names: list[str]) -> str | None:
    """Refuse to resume on other data than the run started with; returns a warning when allowed.

    Called before anything is written. Other genes (another K, or other names) are always an
    error; a changed metadata CSV or split file (which would silently change the training rows
    and the target statistics half-way through a run) only without ``allow_change``.
    """
    path = resolve_checkpoint(checkpoint)
    saved_genes = json.loads((path.parent.parent / "target_stats.json").read_text())["gene_names"]
    if len(saved_genes) != len(gene_names):
        raise RunDirError(
            f"--resume {checkpoint}: the run predicts {len(saved_genes)} genes but the metadata now has "
            f"{len(gene_names)} targets; the data changed since the run started"
        )
    if saved_genes != list(gene_names):
        differ = [f"{a} -> {b}" for a, b in zip(saved_genes, gene_names) if a != b]
        raise RunDirError(
            f"--resume {checkpoint}: the gene names changed since the run started ({', '.join(differ[:3])}"
            f"{' ...' if len(differ) > 3 else ''})"
        )
    saved = json.loads((path / TRAINER_STATE_FILE).read_text()).get("data_sha256") or {}
    if not saved:
        return (
            f"--resume {checkpoint}: the checkpoint predates data fingerprints; whether the metadata CSV and split "
            "file are unchanged since the run started cannot be checked"
        )
    now = data_fingerprint(cfg)
    names = {
        "metadata_csv": cfg.data.metadata_csv,
        "split_csv": cfg.data.split_csv,
        "expression_file": cfg.data.expression_file,
    }
    changed = [f"{key} {names[key]}" for key in now if key in saved and saved[key] != now[key]]
    if not changed:
        return None
    what = " and ".join(changed)
    if not allow_change:
        raise RunDirError(
            f"--resume {checkpoint}: {what} changed since the run started (SHA-256 differs from the checkpoint's); "
            "the rest of the run would train and normalise on other data. Restore the file, start a new run, or "
            "pass --allow_data_change to resume anyway"
        )
    return (
        f"--allow_data_change: resuming although {what} changed since the run started; its numbers mix two data sets"
    )


def resolve_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """``checkpoints/last``, or ``checkpoints/last.old`` when a kill hit the instant of the swap."""
    path = Path(checkpoint).resolve()
    if not (path / TRAINER_STATE_FILE).is_file():
        old = path.with_name(path.name + ".old")
        if (old / TRAINER_STATE_FILE).is_file():
            logger.warning(f"{path} is incomplete; resuming from {old}")
            return old
    return path


def check_resume_dir(checkpoint: str | os.PathLike) -> Path:
    """Validate ``--resume`` and return its run directory."""
    path = resolve_checkpoint(checkpoint)
    if not (path / TRAINER_STATE_FILE).is_file():
        raise RunDirError(
            f"--resume {checkpoint}: not an expreg checkpoint (no {TRAINER_STATE_FILE}); "
            "expected results/<run>/checkpoints/last"
        )
    run_dir = path.parent.parent
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunDirError(f"--resume {checkpoint}: {run_dir / CONFIG_FILE} is missing")
    if read_status(run_dir) == "finished":
        raise RunDirError(f"--resume {checkpoint}: the run {run_dir} has finished; start a new run instead")
    return run_dir


def resume_config(checkpoint: str | os.PathLike, requested: RunConfig | None, overrides: list[str]) -> RunConfig:
    """The run's own resolved config, plus the overrides allowed on resume.

    A recipe given with ``--resume`` must agree with the run's config (data and split paths
    aside, which the run resolved itself); overrides may change only ``RESUMABLE_OVERRIDES``.
    """
    run_dir = check_resume_dir(checkpoint)
    raw = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    saved = config_from_dict(raw, str(run_dir / CONFIG_FILE))
    allowed = {k: v for k, v in parse_overrides(overrides).items() if k in RESUMABLE_OVERRIDES}
    if requested is not None:
        if requested.train.mixed_precision is None:  # left to the launcher: take the run's
            requested.train.mixed_precision = saved.train.mixed_precision
        ignore = {
            "data.metadata_csv",
            "data.split_csv",
            "data.expression_file",
            "data.prepared",  # made absolute by the run, like the paths it implies
            "data.patches",
            "data.genes",
            "logging.run_name",
            "logging.output_dir",
        } | RESUMABLE_OVERRIDES
        diffs = [
            f"{key}: run has {a!r}, recipe has {b!r}"
            for key, a, b in _diff(saved.to_dict(), requested.to_dict())
            if key not in ignore
        ]
        diffs += _genes_differ(run_dir, saved.data.genes, requested.data.genes)
        if diffs:
            raise ConfigError(f"--resume: the recipe differs from the run's {CONFIG_FILE}: " + "; ".join(diffs))
    else:
        others = [o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0] not in RESUMABLE_OVERRIDES]
        if others:
            raise ConfigError(
                f"--resume: {', '.join(others)} cannot change when resuming (allowed: {', '.join(sorted(RESUMABLE_OVERRIDES))})"
            )
    values = {"train.stop_after_steps": None, **allowed}
    for key, value in values.items():
        section, name = key.split(".")
        raw[section][name] = value
    return config_from_dict(raw, "resumed config")


def _genes_differ(run_dir: Path, saved: str | None, requested: str | None) -> list[str]:
    """A recipe's ``data.genes`` must be what the run chose its genes by (``genes.json``) or its ``genes.txt``."""
    if saved is None or requested in (None, saved):
        return [] if requested == saved else [f"data.genes: run has {saved!r}, recipe has {requested!r}"]
    record = run_dir / "genes.json"
    spec = json.loads(record.read_text()).get("spec") if record.is_file() else None
    if requested == spec or Path(requested).resolve() == Path(saved).resolve():
        return []
    return [f"data.genes: run chose its genes by {spec or saved!r}, recipe has {requested!r}"]


def _diff(a: dict, b: dict, prefix: str = ""):
    for key in a:
        if isinstance(a[key], dict):
            yield from _diff(a[key], b.get(key, {}), f"{prefix}{key}.")
        elif a[key] != b.get(key):
            yield f"{prefix}{key}", a[key], b.get(key)
