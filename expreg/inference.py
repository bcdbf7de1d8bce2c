"""One inference loop: the training run's evaluation, its final scores, ``expreg.predict``, CV folds,
TTA and frozen embeddings all go through ``gather_outputs``.

The loader is sharded over the processes (``accelerator.prepare_data_loader``, or already prepared
by the trainer) and ``gather_for_metrics`` puts exactly one row per sample back in dataset order,
so 1 or N processes give the same rows. A *saved* model is run by ``predict_loader``: on the
accelerator's device in fp32 (never under a training run's autocast), so a run's
``predictions_val.csv`` / ``predictions_test.csv`` and ``expreg.predict`` on the same images give
the same numbers. Predictions become expression units in one place: ``ExpRegModel.to_expression``
(the training-split statistics stored with the model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from expreg.progress import progress_bar


class PredictError(RuntimeError):
    """The model or the inputs of a prediction cannot be used."""


class ImageFiles:
    """A map-style dataset of image files -> ``pixel_values`` (the model's evaluation transform).

    An entry of ``files`` is a path, or ``(patch, context patch)`` for a multiscale model (6 channels).
    """

    def __init__(self, files: list, transform) -> None:
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        import torch

        entry = self.files[index]
        paths = (entry,) if isinstance(entry, str) else tuple(entry)
        return torch.cat([self._view(path, paths[0]) for path in paths], dim=0)

    def _view(self, path: str, key: str):
        from expreg.data import UnreadableImageError, load_image

        image, reason = load_image(path)
        if image is None:
            raise UnreadableImageError(f"{path}: cannot read the image ({reason})")
        return self.transform(image, key)


def image_loader(model, files: list[str], batch_size: int, num_workers: int):
    """A DataLoader of ``files`` with the saved model's own evaluation transform (size, mean, std)."""
    from torch.utils.data import DataLoader

    from expreg.data import ImageTransform
    from expreg.data.loaders import worker_options

    config = model.config
    transform = ImageTransform(config.image_size, config.image_mean, config.image_std, train=False)
    return DataLoader(ImageFiles(files, transform), batch_size=batch_size, **worker_options(num_workers, seed=False))


NUM_VIEWS = 8  # the dihedral views of a square image: 4 rotations, each also flipped


def dihedral_view(pixel_values, view: int):
    """View ``view`` (0-7) of a batch ``(B, C, H, W)``: rotation by ``view // 2`` quarter turns, then a
    horizontal flip when ``view`` is odd (the order of ``expreg.inference.dihedral_views``)."""
    import torch

    if view == 0:
        return pixel_values
    rotated = torch.rot90(pixel_values, view // 2, dims=(2, 3))
    return torch.flip(rotated, dims=(3,)) if view % 2 else rotated


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


def gather_outputs(
    forward,
    loader,
    accelerator=None,
    *,
    max_batches=None,
    desc="predict",
    with_labels=False,
    progress=True,
    inference_mode=True,
):
    """``forward(pixel_values)`` over every batch of ``loader``, gathered from all processes in dataset order.

    Args:
        forward: Maps a ``pixel_values`` batch to a ``(batch, ...)`` tensor.
        loader: A sharded (prepared) loader of ``pixel_values`` tensors or of dicts holding them
            (and ``labels`` when ``with_labels``); with ``accelerator=None``, a plain loader run
            in this process.
        max_batches: Stop after this many batches per process (dry runs): the rows returned are
            then the first ones of the dataset.
        progress: Show a progress bar (on the local main process).
        inference_mode: ``torch.inference_mode`` (saved models); ``False``: ``torch.no_grad``, for the
            model being trained, whose forward may cache tensors that a later backward needs.

    Returns:
        The outputs ``(num_samples, ...)`` as float32 numpy (and the labels with ``with_labels``),
        exactly one row per sample (``gather_for_metrics`` drops the padding of the last batch);
        ``None`` when the loader yielded nothing.
    """
    import torch

    outputs, labels = _Rows(_num_rows(loader)), _Rows(_num_rows(loader))
    main = progress and (accelerator is None or accelerator.is_local_main_process)
    with torch.inference_mode() if inference_mode else torch.no_grad():
        for i, batch in enumerate(progress_bar(loader, enabled=main, desc=desc, unit="batch")):
            if max_batches is not None and i >= max_batches:
                break
            pixel_values = batch["pixel_values"] if isinstance(batch, dict) else batch
            if accelerator is not None:
                pixel_values = pixel_values.to(accelerator.device)
            out = forward(pixel_values).float()
            gathered = (out, batch["labels"]) if with_labels else out
            if accelerator is not None:
                gathered = accelerator.gather_for_metrics(gathered)
            out, lab = gathered if with_labels else (gathered, None)
            outputs.add(out.cpu().numpy())
            if with_labels:
                labels.add(lab.cpu().numpy())
    return (outputs.array(), labels.array()) if with_labels else outputs.array()


def _num_rows(loader) -> int | None:
    """The samples a loader yields in all (gathered over processes), when its dataset says."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


class _Rows:
    """Batches of rows collected into one array, allocated once when the number of rows is known (a list of
    batches and its concatenation would hold the rows twice: 2 x 40 MB at 200,000 rows x 50 genes)."""

    def __init__(self, num_rows: int | None) -> None:
        self.num_rows, self.filled, self.out, self.parts = num_rows, 0, None, []

    def add(self, batch: np.ndarray) -> None:
        if self.out is None and self.num_rows is not None:
            self.out = np.empty((self.num_rows, *batch.shape[1:]), dtype=batch.dtype)
        if self.out is None or self.filled + len(batch) > len(self.out):
            self.parts.append(batch)  # more rows than the dataset has: kept, and the caller's count check says so
            return
        self.out[self.filled : self.filled + len(batch)] = batch
        self.filled += len(batch)

    def array(self) -> np.ndarray | None:
        if self.out is None:
            return np.concatenate(self.parts) if self.parts else None
        return np.concatenate([self.out[: self.filled], *self.parts]) if self.parts else self.out[: self.filled]


def predict_loader(
    model,
    loader,
    accelerator,
    *,
    tta: bool = False,
    max_batches: int | None = None,
    desc="predict",
    neighbourhood=None,
):
    """Normalised predictions ``(num_samples, num_genes)`` of a saved ``model`` over ``loader``, in dataset order.

    Args:
        model: An unwrapped ``ExpRegModel`` (moved to the accelerator's device here, fp32, eval mode).
        loader: A DataLoader of ``pixel_values`` tensors or of dicts holding them; it is sharded
            over the processes here (pass the plain, unprepared loader).
        tta: Average over the 8 dihedral views.
        max_batches: Stop after this many batches per process (dry runs).
        neighbourhood: A ``context=neighbourhood`` model's row-normalised ``(num_samples, num_samples)``
            matrix (``expreg.data.neighbours.neighbourhood_matrix``): every sample is embedded first, then
            the head reads each embedding beside its neighbourhood's mean (two passes).
    """
    if neighbourhood is not None and max_batches is not None:
        raise ValueError(
            "max_batches cuts the samples a neighbourhood matrix spans: cut the matrix (first_rows) instead"
        )
    model = model.to(accelerator.device).eval()
    sharded = accelerator.prepare_data_loader(loader)
    if neighbourhood is not None:
        predictions = _neighbourhood_predictions(model, sharded, accelerator, neighbourhood, tta, desc)
    else:
        predictions = gather_outputs(
            lambda pixel_values: forward_tta(model, pixel_values, tta),
            sharded,
            accelerator,
            max_batches=max_batches,
            desc=desc,
        )
    if predictions is None:
        return np.zeros((0, model.config.num_genes), dtype=np.float32)
    return predictions


def _neighbourhood_predictions(model, sharded, accelerator, matrix, tta: bool, desc: str) -> np.ndarray | None:
    """Embed every sample (each process its shard, gathered in order), average the embeddings over each
    neighbourhood, then the head. With ``tta``: the mean over the 8 dihedral views of each sample's own
    embedding beside the same neighbourhood mean of the images as they are (as a frozen head was trained)."""
    import torch

    views = range(NUM_VIEWS) if tta else range(1)
    total, around = None, None
    for view in views:
        label = f"{desc}: embed" + (f" view {view + 1}/{NUM_VIEWS}" if tta else "")
        embeddings = gather_outputs(
            lambda pv, v=view: model.embed(dihedral_view(pv, v)), sharded, accelerator, desc=label
        )
        if embeddings is None:
            return None
        if around is None:  # view 0: the images as they are
            around = np.asarray(matrix @ embeddings.astype(np.float64), dtype=np.float32)
        features = np.hstack([embeddings, around])
        with torch.inference_mode():
            predictions = np.concatenate(
                [
                    model.forward_head(torch.from_numpy(chunk).to(accelerator.device))
                    .predictions.float()
                    .cpu()
                    .numpy()
                    for chunk in np.array_split(features, max(1, len(features) // 4096))
                ]
            )
        total = predictions if total is None else total + predictions
    return total / len(views)


def predict_files(
    model,
    files: list[str],
    accelerator,
    batch_size: int = 64,
    num_workers: int = 2,
    tta: bool = False,
    neighbourhood=None,
) -> np.ndarray:
    """Predictions in expression units, shape ``(len(files), num_genes)``, in the order of ``files``.

    Every process predicts its shard; ``gather_for_metrics`` reassembles exactly ``len(files)`` rows.
    With ``tta``, each prediction is the mean over the 8 dihedral views of the image (8x the compute).
    ``neighbourhood``: a neighbourhood model's averaging matrix over ``files`` (``predict_loader``).
    """
    loader = image_loader(model, files, batch_size, num_workers)
    normalised = predict_loader(model, loader, accelerator, tta=tta, neighbourhood=neighbourhood)
    return model.to_expression(normalised.astype(np.float64))


def embed_files(model, files: list[str], batch_size: int = 64, num_workers: int = 0) -> np.ndarray:
    """Embeddings ``(len(files), features)`` of the model's encoder (``model.embed``; eval mode, in this process, float64)."""
    loader = image_loader(model, files, batch_size, num_workers)
    was_training = model.training
    model.eval()
    try:
        embeddings = gather_outputs(model.embed, loader, desc="embed", progress=len(files) >= 200)
    finally:
        model.train(was_training)
    return embeddings.astype(np.float64)


def resolve_model_dir(model: str) -> str:
    """Accept a ``save_pretrained`` folder, a run directory (uses its best checkpoint) or a hub id."""
    path = Path(model)
    if (path / "checkpoints" / "best" / "config.json").is_file():
        return str(path / "checkpoints" / "best")
    if path.exists() and not (path / "config.json").is_file():
        raise PredictError(f"{model}: not a saved model (no config.json); pass a run's checkpoints/best folder")
    return model


def load_model(model: str):
    """``ExpRegModel.from_pretrained`` with a clear error for unreachable hub ids (e.g. offline)."""
    from expreg.modeling.model import ExpRegModel, ModelError

    source = resolve_model_dir(model)
    try:
        return ExpRegModel.from_pretrained(source).eval()
    except ModelError as err:  # its backbone cannot be rebuilt (e.g. an architecture this timm lacks)
        raise PredictError(f"could not load model {model!r}: {err}") from err
    except (OSError, ValueError) as err:
        raise PredictError(
            f"could not load model {model!r}: {type(err).__name__}: {str(err).splitlines()[0]}. A local folder "
            "needs config.json and model.safetensors; a hub id needs network access (or the HF cache)."
        ) from err
