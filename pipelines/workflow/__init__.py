"""Stages chained into pipelines (pretrain -> fine-tune -> evaluate -> register -> promote).

Ray runs the stages (one task each, dependencies passed as ObjectRefs); MLflow keeps the state (a
parent run per pipeline run, a child run per stage with its settings digest and outputs). Define
stage kinds with ``StageKind``, load a pipeline with ``load_pipeline``, run it with
``run_pipeline``; running it again under the same ``pipeline.run_name`` resumes it. The product's
kinds are in ``stages``; a fine-tuning recipe runs as a pipeline of its own (``recipe``), nested in
the ``finetune`` stage when the demo or the retraining pipeline runs it.
"""

from pipelines.workflow.engine import (
    PipelineError,
    PipelineResult,
    StageResult,
    run_pipeline,
)
from pipelines.workflow.plan import load_pipeline, plan_pipeline
from pipelines.workflow.spec import (
    NoInputs,
    NoParams,
    PipelineConfig,
    PipelineSection,
    StageConfig,
    StageContext,
    StageKind,
)

__all__ = [
    "NoInputs",
    "NoParams",
    "PipelineConfig",
    "PipelineError",
    "PipelineResult",
    "PipelineSection",
    "StageConfig",
    "StageContext",
    "StageKind",
    "StageResult",
    "load_pipeline",
    "plan_pipeline",
    "run_pipeline",
]
