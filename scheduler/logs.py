"""structlog, configured once per process: JSON lines when not on a terminal (or when asked),
readable console lines otherwise. Job ids and queues are bound with `bound_job`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import structlog

_configured = False


class _CurrentStderr:
    """Writes to whatever sys.stderr is at the time of the write, not at configure time: a test
    runner (pytest, typer's CliRunner) swaps and closes its captured streams, and a logger bound to
    a closed one would raise on the next log line."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


LogFormat = Literal["auto", "json", "console"]


def configure_logging(fmt: LogFormat = "auto", level: str = "info") -> None:
    """Set up structlog for this process; later calls are no-ops so libraries can call it too."""
    global _configured
    if _configured:
        return
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger


@contextmanager
def bound_job(job_id: str, queue: str | None = None) -> Iterator[None]:
    """Bind job_id (and queue) to every log line inside the block, in this context only."""
    values = {"job_id": job_id} if queue is None else {"job_id": job_id, "queue": queue}
    with structlog.contextvars.bound_contextvars(**values):
        yield
