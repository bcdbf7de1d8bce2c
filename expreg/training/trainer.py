"""The training loop (the Accelerator itself is built by ``expreg.launch.build_accelerator``).

Reads top to bottom: ``run`` sets up the run directory, data, model and optimizer, prepares them
with accelerate, then alternates ``train_one_epoch`` and ``evaluate``, saving ``checkpoints/last``
(exact resume) and ``checkpoints/best`` (``save_pretrained``) as it goes. At the end the saved
best model is reloaded and scored in fp32 on validation and any test split through
``expreg.inference`` (the numbers of ``metrics.json``, the prediction files and the model card).

Exact resume: the shuffling order, augmentation and worker seeds are functions of
(seed, epoch, sample) (see ``expreg.data``), checkpoints are taken only at optimizer-step
boundaries with the number of batches done, and a resumed epoch skips those batches.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from expreg import run_dir as io
from expreg.config import DEMO_DATA, ConfigError, RunConfig, config_from_dict, parse_overrides
from expreg.data.dataset import (
    TargetStats,
    UnreadableImageError,
    build_dataloaders,
    build_dataset_dict,
    compute_target_stats,
    image_files,
    split_assignment,
)
from expreg.data.metadata import read_metadata
from expreg.data.splits import make_split_table, write_table
from expreg.evaluation.metrics import compute_metrics
from expreg.modeling.hub import HubError
from expreg.modeling.model import ExpRegModel, build_model
from expreg.seeding import seed_everything
from expreg.training.launch import check_accelerator

logger = logging.getLogger("expreg")
DRY_RUN_STEPS = 3
# Keys that may change when a run is resumed; any other difference is an error.
RESUMABLE_OVERRIDES = {"train.stop_after_steps", "logging.report_to", "train.push_to_hub", "train.hub_model_id"}


class StopRequested(Exception):
    """Training was stopped resumably (``train.stop_after_steps``); a checkpoint was saved."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a resumable checkpoint was saved."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


_SIGNAL: dict = {"received": None}
_LAST_RUN_DIR: dict = {"path": None}


def last_run_dir() -> str | None:
    """The run directory of the latest ``run`` in this process (for messages after it ended)."""
    return _LAST_RUN_DIR["path"]


def _install_signal_handlers():
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next optimizer step and stops."""
    previous = {}

    def handler(signum, frame):
        if _SIGNAL["received"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        _SIGNAL["received"] = signum
        logger.warning(f"{signal.Signals(signum).name} received: saving a checkpoint at the next optimizer step")

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handler)
    _SIGNAL["received"] = None
    return previous


def _fault_nan(step: int, rank: int, micro_batch: int) -> bool:
    """Crash tests: ``EXPREG_FAULT_NAN_AT_STEP=5`` (every process) or ``5@1`` (process 1 only) makes
    the loss of optimizer step 5 NaN; ``5.2`` only that of its 2nd micro-batch (gradient
    accumulation). Inert unless set."""
    spec = os.environ.get("EXPREG_FAULT_NAN_AT_STEP")
    if not spec:
        return False
    at, _, on_rank = spec.partition("@")
    at_step, _, at_micro = at.partition(".")
    return (
        int(at_step) == step
        and (not at_micro or int(at_micro) == micro_batch)
        and (not on_rank or int(on_rank) == rank)
    )


def fault_point(name: str, count: int) -> None:
    """Fault-injection hook for the crash tests; inert unless ``EXPREG_FAULT_PAUSE`` is set.

    With ``EXPREG_FAULT_PAUSE=name:count`` (``step:5``: after optimizer step 5; ``save:4``: while
    saving the checkpoint of step 4, after the temporary folder is written; ``saved:4``: right after
    that checkpoint replaced ``checkpoints/last``), print a marker and
    pause (up to 10 minutes, or until SIGINT/SIGTERM), so that a test can signal or kill the
    process at a known point.
    """
    spec = os.environ.get("EXPREG_FAULT_PAUSE")
    if spec and spec == f"{name}:{count}":
        print(f"EXPREG_FAULT_POINT {name}:{count}", flush=True)
        deadline = time.monotonic() + 600
        while _SIGNAL["received"] is None and time.monotonic() < deadline:  # a SIGTERM ends the pause
            time.sleep(0.05)


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


@dataclass
class RunData:
    datasets: object
    gene_names: list[str]
    target_stats: TargetStats
    split_table: object = None  # the split made by this run (written as split.csv), if any
    split_summary: str | None = None
    loaders: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def run(
    cfg: RunConfig,
    accelerator: Accelerator,
    resume_from: str | None = None,
    dry_run: bool = False,
    allow_data_change: bool = False,
) -> dict:
    """Train and evaluate one run; returns the final ``metrics.json`` content (plus, with a test split,
    ``test_per_gene_spearman``: gene -> held-out Spearman).

    ``accelerator`` must come from ``expreg.launch.build_accelerator(cfg)`` (its accumulation and
    precision are checked against the recipe). ``allow_data_change`` lets ``--resume`` go on
    although the metadata CSV or split file changed since the run started (with a warning).
    """
    check_accelerator(cfg, accelerator)
    seed_everything(cfg.seed)
    cfg.train.mixed_precision = accelerator.mixed_precision  # record what `accelerate launch` decided
    _setup_logging(accelerator)
    # Everything that can fail on bad input (data, split, model, weights) runs before the run
    # directory exists: a failed start leaves nothing behind.
    if cfg.train.mode == "linear_probe" and (accelerator.num_processes > 1 or resume_from):
        raise ConfigError("train.mode=linear_probe runs in one process and has nothing to resume (it takes minutes)")
    data = _setup_data(cfg, accelerator)
    data_warning = check_resume_data(cfg, resume_from, allow_data_change, data.gene_names) if resume_from else None
    model = _setup_model(cfg, data)
    image_cache = _setup_image_cache(cfg, data, accelerator, dry_run)
    data.loaders = _setup_loaders(cfg, data, model, accelerator.num_processes, image_cache)
    run_dir = _setup_run_dir(cfg, accelerator, resume_from, dry_run)
    _LAST_RUN_DIR["path"] = str(run_dir)
    _write_run_files(cfg, accelerator, run_dir, data)
    if data_warning:
        logger.warning(data_warning)
    if cfg.train.mode == "linear_probe":
        return _linear_probe_run(cfg, accelerator, model, data, run_dir, dry_run)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    model, optimizer, train_dl, val_dl = accelerator.prepare(
        model, optimizer, data.loaders["train"], data.loaders["validation"]
    )
    steps_per_epoch = _steps_per_epoch(len(train_dl), cfg, dry_run)
    total_steps = steps_per_epoch * (1 if dry_run else cfg.train.epochs)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.train.warmup_ratio * total_steps), total_steps)
    state = TrainerState(num_processes=accelerator.num_processes, data_sha256=data_fingerprint(cfg))
    if resume_from:
        state = _resume(accelerator, resume_from, scheduler)
        state.data_sha256 = data_fingerprint(cfg)  # what this run trains on from here (checked above)
    _log_start(cfg, accelerator, run_dir, data, len(train_dl), total_steps, state)
    if cfg.logging.report_to != "none":
        # trackers that write files (tensorboard) write them into <run_dir>/<report_to>/
        accelerator.project_configuration.logging_dir = str(run_dir)
        accelerator.trackers = []  # this run's own trackers (an accelerator reused by CV folds keeps old ones)
        accelerator.init_trackers(cfg.logging.report_to, config=_flat_config(cfg))
    previous_handlers = _install_signal_handlers()
    try:
        with _recording_status(accelerator, cfg, run_dir, state):
            return _train_epochs(
                cfg, accelerator, model, optimizer, scheduler, train_dl, val_dl, data, state, run_dir, dry_run
            )
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _recording_status(accelerator: Accelerator, cfg: RunConfig, run_dir: Path, state: TrainerState):
    """A run that ends early says so in ``metrics.json`` (``interrupted`` or ``failed``), then the error goes on."""
    try:
        yield
    except Interrupted:
        _write_status(accelerator, cfg, run_dir, state, "interrupted")
        raise
    except HubError:  # raised after the run was recorded as finished
        raise
    except (KeyboardInterrupt, Exception) as err:
        _write_status(accelerator, cfg, run_dir, state, "failed", f"{type(err).__name__}: {err}")
        raise


def _linear_probe_run(cfg, accelerator, model, data, run_dir, dry_run) -> dict:
    """``train.mode=linear_probe``: fit the probe on frozen embeddings and store it as the model's head."""
    from expreg.evaluation.baselines import embed_with, linear_probe_affine

    state = TrainerState(num_processes=accelerator.num_processes)
    _log_start(cfg, accelerator, run_dir, data, 0, 0, state)
    with _recording_status(accelerator, cfg, run_dir, state):
        train = data.datasets["train"]
        embeddings = embed_with(
            model, image_files(train), cfg.data.eval_batch_size or cfg.data.batch_size, cfg.data.num_workers
        )
        targets = data.target_stats.normalize(np.asarray(train["labels"], dtype=np.float64))
        groups = np.asarray(train["group_id"], dtype=object)
        weights, bias, info = linear_probe_affine(embeddings, targets, groups, seed=cfg.seed)
        if info["pca_components"]:
            logger.info(f"linear probe: {info['pca_components']} PCA components, ridge alpha {info['alpha']:g}")
        else:
            logger.warning("linear probe: the embeddings do not vary on the training rows; the head predicts the mean")
        head = torch.nn.Linear(weights.shape[0], weights.shape[1])
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(weights.T))
            head.bias.copy_(torch.from_numpy(bias))
        model.head = head
        train_loss = float(((embeddings @ weights + bias - targets) ** 2).mean())
        model, val_dl = accelerator.prepare(model, data.loaders["validation"])
        val_loss, predictions = evaluate(model, val_dl, accelerator, max_batches=2 if dry_run else None)
        _end_epoch(accelerator, model, cfg, data, state, run_dir, train_loss, val_loss, predictions)
        state.epoch = 1
        return _finish(accelerator, cfg, run_dir, data, state, dry_run)


def _train_epochs(cfg, accelerator, model, optimizer, scheduler, train_dl, val_dl, data, state, run_dir, dry_run):
    """The epochs: train, evaluate, keep the best, checkpoint; then finish."""
    epochs = 1 if dry_run else cfg.train.epochs
    for epoch in range(state.epoch, epochs):
        if _early_stopped(cfg, state):  # decided before an interruption or kill: honour it on resume
            break
        state.epoch = epoch
        try:
            train_loss = train_one_epoch(
                model, train_dl, optimizer, scheduler, accelerator, data, cfg, state, run_dir, dry_run
            )
        except StopRequested:
            return _stopped(accelerator, cfg, run_dir, state)
        _sync_buffers(model, accelerator)
        val_loss, predictions = evaluate(model, val_dl, accelerator, max_batches=2 if dry_run else None)
        _end_epoch(accelerator, model, cfg, data, state, run_dir, train_loss, val_loss, predictions)
        state.epoch, state.batches_done = epoch + 1, 0
        state.loss_sums, state.loss_counts = [], []
        save_checkpoint(accelerator, run_dir, state, scheduler)
        if _early_stopped(cfg, state) or state.epoch >= epochs:
            continue  # the loop ends: finish even if a signal came in meanwhile
        if _any_process(accelerator, _SIGNAL["received"] is not None):
            raise Interrupted(_SIGNAL["received"] or signal.SIGTERM)
        if cfg.train.stop_after_steps is not None and state.global_step >= cfg.train.stop_after_steps:
            return _stopped(accelerator, cfg, run_dir, state)
    return _finish(accelerator, cfg, run_dir, data, state, dry_run)


def _early_stopped(cfg: RunConfig, state: TrainerState) -> bool:
    patience = cfg.train.early_stopping_patience
    if patience and state.bad_epochs >= patience:
        logger.info(f"early stopping: no improvement in {state.bad_epochs} epochs")
        return True
    return False


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (a collective: all processes must call it)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def _write_status(accelerator, cfg, run_dir: Path, state: TrainerState, status: str, error: str | None = None) -> None:
    """Record why a run ended early in ``metrics.json`` (never presented as finished)."""
    if not accelerator.is_main_process:
        return
    result = _metrics_json(cfg, accelerator, run_dir, state, status)
    if error:
        result["error"] = error
    try:
        io.write_json(run_dir / io.METRICS_FILE, result)
    except OSError as err:  # e.g. the disk is full: the original error matters more
        logger.error(f"could not write {run_dir / io.METRICS_FILE}: {err}")


def cpu_bf16_flags(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU has native bf16 instructions (AVX512-BF16 or AMX-BF16); None when unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = set(cpuinfo.split())
    if "flags" not in flags and "flags\t:" not in cpuinfo:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cpu_precision_warning(mixed_precision: str, cpuinfo: str | None = None) -> str | None:
    """Why reduced precision is a bad idea on this CPU, or None (measured: benchmarks/RESULTS.md)."""
    if mixed_precision == "fp16":
        return "mixed_precision=fp16 on a CPU: fp16 autocast has no fast CPU kernels; use bf16 or no"
    if mixed_precision == "bf16" and cpu_bf16_flags(cpuinfo) is False:
        return (
            "mixed_precision=bf16 on a CPU without native bf16 (no AVX512-BF16/AMX): bf16 autocast was measured "
            "7-25x SLOWER than fp32 on such CPUs; use mixed_precision=no here"
        )
    return None


def _steps_per_epoch(num_batches: int, cfg: RunConfig, dry_run: bool) -> int:
    if dry_run:
        num_batches = min(num_batches, DRY_RUN_STEPS * cfg.train.grad_accum_steps)
    elif cfg.train.max_steps_per_epoch:
        num_batches = min(num_batches, cfg.train.max_steps_per_epoch * cfg.train.grad_accum_steps)
    return math.ceil(num_batches / cfg.train.grad_accum_steps)


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


def _setup_run_dir(cfg: RunConfig, accelerator: Accelerator, resume_from: str | None, dry_run: bool) -> Path:
    """Create the run directory on the main process and share its path with the others."""
    if resume_from:
        return Path(resume_from).resolve().parent.parent
    name = None
    if accelerator.is_main_process:
        explicit = cfg.logging.run_name is not None
        name = cfg.logging.run_name or io.default_run_name(
            cfg.model.backbone,
            cfg.data.batch_size,
            cfg.train.grad_accum_steps,
            accelerator.num_processes,
            cfg.train.lr,
            cfg.seed,
        )
        if dry_run and not explicit:
            name += "__dry_run"
        name = str(io.create_run_dir(cfg.logging.output_dir, name, explicit))
    return Path(broadcast_object_list([name])[0])


_LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")


def _setup_logging(accelerator: Accelerator) -> None:
    """Console logging (main process: info, others: warnings); ``log.txt`` is added with the run directory."""
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    logger.handlers.clear()
    logger.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(_LOG_FORMAT)
    logger.addHandler(console)


def _write_run_files(cfg: RunConfig, accelerator: Accelerator, run_dir: Path, data: RunData) -> None:
    """``log.txt``, the split made by the run, ``config_resolved.yaml`` and ``target_stats.json``."""
    if data.split_table is not None:
        cfg.data.split_csv = str(run_dir / "split.csv")
    if not accelerator.is_main_process:
        return
    file_handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
    file_handler.setFormatter(_LOG_FORMAT)
    logger.addHandler(file_handler)
    if data.split_table is not None:
        write_table(data.split_table, cfg.data.split_csv)
        logger.info(f"made a group-aware split from seed {cfg.seed} -> {cfg.data.split_csv}\n{data.split_summary}")
    io.atomic_write_text(run_dir / io.CONFIG_FILE, cfg.to_yaml())
    io.write_json(run_dir / "target_stats.json", {"gene_names": data.gene_names, **data.target_stats.to_dict()})
    io.write_json(run_dir / io.SPLIT_SUMMARY_FILE, _split_summary(data))


def _split_summary(data: RunData) -> dict:
    """The groups and sample counts of every split the run uses (what it was fitted and selected on)."""
    return {
        name: {"samples": len(part), "groups": sorted(set(part["group_id"]))} for name, part in data.datasets.items()
    }


def _setup_data(cfg: RunConfig, accelerator: Accelerator) -> RunData:
    """Validate the metadata, fix the split (made in memory when not given), build the datasets."""
    d = cfg.data
    with accelerator.main_process_first():
        if d.metadata_csv == DEMO_DATA:
            from expreg.data.demo import ensure_demo_dataset

            d.metadata_csv = str(ensure_demo_dataset())
        metadata = read_metadata(d.metadata_csv, d.gene_names_file, d.num_genes, d.check_images)
    d.metadata_csv = str(metadata.csv_path)
    table = summary = None
    if d.split_csv is None:  # the same on every process: a function of the CSV content and the seed
        table, summary = make_split_table(metadata, val_frac=d.val_frac, seed=cfg.seed)
        assignment = table.set_index("path").loc[metadata.frame["path"], "split"].to_numpy()
    else:
        d.split_csv = str(Path(d.split_csv).resolve())
        assignment = split_assignment(metadata, d.split_csv, fold=d.fold, seed=cfg.seed, val_frac=d.val_frac)
    datasets = build_dataset_dict(metadata, assignment, split_csv=d.split_csv, fold=d.fold)
    if "validation" not in datasets:
        raise ConfigError(f"{d.split_csv}: no validation rows; the loop selects the best epoch on validation")
    stats = compute_target_stats(datasets["train"], normalize=d.normalize_targets)
    return RunData(datasets, metadata.gene_names, stats, split_table=table, split_summary=summary and summary.format())


def _setup_image_cache(cfg: RunConfig, data: RunData, accelerator: Accelerator, dry_run: bool = False):
    """The decoded-image cache of every split's images, or None when off (and in a dry run).

    Each machine's local main process builds it; the other processes wait for it by polling the
    folder, not in a collective barrier (whose timeout a long build could exceed).
    """
    d = cfg.data
    if not d.image_cache or dry_run:
        return None
    from expreg.data.image_cache import ensure_image_cache

    if d.image_cache_dir is not None:
        d.image_cache_dir = str(Path(d.image_cache_dir).expanduser().resolve())  # the same cache on --resume
    paths = {name: image_files(part) for name, part in data.datasets.items()}
    builder = accelerator.is_local_main_process
    cache = ensure_image_cache(
        [p for part in paths.values() for p in part],
        d.image_size,
        d.image_cache_dir,
        num_workers=d.num_workers,
        progress=builder,
        build=builder,
    )
    accelerator.wait_for_everyone()  # quick: every process holds the cache by now
    problems = dict(cache.unreadable())
    for name, part in paths.items():
        bad = [(p, problems[p]) for p in part if p in problems]
        if bad and (name != "train" or d.bad_image_policy == "fail"):
            listed = "; ".join(f"{path}: {reason}" for path, reason in bad[:5])
            more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
            hint = (
                "Fix or remove them, or set data.bad_image_policy=skip to train without them"
                if name == "train"
                else "Fix or remove them: evaluation needs every image (bad_image_policy applies to training only)"
            )
            raise UnreadableImageError(f"{len(bad)} {name} image(s) cannot be decoded: {listed}{more}. {hint}")
    return cache


def _setup_loaders(cfg: RunConfig, data: RunData, model: ExpRegModel, num_processes: int, image_cache=None) -> dict:
    """DataLoaders with the backbone's own pixel normalisation (stored in the model's config)."""
    d = cfg.data
    return build_dataloaders(
        data.datasets,
        image_size=d.image_size,
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        num_workers=d.num_workers,
        seed=cfg.seed,
        target_stats=data.target_stats,
        mean=model.config.image_mean,
        std=model.config.image_std,
        dihedral=d.augment_dihedral,
        color_jitter=d.color_jitter,
        bad_image_policy=d.bad_image_policy,
        num_processes=num_processes,
        hed_jitter=d.hed_jitter,
        image_cache=image_cache,
    )


def _setup_model(cfg: RunConfig, data: RunData) -> ExpRegModel:
    m = cfg.model
    return build_model(
        m.backbone,
        len(data.gene_names),
        pretrained=m.pretrained,
        pretrained_path=m.pretrained_path,
        head=m.head,
        head_hidden_dim=m.head_hidden_dim,
        dropout=m.dropout,
        gene_names=data.gene_names,
        target_mean=data.target_stats.mean.tolist(),
        target_std=data.target_stats.std.tolist(),
        image_size=cfg.data.image_size,
    )


def _log_start(cfg, accelerator, run_dir, data, batches_per_epoch, total_steps, state) -> None:
    world = accelerator.num_processes
    effective = cfg.data.batch_size * cfg.train.grad_accum_steps * world
    sizes = ", ".join(f"{k} {len(v)}" for k, v in data.datasets.items())
    logger.info(f"run directory: {run_dir}")
    logger.info(
        f"num_processes={world} distributed_type={accelerator.distributed_type.value} "
        f"device={accelerator.device} mixed_precision={accelerator.mixed_precision} "
        f"torch_threads={torch.get_num_threads()}"
    )
    if cfg.train.mode == "linear_probe":
        logger.info(f"mode linear_probe: frozen {cfg.model.backbone} embeddings -> standardise -> PCA -> ridge")
    else:
        logger.info(
            f"effective batch size {effective} = {cfg.data.batch_size} (micro) x {cfg.train.grad_accum_steps} "
            f"(accumulation) x {world} (processes); {batches_per_epoch} batches per process per epoch, "
            f"{total_steps} optimizer steps in all"
        )
    logger.info(f"data: {sizes} samples, {len(data.gene_names)} genes; split {cfg.data.split_csv}")
    if accelerator.device.type == "cpu":
        problem = cpu_precision_warning(accelerator.mixed_precision)
        if problem:
            logger.warning(problem)
    if cfg.train.push_to_hub and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        logger.warning(f"HF_HUB_OFFLINE is set: pushing to {cfg.train.hub_model_id!r} at the end will fail")
    if state.global_step:
        logger.info(f"resumed at epoch {state.epoch}, batch {state.batches_done}, step {state.global_step}")


# --------------------------------------------------------------------------------------------
# Train and evaluate
# --------------------------------------------------------------------------------------------


def train_one_epoch(model, train_dl, optimizer, scheduler, accelerator, data, cfg, state, run_dir, dry_run) -> float:
    """One pass over the training data (resuming mid-epoch where ``state`` says); returns the mean loss."""
    model.train()
    data.loaders["train_sampler"].set_epoch(state.epoch)  # the shuffling order of this epoch
    data.loaders["train_transform"].set_epoch(state.epoch)  # the augmentation draws of this epoch
    limit = _steps_per_epoch(len(train_dl), cfg, dry_run) * cfg.train.grad_accum_steps
    loader = accelerator.skip_first_batches(train_dl, state.batches_done) if state.batches_done else train_dl
    # accelerate's loaders re-set the sampler's epoch from their own iteration counter when they
    # start; a resumed run's counter is wrong (accelerate #2016), so set the epoch explicitly.
    loader.set_epoch(state.epoch)
    rank = accelerator.process_index
    local = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (loss x samples, samples)
    if state.loss_sums:
        local += torch.tensor(
            [state.loss_sums[rank], state.loss_counts[rank]], dtype=torch.float64, device=local.device
        )
    skipped_images = 0
    progress = _progress_bar(
        accelerator, total=min(limit, len(train_dl)), initial=state.batches_done, desc=f"epoch {state.epoch + 1}"
    )
    for batch in loader:
        if state.batches_done >= limit:
            break
        paths = batch.pop("path")
        skipped_images += batch.pop("skipped")
        with accelerator.accumulate(model):
            outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
            micro_batch = state.batches_done % cfg.train.grad_accum_steps + 1
            if _fault_nan(state.global_step + 1, accelerator.process_index, micro_batch):  # crash tests only
                outputs.loss = outputs.loss * float("nan")
            nonfinite, signalled = _flags(accelerator, outputs.loss)
            if nonfinite:
                _nonfinite_loss(accelerator, cfg, state, outputs.loss, paths)  # raises unless the policy is skip
                optimizer.zero_grad()
            else:
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
                local[0] += outputs.loss.detach().double() * len(batch["labels"])
                local[1] += len(batch["labels"])
        state.batches_done += 1
        progress.update(1)
        if accelerator.sync_gradients:
            scheduler.step()
            state.global_step += 1
            fault_point("step", state.global_step)
            every, stop = cfg.train.checkpointing_steps, cfg.train.stop_after_steps
            stopping = stop is not None and state.global_step >= stop and state.batches_done < limit
            if signalled or stopping or (every and state.global_step % every == 0 and state.batches_done < limit):
                _record_loss(accelerator, state, local)
                save_checkpoint(accelerator, run_dir, state, scheduler)
            if signalled:
                progress.close()
                raise Interrupted(_SIGNAL["received"] or signal.SIGTERM)
            if stopping:
                progress.close()
                raise StopRequested
    progress.close()
    _record_loss(accelerator, state, local)
    _log_skipped(accelerator, state, skipped_images)
    return sum(state.loss_sums) / max(sum(state.loss_counts), 1)


def _log_skipped(accelerator: Accelerator, state: TrainerState, skipped_images: int) -> None:
    total = int(accelerator.reduce(torch.tensor(float(skipped_images), device=accelerator.device), reduction="sum"))
    if total:
        state.skipped_images += total
        logger.warning(
            f"epoch {state.epoch + 1}: skipped {total} unreadable training image(s) (data.bad_image_policy=skip); "
            f"{state.skipped_images} in all"
        )


def _flags(accelerator: Accelerator, loss: torch.Tensor) -> tuple[bool, bool]:
    """(non-finite loss on any process, stop signal on any process): every process decides alike."""
    flags = torch.tensor(
        [float(not torch.isfinite(loss.detach()).item()), float(_SIGNAL["received"] is not None)],
        device=loss.device,
    )
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    return bool(flags[0] > 0), bool(flags[1] > 0)


def _nonfinite_loss(accelerator: Accelerator, cfg: RunConfig, state: TrainerState, loss, paths: list[str]) -> None:
    """A non-finite loss on some process (every process calls this): skip the batch, or stop naming it."""
    where = f"epoch {state.epoch + 1}, batch {state.batches_done + 1}, after optimizer step {state.global_step}"
    if cfg.train.nonfinite_loss_policy == "skip":
        state.skipped_batches += 1
        logger.warning(f"non-finite loss at {where}: batch skipped ({state.skipped_batches} so far)")
        return
    mine = (accelerator.process_index, float(loss.detach().float()), list(paths))
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        reports = gather_object([mine])
    else:
        reports = [mine]
    bad = [(rank, value, batch) for rank, value, batch in reports if not math.isfinite(value)]
    details = "; ".join(
        f"process {rank}: loss {value}, images "
        + ", ".join(batch[:8])
        + (f" (+{len(batch) - 8} more)" if len(batch) > 8 else "")
        for rank, value, batch in bad
    )
    raise TrainingError(
        f"non-finite loss at {where} ({details}). Training stopped; checkpoints/last holds the last good state. "
        "Lower train.lr, check these images and targets, or set train.nonfinite_loss_policy=skip for isolated bad batches"
    )


def _progress_bar(accelerator: Accelerator, **kwargs) -> tqdm:
    """A progress bar on the local main process; in log files (no terminal) at most one line per 30 s."""
    interactive = sys.stderr.isatty()
    return tqdm(
        disable=not accelerator.is_local_main_process, leave=False, mininterval=0.1 if interactive else 30, **kwargs
    )


def _record_loss(accelerator: Accelerator, state: TrainerState, local: torch.Tensor) -> None:
    """Store every process's running loss sum and count in ``state`` (gathered, in rank order)."""
    gathered = accelerator.gather(local[None]).cpu().tolist()
    state.loss_sums = [row[0] for row in gathered]
    state.loss_counts = [int(row[1]) for row in gathered]


@torch.no_grad()
def evaluate(model, dataloader, accelerator: Accelerator, max_batches: int | None = None):
    """Predictions on the whole (sharded) evaluation set, gathered in dataset order.

    Returns:
        ``(loss, predictions)``: MSE on normalised targets over all samples, and normalised
        predictions of shape ``(num_samples, num_genes)``; computed once on the gathered arrays,
        so any number of processes gives the same numbers.
    """
    model.eval()
    predictions, labels = [], []
    for i, batch in enumerate(_progress_bar(accelerator, iterable=dataloader, desc="evaluate")):
        if max_batches is not None and i >= max_batches:
            break
        outputs = model(pixel_values=batch["pixel_values"])
        preds, labs = accelerator.gather_for_metrics((outputs.predictions.float(), batch["labels"]))
        predictions.append(preds.cpu().numpy())
        labels.append(labs.cpu().numpy())
    model.train()
    predictions, labels = np.concatenate(predictions), np.concatenate(labels)
    if max_batches is None and len(predictions) != len(dataloader.dataset):
        raise TrainingError(
            f"evaluation returned {len(predictions)} predictions for {len(dataloader.dataset)} samples; every "
            "evaluation image must be read (metrics on misaligned rows would be wrong)"
        )
    return float(((predictions.astype(np.float64) - labels) ** 2).mean()), predictions


def _sync_buffers(model, accelerator: Accelerator) -> None:
    """Give every process rank 0's BatchNorm statistics, so evaluation and the saved model agree."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    for buffer in accelerator.unwrap_model(model).buffers():
        dist.broadcast(buffer.data, src=0)


# --------------------------------------------------------------------------------------------
# End of epoch, checkpoints, resume
# --------------------------------------------------------------------------------------------


def _end_epoch(accelerator, model, cfg, data, state, run_dir, train_loss, val_loss, predictions) -> None:
    """Metrics, history, best model, predictions and the early-stopping count."""
    val = data.datasets["validation"]
    targets = np.asarray(val["labels"], dtype=np.float64)[: len(predictions)]
    expression = data.target_stats.denormalize(predictions.astype(np.float64))
    metrics = compute_metrics(expression, targets, data.gene_names)
    entry = {
        "epoch": state.epoch + 1,
        "step": state.global_step,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_spearman_mean": metrics.spearman_mean,
        "val_pearson_mean": metrics.pearson_mean,
    }
    state.history.append(entry)
    logger.info(
        f"epoch {entry['epoch']}/{cfg.train.epochs} step {entry['step']}: train_loss {train_loss:.4f} "
        f"val_loss {val_loss:.4f} val mean Spearman {metrics.spearman_mean:.4f} "
        f"val mean Pearson {metrics.pearson_mean:.4f}"
    )
    if cfg.logging.report_to != "none":
        accelerator.log({k: v for k, v in entry.items() if k not in ("epoch", "step")}, step=state.global_step)
    if math.isnan(metrics.spearman_mean):
        logger.warning("validation mean Spearman is undefined (constant predictions or truth for every gene)")
    if _improved(metrics.spearman_mean, state):
        defined = not math.isnan(metrics.spearman_mean)
        state.best_spearman = metrics.spearman_mean if defined else None
        state.best_epoch, state.bad_epochs = state.epoch + 1, 0
        if accelerator.is_main_process:
            card = _model_card(cfg, accelerator, run_dir, data, entry, metrics)
            _save_best(accelerator, model, run_dir, val, expression, metrics, card)
    else:
        state.bad_epochs += 1
    if accelerator.is_main_process:
        io.write_json(run_dir / io.METRICS_FILE, _metrics_json(cfg, accelerator, run_dir, state, "running"))


def _improved(spearman: float, state: TrainerState) -> bool:
    """Better than the best so far; the first epoch always counts, so a best model always exists."""
    if state.best_epoch is None:
        return True
    if math.isnan(spearman):
        return False
    return state.best_spearman is None or spearman > state.best_spearman


def _save_best(accelerator, model, run_dir: Path, val, expression: np.ndarray, metrics, card: str) -> None:
    n = len(expression)
    tmp = run_dir / "checkpoints" / ".best.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    with _writing(tmp):
        accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
        io.atomic_write_text(tmp / "README.md", card)
    io.replace_dir(tmp, run_dir / "checkpoints" / "best")
    io.write_predictions(
        run_dir / "predictions_val.csv", val["path"][:n], val["group_id"][:n], metrics.gene_names, expression
    )
    io.write_per_gene_metrics(run_dir / "per_gene_metrics.csv", metrics.per_gene_rows())


def _model_card(
    cfg: RunConfig, accelerator: Accelerator, run_dir: Path, data: RunData, entry: dict, metrics, test=None
) -> str:
    from expreg.modeling.model_card import render_model_card

    best = {
        "run_name": run_dir.name,
        "best_epoch": entry["epoch"],
        "best_val_spearman_mean": metrics.spearman_mean,
        "best_val_pearson_mean": metrics.pearson_mean,
        "val_loss": entry["val_loss"],
        "num_processes": accelerator.num_processes,
        "effective_batch_size": cfg.data.batch_size * cfg.train.grad_accum_steps * accelerator.num_processes,
    }
    used = _split_summary(data)
    group_sets = {name: set(part["groups"]) for name, part in used.items()}
    splits = {name: {"samples": part["samples"], "groups": len(part["groups"])} for name, part in used.items()}
    shared = {
        f"{a}/{b}": sorted(group_sets[a] & group_sets[b])
        for i, a in enumerate(group_sets)
        for b in list(group_sets)[i + 1 :]
        if group_sets[a] & group_sets[b]
    }
    summary = {
        "metadata_csv": Path(cfg.data.metadata_csv).name,
        "split_file": Path(cfg.data.split_csv).name,
        "split_made_by_run": Path(cfg.data.split_csv).parent == run_dir,
        "num_genes": len(data.gene_names),
        "splits": splits,
        "shared_groups": shared,  # splits that share groups (a single training group gives up part of it)
    }
    return render_model_card(cfg.to_dict(), best, metrics.per_gene_rows(), summary, test=test)


@contextlib.contextmanager
def _writing(what: Path):
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


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainerState, scheduler) -> None:
    """``accelerator.save_state`` into a temporary folder, then an atomic swap to ``checkpoints/last``.

    A process killed at any moment leaves ``checkpoints/last`` (or, for the instant of the swap,
    ``checkpoints/last.old``) complete; ``trainer_state.json`` is written last inside the folder.
    """
    tmp = run_dir / "checkpoints" / ".last.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with _writing(tmp):
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.scheduler = scheduler.state_dict()
        with _writing(tmp):
            io.write_json(tmp / io.TRAINER_STATE_FILE, asdict(state))
        fault_point("save", state.global_step)
        io.replace_dir(tmp, run_dir / "checkpoints" / "last")
        fault_point("saved", state.global_step)
    accelerator.wait_for_everyone()


def _resume(accelerator: Accelerator, checkpoint: str, scheduler) -> TrainerState:
    import json

    path = resolve_checkpoint(checkpoint)
    state = TrainerState(**json.loads((path / io.TRAINER_STATE_FILE).read_text()))
    if state.num_processes != accelerator.num_processes:
        raise io.RunDirError(
            f"--resume {checkpoint}: the run was trained with {state.num_processes} process(es), this launch has "
            f"{accelerator.num_processes}; resume with the same number (an exact resume depends on it)"
        )
    _check_rng_state(path, accelerator.process_index, checkpoint)
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as err:  # weights_only=True refused a pickle that would run code
        raise io.RunDirError(
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
        raise io.RunDirError(
            f"--resume {checkpoint}: {rng_file.name} cannot be loaded safely ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); without it the run would not resume exactly. "
            "Nothing in it was executed"
        ) from err


def data_fingerprint(cfg: RunConfig) -> dict:
    """SHA-256 of the files a run's data come from (the metadata CSV and the split file)."""
    return {
        "metadata_csv": io.file_sha256(cfg.data.metadata_csv),
        "split_csv": io.file_sha256(cfg.data.split_csv) if cfg.data.split_csv else None,
    }


def check_resume_data(cfg: RunConfig, checkpoint: str, allow_change: bool, gene_names: list[str]) -> str | None:
    """Refuse to resume on other data than the run started with; returns a warning when allowed.

    Called before anything is written. Other genes (another K, or other names) are always an
    error; a changed metadata CSV or split file (which would silently change the training rows
    and the target statistics half-way through a run) only without ``allow_change``.
    """
    import json

    path = resolve_checkpoint(checkpoint)
    saved_genes = json.loads((path.parent.parent / "target_stats.json").read_text())["gene_names"]
    if len(saved_genes) != len(gene_names):
        raise io.RunDirError(
            f"--resume {checkpoint}: the run predicts {len(saved_genes)} genes but the metadata now has "
            f"{len(gene_names)} targets; the data changed since the run started"
        )
    if saved_genes != list(gene_names):
        differ = [f"{a} -> {b}" for a, b in zip(saved_genes, gene_names) if a != b]
        raise io.RunDirError(
            f"--resume {checkpoint}: the gene names changed since the run started ({', '.join(differ[:3])}"
            f"{' ...' if len(differ) > 3 else ''})"
        )
    saved = json.loads((path / io.TRAINER_STATE_FILE).read_text()).get("data_sha256") or {}
    if not saved:
        return (
            f"--resume {checkpoint}: the checkpoint predates data fingerprints; whether the metadata CSV and split "
            "file are unchanged since the run started cannot be checked"
        )
    now = data_fingerprint(cfg)
    names = {"metadata_csv": cfg.data.metadata_csv, "split_csv": cfg.data.split_csv}
    changed = [f"{key} {names[key]}" for key in now if key in saved and saved[key] != now[key]]
    if not changed:
        return None
    what = " and ".join(changed)
    if not allow_change:
        raise io.RunDirError(
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
    if not (path / io.TRAINER_STATE_FILE).is_file():
        old = path.with_name(path.name + ".old")
        if (old / io.TRAINER_STATE_FILE).is_file():
            logger.warning(f"{path} is incomplete; resuming from {old}")
            return old
    return path


def check_resume_dir(checkpoint: str | os.PathLike) -> Path:
    """Validate ``--resume`` and return its run directory."""
    path = resolve_checkpoint(checkpoint)
    if not (path / io.TRAINER_STATE_FILE).is_file():
        raise io.RunDirError(
            f"--resume {checkpoint}: not an expreg checkpoint (no {io.TRAINER_STATE_FILE}); "
            "expected results/<run>/checkpoints/last"
        )
    run_dir = path.parent.parent
    if not (run_dir / io.CONFIG_FILE).is_file():
        raise io.RunDirError(f"--resume {checkpoint}: {run_dir / io.CONFIG_FILE} is missing")
    if io.read_status(run_dir) == "finished":
        raise io.RunDirError(f"--resume {checkpoint}: the run {run_dir} has finished; start a new run instead")
    return run_dir


def resume_config(checkpoint: str | os.PathLike, requested: RunConfig | None, overrides: list[str]) -> RunConfig:
    """The run's own resolved config, plus the overrides allowed on resume.

    A recipe given with ``--resume`` must agree with the run's config (data and split paths
    aside, which the run resolved itself); overrides may change only ``RESUMABLE_OVERRIDES``.
    """
    run_dir = check_resume_dir(checkpoint)
    raw = yaml.safe_load((run_dir / io.CONFIG_FILE).read_text())
    saved = config_from_dict(raw, str(run_dir / io.CONFIG_FILE))
    allowed = {k: v for k, v in parse_overrides(overrides).items() if k in RESUMABLE_OVERRIDES}
    if requested is not None:
        if requested.train.mixed_precision is None:  # left to the launcher: take the run's
            requested.train.mixed_precision = saved.train.mixed_precision
        ignore = {
            "data.metadata_csv",
            "data.split_csv",
            "logging.run_name",
            "logging.output_dir",
        } | RESUMABLE_OVERRIDES
        diffs = [
            f"{key}: run has {a!r}, recipe has {b!r}"
            for key, a, b in _diff(saved.to_dict(), requested.to_dict())
            if key not in ignore
        ]
        if diffs:
            raise ConfigError(f"--resume: the recipe differs from the run's {io.CONFIG_FILE}: " + "; ".join(diffs))
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


def _diff(a: dict, b: dict, prefix: str = ""):
    for key in a:
        if isinstance(a[key], dict):
            yield from _diff(a[key], b.get(key, {}), f"{prefix}{key}.")
        elif a[key] != b.get(key):
            yield f"{prefix}{key}", a[key], b.get(key)


# --------------------------------------------------------------------------------------------
# Finish
# --------------------------------------------------------------------------------------------


def _metrics_json(cfg: RunConfig, accelerator: Accelerator, run_dir: Path, state: TrainerState, status: str) -> dict:
    best = next((h for h in state.history if h["epoch"] == state.best_epoch), None)
    return {
        "status": status,
        "run_name": run_dir.name,
        "split_csv": cfg.data.split_csv,
        "split_csv_sha256": io.file_sha256(cfg.data.split_csv),
        "fold": cfg.data.fold,
        "num_processes": accelerator.num_processes,
        "effective_batch_size": cfg.data.batch_size * cfg.train.grad_accum_steps * accelerator.num_processes,
        "epochs_done": len(state.history),
        "best_epoch": state.best_epoch,
        "best_val_spearman_mean": best["val_spearman_mean"] if best else None,
        "best_val_pearson_mean": best["val_pearson_mean"] if best else None,
        "history": state.history,
    }


def _stopped(accelerator: Accelerator, cfg: RunConfig, run_dir: Path, state: TrainerState) -> dict:
    result = _metrics_json(cfg, accelerator, run_dir, state, "stopped")
    if accelerator.is_main_process:
        io.write_json(run_dir / io.METRICS_FILE, result)
        logger.info(
            f"stopped after {state.global_step} optimizer steps (train.stop_after_steps); continue with: "
            f"accelerate launch run_regression.py --resume {run_dir / 'checkpoints' / 'last'}"
        )
    accelerator.wait_for_everyone()
    return result


def _finish(
    accelerator: Accelerator, cfg: RunConfig, run_dir: Path, data: RunData, state: TrainerState, dry_run: bool
):
    """Score the saved best model, plots, optional push to the Hub, then ``metrics.json`` (``finished``, last)."""
    result = _metrics_json(cfg, accelerator, run_dir, state, "finished")
    result["dry_run"] = dry_run
    scores = _score_best(accelerator, data, run_dir, max_batches=2 if dry_run else None) if state.best_epoch else {}
    result.update(_score_fields(scores, data))  # on every process: each returns the same numbers
    push_error = None
    if accelerator.is_main_process:
        if scores:
            _record_scores(cfg, accelerator, run_dir, data, state, scores, result)
        if cfg.train.push_to_hub:
            push_error = _push(run_dir, cfg.train.hub_model_id, result)
        io.write_json(run_dir / io.METRICS_FILE, {k: v for k, v in result.items() if k not in _RETURNED_ONLY})
        logger.info(f"run finished: {run_dir}")
    _finish_trackers(accelerator)
    accelerator.wait_for_everyone()  # every process gets here before the main one reports a failed push
    if push_error is not None:
        raise push_error
    return result


_RETURNED_ONLY = {"test_per_gene_spearman"}  # returned by run() (for expreg.cv), not in metrics.json


def _score_fields(scores: dict, data: RunData) -> dict:
    """The final scores as result fields: ``best_val_*`` and, with a test split, ``test_*``."""
    fields = {}
    if "validation" in scores:
        val = scores["validation"][1]
        fields.update(best_val_spearman_mean=val.spearman_mean, best_val_pearson_mean=val.pearson_mean)
    if "test" in scores:
        test = scores["test"][1]
        fields.update(
            test_spearman_mean=test.spearman_mean,
            test_pearson_mean=test.pearson_mean,
            num_test_samples=test.summary["num_samples"],
            num_genes_undefined_test_spearman=test.summary["num_genes_undefined_spearman"],
            test_groups=sorted(set(data.datasets["test"]["group_id"])),
            test_per_gene_spearman={r["gene"]: r["spearman"] for r in test.per_gene_rows()},
        )
    return fields


def _finish_trackers(accelerator: Accelerator) -> None:
    """Close this run's trackers (``accelerator.end_training`` would also end the process group, which
    a CV's next fold still needs: the commands call it once at the very end)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []


def _score_best(accelerator: Accelerator, data: RunData, run_dir: Path, max_batches: int | None) -> dict:
    """The saved best model, reloaded and scored in fp32 on validation and (when present) the test split.

    These are the numbers of ``metrics.json``, ``predictions_*.csv`` and the model card: what
    ``expreg.predict`` gives for the same images, whatever precision the run trained in.

    Returns:
        ``{split: (expression, metrics)}`` on every process.
    """
    from expreg.inference import predict_loader

    accelerator.wait_for_everyone()  # the main process wrote checkpoints/best
    model = ExpRegModel.from_pretrained(run_dir / "checkpoints" / "best")
    scores = {}
    for split in ("validation", "test"):
        if split not in data.datasets:
            continue
        normalised = predict_loader(
            model, data.loaders[split], accelerator, max_batches=max_batches, desc=f"score {split}"
        )
        expression = model.to_expression(normalised.astype(np.float64))
        targets = _targets(data.datasets[split], len(expression), truncate=max_batches is not None)
        scores[split] = (expression, compute_metrics(expression, targets, data.gene_names))
    accelerator.free_memory()
    return scores


def _targets(dataset, num_predictions: int, truncate: bool) -> np.ndarray:
    """The split's targets in dataset order; a count other than the predictions' is an error (not a silent cut)."""
    targets = np.asarray(dataset["labels"], dtype=np.float64)
    if truncate:
        return targets[:num_predictions]
    if len(targets) != num_predictions:
        raise TrainingError(
            f"evaluation returned {num_predictions} predictions for {len(targets)} samples; every evaluation "
            "image must be read (metrics on misaligned rows would be wrong)"
        )
    return targets


def _record_scores(cfg, accelerator, run_dir: Path, data: RunData, state, scores: dict, result: dict) -> None:
    """Write the final predictions, per-gene metrics, model card and plots (main process)."""
    from expreg.evaluation.plots import write_run_plots

    val = scores["validation"][1]
    files = {"validation": ("predictions_val.csv", "per_gene_metrics.csv")}
    files["test"] = ("predictions_test.csv", "per_gene_metrics_test.csv")
    for split, (expression, metrics) in scores.items():
        part, n = data.datasets[split], len(expression)
        io.write_predictions(
            run_dir / files[split][0], part["path"][:n], part["group_id"][:n], data.gene_names, expression
        )
        io.write_per_gene_metrics(run_dir / files[split][1], metrics.per_gene_rows())
    test = (
        {k: v for k, v in result.items() if k.startswith("test_") or k == "num_test_samples"}
        if "test" in scores
        else None
    )
    best = next(h for h in state.history if h["epoch"] == state.best_epoch)
    card = _model_card(cfg, accelerator, run_dir, data, best, val, test)
    io.atomic_write_text(run_dir / "checkpoints" / "best" / "README.md", card)
    write_run_plots(run_dir, np.asarray(data.datasets["validation"]["labels"], dtype=np.float64), metrics=result)
    logger.info(
        f"best epoch {result['best_epoch']} (checkpoints/best, scored in fp32): validation mean Spearman "
        f"{val.spearman_mean:.4f}, mean Pearson {val.pearson_mean:.4f}"
    )
    if test:
        logger.info(
            f"held-out test ({test['num_test_samples']} samples, groups {', '.join(test['test_groups'])}): "
            f"mean Spearman {test['test_spearman_mean']:.4f}, mean Pearson {test['test_pearson_mean']:.4f}"
        )


def _push(run_dir: Path, repo_id: str, result: dict):
    """Push the best model; record the outcome in ``result`` and return the error, if any."""
    from expreg.modeling.hub import HubError, push_best_model

    try:
        url = push_best_model(run_dir, repo_id)
    except HubError as err:
        logger.error(str(err))
        result["push_to_hub"] = {"repo_id": repo_id, "ok": False, "error": str(err)}
        return err
    logger.info(f"pushed the best model to {url}")
    result["push_to_hub"] = {"repo_id": repo_id, "ok": True, "url": url}
    return None


def _flat_config(cfg: RunConfig) -> dict:
    flat = {"seed": cfg.seed}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": ("" if v is None else v) for k, v in values.items()})
    return flat
