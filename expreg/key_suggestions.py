"""The keys an unknown recipe key may have meant: other tools' names for ours, the same name in another
section, the nearest spellings (``expreg.config`` names them in its error)."""

from __future__ import annotations

import difflib

# Names other tools give our keys (transformers' TrainingArguments, Lightning, timm's train.py, plain habit)
OTHER_TOOLS_NAMES = {
    "learning_rate": "train.lr",
    "num_epochs": "train.epochs",
    "num_train_epochs": "train.epochs",
    "max_epochs": "train.epochs",
    "n_epochs": "train.epochs",
    "per_device_train_batch_size": "data.batch_size",
    "train_batch_size": "data.batch_size",
    "per_device_eval_batch_size": "data.eval_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "accumulate_grad_batches": "train.grad_accum_steps",
    "fp16": "train.mixed_precision",
    "bf16": "train.mixed_precision",
    "precision": "train.mixed_precision",
    "amp": "train.mixed_precision",
    "max_grad_norm": "train.max_grad_norm",
    "gradient_clip_val": "train.max_grad_norm",
    "clip_grad": "train.max_grad_norm",
    "warmup": "train.warmup_ratio",
    "patience": "train.early_stopping_patience",
    "model": "model.backbone",
    "model_name": "model.backbone",
    "model_name_or_path": "model.backbone",
    "arch": "model.backbone",
    "drop": "model.dropout",
    "dataloader_num_workers": "data.num_workers",
    "workers": "data.num_workers",
    "img_size": "data.image_size",
    "input_size": "data.image_size",
    "csv": "data.metadata_csv",
    "metadata": "data.metadata_csv",
    "split": "data.split_csv",
    "output_dir": "logging.output_dir",
    "run_name": "logging.run_name",
    "report_to": "logging.report_to",
    "seed": "seed",
}


def closest_keys(key: str, known) -> list[str]:
    """The known keys a mistyped or foreign ``key`` most likely means: another tool's name for it
    (``OTHER_TOOLS_NAMES``), the same name in another section, or the nearest spellings."""
    leaf = key.split(".")[-1]
    found = [OTHER_TOOLS_NAMES[leaf]] if leaf in OTHER_TOOLS_NAMES else []
    found += [c for c in known if c.split(".")[-1] == leaf]
    leaves = {c.split(".")[-1]: c for c in known}
    found += [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=2, cutoff=0.75)]
    found += difflib.get_close_matches(key, list(known), n=2, cutoff=0.75)
    return list(dict.fromkeys(c for c in found if c != key))[:3]
