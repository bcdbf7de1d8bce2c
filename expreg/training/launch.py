"""Building the ``Accelerator`` (the one place where training, CV, prediction and the benchmarks get it) and
the launch checks: processes that did not connect, reduced precision on a CPU without bf16 units.

Precision, gradient accumulation and trackers come from the recipe, so a run gets the same
accelerator whatever command starts it; ``check_accelerator`` lets ``train.run`` refuse one
that was built otherwise (e.g. a bare ``Accelerator()`` whose accumulation is 1 while the recipe
says 3, which would make every batch an optimizer step and run the schedule past its end).
"""

from __future__ import annotations

import os
from pathlib import Path

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
            "expreg.training.launch.build_accelerator(cfg)"
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
