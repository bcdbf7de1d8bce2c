"""The report of ``expreg.evaluation.cv``: the summary of every method over the folds (``cv_summary.json``)
and its Markdown rendering (``cv_summary.md``), with the notes a reader needs for some rows."""

from __future__ import annotations

import math

from expreg.evaluation.hest_probe import PROBE_NAME as HEST_PROBE
from expreg.evaluation.hest_probe import describe_hest_probe
from expreg.formatting import fmt_float, fmt_mean_std, mean_std
from expreg.run_dir import file_sha256

UNDEFINED = "undefined"  # how a missing (undefined) correlation is written


def describe(summary: dict) -> str:
    spearman, pearson = (fmt_float(summary[k], missing=UNDEFINED) for k in ("spearman_mean", "pearson_mean"))
    return f"held-out mean Spearman {spearman} | mean Pearson {pearson} | {summary['num_samples']} samples"


def summarise(results: dict[str, list[dict]], genes: list[str], recipe: str, folds_csv: str, seed: int) -> dict:
    methods = {}
    for method, folds in results.items():
        s_mean, s_std = mean_std([f["spearman_mean"] for f in folds])
        p_mean, p_std = mean_std([f["pearson_mean"] for f in folds])
        a_mean, a_std = _all_or_none([f.get("spearman_depth_adjusted_mean") for f in folds])
        o_mean, _ = _all_or_none([f.get("depth_oracle_spearman_mean") for f in folds])
        per_gene = {g: mean_std([f["per_gene_spearman"][g] for f in folds])[0] for g in genes}
        methods[method] = {
            "spearman_mean": s_mean,
            "spearman_std": s_std,
            "pearson_mean": p_mean,
            "pearson_std": p_std,
            "spearman_depth_adjusted_mean": a_mean,
            "spearman_depth_adjusted_std": a_std,
            "depth_oracle_spearman_mean": o_mean,
            "seconds_total": round(sum(f["seconds"] for f in folds), 1),
            "per_gene_spearman_mean": per_gene,
            "folds": folds,
        }
    return {
        "recipe": recipe,
        "folds_csv": folds_csv,
        "folds_csv_sha256": file_sha256(folds_csv),
        "seed": seed,
        "methods": methods,
    }


def _all_or_none(values) -> tuple[float | None, float | None]:
    """``mean_std`` when every fold knows the value; (None, None) when one does not (never a partial mean)."""
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None, None
    return mean_std(values)


def render_markdown(summary: dict) -> str:
    methods = summary["methods"]
    lines = [
        f"# Cross-validation: {summary['recipe']}",
        "",
        f"Folds: `{summary['folds_csv']}` (seed {summary['seed']}).",
        "",
    ]
    lines += _hest_task_notes(summary)
    lines += [
        "| method | fold | test groups | test samples | mean Spearman | mean Pearson | depth-adjusted Spearman "
        "| time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, m in methods.items():
        for f in m["folds"]:
            adjusted = fmt_float(f.get("spearman_depth_adjusted_mean"), missing="n/a")
            lines.append(
                f"| {method} | {f['fold']} | {', '.join(f['test_groups'])} | {f['num_test_samples']} "
                f"| {fmt_float(f['spearman_mean'], missing=UNDEFINED)} | {fmt_float(f['pearson_mean'], missing=UNDEFINED)} "
                f"| {adjusted} | {f['seconds']:.0f} |"
            )
    lines += [
        "",
        "| method | mean Spearman (mean ± std over folds) | mean Pearson | depth-adjusted Spearman | total time (s) |",
        "|---|---|---|---|---|",
    ]
    for method, m in methods.items():
        spearman = fmt_mean_std(m["spearman_mean"], m["spearman_std"], UNDEFINED)
        pearson = fmt_mean_std(m["pearson_mean"], m["pearson_std"], UNDEFINED)
        adjusted = fmt_mean_std(m.get("spearman_depth_adjusted_mean"), m.get("spearman_depth_adjusted_std"), "n/a")
        lines.append(f"| {method} | {spearman} | {pearson} | {adjusted} | {m['seconds_total']:.0f} |")
    lines += _depth_note(methods)
    lines += _method_notes(summary)
    for method, m in methods.items():
        ranked = sorted(((g, v) for g, v in m["per_gene_spearman_mean"].items() if v is not None), key=lambda x: -x[1])
        if len(ranked) > 2 * PER_GENE_SHOWN:
            best = ", ".join(f"{g} {v:.3f}" for g, v in ranked[:PER_GENE_SHOWN])
            worst = ", ".join(f"{g} {v:.3f}" for g, v in ranked[-PER_GENE_SHOWN:])
            lines += ["", f"**{method}**, per-gene Spearman averaged over folds: best {best}; worst {worst}."]
        elif ranked:  # too few for a best and a worst that differ: every gene, once
            every = ", ".join(f"{g} {v:.3f}" for g, v in ranked)
            lines += ["", f"**{method}**, per-gene Spearman averaged over folds, all {len(ranked)}: {every}."]
    return "\n".join(lines) + "\n"


PER_GENE_SHOWN = 5  # best and worst genes named per method
FEW_COMMON_GENES = 5  # fewer genes chosen in every fold than this: the summary says why that matters


def _depth_note(methods: dict) -> list[str]:
    """How to read the depth-adjusted column, with the depth oracle of these folds."""
    oracle = next(
        (
            m.get("depth_oracle_spearman_mean")
            for m in methods.values()
            if m.get("depth_oracle_spearman_mean") is not None
        ),
        None,
    )
    if oracle is None:
        return [
            "",
            "Depth-adjusted scores: n/a (the spots' library sizes are unknown: no expression file and no "
            "`library_size` column).",
        ]
    return [
        "",
        f"Depth-adjusted: the partial Spearman with each spot's log library size regressed out of prediction and "
        f"truth (n/a: undefined, e.g. for a constant or a depth-only prediction, or not known in every fold). The spot's library size alone (a diagnostic that uses measured data, never a competitor) ranks "
        f"these genes at a mean Spearman of {oracle:.4f} over the folds: a raw score near it, with a depth-adjusted "
        "one near 0, measures sequencing depth, not genes.",
    ]


def _hest_task_notes(summary: dict) -> list[str]:
    """Where the data, folds and targets of a HEST-Benchmark task came from, and the leak of its gene list."""
    if "hest_task" not in summary:
        return []
    t = summary["hest_task"]
    return [
        f"Data: HEST-Benchmark task `{t['task']}` (`{t['source']}`, materialised in `{t['materialised']}`): "
        f"its own folds (fold k holds out `splits/test_<k>.csv`), its {len(t['genes'])} genes "
        f"(`{t['genes_file']}`) and its targets ({t['targets']}).",
        "",
        f"**Gene leak:** {t['gene_leak']}",
        "",
    ]


def _method_notes(summary: dict) -> list[str]:
    """What a reader needs to read some rows: TTA, the constant mean, per-fold genes, HEST's probe."""
    methods, lines = summary["methods"], []
    if "finetune" in methods:
        tta = mean_std([f.get("tta_spearman_mean") for f in methods["finetune"]["folds"]])[0]
        plain = methods["finetune"]["spearman_mean"]
        if tta is not None and plain is not None:
            lines += [
                "",
                f"Test-time augmentation (mean over the 8 dihedral views) for `finetune`: mean Spearman "
                f"{tta:.4f} vs {plain:.4f} without ({tta - plain:+.4f}).",
            ]
    if "mean" in methods:
        lines += ["", "The `mean` predictor is constant, so its correlations are undefined for every gene."]
    if "gene_selection" in summary:
        g = summary["gene_selection"]
        lines += [
            "",
            f"Genes: chosen in each fold on its training groups only ({g['genes']}, {g['target_transform']} values, "
            f"detected in >= {g['min_gene_detection']:g} of the training spots; lists in genes_fold<k>.txt); "
            f"{g['in_every_fold']} genes were chosen in every fold: the per-gene means cover those.",
        ]
        common, largest = g["in_every_fold"], max(g["per_fold"].values(), default=0)
        if common < min(FEW_COMMON_GENES, largest):  # the folds chose different genes, and few in common
            genes = "1 gene was" if common == 1 else f"{common} genes were"
            lines += [
                "",
                f"Only {genes} chosen in every fold (few training groups per fold choose different genes), so the "
                "per-gene means say little. To compare genes across folds, give a fixed list chosen without these "
                "data, e.g. a marker panel (`data.genes=recipes/genes/her2_breast_panel.txt`).",
            ]
    if HEST_PROBE in methods:
        lines += ["", describe_hest_probe(methods)]
    return lines
