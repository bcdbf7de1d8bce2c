"""What a run says: console logging on every process (info on the main one), ``log.txt`` in the run
directory, and the opening lines that state the launch (processes, device, precision, effective batch)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

from expreg.progress import quiet_library_bars
from expreg.training.launch import cpu_precision_warning

logger = logging.getLogger("expreg")
_LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")


def setup_logging(accelerator) -> None:
    """Console logging (main process: info, others: warnings); ``log.txt`` is added with the run directory."""
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    logger.handlers.clear()
    logger.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(_LOG_FORMAT)
    logger.addHandler(console)
    quiet_library_bars()  # transformers' bar at every checkpoint saved or loaded: noise in every epoch's log


def log_to_file(run_dir: Path) -> None:
    """Also write the log to ``<run_dir>/log.txt`` (main process)."""
    file_handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
    file_handler.setFormatter(_LOG_FORMAT)
    logger.addHandler(file_handler)


def log_start(trainer, batches_per_epoch: int, total_steps: int) -> None:
    """The opening lines of a run: where it writes, how it was launched, its batch and its data."""
    cfg, accelerator, data, state = trainer.cfg, trainer.accelerator, trainer.data, trainer.state
    world = accelerator.num_processes
    effective = cfg.data.batch_size * cfg.train.grad_accum_steps * world
    sizes = ", ".join(f"{k} {len(v)}" for k, v in data.datasets.items())
    logger.info(f"run directory: {trainer.run_dir}")
    logger.info(
        f"num_processes={world} distributed_type={accelerator.distributed_type.value} "
        f"device={accelerator.device} mixed_precision={accelerator.mixed_precision} "
        f"torch_threads={torch.get_num_threads()}"
    )
    if cfg.train.mode == "linear_probe":
        logger.info(f"mode linear_probe: frozen {cfg.model.backbone} embeddings -> standardise -> PCA -> ridge")
    else:
        if cfg.train.mode == "frozen":
            encoder = data.embedding_stores[0].info["architecture"]
            logger.info(
                f"mode frozen: {encoder} embeddings cached (model.pooling={cfg.model.pooling}), the {cfg.model.head} head trains"
            )
            for store in data.embedding_stores:
                logger.info(
                    f"embedding store: {store.folder} ({len(store):,} images x {store.num_features:,} features)"
                )
        logger.info(
            f"effective batch size {effective} = {cfg.data.batch_size} (micro) x {cfg.train.grad_accum_steps} "
            f"(accumulation) x {world} (processes); {batches_per_epoch} batches per process per epoch, "
            f"{total_steps} optimizer steps in all"
        )
    logger.info(f"data: {sizes} samples, {len(data.gene_names)} genes; split {cfg.data.split_csv}")
    problem = cpu_precision_warning(accelerator.mixed_precision) if accelerator.device.type == "cpu" else None
    if problem:
        logger.warning(problem)
    if cfg.train.push_to_hub and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        logger.warning(f"HF_HUB_OFFLINE is set: pushing to {cfg.train.hub_model_id!r} at the end will fail")
    if state.global_step:
        logger.info(f"resumed at epoch {state.epoch}, batch {state.batches_done}, step {state.global_step}")
