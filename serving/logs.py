"""Log set-up shared by every process of the server: plain text, or one JSON object per line.

Each process (the server with its broker, the HTTP front, each model worker) calls ``configure`` once
with its role, so a log collector can tell the lines apart and parse them without a grok pattern.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import threading

ACCESS_LOGGER = "serving.access"
"""The logger of the per-request access lines (serving.access)."""

TEXT_FORMAT = "%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, role, message, plus any ``fields`` passed as
    ``extra={"fields": {...}}`` (the access line's request id, route, status, tokens...)."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
        line = {
            "time": stamp.isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "role": self.role,
            "pid": record.process,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def formatter(log_format: str, role: str) -> logging.Formatter:
    """The formatter every handler of this process uses (gunicorn's own logger included)."""
    if log_format == "json":
        return JsonFormatter(role)
    return logging.Formatter(TEXT_FORMAT.format(role=role))


def configure(log_format: str, level: str | int, role: str) -> None:
    """Replace the root logger's handlers with one stderr handler in ``log_format``; libraries that log
    through their own handlers (transformers) are routed to it, and Python warnings too."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format, role))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)
    if log_format == "json":
        _route_library_loggers()
        sys.excepthook = _log_uncaught  # a crash's traceback as one JSON line, not raw text
        threading.excepthook = lambda args: _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback)


def _log_uncaught(exc_type: type[BaseException], exc: BaseException | None, tb: object) -> None:
    logging.getLogger("uncaught").critical("Uncaught exception", exc_info=(exc_type, exc, tb))


def _route_library_loggers() -> None:
    """Loggers that print through handlers of their own would break one-JSON-object-per-line."""
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.handlers and not name.startswith("gunicorn"):
            for old in list(logger.handlers):
                logger.removeHandler(old)
            logger.propagate = True
