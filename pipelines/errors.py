"""Errors a user can fix, and finding one inside the exceptions Ray wraps it in.

Every error the project raises for a bad input (a data file, a config key, a model source, a
checkpoint) derives from ``UserError`` and names what to fix in its first line. Raised in a Ray Data
task or a Ray Train worker, it reaches the driver wrapped (``RayTaskError``, ``UserCodeException``,
``TrainingFailedError``); ``user_error`` digs it out, so that a job prints that one line and exits 2
instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator


class UserError(Exception):
    """A problem with what the user gave (its first line says which file or key, and what to do)."""


def user_error(error: BaseException) -> UserError | None:
    """The first ``UserError`` in ``error``'s chain: its causes and contexts, a Ray task error's
    ``cause``, and a Ray Train failure's worker errors (lowest rank first)."""
    for candidate in _chain(error):
        if isinstance(candidate, UserError):
            # Ray's RayTaskError(BadFileError) is a BadFileError whose message is Ray's; the
            # original is its ``cause``.
            cause = getattr(candidate, "cause", None)
            return cause if isinstance(cause, UserError) else candidate
    return None


def first_line(error: BaseException) -> str:
    """The error's message on one line (Ray appends its own context on further lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    queue: list[BaseException | None] = [error]
    while queue:
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        failures = getattr(current, "worker_failures", None) or {}
        queue.extend(failure for _, failure in sorted(failures.items()))
        cause = getattr(current, "cause", None)
        queue.extend(
            [
                cause if isinstance(cause, BaseException) else None,
                current.__cause__,
                current.__context__,
            ]
        )


def surface_user_errors() -> None:
    """Let a ``UserError`` raised in a Ray Data function reach the caller as itself (inside Ray's
    ``RayTaskError``), not as a ``UserCodeException`` that keeps only its traceback's text. For
    every process that runs a Ray Data execution."""
    import ray.data

    ray.data.DataContext.get_current().raise_original_map_exception = True
