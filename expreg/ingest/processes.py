"""The processes that share one ``expreg.prepare`` (``accelerate launch``, on one or several machines sharing
a file system): who they are (``Processes``, filled by the command from accelerate) and which samples
each one cuts (``share``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Processes:
    """The processes sharing one preparation (``accelerate launch``, on one or several machines sharing a
    file system): each cuts a share of the samples, the main one (index 0) writes the tables. The
    command fills it from accelerate (``expreg.prepare``); the default is this process alone."""

    index: int = 0
    count: int = 1
    wait: Callable[[], None] = lambda: None  # a barrier
    agree: Callable[[object], object] = lambda value: value  # the main process's value, on every process
    gather: Callable[[object], list] = lambda value: [value]  # every process's value, on every process

    @property
    def main(self) -> bool:
        return self.index == 0


def share(results: list, processes: Processes) -> list[int]:
    """The sample indices ``processes.index`` cuts (of ``results``, each with its kept spots ``keep``): the
    largest sample first to the least-loaded process."""
    if processes.count == 1:
        return list(range(len(results)))
    load, owner = [0] * processes.count, {}
    for i in sorted(range(len(results)), key=lambda i: (-len(results[i].keep), i)):
        owner[i] = load.index(min(load))
        load[owner[i]] += len(results[i].keep)
    return [i for i in range(len(results)) if owner[i] == processes.index]
