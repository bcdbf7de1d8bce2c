"""Progress bars for long work: on a terminal only, one per machine (the local main process). A log file or a
pipe gets none: the commands log what they did, and a bar redrawn into a file is noise. The libraries' own
bars (transformers' "Writing model shards" and "Loading weights" at every checkpoint) are turned off by
``quiet_library_bars``. tqdm's environment variables still apply (``TQDM_MININTERVAL``, ...)."""

from __future__ import annotations

import sys


def on_terminal() -> bool:
    """Progress bars are drawn: stderr is a terminal."""
    return sys.stderr.isatty()


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs):
    """A tqdm bar when ``enabled`` (one process per machine) and stderr is a terminal; a silent pass-through else."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled or not on_terminal(), leave=False, **kwargs)


def quiet_library_bars() -> None:
    """No progress bars from transformers (one per saved or loaded checkpoint, at every epoch) or datasets."""
    import datasets
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()
