"""How a run stops before its end: signals, ``train.stop_after_steps``, fatal errors and the crash-test hooks.

SIGINT/SIGTERM set a flag (``stop_requested()``); the loop saves a checkpoint at the next optimizer
step and raises ``Interrupted``. The fault hooks (``nan_fault``, ``fault_point``) exist for the
crash tests only and are inert unless their environment variable is set; they live here, behind
these functions, and nowhere in the loop's own code.
"""

from __future__ import annotations

import logging
import os
import signal
import time

logger = logging.getLogger("expreg")


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


def stop_requested() -> bool:
    """Whether SIGINT or SIGTERM arrived since the handlers were installed."""
    return _SIGNAL["received"] is not None


def interrupted() -> Interrupted:
    """The ``Interrupted`` error for the signal received (SIGTERM when another process got it)."""
    return Interrupted(_SIGNAL["received"] or signal.SIGTERM)


class signal_handlers:
    """Context manager: SIGINT/SIGTERM set the flag; a second Ctrl-C stops at once; handlers restored on exit."""

    def __enter__(self) -> signal_handlers:
        self.previous = {}

        def handler(signum, frame):
            if _SIGNAL["received"] is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            _SIGNAL["received"] = signum
            logger.warning(f"{signal.Signals(signum).name} received: saving a checkpoint at the next optimizer step")

        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, handler)
        _SIGNAL["received"] = None
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def nan_fault(step: int, rank: int, micro_batch: int) -> bool:
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
        while not stop_requested() and time.monotonic() < deadline:  # a SIGTERM ends the pause
            time.sleep(0.05)


def nonfinite_loss_error(where: str, reports: list[tuple[int, float, list[str]]]) -> TrainingError:
    """The error for a non-finite loss, naming each process's loss and images (``reports``: rank, loss, paths)."""
    import math

    bad = [(rank, value, batch) for rank, value, batch in reports if not math.isfinite(value)]
    details = "; ".join(
        f"process {rank}: loss {value}, images "
        + ", ".join(batch[:8])
        + (f" (+{len(batch) - 8} more)" if len(batch) > 8 else "")
        for rank, value, batch in bad
    )
    return TrainingError(
        f"non-finite loss at {where} ({details}). Training stopped; checkpoints/last holds the last good state. "
        "Lower train.lr, check these images and targets, or set train.nonfinite_loss_policy=skip for isolated bad batches"
    )
