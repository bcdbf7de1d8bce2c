"""The embedding store: every image of a data set embedded once by a frozen encoder, memory-mapped on disk.

A frozen encoder gives the same embedding of an image every time, so the linear probes of
``expreg.cv`` (every fold, both probes) and ``train.mode=frozen`` runs (every epoch, and the next
run on the same data) read it from here instead of running the encoder again. A store is one
folder under ``<cache>/embeddings/`` (``$EXPREG_CACHE`` or ``~/.cache/expreg``, as the decoded-image
cache), named by the architecture and a digest of everything that makes the numbers:

- the encoder: its architecture and arguments (``backbone_config``) and pooling;
- its weights: SHA-256 of every tensor of the backbone (so a randomly initialised encoder is
  the same store only when it is the same seeded initialisation);
- the preprocessing: input size, normalisation mean and std, expreg's bilinear resize;
- the view: 0 is the image as it is, 1-7 the other dihedral views (rotations and flips);
- the images: each one's absolute path, size and modification time, and the Pillow version.

Files: ``embeddings.npy`` (``float32``, ``(num_images, features)``, rows in sorted path order, read
with ``np.load(mmap_mode="r")``: nothing is loaded until used, and the operating system shares the
pages between processes), ``paths.json`` and ``info.json`` (the identity above, the size, the time it
took). Building: a size estimate is printed first, then a progress bar; with several processes
each embeds its shard of the images and ``gather_for_metrics`` puts every row back exactly once,
in order; the main process writes the store into a staging folder and renames it (atomic: a
store is complete or absent). Delete a store's folder to rebuild it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from expreg.data.demo import default_cache_dir
from expreg.data.image_cache import fingerprint
from expreg.formatting import fmt_bytes
from expreg.run_dir import process_alive

STORE_VERSION = 1  # bump when the numbers a store holds would change for the same identity
EMBEDDINGS_FILE = "embeddings.npy"
PATHS_FILE = "paths.json"
INFO_FILE = "info.json"
NUM_VIEWS = 8
MAX_DISK_FRACTION = 0.95


class EmbeddingStoreError(OSError):
    """A store cannot be built (no disk space, unwritable folder) or does not hold an image asked for."""


class EmbeddingStore:
    """Read side: ``get(files) -> (len(files), features)`` float32 rows, in the order of ``files``."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.info = json.loads((self.folder / INFO_FILE).read_text())
        self.paths = json.loads((self.folder / PATHS_FILE).read_text())
        self.array = np.load(self.folder / EMBEDDINGS_FILE, mmap_mode="r")
        self._row = {path: i for i, path in enumerate(self.paths)}

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_features(self) -> int:
        return int(self.array.shape[1])

    def rows(self, files: list[str]) -> np.ndarray:
        """The row of each file; ``EmbeddingStoreError`` naming the first file the store does not hold."""
        try:
            return np.fromiter((self._row[os.path.abspath(f)] for f in files), dtype=np.int64, count=len(files))
        except KeyError as err:
            raise EmbeddingStoreError(f"{err.args[0]} is not in the embedding store {self.folder}") from err

    def get(self, files: list[str]) -> np.ndarray:
        return np.asarray(self.array[self.rows(files)], dtype=np.float32)


def dihedral_view(pixel_values, view: int):
    """View ``view`` (0-7) of a batch ``(B, C, H, W)``: rotation by ``view // 2`` quarter turns, then a
    horizontal flip when ``view`` is odd (the order of ``expreg.inference.dihedral_views``)."""
    import torch

    if view == 0:
        return pixel_values
    rotated = torch.rot90(pixel_values, view // 2, dims=(2, 3))
    return torch.flip(rotated, dims=(3,)) if view % 2 else rotated


def store_identity(model, files: list[str], view: int = 0, weights_sha256: str | None = None) -> dict:
    """Everything that makes the numbers of a store (see the module docstring). ``weights_sha256``:
    the encoder's ``weights_digest``, when the caller has it already (it reads every weight)."""
    import timm
    import torch

    from expreg.modeling.encoders import weights_digest

    config = model.config
    spec = config.backbone_config or {"architecture": config.backbone, "model_args": {}}
    return {
        "version": STORE_VERSION,
        "architecture": spec["architecture"],
        "model_args": spec.get("model_args", {}),
        "pooling": config.pooling,
        "weights_sha256": weights_sha256 or weights_digest(model.backbone),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "image_size": config.image_size,
        "image_mean": list(config.image_mean),
        "image_std": list(config.image_std),
        "resize": "bilinear",
        "view": view,
        "images_sha256": fingerprint(files, config.image_size),
        "num_images": len(files),
    }


def store_folder(identity: dict, cache_root: str | os.PathLike | None = None) -> Path:
    root = Path(cache_root) if cache_root is not None else default_cache_dir()
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in identity["architecture"])
    return root / "embeddings" / f"{name}-view{identity['view']}-{digest}"


def ensure_embeddings(
    model,
    files: list[str],
    *,
    view: int = 0,
    accelerator=None,
    cache_root: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    weights_sha256: str | None = None,
) -> EmbeddingStore:
    """Open the store of these images under this encoder and view, building it first when there is none.

    Args:
        model: An ``ExpRegModel``; its encoder (``embed``) runs in eval mode, fp32, on the
            accelerator's device (this process's device without one). Its head plays no part.
        files: Image paths (any order; duplicates once); every one must be readable.
        view: 0-7, the dihedral view embedded (``dihedral_view``).
        accelerator: Shares the building over its processes (every process must call this). The
            main process decides the store's folder, whether it exists and whether there is space,
            and writes it; with several machines the cache folder must be one they share.
        weights_sha256: The encoder's ``weights_digest`` when already known (saves reading every weight).

    Raises:
        EmbeddingStoreError: Not enough disk space, or the cache folder cannot be written (on every process).
        UnreadableImageError: An image cannot be read (named).
    """
    if not 0 <= view < NUM_VIEWS:
        raise ValueError(f"view must be in 0..{NUM_VIEWS - 1}, got {view}")
    files = sorted({os.path.abspath(f) for f in files})
    main = accelerator is None or accelerator.is_main_process
    plan = _plan(model, files, view, cache_root, weights_sha256) if main else None
    folder, identity, exists, problem = _from_main(plan, accelerator)
    if problem:
        raise EmbeddingStoreError(problem)
    if not exists:
        import torch

        with torch.random.fork_rng(devices=[]):  # a run draws the same random numbers whether it built a store or not
            embeddings = _embed(model, files, view, accelerator, batch_size, num_workers, progress, folder)
        problem = _write(folder, files, embeddings, identity) if main else None
        problem = _from_main(problem, accelerator)
        if problem:
            raise EmbeddingStoreError(problem)
    return EmbeddingStore(folder)


def _plan(model, files: list[str], view: int, cache_root, weights_sha256) -> tuple:
    """The main process's ``(folder, identity, exists, problem)``; a size estimate is printed before a build."""
    from expreg.modeling.encoders import pooled_features

    identity = store_identity(model, files, view, weights_sha256)
    folder = store_folder(identity, cache_root)
    if (folder / INFO_FILE).is_file():
        return folder, identity, True, None
    width = pooled_features(model.backbone, model.config.pooling)
    return folder, identity, False, _announce(folder, len(files), width, view)


def _from_main(value, accelerator):
    """``value`` as the main process has it, on every process."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _embed(model, files, view, accelerator, batch_size, num_workers, progress, folder) -> np.ndarray:
    """``(len(files), features)`` float32 embeddings, every process's shard gathered in order."""
    from expreg.inference import gather_outputs, image_loader

    main = accelerator is None or accelerator.is_main_process
    was_training = model.training
    model.eval()
    loader = image_loader(model, files, batch_size, num_workers)
    if accelerator is not None:
        model.to(accelerator.device)
        loader = accelerator.prepare_data_loader(loader)
    device = next(model.parameters()).device  # without an accelerator: wherever the caller put the model
    start = time.perf_counter()
    try:
        embeddings = gather_outputs(
            lambda pixel_values: model.embed(dihedral_view(pixel_values.to(device), view)),
            loader,
            accelerator,
            desc=f"embedding ({folder.name.rsplit('-', 1)[0]})",
            progress=progress,
        )
    finally:
        model.train(was_training)
    if embeddings is None or len(embeddings) != len(files):
        raise EmbeddingStoreError(
            f"embedding returned {0 if embeddings is None else len(embeddings)} rows for {len(files)} images"
        )
    if main:
        seconds = time.perf_counter() - start
        print(f"embedded {len(files):,} images in {seconds:.1f} s ({len(files) / max(seconds, 1e-9):.1f} images/s)")
    return embeddings.astype(np.float32, copy=False)


def _announce(folder: Path, num_images: int, width: int, view: int) -> str | None:
    """Print the size estimate; the problem when the disk has not got the space to spare (or no folder)."""
    needed = num_images * width * 4 + num_images * 200  # float32 rows + the paths
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder.parent).free
    except OSError as err:
        return f"cannot make the embedding store folder {folder.parent}: {err}; set EXPREG_CACHE"
    if needed > MAX_DISK_FRACTION * free:
        return (
            f"the embedding store needs about {fmt_bytes(needed)} in {folder.parent}, which has {fmt_bytes(free)} "
            "free: set EXPREG_CACHE to a larger disk"
        )
    print(
        f"embedding store: {num_images:,} images x {width:,} features (float32, view {view}) = about "
        f"{fmt_bytes(needed)} -> {folder}",
        flush=True,
    )
    return None


def _write(folder: Path, files: list[str], embeddings: np.ndarray, identity: dict) -> str | None:
    """Write into a staging folder of this process, then rename it to ``folder`` (atomic); the problem, if any."""
    staging = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_staging(folder.parent)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        np.save(staging / EMBEDDINGS_FILE, embeddings)
        (staging / PATHS_FILE).write_text(json.dumps(files))
        info = {**identity, "num_features": int(embeddings.shape[1]), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / INFO_FILE).is_file():  # anything but "another process built it meanwhile"
                raise
    except OSError as err:
        return f"cannot write the embedding store {folder}: {err}; set EXPREG_CACHE to a writable folder with space"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return None


def _remove_abandoned_staging(stores_dir: Path) -> None:
    for staging in stores_dir.glob(".*.tmp"):
        pid = staging.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)
