"""A quiet console: the project's progress lines and summaries, not the libraries' chatter.

Ray Data announces every execution, Ray Train prints every reported result and checkpoint,
DeepSpeed prints when it builds its ops, MLflow and transformers draw download and loading bars and
warn about model cards. All of it stays in Ray's and MLflow's logs (``/tmp/ray/session_*/logs``);
the console gets this package's INFO lines (``pipelines.*``), warnings and errors.

``quiet()`` runs in every process the project starts work in: the job's driver, the training
workers, the crop feed and the held-out read; ``ray_logging()`` is the ``LoggingConfig`` a job
passes to ``ray.init`` for Ray's own processes of the job (its train controller and helpers).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

# Loggers whose INFO lines are the libraries' bookkeeping; their warnings and errors still show.
_WARNING_AND_UP = (
    "ray",
    "ray.train",
    "ray.tune",
    "DeepSpeed",
    "deepspeed",
    "mlflow",
    "alembic",
    "torch.distributed",
    "filelock",
)
# Ray Data logs a failed task's error with its traceback before raising it; the job prints the
# error itself (one line when it is the user's: ``pipelines.errors``). Ray Data's log file keeps all.
_CRITICAL_ONLY = ("ray.data",)
# Loggers whose warnings are about things a user of this project cannot act on (model cards and
# licences of models we write ourselves, transformers' advisory notes).
_ERROR_AND_UP = (
    "transformers",
    "huggingface_hub",
    "mlflow.transformers",
    "ray.data._internal.progress",  # "Progress bars disabled": we disabled them
)

# Read by the libraries when a process starts or when they draw a bar.
QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # mlflow sets its loggers' level when it is imported
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TQDM_DISABLE": "1",
}


def quiet() -> None:
    """Quiet the libraries in this process (idempotent)."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name in _WARNING_AND_UP:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in _ERROR_AND_UP:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in _CRITICAL_ONLY:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # The root logger at WARNING drops what libraries log through it at INFO: in a Ray Train
    # worker that is every ``print`` (Ray Train routes them there) and Ray Train's own reports.
    # The project's lines stay INFO: their logger says so, and they still reach the root's
    # handlers (propagation does not ask the root's level).
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("pipelines").setLevel(logging.INFO)
    # torch.distributed's deprecation notes about APIs DeepSpeed calls, once per process.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"deepspeed")
    with contextlib.suppress(ImportError):
        import ray.data

        from pipelines.errors import surface_user_errors

        surface_user_errors()  # not noise, but wanted in the same processes
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        context.enable_auto_log_stats = False
    # Imported, transformers is told; not yet imported, it reads QUIET_ENV when it is. Importing
    # it here would cost 3 s of CPU in every process that never uses it (training workers).
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def train_logging() -> Any:
    """Ray Train's ``LoggingConfig`` for a run: its controller's and workers' bookkeeping
    (resources requested, worker group started, each result reported) stays in Ray Train's log
    files (``ray-train-*.log`` in the session's logs); the console gets its warnings."""
    import ray.train

    return ray.train.LoggingConfig(log_level="WARNING")


def ray_logging() -> Any:
    """The ``ray.LoggingConfig`` of a job: only errors from the processes Ray starts for it and
    the project does not configure (Ray Train's controller and its helpers, whose warnings are
    about Ray's own bookkeeping, e.g. a state API that a cluster without a dashboard lacks)."""
    import ray

    return ray.LoggingConfig(log_level="ERROR")


@contextlib.contextmanager
def captured_stdout(logger: logging.Logger) -> Iterator[None]:
    """Run a block whose library prints to stdout (DeepSpeed's "... built successfully"); what it
    printed goes to ``logger`` at DEBUG."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                logger.debug("%s", line)


def log_to_console() -> None:
    """The project's INFO lines on this process's stderr: a Ray Train worker's, which Ray forwards to
    the driver's console."""
    logger = logging.getLogger("pipelines")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # Ray's root handler would print every line a second time
