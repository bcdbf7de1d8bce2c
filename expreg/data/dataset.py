"""The dataset object: metadata + split file -> ``datasets.DatasetDict``, transforms, target statistics.

Two lines in a notebook::

    from expreg.data.dataset import load_expression_dataset
    ds = load_expression_dataset("data/example_metadata.csv", "splits/example.csv")

Rows carry ``image`` (decoded lazily by ``datasets.Image``), ``labels`` (float32, length K, in
expression units), ``group_id``, ``path`` and the CSV's extra columns. Nothing is downloaded and the dataset is
not cached between runs: each split is converted from the validated table to an Arrow file
in a temporary folder (``$TMPDIR/expreg-arrow-<host>-<pid>-*``, removed when the process exits, or by
the next run on the same machine if it was killed) and memory-mapped.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from expreg.data.metadata import Metadata, MetadataError, read_metadata
from expreg.data.splits import SPLIT_NAMES, assign_splits, read_split_file
from expreg.seeding import derive_seed

INFO_KEY = "expreg"


# ---------------------------------------------------------------------------------------------
# Dataset object
# ---------------------------------------------------------------------------------------------


def load_expression_dataset(
    metadata_csv: str | os.PathLike,
    split_csv: str | os.PathLike | None = None,
    *,
    gene_names_file: str | os.PathLike | None = None,
    num_genes: int | None = None,
    fold: int | None = None,
    seed: int = 42,
    val_frac: float = 0.2,
    check_images: str = "exists",
):
    """Load a metadata CSV (and a split file) as a ``datasets.DatasetDict``.

    Args:
        metadata_csv: The metadata CSV (see ``data/metadata_schema.md``).
        split_csv: A split file (``split`` column) or fold file (``fold`` column) made by
            ``expreg.splits``. When None, a group-aware train/validation split is made in memory
            from ``seed`` and ``val_frac``.
        gene_names_file: Gene names for ``y0..``; a ``genes.txt`` beside the CSV is used when None.
        num_genes: Expected K, checked against the CSV.
        fold: With a fold file: the fold held out as ``test``. The other folds' groups are split
            into ``train`` and ``validation`` (``val_frac``, ``seed``), so that model selection
            never looks at the test fold.
        seed: Seed of any split made here.
        val_frac: Validation fraction of any split made here.
        check_images: ``"exists"``, ``"decode"`` or ``"none"`` (see ``expreg.metadata``).

    Returns:
        ``DatasetDict`` with ``train``, ``validation`` and, where present, ``test``.
    """
    metadata = read_metadata(metadata_csv, gene_names_file, num_genes, check_images)
    assignment = split_assignment(metadata, split_csv, fold=fold, seed=seed, val_frac=val_frac)
    return build_dataset_dict(metadata, assignment, split_csv=split_csv, fold=fold)


def split_assignment(
    metadata: Metadata,
    split_csv: str | os.PathLike | None,
    *,
    fold: int | None = None,
    seed: int = 42,
    val_frac: float = 0.2,
) -> np.ndarray:
    """The split name (``train``/``validation``/``test``) of every metadata row, in row order."""
    if split_csv is None:
        from expreg.data.splits import make_split_table

        table, _ = make_split_table(metadata, val_frac=val_frac, seed=seed)
        return table.set_index("path").loc[metadata.frame["path"], "split"].to_numpy()
    table = read_split_file(split_csv, metadata)
    if "split" in table.columns:
        if fold is not None:
            raise MetadataError(f"{split_csv}: fold={fold} given but this is a split file, not a fold file")
        return table["split"].to_numpy()
    folds = table["fold"].to_numpy()
    if fold is None or fold not in set(folds.tolist()):
        raise MetadataError(
            f"{split_csv}: a fold file; choose the held-out fold (one of {sorted(set(folds.tolist()))})"
        )
    return _split_training_folds(table, folds == fold, seed, val_frac)


def _split_training_folds(table, is_test: np.ndarray, seed: int, val_frac: float) -> np.ndarray:
    train_part = table.loc[~is_test]
    counts = train_part["group_id"].value_counts()
    groups = np.array(sorted(counts.index), dtype=object)
    if len(groups) < 2:
        # One training group (e.g. leave-one-patient-out with two patients): validation, used only
        # to pick the best epoch, is a seeded random fraction of its samples. The test fold stays
        # untouched; the validation score is optimistic (same patient), the test score is not.
        rng = np.random.default_rng(seed)
        order = np.argsort(train_part["path"].to_numpy(), kind="stable")  # independent of row order
        n_val = max(1, int(round(val_frac * len(order))))
        val_rows = train_part.index[order[rng.permutation(len(order))[:n_val]]]
        out = np.where(is_test, "test", "train").astype(object)
        out[table.index.get_indexer(val_rows)] = "validation"
        return out
    mapping = assign_splits(
        groups, counts.loc[groups].to_numpy(), {"train": 1 - val_frac, "validation": val_frac}, seed
    )
    out = np.where(is_test, "test", table["group_id"].map(mapping).fillna("test").to_numpy())
    return out.astype(object)


ARROW_CHUNK_ROWS = 50_000  # rows converted to Arrow at a time (the conversion's temporaries stay this small)
_ARROW_DIRS: dict[int, Path] = {}  # pid -> this process's folder (a forked child makes its own)
_BUILD_IDS = itertools.count()


def _host() -> str:
    """This machine's name as it appears in temporary-folder names (no ``-``, which separates the parts)."""
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _arrow_dir() -> Path:
    """This process's folder for dataset Arrow files: ``$TMPDIR/expreg-arrow-<host>-<pid>-*``, removed at exit.

    Folders left by killed processes of *this* machine (no exit handler ran) are removed on first
    use; a TMPDIR shared between nodes also holds other machines' folders, whose process ids mean
    nothing here, and those are never touched.
    """
    pid = os.getpid()
    if pid not in _ARROW_DIRS:
        import atexit
        import shutil
        import tempfile

        from expreg.run_dir import process_alive

        prefix = f"expreg-arrow-{_host()}-"
        for old in Path(tempfile.gettempdir()).glob(f"{prefix}*-*"):
            owner = old.name[len(prefix) :].split("-")[0]
            if owner.isdigit() and not process_alive(int(owner)):
                shutil.rmtree(old, ignore_errors=True)
        _ARROW_DIRS[pid] = Path(tempfile.mkdtemp(prefix=f"{prefix}{pid}-"))
        atexit.register(_remove_arrow_dir, pid)
    return _ARROW_DIRS[pid]


def _remove_arrow_dir(pid: int) -> None:
    import shutil

    if os.getpid() == pid:  # not in a forked child that inherited the exit handler
        shutil.rmtree(_ARROW_DIRS[pid], ignore_errors=True)


def build_dataset_dict(metadata: Metadata, assignment: np.ndarray, split_csv=None, fold=None):
    """Build the ``DatasetDict`` from a validated table and per-row split names.

    Each split is converted to Arrow in ``ARROW_CHUNK_ROWS``-row record batches (the targets go
    over as float32 arrays, not as one Python float per value), written to a temporary file and
    memory-mapped (``datasets.Dataset.from_file``), so DataLoader workers share its pages
    instead of copying the table.
    """
    import datasets
    import pyarrow as pa

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "labels": datasets.List(datasets.Value("float32"), length=metadata.num_genes),
            "group_id": datasets.Value("string"),
            "path": datasets.Value("string"),
            **{c: datasets.Value("string") for c in metadata.extra_columns},
        }
    )
    description = json.dumps(
        {
            INFO_KEY: {
                "gene_names": metadata.gene_names,
                "target_columns": metadata.target_columns,
                "metadata_csv": str(metadata.csv_path),
                "split_csv": None if split_csv is None else str(Path(split_csv).resolve()),
                "fold": fold,
            }
        }
    )
    schema = features.arrow_schema
    image_paths = np.asarray(metadata.image_paths(), dtype=object)
    targets = metadata.targets()
    folder = _arrow_dir() / f"build-{next(_BUILD_IDS)}"
    parts = {}
    for name in SPLIT_NAMES:
        rows = np.flatnonzero(assignment == name)
        if len(rows) == 0:
            continue
        arrow_file = folder / f"{name}.arrow"
        try:
            folder.mkdir(exist_ok=True)
            with pa.OSFile(str(arrow_file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
                for start in range(0, len(rows), ARROW_CHUNK_ROWS):
                    chunk = rows[start : start + ARROW_CHUNK_ROWS]
                    writer.write_batch(_record_batch(metadata, chunk, image_paths, targets, schema))
        except OSError as err:
            raise OSError(
                f"cannot write the dataset's Arrow file {arrow_file}: {err}. It needs about "
                f"{len(rows) * (targets.shape[1] * 4 + 200) / 1e6:.0f} MB in the temporary folder: set TMPDIR "
                "to a folder with space"
            ) from err
        info = datasets.DatasetInfo(description=description, features=features)
        parts[name] = datasets.Dataset.from_file(str(arrow_file), info=info, split=name, in_memory=False)
    if "train" not in parts:
        raise MetadataError(f"{split_csv or metadata.csv_path}: no rows assigned to train")
    return datasets.DatasetDict(parts)


def _record_batch(metadata: Metadata, rows: np.ndarray, image_paths: np.ndarray, targets: np.ndarray, schema):
    """Metadata rows -> one Arrow record batch in the dataset's schema (``image`` as a path-only struct)."""
    import pyarrow as pa

    frame = metadata.frame.iloc[rows]
    paths = pa.array(image_paths[rows].tolist(), pa.string())
    image = pa.StructArray.from_arrays([pa.nulls(len(rows), pa.binary()), paths], names=["bytes", "path"])
    labels = pa.FixedSizeListArray.from_arrays(pa.array(targets[rows].reshape(-1)), metadata.num_genes)
    columns = {
        "image": image,
        "labels": labels,
        "group_id": pa.array(frame["group_id"], pa.string()),
        "path": pa.array(frame["path"], pa.string()),
        **{c: pa.array(frame[c].astype(str), pa.string()) for c in metadata.extra_columns},
    }
    return pa.record_batch([columns[field.name].cast(field.type) for field in schema], schema=schema)


def image_files(dataset) -> list[str]:
    """The absolute image paths of a split's rows, in row order (nothing is decoded)."""
    import datasets

    return [item["path"] for item in dataset.cast_column("image", datasets.Image(decode=False))["image"]]


def dataset_gene_names(dataset) -> list[str]:
    """Gene names recorded in a dataset (or ``DatasetDict``) made by ``load_expression_dataset``."""
    ds = next(iter(dataset.values())) if hasattr(dataset, "values") else dataset
    return json.loads(ds.info.description)[INFO_KEY]["gene_names"]


# ---------------------------------------------------------------------------------------------
# Target normalisation (train split only)
# ---------------------------------------------------------------------------------------------


@dataclass
class TargetStats:
    """Per-gene mean and standard deviation of the training targets (z-score normalisation).

    Genes with zero standard deviation in training get std 1 so that they pass through unscaled.
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_labels(cls, labels) -> TargetStats:
        labels = np.asarray(labels, dtype=np.float64)
        std = labels.std(axis=0)
        return cls(mean=labels.mean(axis=0), std=np.where(std > 0, std, 1.0))

    @classmethod
    def identity(cls, num_genes: int) -> TargetStats:
        return cls(mean=np.zeros(num_genes), std=np.ones(num_genes))

    def normalize(self, y):
        return (y - self.mean.astype(np.float32)) / self.std.astype(np.float32)

    def denormalize(self, z):
        return z * self.std.astype(np.float32) + self.mean.astype(np.float32)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> TargetStats:
        return cls(mean=np.asarray(d["mean"], dtype=np.float64), std=np.asarray(d["std"], dtype=np.float64))


def compute_target_stats(train_dataset, normalize: bool = True) -> TargetStats:
    """Target statistics from the **training** split only (identity when ``normalize`` is False)."""
    labels = np.asarray(train_dataset.with_format("numpy")["labels"])
    if not normalize:
        return TargetStats.identity(labels.shape[1])
    return TargetStats.from_labels(labels)


# ---------------------------------------------------------------------------------------------
# Image transforms
# ---------------------------------------------------------------------------------------------

# Ruifrok & Johnston stain vectors (haematoxylin, eosin, DAB) for colour deconvolution, rows unit-norm.
HED_FROM_RGB_OD = np.linalg.inv(
    np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    / np.linalg.norm([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], axis=1, keepdims=True)
)
RGB_OD_FROM_HED = np.linalg.inv(HED_FROM_RGB_OD)
_OPTICAL_DENSITY = -np.log(np.clip(np.arange(256) / 255.0, 1e-6, 1.0))  # of each uint8 intensity


def hed_jitter(rgb_uint8: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Stain augmentation in HED space (Tellez et al. 2018): each stain's concentration is scaled by
    ``U(1 - s, 1 + s)`` and shifted by ``U(-s, s)``; returns uint8 RGB of the same shape."""
    scale = rng.uniform(1 - strength, 1 + strength, size=3)
    shift = rng.uniform(-strength, strength, size=3)
    # RGB optical density -> HED, scale and shift, -> RGB optical density: one affine map in OD space
    matrix = (HED_FROM_RGB_OD * scale) @ RGB_OD_FROM_HED
    offset = shift @ RGB_OD_FROM_HED
    od = _OPTICAL_DENSITY[rgb_uint8.reshape(-1, 3)]  # a look-up: uint8 has only 256 values
    rgb = np.exp(-(od @ matrix + offset)).reshape(rgb_uint8.shape)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# One fixed input range per PIL mode, mapped to 0..255 (values outside are clipped): never a
# per-image maximum, which would give the same pixel value different intensities in two images.
INPUT_RANGES = {"F": 1.0, "I": 65535.0, "I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0}


def to_rgb(image):
    """Convert any PIL image (grayscale, RGBA, palette, 16-bit, 32-bit, float) to 8-bit RGB.

    RGBA/LA are composited on white (slide background). High-bit-depth modes use one fixed range
    each (``INPUT_RANGES``), whatever the image holds: 16-bit (``I;16*``) and 32-bit integer
    (``I``, as PIL opens many 16-bit files) images are scaled from 0..65535, float (``F``) images
    from 0..1; values outside the range are clipped. 12-bit or other data come out dark or
    clipped: convert those yourself.
    """
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in INPUT_RANGES:
        arr = np.asarray(image, dtype=np.float64)
        scaled = np.clip(arr / INPUT_RANGES[image.mode] * 255.0 + 0.5, 0, 255)
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_resized(image, image_size: int):
    """PIL image -> ``uint8`` RGB tensor ``(3, image_size, image_size)`` (bilinear resize when needed)."""
    from torchvision.transforms.v2 import functional as F

    image = to_rgb(image)
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), resample=2)  # bilinear
    return F.pil_to_tensor(image)


class ImageTransform:
    """PIL image -> normalised float tensor ``(3, image_size, image_size)``.

    Training adds a random dihedral transform (one of the 8 flips/90-degree rotations: tissue
    has no canonical orientation) and optional brightness/contrast/saturation jitter. All
    randomness comes from a generator seeded by (seed, epoch, path), so an image gets the same
    augmentation in a given epoch whatever process, worker or batch position it lands in; that
    is what makes stop-and-resume exact.
    """

    def __init__(
        self,
        image_size: int,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        train: bool = False,
        dihedral: bool = True,
        color_jitter: float = 0.0,
        seed: int = 0,
        hed_jitter: float = 0.0,
    ) -> None:
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.train = train
        self.dihedral = dihedral
        self.color_jitter = color_jitter
        self.hed_jitter = hed_jitter
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, image, key: str):
        """``image``: a PIL image, or the ``uint8`` tensor ``decode_resized`` made of it (the image cache)."""
        import torch
        from torchvision.transforms.v2 import functional as F

        x = image if isinstance(image, torch.Tensor) else decode_resized(image, self.image_size)
        if self.train:
            rng = np.random.default_rng(derive_seed(self.seed, self.epoch, key))
            if self.hed_jitter > 0:
                x = (
                    torch.from_numpy(hed_jitter(x.permute(1, 2, 0).numpy(), self.hed_jitter, rng))
                    .permute(2, 0, 1)
                    .contiguous()
                )
            x = self._augment(x, rng)
        x = x.to(torch.float32).div_(255.0)
        return F.normalize(x, self.mean, self.std)

    def _augment(self, x, rng: np.random.Generator):
        import torch
        from torchvision.transforms.v2 import functional as F

        if self.dihedral:
            k = int(rng.integers(8))
            x = torch.rot90(x, k % 4, dims=(1, 2))
            if k >= 4:
                x = torch.flip(x, dims=(2,))
        if self.color_jitter > 0:
            lo, hi = 1 - self.color_jitter, 1 + self.color_jitter
            b, c, s = rng.uniform(lo, hi, size=3)
            x = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(x, b), c), s)
        return x


class UnreadableImageError(RuntimeError):
    """An image that passed validation cannot be read any more (deleted, truncated, corrupted)."""


def error_message(err: Exception) -> str:
    """The message of an error, without the traceback text a DataLoader worker wraps around it."""
    text = str(err).strip()
    if "Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(f"{type(err).__name__}: ", 1)[-1]


def load_image(item) -> tuple[object | None, str | None]:
    """Open and fully decode an image given as a path or a ``datasets.Image(decode=False)`` dict.

    Returns:
        ``(image, None)``, or ``(None, reason)`` when it cannot be read.
    """
    import io as _io

    from PIL import Image

    path = item["path"] if isinstance(item, dict) else item
    try:
        if isinstance(item, dict) and item.get("bytes"):
            image = Image.open(_io.BytesIO(item["bytes"]))
            image.load()
            return image, None
        with open(path, "rb") as fh:  # our handle, closed here; after load() the pixels need no file
            image = Image.open(fh)
            image.load()
        return image, None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
        return None, f"{type(err).__name__}: {err}"


class ExpressionTransform:
    """``with_transform`` function: a batch of rows -> ``pixel_values`` and normalised ``labels``.

    Images are decoded here (the dataset's image column is cast to ``decode=False``), so that an
    image that became unreadable after validation is handled by ``bad_image_policy``: ``"fail"``
    raises ``UnreadableImageError`` naming the file; ``"skip"`` drops the sample (counted in the
    batch's ``skipped``). With an ``image_cache`` (``expreg.image_cache.ImageCache``) the resized
    pixels are read from the cache instead of decoding the file.
    """

    def __init__(
        self,
        image_transform: ImageTransform,
        target_stats: TargetStats | None = None,
        bad_image_policy: str = "fail",
        image_cache=None,
    ) -> None:
        if bad_image_policy not in ("fail", "skip"):
            raise ValueError(f"bad_image_policy must be fail or skip, got {bad_image_policy!r}")
        self.image_transform = image_transform
        self.target_stats = target_stats
        self.bad_image_policy = bad_image_policy
        self.image_cache = image_cache

    def _load(self, item):
        if not isinstance(item, (dict, str)):
            return item, None  # already decoded
        if self.image_cache is not None:
            return self.image_cache.get(item["path"] if isinstance(item, dict) else item)
        return load_image(item)

    def set_epoch(self, epoch: int) -> None:
        self.image_transform.set_epoch(epoch)

    def __call__(self, batch: dict) -> dict:
        import torch

        pixel_values = []
        for item, key in zip(batch["image"], batch["path"]):
            image, reason = self._load(item)
            if image is None and self.bad_image_policy == "fail":
                path = item["path"] if isinstance(item, dict) else item
                raise UnreadableImageError(
                    f"{path} (row path {key!r}) cannot be read: {reason}. Fix or remove the file (data.check_images="
                    "decode finds all such files before training), or set data.bad_image_policy=skip"
                )
            pixel_values.append(None if image is None else self.image_transform(image, key))
        labels = np.asarray(batch["labels"], dtype=np.float32)
        if self.target_stats is not None:
            labels = self.target_stats.normalize(labels)
        labels = torch.from_numpy(np.ascontiguousarray(labels, np.float32))
        return {"pixel_values": pixel_values, "labels": labels, "path": list(batch["path"])}


def collate_fn(examples: list[dict]) -> dict:
    """Stack transformed rows into ``{"pixel_values": (B, 3, H, W), "labels": (B, K)}``.

    Also ``path`` (the rows' paths, for error messages) and ``skipped`` (samples dropped as
    unreadable under ``bad_image_policy=skip``).
    """
    import torch

    kept = [e for e in examples if e["pixel_values"] is not None]
    if not kept:
        raise UnreadableImageError(
            "every image of a batch was unreadable: " + ", ".join(e["path"] for e in examples[:5])
        )
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in kept]),
        "labels": torch.stack([e["labels"] for e in kept]),
        "path": [e["path"] for e in kept],
        "skipped": len(examples) - len(kept),
    }


# ---------------------------------------------------------------------------------------------
# DataLoaders
# ---------------------------------------------------------------------------------------------


def _round_sizes(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` sizes that differ by at most one (larger first)."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def epoch_batch_sizes(num_samples: int, batch_size: int, num_processes: int) -> list[int]:
    """Sizes of an epoch's batches, in order, for ``num_processes`` processes taking turns.

    Full batches first; the remainder is spread over one last round of ``num_processes`` batches
    (so every process gets the same number of batches and every sample is used exactly once).
    A remainder too small to give each process two samples (BatchNorm needs two) is folded into
    the last full round instead.
    """
    if num_samples < num_processes:
        raise ValueError(f"{num_samples} training samples cannot be shared by {num_processes} processes")
    full_rounds, tail = divmod(num_samples, batch_size * num_processes)
    sizes = [batch_size] * (full_rounds * num_processes)
    if tail == 0:
        return sizes
    if tail >= 2 * num_processes or full_rounds == 0:
        return sizes + _round_sizes(tail, num_processes)
    last_round = _round_sizes(batch_size * num_processes + tail, num_processes)
    return sizes[:-num_processes] + last_round


class EpochBatchSampler:
    """Shuffled batches that depend only on (seed, epoch): the same in every process and after a resume.

    accelerate deals batch ``i`` to process ``i % num_processes``. The number of batches is a
    multiple of ``num_processes`` and no sample is repeated, so each sample is seen exactly
    once per epoch across processes (see ``epoch_batch_sizes``). There is deliberately no
    ``batch_size`` attribute: accelerate then takes the batches as they are, without padding.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, num_processes: int = 1) -> None:
        import torch

        self.sizes = epoch_batch_sizes(num_samples, batch_size, num_processes)
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        # Handed to the DataLoader: worker seeds are drawn from it instead of from the global RNG,
        # whose stream (dropout, ...) must not depend on when a DataLoader iterator was created.
        self.generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        from expreg.seeding import derive_seed

        self.epoch = epoch
        self.generator.manual_seed(derive_seed(self.seed, epoch, "workers"))

    def __iter__(self):
        import torch

        from expreg.seeding import epoch_generator

        order = torch.randperm(self.num_samples, generator=epoch_generator(self.seed, self.epoch)).tolist()
        start = 0
        for size in self.sizes:
            yield order[start : start + size]
            start += size

    def __len__(self) -> int:
        return len(self.sizes)


def build_dataloaders(
    datasets_dict,
    *,
    image_size: int,
    batch_size: int,
    eval_batch_size: int | None = None,
    num_workers: int = 0,
    seed: int = 0,
    target_stats: TargetStats | None = None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    dihedral: bool = True,
    color_jitter: float = 0.0,
    bad_image_policy: str = "fail",
    num_processes: int = 1,
    hed_jitter: float = 0.0,
    image_cache=None,
) -> dict:
    """DataLoaders for every split: shuffled, augmented ``train``; ordered, plain evaluation splits.

    ``num_processes`` is the number of training processes that will share the train loader
    (after ``accelerator.prepare``): its batches are laid out so that each sample is used
    exactly once per epoch across them. ``image_cache`` (``expreg.image_cache.ImageCache`` at
    ``image_size``) replaces decoding the image files.

    Returns:
        ``{"train": DataLoader, "validation": ..., "test": ...}`` (the splits present), plus
        ``"train_sampler"`` and ``"train_transform"``, which need ``set_epoch`` at each epoch.
    """
    import datasets
    import torch
    from torch.utils.data import DataLoader

    from expreg.seeding import seed_worker

    if image_cache is not None and image_cache.image_size != image_size:
        raise ValueError(
            f"the image cache {image_cache.folder} holds {image_cache.image_size}-px images, not {image_size}"
        )
    loaders: dict = {}
    common = {"num_workers": num_workers, "collate_fn": collate_fn, "worker_init_fn": seed_worker}
    for name, part in datasets_dict.items():
        train = name == "train"
        image_transform = ImageTransform(
            image_size,
            mean,
            std,
            train=train,
            dihedral=dihedral,
            color_jitter=color_jitter,
            seed=seed,
            hed_jitter=hed_jitter,
        )
        # Evaluation always fails on an unreadable image: skipping would misalign predictions and paths.
        transform = ExpressionTransform(
            image_transform, target_stats, bad_image_policy if train else "fail", image_cache=image_cache
        )
        dataset = part.cast_column("image", datasets.Image(decode=False)).with_transform(transform)
        if train:
            sampler = EpochBatchSampler(len(dataset), batch_size, seed, num_processes)
            loaders["train"] = DataLoader(dataset, batch_sampler=sampler, generator=sampler.generator, **common)
            loaders["train_sampler"], loaders["train_transform"] = sampler, transform
        else:
            generator = torch.Generator().manual_seed(seed)
            loaders[name] = DataLoader(
                dataset, batch_size=eval_batch_size or batch_size, shuffle=False, generator=generator, **common
            )
    return loaders
