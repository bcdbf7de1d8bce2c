"""Command: (re)draw the plots of a finished run (machinery: ``expreg.evaluation.plots``).

python -m expreg.plots results/<run>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from expreg.evaluation.plots import write_run_plots


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m expreg.plots", description="Draw a finished run's plots.")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    import yaml

    from expreg.config import config_from_dict
    from expreg.data.dataset import load_expression_dataset

    run_dir = Path(args.run_dir)
    cfg = config_from_dict(yaml.safe_load((run_dir / "config_resolved.yaml").read_text()), "run config")
    ds = load_expression_dataset(
        cfg.data.metadata_csv,
        cfg.data.split_csv,
        fold=cfg.data.fold,
        seed=cfg.seed,
        val_frac=cfg.data.val_frac,
        check_images="none",
    )
    for path in write_run_plots(run_dir, np.asarray(ds["validation"]["labels"], dtype=np.float64)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
