"""Evaluation and prediction: expreg's throughput against a bare ``torch.inference_mode()`` loop.

    python benchmarks/bench_eval_predict.py [--repeats 5] [--metadata_csv CSV] [recipe overrides ...]

On the validation images of the recipe (``recipes/her2st.yaml`` on her2st_dev by default),
with the recipe's backbone, image size, evaluation batch size and workers:

- ``expreg.training.trainer.evaluate``: the validation pass of every epoch (validation DataLoader ->
  model -> ``gather_for_metrics`` -> predictions and loss), decoding the image files, and
  reading the decoded-image cache (``data.image_cache=true``);
- ``expreg.predict.predict_files``: what ``expreg-predict`` runs on image files (DataLoader with
  the model's evaluation transform -> model -> predictions in expression units).

Baseline (the compute limit): the same model and batch size in a bare
``torch.inference_mode()`` forward loop over the images decoded into one tensor beforehand.
Sides alternate in one process; medians of ``--repeats`` passes. The ratios are printed last.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, environment, median, predecode, recipe_parser, report, setup_run  # noqa: E402


def main() -> None:
    args = recipe_parser(__doc__, repeats=5).parse_args()

    import torch

    from expreg.data import image_files
    from expreg.predict import predict_files
    from expreg.training.setup import setup_image_cache, setup_loaders
    from expreg.training.trainer import evaluate

    cfg, accelerator, data, model = setup_run(args)
    model = model.eval()
    d = cfg.data
    batch_size = d.eval_batch_size or d.batch_size
    files = image_files(data.datasets["validation"])
    pixels = predecode(files, d.image_size, model.config.image_mean, model.config.image_std)

    with tempfile.TemporaryDirectory() as cache_dir:
        loaders = {}
        for cached in (False, True):
            d.image_cache, d.image_cache_dir = cached, cache_dir
            built = setup_loaders(cfg, data, model, 1, setup_image_cache(cfg, data, accelerator))
            loaders[cached] = accelerator.prepare(built["validation"])
        prepared = accelerator.prepare(model)

        def rate(fn) -> float:
            start = time.perf_counter()
            fn()
            return len(files) / (time.perf_counter() - start)

        def bare() -> None:
            with torch.inference_mode():
                for start in range(0, len(pixels), batch_size):
                    model(pixel_values=pixels[start : start + batch_size])

        values = alternate(
            {
                "bare inference_mode loop, pre-decoded tensors": lambda: rate(bare),
                "expreg evaluate, decoding image files": lambda: rate(
                    lambda: evaluate(prepared, loaders[False], accelerator)
                ),
                "expreg evaluate, decoded-image cache": lambda: rate(
                    lambda: evaluate(prepared, loaders[True], accelerator)
                ),
                "expreg.predict.predict_files (image files)": lambda: rate(
                    lambda: predict_files(model, files, accelerator, batch_size, d.num_workers)
                ),
            },
            args.repeats,
        )
    print(environment())
    print(
        f"{cfg.model.backbone}, {d.image_size} px, batch {batch_size}, {d.num_workers} workers, {len(files)} validation "
        f"images ({d.metadata_csv}), fp32; images/s, median of {args.repeats} passes"
    )
    report(values, "img/s")
    base = median(values["bare inference_mode loop, pre-decoded tensors"])
    print()
    for name in list(values)[1:]:
        print(f"{name} / bare loop = {median(values[name]) / base:.2f} (target >= 0.90)")


if __name__ == "__main__":
    main()
