"""Evaluation: per-gene metrics, baselines, patient-level cross-validation, run tables and plots.
Pure numbers and files: nothing here builds or touches the Accelerator or imports ``expreg.training``;
the fine-tuning folds of ``cv`` are handed in by the command (``expreg.training.folds.finetune_fold``)."""
