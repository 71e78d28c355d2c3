"""Structured logging: structlog to stderr (console or JSON lines) or to the journal.

Step loggers carry job_id, step_id, task_id and user as fields, so every line a step
produces can be filtered by job (in the journal: NODESTEPD_JOB_ID and so on).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Mapping

import structlog

if TYPE_CHECKING:
    from nodestepd.systemd.journalqueue import JournalQueue

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def resolve_log_format(fmt: str, env: Mapping[str, str]) -> str:
    """`auto`: the journal when stderr is the journal stream systemd connected, else console."""
    from nodestepd.systemd.journal import stderr_is_journal

    if fmt != "auto":
        return fmt
    return "journal" if stderr_is_journal(env) else "console"


def configure_logging(fmt: str = "console", level: str = "info") -> JournalQueue | None:
    """Returns the journal queue the log records go through (`journal`), for detached
    steps' output to share; None for the other formats."""
    if fmt == "journal":
        return _configure_journal(level)
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    return None


def _configure_journal(level: str) -> JournalQueue:
    from nodestepd.systemd import journal, journalqueue

    # Never a blocking send: records wait (bounded) while journald is slow (journalqueue.py).
    queue = journalqueue.JournalQueue(journal.JournalSender(journal.socket_path(os.environ)),
                                      lambda event, **fields: get_logger().warning(event, **fields))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.CallsiteParameterAdder(
                {
                    structlog.processors.CallsiteParameter.PATHNAME,
                    structlog.processors.CallsiteParameter.LINENO,
                    structlog.processors.CallsiteParameter.FUNC_NAME,
                }
            ),
            structlog.processors.format_exc_info,
            journal.journal_renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=journalqueue.JournalLoggerFactory(queue),
        cache_logger_on_first_use=True,
    )
    return queue


BoundLogger = structlog.typing.FilteringBoundLogger


def get_logger(**fields: object) -> BoundLogger:
    return structlog.get_logger("nodestepd").bind(**fields)
