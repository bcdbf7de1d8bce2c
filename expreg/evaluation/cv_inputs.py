"""What ``expreg.cv``'s baselines read, computed once for every fold: colour/texture features, frozen
embeddings of the recipe's encoder and their neighbourhood means, each with its fit function."""

from __future__ import annotations

import functools
import time

import numpy as np

from expreg.data.neighbours import neighbourhood_features
from expreg.evaluation.depth import DEPTH_ORACLE, depth_oracle_fit
from expreg.evaluation.hest_probe import PROBE_NAME as HEST_PROBE

NEIGHBOURHOOD_PROBE = "linear_probe_neighbourhood"
PROBES = ("linear_probe", HEST_PROBE, NEIGHBOURHOOD_PROBE)  # methods on the embeddings of the recipe's encoder


def shared_inputs(cfg, methods: list[str], files: list[str], accelerator=None, metadata=None) -> dict:
    """Per-image inputs computed once for all folds (colour/texture features, frozen embeddings, their
    neighbourhood means), and the fit function of each baseline: ``fit(x_train, y_train, groups_train,
    x_test, seed)``."""
    from expreg.evaluation.baselines import extract_features, linear_probe, mean_fit, ridge_baseline
    from expreg.evaluation.hest_probe import hest_linear_probe

    inputs: dict = {"mean": (np.zeros((len(files), 0)), mean_fit)}  # the mean needs no input
    inputs[DEPTH_ORACLE] = (None, depth_oracle_fit)  # its input: the fold's library sizes (_fit_baseline)
    if "ridge" in methods:
        start = time.perf_counter()
        inputs["ridge"] = (extract_features(files), ridge_baseline)
        inputs["ridge_seconds"] = time.perf_counter() - start
    probes = [m for m in PROBES if m in methods]
    if probes:  # one embedding array for every probe, from the embedding store (built once, reused)
        start = time.perf_counter()
        embeddings = probe_embeddings(cfg, files, accelerator)
        seconds = time.perf_counter() - start
        fits = {"linear_probe": linear_probe, HEST_PROBE: hest_linear_probe}
        for method in probes:  # each probe's time includes the embedding it needs
            if method == NEIGHBOURHOOD_PROBE:
                x, info = neighbourhood_features(
                    embeddings, metadata, cfg.data.neighbourhood_um, cfg.data.neighbourhood_rings
                )
                print(f"{method}: each spot's embedding beside the mean of its neighbourhood ({_describe(info)})")
                inputs[method] = (x, functools.partial(_with_info, linear_probe, info))
            else:
                inputs[method] = (embeddings, fits[method])
            inputs[f"{method}_seconds"] = time.perf_counter() - start if method == NEIGHBOURHOOD_PROBE else seconds
    return inputs


def _describe(info: dict) -> str:
    return f"{info['neighbourhood_um']} µm, {info['mean_spots_per_neighbourhood']} spots on average, itself included"


def _with_info(fit, info: dict, *args, **kwargs):
    """``fit``'s predictions, with ``info`` added to what it reports (the neighbourhood's radius and size)."""
    predictions, extra = fit(*args, **kwargs)
    return predictions, {**extra, **info}


def probe_embeddings(cfg, files: list[str], accelerator=None) -> np.ndarray:
    """Frozen embeddings ``(len(files), features)`` (float64) of the recipe's encoder, from the embedding store.

    ``accelerator``: the store is built on its device(s), shared by its processes (None: this process, CPU).

    The encoder is the recipe's (``model.backbone``, ``model.pretrained`` / ``model.pretrained_path``,
    ``model.pooling``, ``data.image_size``); a randomly initialised one is seeded from ``cfg.seed``, so
    it is the same one, and the same store, every time.
    """
    from expreg.embeddings import ensure_embeddings
    from expreg.modeling.model import build_model
    from expreg.seeding import seed_everything

    seed_everything(cfg.seed)
    m, d = cfg.model, cfg.data
    model = build_model(
        m.backbone,
        1,
        pretrained=m.pretrained,
        pretrained_path=m.pretrained_path,
        encoder_args=m.encoder_kwargs(),
        pooling=m.pooling,
        image_size=d.image_size,
    )
    store = ensure_embeddings(
        model,
        files,
        accelerator=accelerator,
        cache_root=d.image_cache_dir,
        batch_size=d.eval_batch_size or 64,
        num_workers=d.num_workers,
        progress=accelerator is None or accelerator.is_local_main_process,
    )
    print(f"embeddings: {store.folder} ({len(store):,} images x {store.num_features:,} features)")
    return store.get(files).astype(np.float64)
