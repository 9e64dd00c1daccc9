"""Entry points for ``ray job submit``: each parses a run config and calls one pipeline function.

A job run without ``RAY_ADDRESS`` starts a private Ray (``start_ray``) whose services listen on
127.0.0.1 only: Ray's own switch for that (meant for laptops) is read when Ray is imported, so it
is set here, before any job module imports Ray.
"""

from __future__ import annotations

import os
import sys
from typing import Any

if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def console() -> None:
    """A job's console: the project's INFO lines with their time, the libraries quieted (MLflow's
    download bars, Hub progress) from the first thing the job does, Ray or not."""
    import logging

    from pipelines.console import quiet

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    quiet()


def start_ray(**options: Any) -> None:
    """Join the cluster ``RAY_ADDRESS`` names (``ray job submit`` sets it for its entry point);
    else start a private Ray in this process: on 127.0.0.1, no dashboard, and never attached to
    another cluster on the machine (a bare ``ray.init()`` joins whichever cluster ``/tmp/ray``
    last recorded). ``RAY_ADDRESS=auto`` joins that one on purpose."""
    import ray

    from pipelines.console import quiet, ray_logging

    quiet()  # Ray Data's bars and execution notes, the libraries' INFO lines: in the logs only
    if ray.is_initialized():
        return
    options.setdefault("logging_config", ray_logging())
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **options)
    else:
        ray.init(address="local", include_dashboard=False, **options)
    quiet()  # ray.init configured the loggers again


def report_user_error(error: BaseException) -> int:
    """For a job's ``except``: a ``UserError`` anywhere in ``error``'s chain (Ray wraps what its
    tasks and workers raise) becomes one line on stderr and exit code 2; anything else is a bug,
    re-raised with its traceback."""
    from pipelines.errors import first_line, user_error

    found = user_error(error)
    if found is None:
        raise error
    print(f"error: {first_line(found)}", file=sys.stderr)
    return 2
