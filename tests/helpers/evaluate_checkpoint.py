"""Evaluate a saved model on a run's validation split with N processes (test helper).

accelerate launch ... tests/helpers/evaluate_checkpoint.py RUN_DIR OUT_JSON EVAL_BATCH_SIZE
"""

import json
import sys
from pathlib import Path

import numpy as np
import yaml

from expreg.config import config_from_dict
from expreg.data import TargetStats, build_dataloaders, load_expression_dataset
from expreg.evaluation.metrics import compute_metrics
from expreg.inference import predict_loader
from expreg.modeling.model import ExpRegModel
from expreg.training.launch import build_accelerator
from expreg.training.trainer import evaluate


def main() -> None:
    run_dir, out_json, batch_size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    cfg = config_from_dict(yaml.safe_load((run_dir / "config_resolved.yaml").read_text()), "run config")
    accelerator = build_accelerator()
    model = ExpRegModel.from_pretrained(run_dir / "checkpoints" / "best")
    datasets = load_expression_dataset(cfg.data.metadata_csv, cfg.data.split_csv)
    stats = TargetStats.from_dict({"mean": model.config.target_mean, "std": model.config.target_std})
    loaders = build_dataloaders(
        datasets,
        image_size=cfg.data.image_size,
        batch_size=batch_size,
        target_stats=stats,
        mean=model.config.image_mean,
        std=model.config.image_std,
    )
    # the loop that scores a saved model (metrics.json, predict): plain loader, sharded inside
    scored = predict_loader(
        ExpRegModel.from_pretrained(run_dir / "checkpoints" / "best"), loaders["validation"], accelerator
    )
    model, val_dl = accelerator.prepare(model, loaders["validation"])
    _, predictions = evaluate(model, val_dl, accelerator)
    targets = np.asarray(datasets["validation"]["labels"], dtype=np.float64)
    metrics = compute_metrics(stats.denormalize(predictions.astype(np.float64)), targets)
    if accelerator.is_main_process:
        out_json.write_text(
            json.dumps(
                {
                    "num_processes": accelerator.num_processes,
                    "rows": len(predictions),
                    **metrics.summary,
                    "predictions": predictions.tolist(),
                    "scored_rows": len(scored),
                    "scored": scored.tolist(),
                }
            )
        )
    accelerator.end_training()  # end the process group before exit: a teardown at exit can abort under load


if __name__ == "__main__":
    main()
