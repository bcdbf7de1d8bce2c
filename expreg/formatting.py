"""Numbers as text, for the tables, summaries and model cards every layer writes (one implementation each).

A value is *missing* when it is None or a float NaN (an undefined correlation); each writer chooses
the word it prints for it (``"n/a"`` in run tables and model cards, ``"undefined"`` in
cross-validation summaries).
"""

from __future__ import annotations

import math

import numpy as np


def is_missing(value) -> bool:
    """None or a float NaN (numpy float64 included)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_float(value, digits: int | str = 4, missing: str = "n/a") -> str:
    """``value`` with ``digits`` decimals (or a format spec such as ``"g"``); ``missing`` for None or NaN."""
    if is_missing(value):
        return missing
    return f"{value:{digits}}" if isinstance(digits, str) else f"{value:.{digits}f}"


def fmt_cell(value, digits: int | str = 4, missing: str = "n/a") -> str:
    """A table cell: floats as ``fmt_float`` writes them, anything else (ints, text) as it is."""
    if not is_missing(value) and not isinstance(value, float):
        return str(value)
    return fmt_float(value, digits, missing)


def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and sample std (``ddof=1``; 0.0 for one value) of the defined values; ``(None, None)`` when none is."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return None, None
    mean = float(np.mean(finite))
    return mean, float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def fmt_mean_std(mean, std, missing: str = "n/a") -> str:
    """``"0.1234 ± 0.0567"``; ``missing`` when ``mean`` is None."""
    return missing if mean is None else f"{mean:.4f} ± {std:.4f}"


def fmt_mean_std_of_all(values, missing: str = "n/a") -> str:
    """Mean ± std of ``values``; ``missing`` when there are none or any is missing (a partial mean would mislead)."""
    if not values or any(is_missing(v) for v in values):
        return missing
    return fmt_mean_std(*mean_std(values))


def fmt_bytes(count: float) -> str:
    """``2_600_000`` -> ``"2.6 MB"`` (decimal units, as disk sizes are sold)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def command_error(program: str, message: str, every_process: bool = False) -> None:
    """``<program>: error: <message>`` on stderr. A bad recipe or bad data is met by every process of an
    ``accelerate launch`` alike, so only the first process of each machine (``LOCAL_RANK`` 0, or no
    launcher) says so; ``every_process``: an error one process meets alone (an image that breaks during
    training, a full disk), which only that process can report."""
    import os
    import sys

    if every_process or os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"{program}: error: {message}", file=sys.stderr)
