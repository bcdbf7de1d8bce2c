"""Imported by the DataLoader fork server (``expreg.data.loaders.FORKSERVER_PRELOAD``): it ignores SIGTERM.

``torchrun`` (``accelerate launch`` with several processes) stops a process by signalling its whole
process group (``os.killpg``), and the fork server that starts a process's DataLoader workers is in that
group. The training process handles SIGTERM (a checkpoint at the next optimizer step,
``expreg.training.interrupts``), which can need new workers (the next epoch, the validation loader);
a fork server killed by the same signal made that end in ``EOFError: unexpected EOF`` instead.
Ignoring SIGTERM there is safe: the server exits when the last process using it does (its ``alive``
pipe closes), and a SIGKILL still stops it. The server already ignores SIGINT. The workers it starts
inherit the ignored SIGTERM; training's workers ignore both signals anyway (``expreg.seeding.seed_worker``),
and every worker ends with the process that started it.

Importing this module anywhere else does nothing.
"""

import signal
import sys


def imported_by_fork_server() -> bool:
    """Whether this import runs inside ``multiprocessing.forkserver.main`` (the server's preload)."""
    from multiprocessing import forkserver

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is forkserver.main.__code__:
            return True
        frame = frame.f_back
    return False


if imported_by_fork_server():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
