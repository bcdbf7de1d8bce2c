"""The training run: one ``Trainer`` holds a run's state from setup to the final scores.

Reads top to bottom, like torchtune's recipes: ``setup()`` builds the data, model, run directory,
optimizer and schedule and prepares them with accelerate (everything that can fail on bad input
runs before the run directory exists); ``train()`` alternates ``train_one_epoch`` and
``evaluate``, saving ``checkpoints/last`` (exact resume, ``expreg.training.checkpoint``) and
``checkpoints/best`` as it goes; at the end the saved best model is reloaded and scored in fp32
on validation and any test split (``expreg.training.results``).

``run(cfg, accelerator)`` is the one-call form. The Accelerator comes from
``expreg.training.launch.build_accelerator(cfg)``; the caller's ``cfg`` is never changed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from pathlib import Path

import numpy as np
import torch
from transformers import get_cosine_schedule_with_warmup

from expreg.config import ConfigError, RunConfig
from expreg.data.dataset import iter_strings, labels_array, library_sizes
from expreg.evaluation.metrics import compute_metrics, mean_squared_error
from expreg.inference import gather_outputs
from expreg.modeling.hub import HubError
from expreg.progress import progress_bar
from expreg.run_dir import (
    METRICS_FILE,
    write_json,
    write_per_gene_metrics,
    write_predictions,
)
from expreg.seeding import seed_everything
from expreg.training import checkpoint, results
from expreg.training.frozen import FrozenHead, record_stores, setup_frozen_loaders
from expreg.training.interrupts import (
    Interrupted,
    StopRequested,
    TrainingError,
    fault_point,
    interrupted,
    nan_fault,
    nonfinite_loss_error,
    signal_handlers,
    stop_requested,
)
from expreg.training.launch import check_accelerator
from expreg.training.linear_probe import fit_linear_probe
from expreg.training.logs import log_start, setup_logging
from expreg.training.setup import (
    RunData,
    setup_data,
    setup_image_cache,
    setup_loaders,
    setup_model,
    setup_run_dir,
    tracker_config,
    write_run_files,
)

logger = logging.getLogger("expreg")
DRY_RUN_STEPS = 3


def run(
    cfg: RunConfig,
    accelerator,
    resume_from: str | None = None,
    dry_run: bool = False,
    allow_data_change: bool = False,
) -> dict:
    """Train and evaluate one run; returns the final ``metrics.json`` content (plus, with a test split,
    ``test_per_gene_spearman``: gene -> held-out Spearman). See ``Trainer``."""
    trainer = Trainer(cfg, accelerator, resume_from=resume_from, dry_run=dry_run, allow_data_change=allow_data_change)
    trainer.setup()
    return trainer.train()


class Trainer:
    """One run: ``setup()`` then ``train()`` (which ends with the final scores).

    Args:
        cfg: The recipe; copied, so the caller's object is never changed (the copy records what the
            run resolved: the launcher's precision, the data and split paths).
        accelerator: From ``expreg.training.launch.build_accelerator(cfg)``; its accumulation and
            precision are checked against the recipe.
        resume_from: ``checkpoints/last`` of an unfinished run to continue exactly.
        dry_run: 3 optimizer steps and 2 evaluation batches, end to end.
        allow_data_change: Let ``resume_from`` go on although the metadata CSV or split file changed
            since the run started (with a warning).
    """

    def __init__(self, cfg, accelerator, *, resume_from=None, dry_run=False, allow_data_change=False) -> None:
        check_accelerator(cfg, accelerator)
        self.cfg = copy.deepcopy(cfg)
        self.accelerator = accelerator
        self.resume_from, self.dry_run, self.allow_data_change = resume_from, dry_run, allow_data_change
        self.run_dir: Path | None = None  # set once created (messages after a failure name it)
        self.data: RunData | None = None
        self.state = checkpoint.TrainerState(num_processes=accelerator.num_processes)
        self.model = self.optimizer = self.scheduler = self.train_dl = self.val_dl = None
        self._said_early_stop = False

    # ----------------------------------------------------------------------------------------
    # setup
    # ----------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Data, model, image cache, loaders and run directory; then (fine-tuning) optimizer, schedule, resume."""
        cfg, accelerator = self.cfg, self.accelerator
        seed_everything(cfg.seed)
        cfg.train.mixed_precision = accelerator.mixed_precision  # record what `accelerate launch` decided
        setup_logging(accelerator)
        if cfg.train.mode == "linear_probe" and (accelerator.num_processes > 1 or self.resume_from):
            raise ConfigError(
                "train.mode=linear_probe runs in one process and has nothing to resume (it takes minutes)"
            )
        self.data = setup_data(cfg, accelerator)
        data_warning = self._check_resume_data()
        self.model = setup_model(cfg, self.data.gene_names, self.data.target_stats, self.data.patch_px)
        if cfg.train.mode == "frozen":  # every image embedded once, before the run directory exists
            self.data.loaders = setup_frozen_loaders(
                cfg, self.data, self.model, accelerator, DRY_RUN_STEPS if self.dry_run else None
            )
        else:
            image_cache = setup_image_cache(cfg, self.data, accelerator, self.dry_run)
            self.data.loaders = setup_loaders(cfg, self.data, self.model, accelerator.num_processes, image_cache)
        self.run_dir = setup_run_dir(cfg, accelerator, self.resume_from, self.dry_run, self.model.config.backbone)
        write_run_files(cfg, self.data, self.run_dir, accelerator.is_main_process)
        if cfg.train.mode == "frozen":
            record_stores(
                self.run_dir, self.data.embedding_stores, bool(self.resume_from), accelerator.is_main_process
            )
        if data_warning:
            logger.warning(data_warning)
        if cfg.train.mode != "linear_probe":
            self._setup_optimization()

    def _check_resume_data(self) -> str | None:
        if not self.resume_from:
            return None
        return checkpoint.check_resume_data(self.cfg, self.resume_from, self.allow_data_change, self.data.gene_names)

    def _setup_optimization(self) -> None:
        """AdamW and the cosine schedule, prepared with accelerate; the state of ``resume_from``; trackers."""
        cfg, accelerator = self.cfg, self.accelerator
        model = FrozenHead(self.model) if cfg.train.mode == "frozen" else self.model  # frozen: only the head trains
        if cfg.train.channels_last and cfg.train.mode != "frozen":
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.model, self.optimizer, self.train_dl, self.val_dl = accelerator.prepare(
            model, optimizer, self.data.loaders["train"], self.data.loaders["validation"]
        )
        steps_per_epoch = self._steps_per_epoch()
        total_steps = steps_per_epoch * (1 if self.dry_run else cfg.train.epochs)
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, int(cfg.train.warmup_ratio * total_steps), total_steps
        )
        fingerprint = checkpoint.data_fingerprint(cfg)
        self.state.data_sha256 = fingerprint
        if self.resume_from:
            self.state = checkpoint.load_checkpoint(accelerator, self.resume_from, self.scheduler)
            self.state.data_sha256 = fingerprint  # what this run trains on from here (checked in setup)
        log_start(self, len(self.train_dl), total_steps)
        if cfg.logging.report_to != "none":
            # trackers that write files (tensorboard) write them into <run_dir>/<report_to>/
            accelerator.project_configuration.logging_dir = str(self.run_dir)
            accelerator.trackers = []  # this run's own trackers (an accelerator reused by CV folds keeps old ones)
            accelerator.init_trackers(cfg.logging.report_to, config=tracker_config(cfg))

    def _steps_per_epoch(self) -> int:
        cfg, num_batches = self.cfg, len(self.train_dl)
        if self.dry_run:
            num_batches = min(num_batches, DRY_RUN_STEPS * cfg.train.grad_accum_steps)
        elif cfg.train.max_steps_per_epoch:
            num_batches = min(num_batches, cfg.train.max_steps_per_epoch * cfg.train.grad_accum_steps)
        return math.ceil(num_batches / cfg.train.grad_accum_steps)

    # ----------------------------------------------------------------------------------------
    # train
    # ----------------------------------------------------------------------------------------

    def train(self) -> dict:
        """The epochs (or the linear probe), then the final scores; returns the run's result."""
        if self.cfg.train.mode == "linear_probe":
            return self._fit_linear_probe()
        with signal_handlers(), self._recording_status():
            return self._train_epochs()

    @contextlib.contextmanager
    def _recording_status(self):
        """A run that ends early says so in ``metrics.json`` (``interrupted`` or ``failed``), then the error goes on."""
        try:
            yield
        except Interrupted:
            results.write_status(self, "interrupted")
            raise
        except HubError:  # raised after the run was recorded as finished
            raise
        except (KeyboardInterrupt, Exception) as err:
            results.write_status(self, "failed", f"{type(err).__name__}: {err}")
            raise

    def _train_epochs(self) -> dict:
        """The epochs: train, evaluate, keep the best, checkpoint; then finish."""
        cfg, state = self.cfg, self.state
        epochs = 1 if self.dry_run else cfg.train.epochs
        for epoch in range(state.epoch, epochs):
            if self._early_stopped():  # decided before an interruption or kill: honour it on resume
                break
            state.epoch = epoch
            try:
                train_loss = self.train_one_epoch()
            except StopRequested:
                return results.stopped(self)
            self._sync_buffers()
            val_loss, predictions = self.evaluate()
            self._end_epoch(train_loss, val_loss, predictions)
            state.epoch, state.batches_done = epoch + 1, 0
            state.loss_sums, state.loss_counts = [], []
            checkpoint.save_checkpoint(self.accelerator, self.run_dir, state, self.scheduler)
            if state.epoch >= epochs or self._early_stopped():  # the last epoch ends the run: not "early"
                continue  # the loop ends: finish even if a signal came in meanwhile
            if self._any_process(stop_requested()):
                raise interrupted()
            if cfg.train.stop_after_steps is not None and state.global_step >= cfg.train.stop_after_steps:
                return results.stopped(self)
        return results.finish(self)

    def train_one_epoch(self) -> float:
        """One pass over the training data (resuming mid-epoch where ``state`` says); returns the mean loss."""
        accelerator, state = self.accelerator, self.state
        self.model.train()
        self.data.loaders["train_sampler"].set_epoch(state.epoch)  # the shuffling order of this epoch
        self.data.loaders["train_transform"].set_epoch(state.epoch)  # the augmentation draws of this epoch
        limit = self._steps_per_epoch() * self.cfg.train.grad_accum_steps
        dl = self.train_dl
        loader = accelerator.skip_first_batches(dl, state.batches_done) if state.batches_done else dl
        # accelerate's loaders re-set the sampler's epoch from their own iteration counter when they
        # start; a resumed run's counter is wrong (accelerate #2016), so set the epoch explicitly.
        loader.set_epoch(state.epoch)
        local = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (loss x samples, samples)
        if state.loss_sums:
            rank = accelerator.process_index
            local += torch.tensor(
                [state.loss_sums[rank], state.loss_counts[rank]], dtype=torch.float64, device=local.device
            )
        skipped_images = 0
        enabled = accelerator.is_local_main_process
        bar = progress_bar(
            enabled=enabled, total=min(limit, len(dl)), initial=state.batches_done, desc=f"epoch {state.epoch + 1}"
        )
        with contextlib.closing(bar):
            for batch in loader:
                if state.batches_done >= limit:
                    break
                skipped_images += batch.pop("skipped")
                signalled = self._train_step(batch, local)
                bar.update(1)
                if accelerator.sync_gradients:
                    self._after_optimizer_step(signalled, limit, local)
        self._record_loss(local)
        self._log_skipped(skipped_images)
        return sum(state.loss_sums) / max(sum(state.loss_counts), 1)

    def _train_step(self, batch: dict, local: torch.Tensor) -> bool:
        """Forward and backward of one micro-batch (an optimizer step when accumulation is complete).

        Returns whether any process received a stop signal (decided alike on every process).
        """
        accelerator, state, cfg = self.accelerator, self.state, self.cfg
        paths = batch.pop("path")
        with accelerator.accumulate(self.model):
            outputs = self.model(pixel_values=batch["pixel_values"], labels=batch["labels"])
            micro_batch = state.batches_done % cfg.train.grad_accum_steps + 1
            if nan_fault(state.global_step + 1, accelerator.process_index, micro_batch):  # crash tests only
                outputs.loss = outputs.loss * float("nan")
            nonfinite, signalled = self._flags(outputs.loss)
            if nonfinite:
                self._nonfinite_loss(outputs.loss, paths)  # raises unless the policy is skip
                self.optimizer.zero_grad()
            else:
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm:
                    accelerator.clip_grad_norm_(self.model.parameters(), cfg.train.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
                local[0] += outputs.loss.detach().double() * len(batch["labels"])
                local[1] += len(batch["labels"])
        state.batches_done += 1
        return signalled

    def _after_optimizer_step(self, signalled: bool, limit: int, local: torch.Tensor) -> None:
        """Schedule step; checkpoint when due, signalled or stopping; raise to stop."""
        state, cfg = self.state, self.cfg
        self.scheduler.step()
        state.global_step += 1
        fault_point("step", state.global_step)
        every, stop = cfg.train.checkpointing_steps, cfg.train.stop_after_steps
        stopping = stop is not None and state.global_step >= stop and state.batches_done < limit
        if signalled or stopping or (every and state.global_step % every == 0 and state.batches_done < limit):
            self._record_loss(local)
            checkpoint.save_checkpoint(self.accelerator, self.run_dir, state, self.scheduler)
        if signalled:
            raise interrupted()
        if stopping:
            raise StopRequested

    def _flags(self, loss: torch.Tensor) -> tuple[bool, bool]:
        """(non-finite loss on any process, stop signal on any process): every process decides alike."""
        flags = torch.tensor(
            [float(not torch.isfinite(loss.detach()).item()), float(stop_requested())], device=loss.device
        )
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def _nonfinite_loss(self, loss, paths: list[str]) -> None:
        """A non-finite loss on some process (every process calls this): skip the batch, or stop naming it."""
        accelerator, state = self.accelerator, self.state
        where = f"epoch {state.epoch + 1}, batch {state.batches_done + 1}, after optimizer step {state.global_step}"
        if self.cfg.train.nonfinite_loss_policy == "skip":
            state.skipped_batches += 1
            logger.warning(f"non-finite loss at {where}: batch skipped ({state.skipped_batches} so far)")
            return
        mine = (accelerator.process_index, float(loss.detach().float()), list(paths))
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            reports = gather_object([mine])
        else:
            reports = [mine]
        raise nonfinite_loss_error(where, reports)

    def _record_loss(self, local: torch.Tensor) -> None:
        """Store every process's running loss sum and count in ``state`` (gathered, in rank order)."""
        gathered = self.accelerator.gather(local[None]).cpu().tolist()
        self.state.loss_sums = [row[0] for row in gathered]
        self.state.loss_counts = [int(row[1]) for row in gathered]

    def _log_skipped(self, skipped_images: int) -> None:
        accelerator, state = self.accelerator, self.state
        total = int(
            accelerator.reduce(torch.tensor(float(skipped_images), device=accelerator.device), reduction="sum")
        )
        if total:
            state.skipped_images += total
            logger.warning(
                f"epoch {state.epoch + 1}: skipped {total} unreadable training image(s) (data.bad_image_policy=skip); "
                f"{state.skipped_images} in all"
            )

    def _any_process(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (a collective: all processes must call it)."""
        if self.accelerator.num_processes == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def _early_stopped(self) -> bool:
        patience = self.cfg.train.early_stopping_patience
        if patience and self.state.bad_epochs >= patience:
            if not self._said_early_stop:  # asked twice at the end of the last epoch: say it once
                logger.info(f"early stopping: no improvement in {self.state.bad_epochs} epochs")
                self._said_early_stop = True
            return True
        return False

    def _sync_buffers(self) -> None:
        """Give every process rank 0's BatchNorm statistics, so evaluation and the saved model agree."""
        if self.accelerator.num_processes == 1:
            return
        import torch.distributed as dist

        for buffer in self.accelerator.unwrap_model(self.model).buffers():
            dist.broadcast(buffer.data, src=0)

    # ----------------------------------------------------------------------------------------
    # evaluate, end of epoch
    # ----------------------------------------------------------------------------------------

    def evaluate(self) -> tuple[float, np.ndarray]:
        """Validation loss and normalised predictions of the model being trained (see ``evaluate``)."""
        return evaluate(self.model, self.val_dl, self.accelerator, max_batches=2 if self.dry_run else None)

    def _end_epoch(self, train_loss: float, val_loss: float, predictions: np.ndarray) -> None:
        """Metrics, history, best model, predictions and the early-stopping count."""
        cfg, accelerator, data, state = self.cfg, self.accelerator, self.data, self.state
        val = data.datasets["validation"]
        targets = labels_array(val, len(predictions))  # float32; compute_metrics converts a block at a time
        expression = accelerator.unwrap_model(self.model).to_expression(predictions)
        depth = library_sizes(val, len(predictions))
        metrics = compute_metrics(expression, targets, data.gene_names, cfg.data.allow_unmeasured_genes, depth)
        entry = _history_entry(state, train_loss, val_loss, metrics)
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
                self._save_best(entry, expression, metrics)
        else:
            state.bad_epochs += 1
        if accelerator.is_main_process:
            write_json(self.run_dir / METRICS_FILE, results.metrics_json(self, "running"))

    def _save_best(self, entry: dict, expression: np.ndarray, metrics) -> None:
        """``checkpoints/best`` with its model card, and the validation predictions and per-gene metrics."""
        val, n = self.data.datasets["validation"], len(expression)
        card = results.model_card(self, entry, metrics)
        checkpoint.save_best_model(self.accelerator, self.model, self.run_dir, card)
        write_predictions(
            self.run_dir / "predictions_val.csv",
            iter_strings(val, "path", n),
            iter_strings(val, "group_id", n),
            metrics.gene_names,
            expression,
        )
        write_per_gene_metrics(self.run_dir / "per_gene_metrics.csv", metrics.per_gene_rows())

    # ----------------------------------------------------------------------------------------
    # train.mode=linear_probe
    # ----------------------------------------------------------------------------------------

    def _fit_linear_probe(self) -> dict:
        """``train.mode=linear_probe`` (``expreg.training.linear_probe``): one closed-form fit, then finish."""
        log_start(self, 0, 0)
        with self._recording_status():
            self._end_epoch(*fit_linear_probe(self))
            self.state.epoch = 1
            return results.finish(self)


@torch.no_grad()
def evaluate(model, dataloader, accelerator, max_batches: int | None = None):
    """Predictions on the whole (sharded) evaluation set, gathered in dataset order.

    Returns:
        ``(loss, predictions)``: MSE on normalised targets over all samples, and normalised
        predictions of shape ``(num_samples, num_genes)``; computed once on the gathered arrays,
        so any number of processes gives the same numbers.
    """
    model.eval()
    predictions, labels = gather_outputs(
        lambda pixel_values: model(pixel_values=pixel_values).predictions,
        dataloader,
        accelerator,
        max_batches=max_batches,
        desc="evaluate",
        with_labels=True,
        inference_mode=False,
    )
    model.train()
    if max_batches is None and len(predictions) != len(dataloader.dataset):
        raise TrainingError(
            f"evaluation returned {len(predictions)} predictions for {len(dataloader.dataset)} samples; every "
            "evaluation image must be read (metrics on misaligned rows would be wrong)"
        )
    return mean_squared_error(predictions, labels), predictions


def _improved(spearman: float, state: checkpoint.TrainerState) -> bool:
    """Better than the best so far; the first epoch always counts, so a best model always exists."""
    if state.best_epoch is None:
        return True
    if math.isnan(spearman):
        return False
    return state.best_spearman is None or spearman > state.best_spearman


def _history_entry(state, train_loss: float, val_loss: float, metrics) -> dict:
    return {
        "epoch": state.epoch + 1,
        "step": state.global_step,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_spearman_mean": metrics.spearman_mean,
        "val_pearson_mean": metrics.pearson_mean,
        "val_spearman_depth_adjusted_mean": metrics.summary["spearman_depth_adjusted_mean"],
    }
