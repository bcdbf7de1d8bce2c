"""Deterministic seeding: Python, NumPy, torch, DataLoader generators and workers.

Exact resume needs every random stream to be a function of (seed, epoch, sample) rather than of
how far a global generator has advanced. So the DataLoader's shuffling generator is re-seeded
from (seed, epoch) at the start of every epoch, and augmentation draws come from a generator
seeded per sample (see ``expreg.data.ImageTransform``).
"""

from __future__ import annotations

import random
import zlib

import numpy as np


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends only on ``parts`` (stable across processes and machines).

    Strings are hashed with CRC32, not ``hash()``, which is salted per process.
    """
    words = [zlib.crc32(p.encode("utf-8")) if isinstance(p, str) else int(p) % 2**32 for p in parts]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


def epoch_generator(seed: int, epoch: int):
    """A ``torch.Generator`` for the DataLoader's shuffling in ``epoch``."""
    import torch

    generator = torch.Generator()
    generator.manual_seed(derive_seed(seed, epoch, "shuffle"))
    return generator


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` for DataLoaders: seed NumPy and ``random`` from the worker's torch seed.

    torch seeds each worker from the loader's generator, so this is deterministic too.
    """
    import signal

    import torch

    # Ctrl-C / SIGTERM are handled by the training process, which saves a checkpoint first;
    # workers ignore them and are shut down by their parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
