# %% [markdown]
# # expreg in a notebook
#
# Load a run's data split as a HuggingFace `datasets` object, load its best model with
# `AutoModel.from_pretrained`, predict a batch and compute the metrics. Each `# %%` block is a
# notebook cell (VS Code / Jupytext); the file also runs as a script:
#
#     accelerate launch run_regression.py recipes/demo.yaml     # make a run first
#     python examples/notebook_quickstart.py [results/<run>]     # newest run by default

# %%
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import AutoModel

import expreg.model  # noqa: F401  (registers the "expreg" model type with AutoModel)
from expreg.data import ImageTransform, load_expression_dataset
from expreg.metrics import compute_metrics

runs = sorted(Path("results").glob("*/checkpoints/best/config.json"), key=lambda p: p.stat().st_mtime)
run_dir = Path(sys.argv[1]) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else runs[-1].parents[2]
cfg = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
print("run:", run_dir)

# %% The dataset object: train / validation (/ test) with decoded images and labels
d = cfg["data"]
ds = load_expression_dataset(
    d["metadata_csv"], d["split_csv"], fold=d["fold"], seed=cfg["seed"], val_frac=d["val_frac"]
)
print(ds)
example = ds["validation"][0]
print(example["path"], example["group_id"], example["image"].size, len(example["labels"]), "targets")

# %% The trained model, as any transformers model
model = AutoModel.from_pretrained(run_dir / "checkpoints" / "best").eval()
genes = model.config.gene_names
print(type(model).__name__, model.config.backbone, f"{len(genes)} genes:", genes[:5], "...")

# %% Predict a batch (the evaluation transform: resize + the backbone's normalisation)
transform = ImageTransform(model.config.image_size, model.config.image_mean, model.config.image_std)
batch = ds["validation"].select(range(min(32, len(ds["validation"]))))
pixel_values = torch.stack([transform(row["image"], row["path"]) for row in batch])
predicted = model.predict_expression(pixel_values).numpy()  # expression units, (batch, genes)
print("predictions:", predicted.shape)

# %% Metrics: per-gene Spearman (primary) and Pearson, averaged over genes
result = compute_metrics(predicted, np.asarray(batch["labels"]), genes)
print(result.format())
print(result.format_genes(n=3))
