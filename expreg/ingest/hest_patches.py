"""HEST-1k samples shipped without their whole-slide image: the patches of ``patches/<id>.h5``.

HEST cuts 224-px patches at 0.5 µm/px (112 µm) around each spot (``img`` N x 224 x 224 x 3,
``coords`` the top-left level-0 x, y, ``barcode``). Without the WSI nothing else can be cut, so
``--patch_um`` must be 112 (they are resized to ``--patch_px``); spots without a patch in the file
are dropped and counted.
"""

from __future__ import annotations

import h5py
import numpy as np
from PIL import Image

from expreg.ingest.errors import IngestError

HEST_PATCH_UM = 112.0


def patch_rows(section, patch_um: float) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """``(spot rows kept, their row in the .h5, dropped counts)``; an error when ``patch_um`` is not HEST's."""
    path = section.patches_h5
    if abs(patch_um - HEST_PATCH_UM) > 1e-6:
        raise IngestError(
            f"sample {section.sample_id}: only {path} (HEST's {HEST_PATCH_UM:g} um patches) is available, no "
            f"whole-slide image: pass --patch_um {HEST_PATCH_UM:g}, or add the WSI (wsis/{section.sample_id}.tif)"
        )
    try:
        with h5py.File(path, "r") as f:
            barcodes = [b.decode() if isinstance(b, bytes) else str(b) for b in np.asarray(f["barcode"]).reshape(-1)]
            count = f["img"].shape[0]
    except (OSError, KeyError) as err:
        raise IngestError(f"{path}: unreadable HEST patch file ({type(err).__name__}: {err})") from err
    if len(barcodes) != count:
        raise IngestError(f"{path}: {count} images but {len(barcodes)} barcodes")
    where = {b: i for i, b in enumerate(barcodes)}
    rows = np.array([where.get(str(b), -1) for b in section.barcodes], dtype=np.int64)
    keep = np.flatnonzero(rows >= 0)
    dropped = {f"no patch in {path.rsplit('/', 1)[-1]}": int(len(rows) - len(keep))} if len(keep) < len(rows) else {}
    if not len(keep):
        raise IngestError(f"{path}: none of sample {section.sample_id}'s barcodes has a patch")
    return keep, rows[keep], dropped


def read_patches(path: str, rows, patch_px: int):
    """Patches ``rows`` of a HEST ``.h5`` (opened once), each an RGB image of ``patch_px`` x ``patch_px``."""
    row = None
    try:
        with h5py.File(path, "r") as f:
            for row in rows:
                yield _patch_image(np.asarray(f["img"][int(row)]), patch_px)
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise IngestError(f"{path}: patch {row} unreadable ({type(err).__name__}: {err})") from err


def _patch_image(pixels: np.ndarray, patch_px: int) -> Image.Image:
    image = Image.fromarray(pixels[..., :3].astype(np.uint8), "RGB")
    if image.size != (patch_px, patch_px):
        image = image.resize((patch_px, patch_px), Image.Resampling.LANCZOS)
    return image
