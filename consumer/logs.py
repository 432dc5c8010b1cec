"""Structured logging: one line per event of interest, plain text or JSON (LEDGER_LOG_FORMAT).

Call sites pass fields, never message bodies, user queries or connection strings:
    log.info("batch committed", extra=fields(records=12, partitions=[0, 2]))
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_FIELDS = "ledger_fields"


def fields(**values: Any) -> dict[str, Any]:
    return {_FIELDS: values}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, _FIELDS, {}),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = getattr(record, _FIELDS, None)
        if extra:
            text += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return text


def configure_logging(log_format: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka logs every retriable broker hiccup at ERROR/WARNING; keep ours readable.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
    # alembic announces its plugins at INFO whenever `consume` reads the migrations' revisions.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
