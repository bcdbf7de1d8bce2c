"""Progress bars for long work: one on the local main process, and in log files (no terminal) at most
one line per 30 s instead of a line per update."""

from __future__ import annotations

import sys


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs):
    """A tqdm bar (on one process per machine); in log files (no terminal) at most one line per 30 s."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(iterable, disable=not enabled, leave=False, mininterval=0.1 if interactive else 30, **kwargs)
