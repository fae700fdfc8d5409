"""One JSON object per log line from the worker, when ``MASKFLEET_LOG_FORMAT=json``.

Hooked to Celery's ``after_setup_logger`` / ``after_setup_task_logger`` signals: the
handlers Celery set up keep their streams and levels, only their formatter is replaced.
Each line has ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``message`` (plus ``exc_info``
when there is a traceback), and ``task_id`` / ``job_id`` when the record is emitted while a
``maskfleet.sample`` task runs (from Celery's current task request; ``job_id`` from the
task's first argument, the job dict). Any other value of the variable keeps Celery's text format.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

from celery.signals import after_setup_logger, after_setup_task_logger

from .settings import TASK_NAME, load_settings



def _task_ids() -> dict[str, str]:
    try:
        from celery import current_task

        task = current_task
        if task is None or task.name != TASK_NAME:
            return {}
        request = task.request
    except Exception:  # noqa: BLE001 - never let logging fail
        return {}
    ids: dict[str, str] = {}
    if getattr(request, "id", None):
        ids["task_id"] = str(request.id)
    args = getattr(request, "args", None) or ()
    if args and isinstance(args[0], dict) and args[0].get("job_id") is not None:
        ids["job_id"] = str(args[0]["job_id"])
    return ids


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_task_ids())
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        return json.dumps(out, default=str)


def enabled() -> bool:
    return load_settings().log_format == "json"


def use_json(logger: logging.Logger) -> None:
    formatter = JsonFormatter()
    for handler in logger.handlers:
        handler.setFormatter(formatter)


@after_setup_logger.connect
@after_setup_task_logger.connect
def _on_setup_logger(logger: logging.Logger | None = None, **kwargs: Any) -> None:
    if enabled() and logger is not None:
        use_json(logger)
