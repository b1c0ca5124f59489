"""Log output of ``parrot serve``: readable text (default) or one JSON object per line.

Every line carries the tenant, session, call and request ids it is about (see ``ids``).
Prompt and output text is never logged unless ``--log-prompts`` asks for it (the
``Observer`` decides; the formatters only print what a record holds).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal

from parrot.service.observe.ids import ID_FIELDS, IdsFilter

LogFormat = Literal["text", "json"]
TEXT_FIELDS = ("prompt", "output")  # app text a record may hold (with --log-prompts only)
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

# Record attributes that are not extra fields of a line.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime",
                                                                          *ID_FIELDS}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """``2026-01-02 10:00:00,123 INFO parrot.x: message [tenant=a session=b call=c request=d]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        for name in TEXT_FIELDS:  # set only with --log-prompts
            value = getattr(record, name, None)
            if value is not None:
                line += f" {name}={value!r}"
        ids = " ".join(f"{k}={v}" for k in ID_FIELDS if (v := getattr(record, k, None)) is not None)
        return f"{line} [{ids}]" if ids else line


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the ids, and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ID_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                body[name] = value
        body.update(_extras(record))
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def make_handler(log_format: LogFormat = "text", stream=None) -> logging.Handler:
    """A stream handler (stderr by default) in ``log_format`` that adds the ids to each line."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}; use one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(IdsFilter())
    return handler


def use_log_format(log_format: LogFormat = "text") -> None:
    """Format every line that reaches the root logger's handlers (uvicorn's too, when it runs
    with ``log_config=None``) as ``log_format``, with the ids of what it is about. Levels are
    left as they are."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}; use one of {', '.join(LOG_FORMATS)}")
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(make_handler(log_format))
        return
    formatter = JSONFormatter() if log_format == "json" else TextFormatter()
    for handler in root.handlers:
        handler.setFormatter(formatter)
        if not any(isinstance(f, IdsFilter) for f in handler.filters):
            handler.addFilter(IdsFilter())
