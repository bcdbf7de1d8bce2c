"""Building the ``Accelerator``: the one place where training, CV, prediction and the benchmarks get it.

Precision, gradient accumulation and trackers come from the recipe, so a run gets the same
accelerator whatever command starts it; ``check_accelerator`` lets ``train.run`` refuse one
that was built otherwise (e.g. a bare ``Accelerator()`` whose accumulation is 1 while the recipe
says 3, which would make every batch an optimizer step and run the schedule past its end).
"""

from __future__ import annotations

import os

from expreg.config import ConfigError, RunConfig


def build_accelerator(cfg: RunConfig | None = None, *, cpu: bool = False):
    """The ``Accelerator`` for ``cfg`` (``None``: inference, with the launcher's settings).

    ``train.mixed_precision`` left unset (``None``) leaves precision to ``accelerate launch``
    (its config or ``--mixed_precision``); trackers (``logging.report_to``) write under
    ``logging.output_dir`` until a run points them at its own directory.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if cfg is None:
        return Accelerator(cpu=cpu)
    output_dir = cfg.logging.output_dir
    return Accelerator(
        cpu=cpu,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with=None if cfg.logging.report_to == "none" else cfg.logging.report_to,
        project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=output_dir),
    )


def check_accelerator(cfg: RunConfig, accelerator) -> None:
    """Raise ``ConfigError`` when ``accelerator`` disagrees with the recipe (see the module docstring)."""
    problems = []
    if accelerator.gradient_accumulation_steps != cfg.train.grad_accum_steps:
        problems.append(
            f"gradient accumulation {accelerator.gradient_accumulation_steps} vs train.grad_accum_steps="
            f"{cfg.train.grad_accum_steps}"
        )
    wanted = cfg.train.mixed_precision
    if wanted is not None and accelerator.mixed_precision != wanted:
        problems.append(f"mixed precision {accelerator.mixed_precision} vs train.mixed_precision={wanted}")
    if problems:
        raise ConfigError(
            "the Accelerator does not match the recipe (" + "; ".join(problems) + "); build it with "
            "expreg.launch.build_accelerator(cfg)"
        )


def unconnected_launch_error(accelerator) -> str | None:
    """Why a multi-process launch did not form one job (each process would work alone), or None."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        return (
            f"{launched} processes were launched but they are not connected: each would work on its own. "
            "Without GPUs, set ACCELERATE_USE_CPU=1 (see accelerate_configs/cpu_2proc.yaml)."
        )
    return None
