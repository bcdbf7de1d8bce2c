"""One inference loop for the saved model: a run's final scores, ``expreg.predict``, CV folds and TTA.

Every prediction of a *saved* model goes through ``predict_loader``: the model on the
accelerator's device in fp32 (never under the training run's autocast), the loader sharded over
the processes, ``gather_for_metrics`` putting exactly one row per sample back in dataset order.
So a run's ``predictions_val.csv`` / ``predictions_test.csv`` and ``expreg.predict`` on the
same images give the same numbers, whatever precision the run trained in.
"""

from __future__ import annotations

import numpy as np


class ImageFiles:
    """A map-style dataset of image files -> ``pixel_values`` (the model's evaluation transform)."""

    def __init__(self, files: list[str], transform) -> None:
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from expreg.data.dataset import UnreadableImageError, load_image

        image, reason = load_image(self.files[index])
        if image is None:
            raise UnreadableImageError(f"{self.files[index]}: cannot read the image ({reason})")
        return self.transform(image, self.files[index])


def dihedral_views(pixel_values):
    """The 8 flips/90-degree rotations of a batch ``(B, C, H, W)`` (identity first)."""
    import torch

    views = []
    for k in range(4):
        rotated = torch.rot90(pixel_values, k, dims=(2, 3))
        views += [rotated, torch.flip(rotated, dims=(3,))]
    return views


def forward_tta(model, pixel_values, tta: bool):
    """Normalised predictions, averaged over the 8 dihedral views when ``tta`` (test-time augmentation)."""
    if not tta:
        return model(pixel_values=pixel_values).predictions.float()
    views = dihedral_views(pixel_values)
    return sum(model(pixel_values=v).predictions.float() for v in views) / len(views)


def predict_loader(model, loader, accelerator, *, tta: bool = False, max_batches: int | None = None, desc="predict"):
    """Normalised predictions ``(num_samples, num_genes)`` of ``model`` over ``loader``, in dataset order.

    Args:
        model: An unwrapped ``ExpRegModel`` (moved to the accelerator's device here, fp32, eval mode).
        loader: A DataLoader of ``pixel_values`` tensors or of dicts holding them; it is sharded
            over the processes here (pass the plain, unprepared loader).
        tta: Average over the 8 dihedral views.
        max_batches: Stop after this many batches per process (dry runs); the rows returned are
            then the first ones of the dataset.
    """
    import torch
    from tqdm.auto import tqdm

    model = model.to(accelerator.device).eval()
    sharded = accelerator.prepare_data_loader(loader)
    outputs = []
    bar = tqdm(sharded, desc=desc, unit="batch", leave=False, disable=not accelerator.is_local_main_process)
    with torch.inference_mode():
        for i, batch in enumerate(bar):
            if max_batches is not None and i >= max_batches:
                break
            pixel_values = batch["pixel_values"] if isinstance(batch, dict) else batch
            predictions = forward_tta(model, pixel_values.to(accelerator.device), tta)
            outputs.append(accelerator.gather_for_metrics(predictions).cpu().numpy())
    if not outputs:
        return np.zeros((0, model.config.num_genes), dtype=np.float32)
    return np.concatenate(outputs)


def predict_files(
    model, files: list[str], accelerator, batch_size: int = 64, num_workers: int = 2, tta: bool = False
) -> np.ndarray:
    """Predictions in expression units, shape ``(len(files), num_genes)``, in the order of ``files``.

    Every process predicts its shard; ``gather_for_metrics`` reassembles exactly ``len(files)`` rows.
    With ``tta``, each prediction is the mean over the 8 dihedral views of the image (8x the compute).
    """
    from torch.utils.data import DataLoader

    from expreg.data.dataset import ImageTransform

    config = model.config
    transform = ImageTransform(config.image_size, config.image_mean, config.image_std, train=False)
    loader = DataLoader(ImageFiles(files, transform), batch_size=batch_size, num_workers=num_workers)
    normalised = predict_loader(model, loader, accelerator, tta=tta)
    return model.to_expression(normalised.astype(np.float64))
