"""Fine-tuning job: a recipe of stages from a pretrained model to a registered classifier.

    ray job submit --working-dir . -- python -m jobs.finetune --config jobs/configs/finetune_imdb_tiny.yaml
    python -m jobs.finetune --config jobs/configs/finetune_imdb_tiny.yaml --set init=models:/perceiver-mlm/3

Runs on the cluster ``RAY_ADDRESS`` names (set by ``ray job submit``), else on an in-process Ray.
Submitting again with the same ``run.name`` skips finished stages and resumes the interrupted one.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs import console, report_user_error, start_ray
from pipelines.config import ConfigError, add_config_arguments, config_from_args
from pipelines.tracking.runs import resolve_tracking
from pipelines.train.finetune_config import FinetuneConfig
from pipelines.workflow.recipe import check_finetune, run_finetune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.finetune", description=__doc__.split("\n")[0]
    )
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(FinetuneConfig, args)
    except (ConfigError, OSError) as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    console()

    from pipelines.workflow import PipelineError

    try:
        # A missing starting model or data column fails here, before Ray starts (a Hub id is
        # downloaded now, once, into the Hub's cache).
        check_finetune(cfg, resolve_tracking(cfg.tracking.tracking_uri).tracking_uri)
        start_ray()
        result = run_finetune(cfg)
    except PipelineError as error:  # a stage failed: the error names it
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # what to fix, in one line; anything else is re-raised
        return report_user_error(error)
    summary = {
        "run_id": result.run_id,
        result.metric: result.score,
        "stages": {s.stage: s.metrics for s in result.stages},
        "model": result.registered.registry_uri if result.registered else None,
        "promoted": result.promoted,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
