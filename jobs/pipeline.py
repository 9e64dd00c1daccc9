"""Run a named pipeline of stages (pretrain -> fine-tune -> evaluate -> promote -> showcase).

    python -m jobs.pipeline --config jobs/configs/demo.yaml
    ray job submit --working-dir . -- python -m jobs.pipeline --config jobs/configs/demo.yaml

Runs on the cluster ``RAY_ADDRESS`` names, else on an in-process Ray; MLflow at
``MLFLOW_TRACKING_URI`` or the pipeline's ``tracking.tracking_uri``, else ``./mlflow.db``. Running it
again with the same ``pipeline.run_name`` skips finished stages and resumes the interrupted one.

Data: ``--data-dir`` or ``DATA_DIR`` (a local mirror of the Hub layout), else ``../shared/data``
when it exists, else the Hugging Face Hub.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from jobs import console, start_ray
from pipelines.config import ConfigError, add_config_arguments, load_config
from pipelines.workflow import PipelineConfig, PipelineError, PipelineResult, run_pipeline
from pipelines.workflow.plan import plan_pipeline
from pipelines.workflow.stages import KINDS, DataUnavailable, resolve_data_dir, with_locations


def main(argv: list[str] | None = None) -> int:
    loaded = pipeline_from_args("python -m jobs.pipeline", __doc__.split("\n\n")[0], argv)
    if loaded is None:
        return 2
    cfg, data_dir = loaded
    logging.getLogger("pipelines").info("data: %s", data_dir or "the Hugging Face Hub")

    start_ray()
    return run_and_report(cfg)


def run_and_report(cfg: PipelineConfig) -> int:
    """Run the pipeline on the connected Ray; print its summary; the exit code."""
    try:
        result = run_pipeline(cfg, KINDS)
    except PipelineError as error:
        if error.result is not None:
            print(summary(error.result, cfg), file=sys.stderr)
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary(result, cfg))
    return 0


def pipeline_from_args(
    prog: str, description: str, argv: list[str] | None
) -> tuple[PipelineConfig, str | None] | None:
    """The pipeline of ``--config``/``--set``, reading data from ``--data-dir``/``DATA_DIR`` (or
    the default places) and keeping checkpoints under ``--storage-path``, checked against the
    stage kinds; None (after printing the reason) when it cannot run."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
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
        storage = absolute_location(args.storage_path)
        cfg = with_locations(cfg, data_dir=data_dir, storage_path=storage)
        plan_pipeline(cfg, KINDS)
    except (ConfigError, OSError, DataUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return None
    console()
    return cfg, data_dir


def summary(result: PipelineResult, cfg: PipelineConfig) -> str:
    """What ran, what each stage produced, and where to look."""
    from pipelines.tracking.runs import resolve_tracking

    lines = [
        f"pipeline {result.pipeline} run {result.run_name} (MLflow run {result.parent_run_id})"
    ]
    for name, stage in result.stages.items():
        lines.append(f"  {name:<16} {stage.status:<9} {_short(stage.outputs)}")
        if stage.error:
            lines.append(f"    error: {stage.error}")
    for stage in result.stages.values():
        outputs = stage.outputs or {}
        for item in outputs.get("predictions", []):
            lines.append(f"  predict: {item['label']:<10} {item['score']:.3f}  {item['text']}")
        if "filled" in outputs:
            lines.append(
                f"  fill-mask: {outputs['filled']!r} (filled in {outputs['fill_predictions']})"
            )
    uri = resolve_tracking(cfg.tracking.tracking_uri).tracking_uri
    if uri.startswith("sqlite:///"):
        lines.append(
            f"MLflow UI: mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)"
        )
    else:
        lines.append(f"MLflow: {uri}")
    return "\n".join(lines)


def _short(outputs: dict[str, Any] | None) -> str:
    if not outputs:
        return ""
    keep = {k: v for k, v in outputs.items() if isinstance(v, str | int | float | bool)}
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in keep.items()
    )


def absolute_location(path: str | None) -> str | None:
    if path is None or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
