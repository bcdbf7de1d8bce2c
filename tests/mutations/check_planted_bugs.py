"""Plant known one-line bugs in a scratch copy of the code and check that the fast tier catches each.

    python tests/mutations/check_planted_bugs.py            # every bug (~5 min on 2 cores)
    python tests/mutations/check_planted_bugs.py cv_ridge   # one of them

For each bug: copy the working tree to a temporary folder, apply the one-line change, run the
fast-tier tests named for it there (``PYTHONPATH`` points at the copy, so subprocesses use the
planted code too) and report ``caught`` (a test failed) or ``MISSED``. The checkout itself is
never modified. Exit code 1 when any bug was missed. Bugs from issue 16, plus the gather bug and four
bugs of whole-slide maps (issue 14), four of
foundation-model encoders and the embedding store (issue 15), and eight from issue 22 (the four an
audit planted, four of the spot lattice, unmeasured genes and the gene join), and three of the
depth-adjusted scores and spatially variable genes (issue 27), three of Visium HD pseudo-spots and
HEST-1k by id (issue 23), one of neighbourhood features and three of
context patches (issue 25), and four of a cohort's table read in chunks of rows and blocks of genes
(issue 24).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# name: (file, text to replace, replacement, tests that must catch it)
BUGS = {
    # issue 24: a cohort's table in bounded memory (chunks of rows, blocks of genes)
    "duplicate_paths_compared_unsorted": (
        "expreg/data/paths.py",
        "ordered = hashes[order]",
        "ordered = hashes; order = np.arange(len(hashes))",
        [
            "tests/test_cohort_memory.py::test_a_duplicate_and_a_missing_image_in_a_later_chunk_are_named_by_their_lines"
        ],
    ),
    "label_columns_read_as_rows": (
        "expreg/data/dataset.py",
        "parts = [_flat_values(chunk)[j::width] for chunk in column.chunks]",
        "parts = [_flat_values(chunk).reshape(width, -1)[j] for chunk in column.chunks]",
        ["tests/test_data.py", "tests/test_cohort_memory.py"],
    ),
    "evaluation_rows_overwritten": (
        "expreg/inference.py",
        "        self.filled += len(batch)\n",
        "",
        ["tests/test_cohort_memory.py::test_evaluation_rows_are_collected_in_order_into_one_array"],
    ),
    "fork_server_dies_of_sigterm": (
        "expreg/data/loaders.py",
        '    "expreg.data.fork_server",  # the server ignores SIGTERM',
        '    # "expreg.data.fork_server",  # the server ignores SIGTERM',
        ["tests/test_data.py::test_the_fork_server_outlives_a_sigterm_to_its_process_group"],
    ),
    "every_gene_block_scores_the_first": (
        "expreg/evaluation/metrics.py",
        "_block_scores(p[:, j : j + GENE_BLOCK], t[:, j : j + GENE_BLOCK], depth)",
        "_block_scores(p[:, 0:GENE_BLOCK], t[:, 0:GENE_BLOCK], depth)",
        ["tests/test_cohort_memory.py::test_scores_by_blocks_of_genes_equal_the_whole_matrix"],
    ),
    "cv_ridge_fitted_on_all_rows": (
        "expreg/evaluation/cv.py",
        "predictions, extra = fit(x[train], y_train, groups[train], x[test], seed=cfg.seed)",
        "predictions, extra = fit(x, np.asarray(targets, np.float64), groups, x[test], seed=cfg.seed)",
        ["tests/test_cv.py::test_cross_validation_runs_every_method_on_the_same_group_folds"],
    ),
    "target_stats_from_all_rows": (
        "expreg/training/setup.py",
        'stats = compute_target_stats(datasets["train"], normalize=d.normalize_targets)',
        "import datasets as _d; stats = compute_target_stats(_d.concatenate_datasets(list(datasets.values())), "
        "normalize=d.normalize_targets)",
        ["tests/test_train.py::test_run_directory_contents"],
    ),
    "evaluation_loaders_skip_unreadable_images": (
        "expreg/data/loaders.py",
        'bad_image_policy if train else "fail"',
        "bad_image_policy",
        ["tests/test_reliability.py::test_an_unreadable_validation_image_stops_the_run_even_with_skip"],
    ),
    "sampler_ignores_the_epoch": (
        "expreg/data/loaders.py",
        "generator=epoch_generator(self.seed, self.epoch)",
        "generator=epoch_generator(self.seed, 0)",
        ["tests/test_data.py::test_training_order_changes_every_epoch_and_is_reproducible"],
    ),
    "per_gene_mse_over_the_wrong_axis": (
        "expreg/evaluation/metrics.py",
        '"mse": ((p - t) ** 2).mean(axis=0),',
        '"mse": ((p - t) ** 2).mean(axis=1),',
        ["tests/test_metrics.py::test_summary_excludes_and_counts_undefined_genes"],
    ),
    "rgba_not_composited_on_white": (
        "expreg/data/transforms.py",
        'if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):',
        "if False:",
        ["tests/test_data.py::test_transparent_pixels_become_white"],
    ),
    "default_run_names_raise_on_a_collision": (
        "expreg/run_dir.py",
        "            if explicit_name:\n",
        "            if True:\n",
        ["tests/test_train.py::test_default_run_names_get_a_suffix_on_a_collision"],
    ),
    "saved_early_stopping_decision_lost_on_resume": (
        "expreg/training/checkpoint.py",
        "    state = TrainerState(**json.loads((path / TRAINER_STATE_FILE).read_text()))\n",
        "    state = TrainerState(**json.loads((path / TRAINER_STATE_FILE).read_text()))\n    state.bad_epochs = 0\n",
        ["tests/test_reliability.py::test_early_stopping_decided_before_a_kill_holds_after_resume"],
    ),
    "gather_instead_of_gather_for_metrics": (
        "expreg/inference.py",
        "                gathered = accelerator.gather_for_metrics(gathered)\n",
        "                gathered = accelerator.gather(gathered)\n",
        ["tests/test_train.py::test_two_processes_evaluate_like_one"],
    ),
    "map_tiles_not_in_expression_units": (
        "expreg/maps/run.py",
        "return plan.model.to_expression(normalised.astype(np.float64))",
        "return normalised.astype(np.float64)",
        ["tests/test_map.py::test_outputs_hold_the_predictions_in_expression_units_with_their_positions"],
    ),
    "map_tile_centre_half_a_pixel_off": (
        "expreg/maps/grid.py",
        "return self.x0 + self.box_px // 2",
        "return self.x0 + self.box_px / 2",
        ["tests/test_map.py::test_a_tile_centre_is_where_prepare_would_centre_a_patch"],
    ),
    "map_spots_measured_with_another_transform": (
        "expreg/maps/run.py",
        "targets, missing = plan.measured.targets(plan.genes, plan.target_transform)",
        'targets, missing = plan.measured.targets(plan.genes, "log1p")',
        ["tests/test_map.py::test_spot_predictions_and_metrics_agree_with_predict_on_the_prepared_patches"],
    ),
    "map_tiles_read_from_level_0": (
        "expreg/maps/plan.py",
        "slide.best_level(geometry.downsample),",
        "0,",
        ["tests/test_map.py::test_a_tiled_slide_is_read_from_the_level_of_the_model_never_whole_at_level_0"],
    ),
    "vit_mean_counts_register_tokens_as_patches": (
        "expreg/modeling/encoders.py",
        "patch_mean = norm(tokens[:, _prefix_tokens(backbone) :].mean(dim=1))",
        "patch_mean = norm(tokens[:, 1:].mean(dim=1))",
        ["tests/test_encoders.py::test_pooling_of_a_vit_with_register_tokens"],
    ),
    "frozen_rows_read_in_dataset_order_not_store_order": (
        "expreg/training/frozen.py",
        "batch[chosen] = self.views[view][self.rows[view][index[chosen]]]",
        "batch[chosen] = self.views[view][index[chosen]]",
        ["tests/test_frozen.py::test_the_head_trains_on_cached_embeddings_and_the_saved_model_is_complete"],
    ),
    "store_identity_without_pooling": (
        "expreg/embeddings.py",
        '"pooling": config.pooling,',
        "",
        ["tests/test_embeddings.py::test_each_part_of_the_identity_makes_its_own_store"],
    ),
    "store_embedded_in_training_mode": (
        "expreg/embeddings.py",
        "    model.eval()\n",
        "\n",
        ["tests/test_embeddings.py::test_built_once_then_read_from_the_memory_map"],
    ),
    "split_ignores_its_seed": (
        "expreg/data/splits.py",
        "mapping = assign_splits(groups, sizes, fractions, seed)",
        "mapping = assign_splits(groups, sizes, fractions, 42)",
        ["tests/test_splits.py::test_the_split_command_uses_its_seed"],
    ),
    "lr_scheduler_stepped_per_epoch": (
        "expreg/training/trainer.py",
        "        self.scheduler.step()\n",
        "        if state.batches_done >= min(limit, len(self.train_dl)): self.scheduler.step()\n",
        ["tests/test_train.py::test_the_learning_rate_follows_the_schedule_at_every_optimizer_step"],
    ),
    "gene_choice_cpm_over_eligible_genes_only": (
        "expreg/data/gene_scores.py",
        'mean, var = sparse_moments(counts, transform, linear=method == "hvg")',
        "eligible = (counts.read() if isinstance(counts, CountRows) else sp.csr_matrix(counts))[:, columns]; "
        'columns = np.arange(len(columns)); mean, var = sparse_moments(eligible, transform, linear=method == "hvg")',
        ["tests/test_expression.py::test_gene_choice_divides_by_each_spots_total_over_all_genes"],
    ),
    "hest_task_fingerprint_ignores_mtime": (
        "expreg/ingest/hest_bench.py",
        "{st.st_size}\\0{st.st_mtime_ns}\\n",
        "{st.st_size}\\n",
        ["tests/test_hest_bench.py::test_a_task_file_rewritten_at_the_same_size_is_materialised_again"],
    ),
    "hexagonal_lattice_columns_a_pitch_apart": (
        "expreg/ingest/geometry.py",
        "(pitch / 2, pitch * math.sqrt(3) / 2) if kind",
        "(pitch, pitch * math.sqrt(3) / 2) if kind",
        ["tests/test_geometry.py"],
    ),
    "unmeasured_genes_eligible": (
        "expreg/data/expression.py",
        "        measured[np.asarray(columns, dtype=np.int64)] = False\n",
        "        pass\n",
        ["tests/test_unmeasured_genes.py::test_genes_a_sample_never_measured_are_not_eligible"],
    ),
    "unmeasured_targets_in_the_loss_as_zeros": (
        "expreg/modeling/model.py",
        "    if bool(measured.all()):",
        "    if True:\n        labels = torch.nan_to_num(labels)",
        [
            "tests/test_unmeasured_genes.py::test_the_loss_the_statistics_the_metrics_and_ridge_leave_unmeasured_targets_out"
        ],
    ),
    "genes_joined_by_name": (
        "expreg/ingest/gene_join.py",
        "    if not without_ids and not repeated_ids:",
        "    if False:",
        ["tests/test_unmeasured_genes.py::test_genes_are_joined_by_feature_id_and_named_alike_in_every_sample"],
    ),
    "partial_spearman_on_values_not_ranks": (
        "expreg/evaluation/metrics.py",
        "return partial_correlation_columns(rp, rt, rz), partial_correlation_columns(p, t, depth), oracle",
        "return partial_correlation_columns(p, t, depth), partial_correlation_columns(p, t, depth), oracle",
        ["tests/test_depth.py::test_the_partial_correlations_equal_an_independent_computation"],
    ),
    "library_size_over_the_chosen_genes_only": (
        "expreg/data/expression.py",
        "totals = np.asarray(block.sum(axis=1), dtype=np.float64).reshape(-1)",
        "totals = np.asarray(block[:, columns].sum(axis=1), dtype=np.float64).reshape(-1)",
        ["tests/test_unmeasured_genes.py::test_the_library_size_is_the_spots_total_over_every_gene_it_measured"],
    ),
    "morans_i_over_every_section_at_once": (
        "expreg/data/spatial_genes.py",
        "rows = np.flatnonzero(sections == section)",
        "rows = np.arange(len(sections))",
        ["tests/test_spatial_genes.py::test_sections_are_never_mixed_and_are_weighted_by_their_spots"],
    ),
    "hd_pseudo_spot_cells_rounded_not_floored": (
        "expreg/ingest/visium_hd.py",
        "col = np.floor((section.x_px - x0) / side).astype(np.int64)",
        "col = np.round((section.x_px - x0) / side).astype(np.int64)",
        ["tests/test_visium_hd.py::test_pseudo_spots_sum_exactly_the_bins_whose_centres_fall_inside"],
    ),
    "hd_thin_pseudo_spots_kept": (
        "expreg/ingest/visium_hd.py",
        "keep = np.flatnonzero(bins >= min_tissue * min(full, (math.sqrt(full) - 1) ** 2))",
        "keep = np.flatnonzero(bins >= 0)",
        ["tests/test_visium_hd.py::test_pseudo_spots_sum_exactly_the_bins_whose_centres_fall_inside"],
    ),
    "hest_where_ignored": (
        "expreg/ingest/hest_hub.py",
        "        rows &= match\n",
        "        rows &= True\n",
        ["tests/test_hest_hub.py::test_selection_by_metadata_and_the_errors_that_say_what_exists"],
    ),
    "neighbours_across_sections": (
        "expreg/data/neighbours.py",
        "index = np.flatnonzero(sections == section)",
        "index = np.arange(n) if section == sections[0] else np.arange(0)",
        ["tests/test_neighbours.py::test_neighbours_are_the_spots_of_the_same_section_within_the_radius"],
    ),
    "context_patch_as_small_as_the_patch": (
        "expreg/ingest/prepare.py",
        "wide = PatchGeometry(options.context_um, options.patch_px, result.scale.um_per_px) if options.context_um",
        "wide = PatchGeometry(options.patch_um, options.patch_px, result.scale.um_per_px) if options.context_um",
        ["tests/test_context.py::test_context_patches_are_centred_on_the_spot_and_white_outside_the_image"],
    ),
    "map_context_patch_off_centre": (
        "expreg/maps/run.py",
        "boxes = [patch_box(x, y, geom) for x, y in zip(*centres)]",
        "boxes = [patch_box(x + geom.box_px / 2, y, geom) for x, y in zip(*centres)]",
        ["tests/test_context.py::test_map_spots_agree_with_predict_on_the_prepared_context_patches"],
    ),
    "map_tile_context_off_centre": (
        "expreg/maps/run.py",
        "half = plan.geometry.box_px // 2",
        "half = 0",
        ["tests/test_context.py::test_map_spots_agree_with_predict_on_the_prepared_context_patches"],
    ),
    "gate_on_the_spot_not_the_context": (
        "expreg/modeling/model.py",
        "return torch.cat([own, torch.sigmoid(self.fusion_gate(features)) * context], dim=1)",
        "return torch.cat([torch.sigmoid(self.fusion_gate(features)) * own, context], dim=1)",
        ["tests/test_context.py::test_gated_fusion_scales_the_context_part_by_a_learned_gate"],
    ),
    "separate_encoder_unused": (
        "expreg/modeling/model.py",
        "pool(self.context_backbone, context, pooling)], 1)",
        "pool(self.backbone, context, pooling)], 1)",
        ["tests/test_context.py::test_a_separate_context_encoder_embeds_the_context_patches_alone"],
    ),
    "frozen_neighbourhood_rows_misaligned": (
        "expreg/training/frozen.py",
        "embeddings = np.asarray(self.views[0][self.rows[0][samples]], dtype=np.float64)",
        "embeddings = np.asarray(self.views[0][self.rows[0][samples][::-1]], dtype=np.float64)",
        ["tests/test_neighbours.py::test_a_neighbourhood_model_trains_on_embeddings_and_predicts_its_validation_rows"],
    ),
    "tta_neighbourhood_of_each_view": (
        "expreg/inference.py",
        "if around is None:  # view 0: the images as they are",
        "if True:",
        ["tests/test_context.py::test_map_spots_and_tiles_of_a_neighbourhood_model_agree_with_predict"],
    ),
    "frozen_gate_not_trained": (
        "expreg/training/frozen.py",
        "            self.fusion_gate = model.fusion_gate\n",
        "            pass\n",
        ["tests/test_neighbours.py::test_a_neighbourhood_model_trains_on_embeddings_and_predicts_its_validation_rows"],
    ),
    "map_neighbourhood_at_half_the_scale": (
        "expreg/maps/run.py",
        "return neighbourhood_matrix(np.zeros(len(xy_um), dtype=np.int64), xy_um, radius)",
        "return neighbourhood_matrix(np.zeros(len(xy_um), dtype=np.int64), xy_um / 2, radius)",
        ["tests/test_context.py::test_map_spots_and_tiles_of_a_neighbourhood_model_agree_with_predict"],
    ),
    "planted_neighbourhood_effect_ignored": (
        "expreg/data/demo.py",
        "factors = (1 - neighbourhood_effect) * factors + neighbourhood_effect * around",
        "factors = factors + 0 * around",
        ["tests/test_neighbours.py::test_a_planted_neighbourhood_effect_is_found_by_the_neighbourhood_probe_alone"],
    ),
}


def check(name: str) -> bool:
    """True when the planted bug ``name`` makes at least one of its tests fail."""
    path, old, new, tests = BUGS[name]
    with tempfile.TemporaryDirectory(prefix=f"planted-{name}-") as scratch:
        copy = Path(scratch) / "repo"
        shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", ".venv", "results", "__pycache__"))
        source = (copy / path).read_text()
        if source.count(old) != 1:
            raise SystemExit(f"{name}: the text to replace is not found exactly once in {path}; update BUGS")
        (copy / path).write_text(source.replace(old, new))
        env = {**os.environ, "PYTHONPATH": str(copy), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
        result = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
        summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
        caught = result.returncode == 1  # tests ran and one failed (not: collection errors, no tests)
        print(f"{'caught' if caught else 'MISSED':7} {name}: {summary}", flush=True)
        why = [line for line in result.stdout.splitlines() if line.startswith("E ")][:2]
        for line in why:  # the failing assertion, to check the bug was caught for the right reason
            print(f"        {line[:150]}", flush=True)
        return caught


def main(argv: list[str]) -> int:
    names = argv or list(BUGS)
    unknown = [n for n in names if n not in BUGS]
    if unknown:
        print(f"unknown bug(s) {', '.join(unknown)}; choose from {', '.join(BUGS)}", file=sys.stderr)
        return 2
    missed = [n for n in names if not check(n)]
    print(f"{len(names) - len(missed)} of {len(names)} planted bugs caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
