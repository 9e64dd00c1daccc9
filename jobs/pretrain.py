"""MLM pretraining job.

    ray job submit --working-dir . -- python -m jobs.pretrain --config jobs/configs/pretrain_tiny.yaml
    python -m jobs.pretrain --config jobs/configs/pretrain_tiny.yaml --set train.steps=50

Runs on the cluster ``RAY_ADDRESS`` names (set by ``ray job submit``), else on an in-process Ray.
Submitting again with the same ``run.name`` resumes from the run's last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs import console, report_user_error, start_ray
from pipelines.config import ConfigError, add_config_arguments, config_from_args
from pipelines.data.index import list_source_files
from pipelines.train import PretrainConfig, run_pretraining


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.pretrain", description=__doc__.split("\n")[0]
    )
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(PretrainConfig, args)
    except (ConfigError, OSError) as error:  # before any worker starts
        print(f"config error: {error}", file=sys.stderr)
        return 2
    console()

    # Ray Data's per-operator bars stay off (start_ray): redrawn from every worker into one log,
    # they would bury the training loop's step, rate and ETA.
    try:
        list_source_files(cfg.data)  # a missing or empty source fails here, before Ray starts
        start_ray()
        result = run_pretraining(cfg)
    except Exception as error:  # what to fix, in one line; anything else is re-raised
        return report_user_error(error)
    summary = {
        "run_id": result.run_id,
        "steps": result.steps,
        "checkpoint": result.checkpoint_path,
        "model": result.registered_model.registry_uri if result.registered_model else None,
        "val_loss": result.metrics.get("val/loss"),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
