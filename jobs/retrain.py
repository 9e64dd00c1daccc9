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

import logging
import sys

from jobs import start_ray
from jobs.pipeline import pipeline_from_args, run_and_report


def main(argv: list[str] | None = None) -> int:
    loaded = pipeline_from_args("python -m jobs.retrain", __doc__.split("\n\n")[0], argv)
    if loaded is None:
        return 2
    cfg, _ = loaded

    from pipelines.workflow.retrain import RetrainError, check_champions, retrain_run_name

    try:
        check_champions(cfg)  # before starting Ray: a first run without a champion stops here
    except RetrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    start_ray()
    if cfg.pipeline.run_name == "auto":
        cfg.pipeline.run_name = retrain_run_name(cfg)  # indexes the data (on Ray)
    logging.getLogger("pipelines").info("retraining run %s", cfg.pipeline.run_name)
    return run_and_report(cfg)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
