"""A pipeline's state in MLflow: a parent run per pipeline run, a child run per stage.

MLflow is the only store: which stages finished, with which settings (``workflow.stage_hash``) and
what they produced (``workflow.outputs``), is read back from the runs, so any driver that can
reach the tracking server can resume a pipeline.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TAG_PIPELINE = "workflow.pipeline"
TAG_CONFIG_HASH = "workflow.config_hash"
TAG_STAGE = "workflow.stage"
TAG_KIND = "workflow.kind"
TAG_STAGE_HASH = "workflow.stage_hash"
TAG_OUTPUTS = "workflow.outputs"
TAG_ERROR = "workflow.error"
TAG_PARENT = "mlflow.parentRunId"
OUTPUTS_ARTIFACT = "workflow/outputs.json"
CONFIG_ARTIFACT = "workflow/pipeline.yaml"

_TAG_LIMIT = 8000  # MLflow's limit on a tag value; longer outputs are read from the artifact
_IN_ARTIFACT = "<in artifact workflow/outputs.json>"


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def find_parent(client: Any, experiment_id: str, pipeline: str, run_name: str) -> Any | None:
    """The latest parent run of ``pipeline`` named ``run_name``, or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"attributes.run_name = {_quote(run_name)} and tags.`{TAG_PIPELINE}` = {_quote(pipeline)}"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def find_children(client: Any, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """The stage runs under a parent run, by stage name (the latest if a stage has several)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = {_quote(parent_run_id)}",
        order_by=["attributes.start_time ASC"],
    )
    children: dict[str, Any] = {}
    for run in runs:  # oldest first: a later run of the same stage wins
        stage = run.data.tags.get(TAG_STAGE)
        if stage:  # runs that stage functions nest under the parent themselves are not stages
            children[stage] = run
    return children


def write_outputs(client: Any, run_id: str, outputs: Mapping[str, Any]) -> None:
    """Store a stage's outputs on its run: the artifact always, the tag when it fits."""
    text = json.dumps(outputs, sort_keys=True)
    client.log_text(run_id, text, OUTPUTS_ARTIFACT)
    client.set_tag(run_id, TAG_OUTPUTS, text if len(text) <= _TAG_LIMIT else _IN_ARTIFACT)


def read_outputs(client: Any, run: Any) -> dict[str, Any]:
    """A finished stage's outputs, as it stored them."""
    text = run.data.tags.get(TAG_OUTPUTS)
    if text is None:
        raise ValueError(f"run {run.info.run_id} has no {TAG_OUTPUTS} tag: not a finished stage")
    if text == _IN_ARTIFACT:
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run.info.run_id, OUTPUTS_ARTIFACT, tmp)
            text = Path(local).read_text(encoding="utf-8")
    return json.loads(text)


def set_error(client: Any, run_id: str, message: str) -> None:
    client.set_tag(run_id, TAG_ERROR, message[:_TAG_LIMIT])
