"""The model card (``README.md``) written beside every saved best model and pushed with it."""

from __future__ import annotations

from expreg.formatting import fmt_float


def _gene_table(per_gene: list[dict], n: int = 5) -> str:
    ranked = sorted((r for r in per_gene if r["spearman"] is not None), key=lambda r: -r["spearman"])
    undefined = [r["gene"] for r in per_gene if r["spearman"] is None]
    lines = ["| rank | gene | Spearman | Pearson | MSE |", "|---|---|---|---|---|"]
    shown = list(enumerate(ranked, 1))
    if len(shown) > 2 * n:
        shown = shown[:n] + [None] + shown[-n:]
    for item in shown:
        if item is None:
            lines.append("| … | | | | |")
            continue
        rank, r = item
        lines.append(
            f"| {rank} | {r['gene']} | {fmt_float(r['spearman'])} | {fmt_float(r['pearson'])} | {fmt_float(r['mse'])} |"
        )
    if undefined:
        lines.append("")
        lines.append(
            f"{len(undefined)} gene(s) had a constant truth or prediction on the validation set, so no defined "
            f"correlation, and are excluded from the means: {', '.join(undefined)}."
        )
    return "\n".join(lines)


def _split_protocol(cfg: dict, data: dict) -> str:
    d = cfg["data"]
    groups = ", ".join(
        f"{name}: {v['samples']} samples from {v['groups']} group(s)" for name, v in data["splits"].items()
    )
    shared = data.get("shared_groups") or {}
    if d.get("fold") is not None and "train/validation" in shared:
        how = (
            f"Group k-fold file `{data['split_file']}`, fold {d['fold']} held out as test. The other folds hold a "
            f"single group, so validation (used only to pick the best epoch) is a seeded random {d['val_frac']:g} "
            f"of that group's samples (seed {cfg['seed']}): validation scores are optimistic (same patient), "
            "the test fold is untouched"
        )
    elif d.get("fold") is not None:
        how = (
            f"Group k-fold file `{data['split_file']}`, fold {d['fold']} held out as test; validation groups "
            f"drawn from the other folds (val_frac {d['val_frac']}, seed {cfg['seed']})"
        )
    elif data.get("split_made_by_run"):
        how = (
            f"Split made by the run from seed {cfg['seed']} (validation fraction {d['val_frac']}) and saved "
            f"with it as `{data['split_file']}`"
        )
    else:
        how = f"Split file `{data['split_file']}`"
    if shared:
        where = "; ".join(f"{pair}: {', '.join(g[:5])}{' ...' if len(g) > 5 else ''}" for pair, g in shared.items())
        grouping = f"Split on `group_id`, but some groups appear in two splits ({where})"
    else:
        grouping = "Patient-level (group-aware) split on `group_id`: no group appears in two splits"
    genes = f" Targets: {data['gene_choice']}." if data.get("gene_choice") else ""
    return (
        f"{grouping}. {how}. {groups}.{genes} "
        f"Target normalisation (per-gene z-score) statistics come from the training split only."
    )


def _results(best: dict, test: dict | None) -> str:
    lines = [
        f"## Results (best epoch {best['best_epoch']}, chosen on validation)",
        "",
        "| metric | validation (model selection) | held-out test |",
        "|---|---|---|",
    ]
    t = test or {}
    lines += [
        f"| mean Spearman over genes (primary) | {fmt_float(best['best_val_spearman_mean'])} | "
        f"{fmt_float(t.get('test_spearman_mean')) if test else 'no test split'} |",
        f"| mean Pearson over genes | {fmt_float(best['best_val_pearson_mean'])} | "
        f"{fmt_float(t.get('test_pearson_mean')) if test else ''} |",
        f"| depth-adjusted mean Spearman (library size regressed out) | "
        f"{fmt_float(best.get('best_val_spearman_depth_adjusted_mean'))} | "
        f"{fmt_float(t.get('test_spearman_depth_adjusted_mean')) if test else ''} |",
        f"| depth-adjusted mean Pearson | {fmt_float(best.get('best_val_pearson_depth_adjusted_mean'))} | "
        f"{fmt_float(t.get('test_pearson_depth_adjusted_mean')) if test else ''} |",
        f"| library size alone (depth oracle: measured data, a diagnostic) | "
        f"{fmt_float(best.get('best_val_depth_oracle_spearman_mean'))} | "
        f"{fmt_float(t.get('test_depth_oracle_spearman_mean')) if test else ''} |",
        f"| MSE on normalised targets (training-time evaluation) | {fmt_float(best.get('val_loss'))} | |",
    ]
    text = "\n".join(lines) + "\n\n"
    text += (
        "Correlations are computed per gene over the samples of a split, then averaged over genes, with the "
        "saved model in fp32. The best epoch was chosen on validation, so validation figures are optimistic. "
        "The depth-adjusted scores are the partial correlations with each spot's log library size regressed out "
        "of prediction and truth (on ranks for Spearman): what the model knows about each gene beyond how many "
        "molecules the spot yielded; n/a where the library size is unknown. "
    )
    if test:
        text += (
            f"The held-out test split ({t['num_test_samples']} samples from group(s) "
            f"{', '.join(t['test_groups'])}) was not used for any choice: report that one."
        )
    else:
        text += "Report a held-out test split or cross-validation (`python -m expreg.cv`) for publication."
    return text


def _training_method(t: dict) -> str:
    if t.get("mode") == "linear_probe":
        return (
            "linear probe: frozen backbone embeddings -> standardise -> PCA -> ridge (strength by inner "
            "group k-fold on the training groups), stored as the linear head"
        )
    if t.get("mode") == "frozen":
        return (
            f"frozen encoder: the head trained on cached embeddings (computed once, encoder unchanged) with AdamW, "
            f"lr {t['lr']}, weight decay {t['weight_decay']}, cosine schedule, warmup {t['warmup_ratio']}"
        )
    return (
        f"fine-tuning with AdamW, lr {t['lr']}, weight decay {t['weight_decay']}, cosine schedule, "
        f"warmup {t['warmup_ratio']}"
    )


FRONT_MATTER = """---
library_name: transformers
tags:
- expreg
- histology
- spatial-transcriptomics
- gene-expression-regression
- timm
---"""


def render_model_card(cfg: dict, best: dict, per_gene: list[dict], data: dict, test: dict | None = None) -> str:
    """Markdown model card.

    Args:
        cfg: The resolved run configuration (``RunConfig.to_dict()``).
        best: ``best_epoch``, ``best_val_spearman_mean``, ``best_val_pearson_mean``, ``val_loss``,
            ``num_processes``, ``effective_batch_size``, ``run_name``.
        per_gene: Rows ``gene, spearman, pearson, mse`` of the best model on validation.
        data: ``metadata_csv`` (name), ``split_file`` (name), ``num_genes`` and ``splits``
            (split name -> ``samples``, ``groups``), and ``shared_groups`` (``"a/b"`` -> groups in both).
        test: ``test_spearman_mean``, ``test_pearson_mean``, ``num_test_samples``, ``test_groups`` of the
            held-out test split, when the run has one.
    """
    return f"""{FRONT_MATTER}

{_summary(cfg, best, data)}

{_results(best, test)}

Best and worst genes by validation Spearman:

{_gene_table(per_gene)}

## Data

Metadata: `{data["metadata_csv"]}` ({data["num_genes"]} genes).{_patches(cfg)}

{_split_protocol(cfg, data)}

{_training_table(cfg, best)}

{_usage(cfg["data"]["image_size"], data["num_genes"], cfg["model"].get("context", "none"))}

{_limits(data)}"""


def _patches(cfg: dict) -> str:
    """The physical size of the training patches, when known (what whole-slide maps need)."""
    d = cfg["data"]
    if d.get("patch_um") is None:
        return ""
    return (
        f" Patches of {d['patch_um']:g} µm, seen by the model at {d['image_size']} px "
        f"({d['patch_um'] / d['image_size']:.3g} µm per input pixel)."
    )


def _pretrained(m: dict) -> str:
    if m["pretrained"] or m["pretrained_path"]:
        return f"pretrained weights ({m['pretrained_path'] or 'timm/hub'})"
    return "random initialisation"


def _summary(cfg: dict, best: dict, data: dict) -> str:
    m, size = cfg["model"], cfg["data"]["image_size"]
    return f"""# {best["run_name"]}

An **expreg** model: it predicts the expression of {data["num_genes"]} genes from a histology
image patch ({size}×{size} px, RGB). It is a timm `{m["backbone"]}` backbone
({_pretrained(m)}) with a {m["head"]} regression head, saved as a HuggingFace `transformers` model.
Its `config.json` holds the gene names and the training-split mean/std used to map predictions
back to expression units."""


def _augmentation(d: dict) -> str:
    text = "dihedral flips/rotations" if d["augment_dihedral"] else "none"
    if d["color_jitter"]:
        text += f", colour jitter {d['color_jitter']}"
    if d.get("hed_jitter"):
        text += f", HED stain jitter {d['hed_jitter']}"
    return text


def _training_table(cfg: dict, best: dict) -> str:
    m, t, d = cfg["model"], cfg["train"], cfg["data"]
    patience = t["early_stopping_patience"]
    processes, effective = best["num_processes"], best["effective_batch_size"]
    return f"""## Training

| setting | value |
|---|---|
| backbone | `{m["backbone"]}`, {_pretrained(m)} |
| head | {m["head"]}, dropout {m["dropout"]} |
| image size | {d["image_size"]} |
| augmentation | {_augmentation(d)} |
| training | {_training_method(t)} |
| batch | {d["batch_size"]} per process × {t["grad_accum_steps"]} accumulation × {processes} process(es) = {effective} |
| epochs | {t["epochs"]} configured{f", early stopping patience {patience}" if patience else ""} |
| mixed precision | {t["mixed_precision"]} |
| seed | {cfg["seed"]} |"""


def _usage(image_size: int, num_genes: int, context: str = "none") -> str:
    channels, images = "3", "a CSV with a `path` column or a folder of images"
    if context == "multiscale":  # the patch, then its context patch (expreg.prepare --context_um)
        channels = "6 (the patch's 3, then its context patch's 3)"
        images = "a CSV with `path` and `context_path` columns (`expreg.prepare --context_um`)"
    call = "expression = model.predict_expression(pixel_values)   # (batch, {k}), expression units"
    if context == "neighbourhood":  # each spot beside the mean embedding of its section's spots nearby
        images = "a CSV with `path` and each spot's section and position (`expreg.prepare` writes them)"
        call = """# the spots of one section together; xy_um: their centres in µm, (spots, 2)
import numpy as np, torch
from expreg.data.neighbours import neighbourhood_matrix
matrix = neighbourhood_matrix(np.zeros(len(xy_um)), xy_um, model.config.neighbourhood_um)
with torch.no_grad():
    mean = torch.from_numpy(matrix @ model.embed(pixel_values).double().numpy()).float()
expression = model.predict_expression(pixel_values, neighbourhood=mean)   # (spots, {k})"""
    return f"""## How to use

```python
import expreg.model  # registers the "expreg" model type with AutoModel
from transformers import AutoModel

model = AutoModel.from_pretrained("path/or/hub-id")
# pixel_values: (batch, {channels}, {image_size}, {image_size}), normalised with
# model.config.image_mean / image_std
{call.format(k=num_genes)}
genes = model.config.gene_names
```

Or from the command line, for {images}:

```bash
python -m expreg.predict --model path/or/hub-id --metadata_csv patches.csv --out_csv predictions.csv
```"""


def _limits(data: dict) -> str:
    targets = (
        "- The targets were computed from raw counts (see Targets above); predictions are in those units."
        if data.get("gene_choice")
        else "- The targets are whatever the training CSV held (e.g. log1p-normalised counts); predictions are\n"
        "  in those units. Gene lists chosen on the whole dataset leak a little information into\n"
        "  evaluation."
    )
    return f"""## Intended use and limits

- Research on the relation between tissue morphology and gene expression; **not for clinical
  or diagnostic use**.
- Trained on {data["splits"].get("train", {}).get("groups", "?")} group(s) (e.g. patients) of one
  dataset. Expect lower accuracy on other tissues, scanners, stains, resolutions or
  spot/patch sizes; check on your own held-out patients first.
{targets}
- Mean correlations hide per-gene differences: see the table above and the run's
  `per_gene_metrics.csv`.
"""
