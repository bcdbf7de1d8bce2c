"""Image decoding and transforms: any PIL image -> 8-bit RGB -> resized ``uint8`` tensor -> normalised,
augmented float tensor.

Owns the fixed input ranges of high-bit-depth images (``to_rgb``), the one resize every path uses
(``decode_resized``, shared with the decoded-image cache), the seeded per-sample augmentation
(``ImageTransform``: dihedral views, colour and HED stain jitter) and the reading of image files
(``load_image``, ``UnreadableImageError``, ``error_message``). torch and torchvision are imported
only inside the functions that need them.
"""

from __future__ import annotations

import io

import numpy as np

from expreg.seeding import derive_seed

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
# The dihedral group of the square: 4 rotations by 90 degrees, each with or without a mirror flip.
DIHEDRAL_ROTATIONS = 4
DIHEDRAL_VIEWS = 2 * DIHEDRAL_ROTATIONS


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
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    image = to_rgb(image)
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), resample=Image.Resampling.BILINEAR)
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
            k = int(rng.integers(DIHEDRAL_VIEWS))
            x = torch.rot90(x, k % DIHEDRAL_ROTATIONS, dims=(1, 2))
            if k >= DIHEDRAL_ROTATIONS:
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

    A path that a registered patch store holds (``expreg.data.patch_store.use_store``) is read from
    the store.

    Returns:
        ``(image, None)``, or ``(None, reason)`` when it cannot be read.
    """
    from PIL import Image

    from expreg.data.patch_store import read_bytes

    path = item["path"] if isinstance(item, dict) else item
    try:
        data = (item.get("bytes") if isinstance(item, dict) else None) or read_bytes(path)
        if data:  # the row's own bytes, or a patch store's (expreg.data.patch_store)
            image = Image.open(io.BytesIO(data))
            image.load()
            return image, None
        with open(path, "rb") as fh:  # our handle, closed here; after load() the pixels need no file
            image = Image.open(fh)
            image.load()
        return image, None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
        return None, f"{type(err).__name__}: {err}"
