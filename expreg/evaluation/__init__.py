"""Evaluation: per-gene metrics, baselines, patient-level cross-validation, run tables and plots.
Pure numbers and files: nothing here builds or touches the Accelerator except the fine-tuning folds
of ``cv``, which go through ``expreg.training``."""
