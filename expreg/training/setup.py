"""Building a run's parts from the recipe: the data (metadata -> split -> ``DatasetDict`` -> target
statistics), the model, the decoded-image cache, the loaders, and then the run directory with its
first files. Called by ``Trainer.setup`` in this order: everything that can fail on bad input runs
before the run directory exists, so bad input leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from accelerate.utils import broadcast_object_list

from expreg.config import ConfigError, RunConfig, flatten
from expreg.data import (
    UnreadableImageError,
    build_dataloaders,
    build_dataset_dict,
    compute_target_stats,
    expression_targets,
    image_files,
    read_recipe_metadata,
    resolve_metadata_csv,
    split_rows,
)
from expreg.data.dataset import context_files
from expreg.data.neighbours import split_neighbourhoods
from expreg.modeling.model import ExpRegModel, build_model
from expreg.run_dir import (
    CONFIG_FILE,
    SPLIT_SUMMARY_FILE,
    atomic_write_text,
    create_run_dir,
    default_run_name,
    write_json,
)
from expreg.training.logs import log_to_file
from expreg.training.results import split_summary

logger = logging.getLogger("expreg")


@dataclass
class RunData:
    """The run's data: datasets, genes, training-split target statistics, the split it made, its loaders."""

    datasets: object  # DatasetDict
    gene_names: list[str]
    target_stats: object  # expreg.data.TargetStats
    split_table: object = None  # the split made by this run (written as split.csv), if any
    split_summary: str | None = None
    loaders: dict = field(default_factory=dict)
    gene_choice: object = None  # expreg.data.expression.GeneChoice when the genes were chosen here
    patch_px: int | None = None  # side of the patch files (from prepare.json), when known
    embedding_stores: list = field(default_factory=list)  # train.mode=frozen: the stores its loaders read
    neighbourhoods: dict = field(default_factory=dict)  # model.context=neighbourhood: each split's averaging matrix


def setup_data(cfg: RunConfig, accelerator) -> RunData:
    """Validate the metadata, fix the split (made in memory when not given), build the datasets.

    Resolves ``cfg.data.metadata_csv`` (the demo data set is generated once, by the main process)
    and ``cfg.data.split_csv`` in place: ``cfg`` is the run's own copy. With
    ``data.expression_file``, the targets are computed from raw counts for genes chosen on the
    training rows only. Returns the run's ``RunData`` (its loaders are added by ``setup_loaders``).
    """
    d = cfg.data
    if d.prepared is not None:  # the saved config then reloads from any working directory
        d.prepared = str(Path(d.prepared).resolve())
    with accelerator.main_process_first():
        d.metadata_csv = resolve_metadata_csv(d.metadata_csv)
        metadata = read_recipe_metadata(d)
    d.metadata_csv = str(metadata.csv_path)
    if d.patches is not None:
        d.patches = str(Path(d.patches).resolve())
    if d.split_csv is not None:
        d.split_csv = str(Path(d.split_csv).resolve())
    # the same on every process: a function of the CSV content and the seed
    split = split_rows(metadata, d.split_csv, fold=d.fold, seed=cfg.seed, val_frac=d.val_frac)
    choice = None
    if d.expression_file:
        d.expression_file = str(Path(d.expression_file).resolve())
        metadata, choice = expression_targets(
            metadata,
            d.expression_file,
            split.names == "train",
            d.genes,
            min_detection=d.min_gene_detection,
            transform=d.target_transform,
            allow_unmeasured=d.allow_unmeasured_genes,
        )
        logger.info(f"targets: {choice.describe()}")
        _check_same_genes(accelerator, choice.genes)
    multiscale = cfg.model.context == "multiscale"
    datasets = build_dataset_dict(metadata, split.names, split_csv=d.split_csv, fold=d.fold, context=multiscale)
    if "validation" not in datasets:
        raise ConfigError(f"{d.split_csv}: no validation rows; the loop selects the best epoch on validation")
    stats = compute_target_stats(datasets["train"], normalize=d.normalize_targets)
    summary = split.summary.format() if split.summary is not None else None
    data = RunData(
        datasets, metadata.gene_names, stats, split_table=split.table, split_summary=summary, gene_choice=choice
    )
    d.patch_um, data.patch_px = patch_geometry(d.metadata_csv, d.patch_um)
    if multiscale:
        d.context_um = context_geometry(d.metadata_csv, d.context_um)
    if cfg.model.context == "neighbourhood":  # the radius, from the training rows' lattice unless given
        found = split_neighbourhoods(metadata, split.names, d.neighbourhood_um, d.neighbourhood_rings)
        data.neighbourhoods, d.neighbourhood_um = found
        logger.info(
            f"neighbourhood: the spots of the same section within {d.neighbourhood_um:g} um, the spot included"
        )
    return data


def patch_geometry(metadata_csv, patch_um: float | None) -> tuple[float | None, int | None]:
    """``(patch_um, patch_px)`` of the training patches: from the ``prepare.json`` that ``expreg.prepare``
    wrote beside the metadata CSV, else ``data.patch_um`` (hand-made CSVs; ``patch_px`` unknown).
    A recipe value that contradicts ``prepare.json`` is an error."""
    record = Path(metadata_csv).parent / "prepare.json"
    if not record.is_file():
        return patch_um, None
    try:
        prepared = json.loads(record.read_text())
        patch = prepared["patch"]
        found_um, found_px = float(patch["patch_um"]), int(patch["patch_px"])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{record}: no readable patch geometry ({type(err).__name__}: {err})") from err
    _warn_old_scale_rule(record, prepared)
    if patch_um is not None and abs(patch_um - found_um) > 1e-6 * found_um:
        raise ConfigError(f"data.patch_um={patch_um:g}, but {record} says the patches are {found_um:g} um")
    return found_um, found_px


def context_geometry(metadata_csv, context_um: float | None) -> float | None:
    """The context patches' side in µm: from ``prepare.json`` (``expreg.prepare --context_um``), else
    ``data.context_um``; a recipe value that contradicts ``prepare.json`` is an error."""
    record = Path(metadata_csv).parent / "prepare.json"
    found = json.loads(record.read_text()).get("patch", {}).get("context_um") if record.is_file() else None
    if found is None:
        return context_um
    if context_um is not None and abs(context_um - float(found)) > 1e-6 * float(found):
        raise ConfigError(f"data.context_um={context_um:g}, but {record} says the context patches are {found:g} um")
    return float(found)


OLD_SCALE_RULE = "--spot_diameter_um 55 um / spot_diameter_fullres"  # expreg.prepare's default before the lattice


def _warn_old_scale_rule(record: Path, prepared: dict) -> None:
    """Samples prepared with the old default scale rule are 15-27 % off their true µm/px: say so."""
    old = [s.get("sample_id") for s in prepared.get("samples", []) if OLD_SCALE_RULE in str(s.get("um_per_px_source"))]
    if old:
        logger.warning(
            f"{record}: sample(s) {', '.join(map(str, old))} were prepared with the old rule '55 um / "
            "spot_diameter_fullres', which puts Visium patches 15-27 % off their stated size; prepare them again "
            "(the scale now comes from the spot lattice)"
        )


def _check_same_genes(accelerator, genes: list[str]) -> None:
    """Every process computed the choice on the same rows; refuse to train on lists that differ."""
    if accelerator.num_processes == 1:
        return
    main = broadcast_object_list([list(genes)])[0]
    if main != list(genes):
        raise ConfigError(
            f"process {accelerator.process_index} chose other genes than process 0 (a near-tie decided differently "
            "on different hardware); choose them once with data.genes=<a file of names>"
        )


def setup_model(cfg: RunConfig, gene_names: list[str], target_stats, patch_px: int | None = None) -> ExpRegModel:
    """The model of the recipe, carrying the genes and the training-split target statistics."""
    m = cfg.model
    return build_model(
        m.backbone,
        len(gene_names),
        pretrained=m.pretrained,
        pretrained_path=m.pretrained_path,
        encoder_args=m.encoder_kwargs(),
        head=m.head,
        head_hidden_dim=m.head_hidden_dim,
        dropout=m.dropout,
        pooling=m.pooling,
        gene_names=gene_names,
        target_mean=target_stats.mean.tolist(),
        target_std=target_stats.std.tolist(),
        image_size=cfg.data.image_size,
        context=m.context,
        context_um=cfg.data.context_um if m.context == "multiscale" else None,
        context_encoder=m.context_encoder,
        fusion=m.fusion,
        neighbourhood_um=cfg.data.neighbourhood_um if m.context == "neighbourhood" else None,
        **({"patch_um": cfg.data.patch_um} if cfg.data.patch_um is not None else {}),
        **({"patch_px": patch_px} if patch_px is not None else {}),
        **({"target_transform": cfg.data.target_transform} if cfg.data.expression_file else {}),
    )


def setup_image_cache(cfg: RunConfig, data, accelerator, dry_run: bool = False):
    """The decoded-image cache of every split's images (``data.datasets``), or None when off (and in a dry run).

    Each machine's local main process builds it; the other processes wait for it by polling the
    folder, not in a collective barrier (whose timeout a long build could exceed).
    """
    d = cfg.data
    if not d.image_cache or dry_run:
        return None
    from expreg.data.image_cache import ensure_image_cache

    if d.image_cache_dir is not None:
        d.image_cache_dir = str(Path(d.image_cache_dir).expanduser().resolve())  # the same cache on --resume
    paths = {name: image_files(part) + context_files(part) for name, part in data.datasets.items()}
    builder = accelerator.is_local_main_process
    cache = ensure_image_cache(
        [p for part in paths.values() for p in part],
        d.image_size,
        d.image_cache_dir,
        num_workers=d.num_workers,
        progress=builder,
        build=builder,
    )
    accelerator.wait_for_everyone()  # quick: every process holds the cache by now
    problems = dict(cache.unreadable())
    for name, part in paths.items():
        bad = [(p, problems[p]) for p in part if p in problems]
        if bad and (name != "train" or d.bad_image_policy == "fail"):
            listed = "; ".join(f"{path}: {reason}" for path, reason in bad[:5])
            more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
            hint = (
                "Fix or remove them, or set data.bad_image_policy=skip to train without them"
                if name == "train"
                else "Fix or remove them: evaluation needs every image (bad_image_policy applies to training only)"
            )
            raise UnreadableImageError(f"{len(bad)} {name} image(s) cannot be decoded: {listed}{more}. {hint}")
    return cache


def setup_loaders(cfg: RunConfig, data, model: ExpRegModel, num_processes: int, image_cache=None) -> dict:
    """DataLoaders with the backbone's own pixel normalisation (stored in the model's config)."""
    d = cfg.data
    return build_dataloaders(
        data.datasets,
        image_size=d.image_size,
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        num_workers=d.num_workers,
        seed=cfg.seed,
        target_stats=data.target_stats,
        mean=model.config.image_mean,
        std=model.config.image_std,
        dihedral=d.augment_dihedral,
        color_jitter=d.color_jitter,
        bad_image_policy=d.bad_image_policy,
        num_processes=num_processes,
        hed_jitter=d.hed_jitter,
        image_cache=image_cache,
    )


def setup_run_dir(
    cfg: RunConfig, accelerator, resume_from: str | None, dry_run: bool, backbone: str | None = None
) -> Path:
    """Create the run directory on the main process and share its path with the others.

    ``backbone``: the name default run names start with (the model's, e.g. the architecture of a
    local encoder folder); default ``model.backbone``.
    """
    if resume_from:
        return Path(resume_from).resolve().parent.parent
    name = None
    if accelerator.is_main_process:
        explicit = cfg.logging.run_name is not None
        name = cfg.logging.run_name or default_run_name(
            backbone or cfg.model.backbone,
            cfg.data.batch_size,
            cfg.train.grad_accum_steps,
            accelerator.num_processes,
            cfg.train.lr,
            cfg.seed,
        )
        if dry_run and not explicit:
            name += "__dry_run"
        name = str(create_run_dir(cfg.logging.output_dir, name, explicit))
    return Path(broadcast_object_list([name])[0])


def write_run_files(cfg: RunConfig, data: RunData, run_dir: Path, is_main_process: bool) -> None:
    """``log.txt``, the split made by the run, ``config_resolved.yaml`` and ``target_stats.json``."""
    table, data.split_table = data.split_table, None  # written once, not held through training (a row each)
    if table is not None:
        cfg.data.split_csv = str(run_dir / "split.csv")
    if data.gene_choice is not None:
        cfg.data.genes = str(run_dir / "genes.txt")  # the resolved config names the exact list
    if not is_main_process:
        return
    log_to_file(run_dir)
    if table is not None:
        from expreg.data.splits import write_table

        write_table(table, cfg.data.split_csv)
        logger.info(f"made a group-aware split from seed {cfg.seed} -> {cfg.data.split_csv}\n{data.split_summary}")
    if data.gene_choice is not None:
        atomic_write_text(run_dir / "genes.txt", "\n".join(data.gene_choice.genes) + "\n")
        write_json(run_dir / "genes.json", data.gene_choice.record())  # how they were chosen (read on --resume)
        logger.info(f"chosen genes -> {run_dir / 'genes.txt'}")
    atomic_write_text(run_dir / CONFIG_FILE, cfg.to_yaml())
    write_json(run_dir / "target_stats.json", {"gene_names": data.gene_names, **data.target_stats.to_dict()})
    write_json(run_dir / SPLIT_SUMMARY_FILE, split_summary(data.datasets))


def tracker_config(cfg: RunConfig) -> dict:
    """The recipe as flat ``section.key`` values for trackers (which take no None)."""
    return {"seed": cfg.seed, **{k: ("" if v is None else v) for k, v in flatten(cfg.to_dict()).items() if "." in k}}
