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
from expreg.data.paths import find_row, hash_index
from expreg.formatting import fmt_bytes
from expreg.inference import NUM_VIEWS, dihedral_view  # noqa: F401 - NUM_VIEWS: also this module's name
from expreg.run_dir import process_alive

STORE_VERSION = 1  # bump when the numbers a store holds would change for the same identity
EMBEDDINGS_FILE = "embeddings.npy"
PATHS_FILE = "paths.json"
INFO_FILE = "info.json"
MAX_DISK_FRACTION = 0.95


class EmbeddingStoreError(OSError):
    """A store cannot be built (no disk space, unwritable folder) or does not hold an image asked for."""


class EmbeddingStore:
    """Read side: ``get(files) -> (len(files), features)`` float32 rows, in the order of ``files``."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.info = json.loads((self.folder / INFO_FILE).read_text())
        self.array = np.load(self.folder / EMBEDDINGS_FILE, mmap_mode="r")
        self._paths, self._hashes, self._order = _path_index(self.folder / PATHS_FILE)

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def paths(self) -> list[str]:
        """The stored images' paths, in row order (made into Python strings when asked)."""
        return self._paths.to_pylist()

    def _row(self, path: str) -> int:
        """The store's row of an absolute path; KeyError when it holds no such image."""
        row = find_row((self._hashes, self._order), path, lambda r: self._paths[r].as_py())
        if row is None:
            raise KeyError(path)
        return row

    @property
    def num_features(self) -> int:
        return int(self.array.shape[1])

    def rows(self, files: list[str]) -> np.ndarray:
        """The row of each file; ``EmbeddingStoreError`` naming the first file the store does not hold."""
        try:
            return np.fromiter((self._row(os.path.abspath(f)) for f in files), dtype=np.int64, count=len(files))
        except KeyError as err:
            raise EmbeddingStoreError(f"{err.args[0]} is not in the embedding store {self.folder}") from err

    def get(self, files: list[str]) -> np.ndarray:
        return np.asarray(self.array[self.rows(files)], dtype=np.float32)


def _path_index(paths_file: Path):
    """A store's paths as one Arrow string array, their hashes sorted and the rows in that order: 16 bytes a row
    beside the paths' own bytes, instead of a Python list and dict of them (~250 bytes a row, 100 MB for a
    400,000-spot cohort, in every process that reads the store)."""
    import pyarrow as pa

    paths = json.loads(paths_file.read_text())
    hashes, order = hash_index(paths, len(paths))
    return pa.array(paths, pa.string()), hashes, order


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


def ensure_embeddings(model, files: list[str], *, view: int = 0, **kwargs) -> EmbeddingStore:
    """Open the store of these images under this encoder and view, building it first when there is none
    (``ensure_embedding_views`` with one view; the same arguments)."""
    return ensure_embedding_views(model, files, views=(view,), **kwargs)[0]


def ensure_embedding_views(
    model,
    files: list[str],
    *,
    views=(0,),
    accelerator=None,
    cache_root: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    weights_sha256: str | None = None,
) -> list[EmbeddingStore]:
    """The stores of these images under this encoder, one per view, building the missing ones in one pass
    (each image decoded once for all its views).

    Args:
        model: An ``ExpRegModel``; its encoder (``embed``) runs in eval mode, fp32, on the
            accelerator's device (this process's device without one). Its head plays no part.
        files: Image paths (any order; duplicates once); every one must be readable.
        views: Dihedral views (0-7, ``dihedral_view``) to embed.
        accelerator: Shares the building over its processes (every process must call this). The
            main process decides the stores' folders, which exist and whether there is space, and
            writes them; with several machines the cache folder must be one they share.
        weights_sha256: The encoder's ``weights_digest`` when already known (saves reading every weight).

    Raises:
        EmbeddingStoreError: Not enough disk space, or the cache folder cannot be written (on every process).
        UnreadableImageError: An image cannot be read (named).
    """
    views = list(views)
    if not views or any(not 0 <= v < NUM_VIEWS for v in views):
        raise ValueError(f"views must be in 0..{NUM_VIEWS - 1}, got {views}")
    files = sorted({os.path.abspath(f) for f in files})
    main = accelerator is None or accelerator.is_main_process
    plans = _plan(model, files, views, cache_root, weights_sha256) if main else None
    plans, problem = _from_main(plans, accelerator)
    if problem:
        raise EmbeddingStoreError(problem)
    missing = [p for p in plans if not p["exists"]]
    if missing:
        import torch

        with torch.random.fork_rng(devices=[]):  # a run draws the same random numbers whether it built a store or not
            embeddings = _embed(
                model, files, [p["view"] for p in missing], accelerator, batch_size, num_workers, progress
            )
        problems = (
            [_write(p["folder"], files, embeddings[:, i], p["identity"]) for i, p in enumerate(missing)]
            if main
            else None
        )
        problem = next((p for p in _from_main(problems, accelerator) if p), None)
        if problem:
            raise EmbeddingStoreError(problem)
    return [EmbeddingStore(p["folder"]) for p in plans]


def _plan(model, files: list[str], views: list[int], cache_root, weights_sha256) -> tuple[list[dict], str | None]:
    """The main process's plan: per view its folder, identity and whether it exists; and the problem, if
    any. The size estimate of what will be built is printed first."""
    from expreg.modeling.encoders import pooled_features, weights_digest

    weights_sha256 = weights_sha256 or weights_digest(model.backbone)
    plans = []
    for view in views:
        identity = store_identity(model, files, view, weights_sha256)
        folder = store_folder(identity, cache_root)
        plans.append({"view": view, "folder": folder, "identity": identity, "exists": (folder / INFO_FILE).is_file()})
    missing = [p for p in plans if not p["exists"]]
    if not missing:
        return plans, None
    width = pooled_features(model.backbone, model.config.pooling)
    return plans, _announce([p["folder"] for p in missing], len(files), width, [p["view"] for p in missing])


def _from_main(value, accelerator):
    """``value`` as the main process has it, on every process."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _embed(model, files, views, accelerator, batch_size, num_workers, progress) -> np.ndarray:
    """``(len(files), len(views), features)`` float32 embeddings, every process's shard gathered in order."""
    import torch

    from expreg.inference import gather_outputs, image_loader

    main = accelerator is None or accelerator.is_main_process
    was_training = model.training
    model.eval()
    loader = image_loader(model, files, batch_size, num_workers)
    if accelerator is not None:
        model.to(accelerator.device)
        loader = accelerator.prepare_data_loader(loader)
    device = next(model.parameters()).device  # without an accelerator: wherever the caller put the model

    def forward(pixel_values):
        pixel_values = pixel_values.to(device)
        return torch.stack([model.embed(dihedral_view(pixel_values, v)) for v in views], dim=1)

    start = time.perf_counter()
    try:
        label = f"embedding (view{'s' if len(views) > 1 else ''} {', '.join(map(str, views))})"
        embeddings = gather_outputs(forward, loader, accelerator, desc=label, progress=progress)
    finally:
        model.train(was_training)
    if embeddings is None or len(embeddings) != len(files):
        raise EmbeddingStoreError(
            f"embedding returned {0 if embeddings is None else len(embeddings)} rows for {len(files)} images"
        )
    if main:
        seconds = time.perf_counter() - start
        rate = len(files) * len(views) / max(seconds, 1e-9)
        print(f"embedded {len(files):,} images x {len(views)} view(s) in {seconds:.1f} s ({rate:.1f} embeddings/s)")
    return embeddings.astype(np.float32, copy=False)


def _announce(folders: list[Path], num_images: int, width: int, views: list[int]) -> str | None:
    """Print the size estimate; the problem when the disk has not got the space to spare (or no folder)."""
    parent = folders[0].parent
    needed = len(views) * (num_images * width * 4 + num_images * 200)  # float32 rows + the paths
    try:
        parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(parent).free
    except OSError as err:
        return f"cannot make the embedding store folder {parent}: {err}; set EXPREG_CACHE"
    if needed > MAX_DISK_FRACTION * free:
        return (
            f"the embedding store needs about {fmt_bytes(needed)} in {parent}, which has {fmt_bytes(free)} "
            "free: set EXPREG_CACHE to a larger disk"
        )
    where = str(folders[0]) if len(folders) == 1 else f"{len(folders)} stores in {parent}"
    print(
        f"embedding store: {num_images:,} images x {width:,} features (float32, view{'s' if len(views) > 1 else ''} "
        f"{', '.join(map(str, views))}) = about {fmt_bytes(needed)} -> {where}",
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
