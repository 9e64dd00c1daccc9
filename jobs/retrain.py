"""Scheduled retraining: continue pretraining the champion on new data, fine-tune, and promote the
result only if it is at least as good as the champion on a fixed evaluation set.

    python -m jobs.retrain --config jobs/configs/retrain.yaml
    python -m jobs.retrain --config jobs/configs/retrain.yaml --set stages.0.params.overrides=[...]

The pipeline run is named after what it would learn from: ``retrain-<digest>`` of the pretraining
data's index fingerprint (its files, sizes and versions) and the pipeline's settings. A second run
on the same data is the same pipeline run, already finished, so it changes nothing; new files or a
newer snapshot give a new run. ``pipeline.run_name`` other than ``auto`` names the run explicitly.
The champion must exist (run ``jobs.pipeline`` first): without one the job stops before training.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from jobs.pipeline import absolute_location, summary
from pipelines.config import ConfigError, add_config_arguments, load_config
from pipelines.workflow import PipelineConfig, PipelineError, run_pipeline
from pipelines.workflow.plan import plan_pipeline
from pipelines.workflow.stages import KINDS, DataUnavailable, resolve_data_dir, with_locations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.retrain", description=__doc__.split("\n")[0]
    )
    add_config_arguments(parser)
    parser.add_argument("--data-dir", help="local mirror of the Hub datasets (default: DATA_DIR)")
    parser.add_argument(
        "--storage-path",
        help="checkpoints of every training stage: a folder or s3:// URI (default: each config's)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(PipelineConfig, args.config, args.overrides)
        data_dir = resolve_data_dir(args.data_dir or os.environ.get("DATA_DIR"))
        cfg = with_locations(
            cfg, data_dir=data_dir, storage_path=absolute_location(args.storage_path)
        )
        plan_pipeline(cfg, KINDS)
    except (ConfigError, OSError, DataUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    from pipelines.workflow.retrain import RetrainError, check_champions, retrain_run_name

    try:
        check_champions(cfg)  # before starting Ray: a first run without a champion stops here
    except RetrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import ray

    ray.init()
    ray.data.DataContext.get_current().enable_progress_bars = False
    if cfg.pipeline.run_name == "auto":
        cfg.pipeline.run_name = retrain_run_name(cfg)  # indexes the data (on Ray)
    logging.getLogger("pipelines").info("retraining run %s", cfg.pipeline.run_name)
    try:
        result = run_pipeline(cfg, KINDS)
    except PipelineError as error:
        if error.result is not None:
            print(summary(error.result, cfg), file=sys.stderr)
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary(result, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
