"""JSON worker logs (tasks/json_logs.py): the formatter alone, and a real worker with MASKFLEET_LOG_FORMAT=json."""
from __future__ import annotations

import json
import logging
import sys
import time

from fleet_workers import Worker, claim_db_url, flush, require_redis
from golden_jobs import IN_REPO_GOLDEN, make_models_dir, write_case_job
from maskfleet.tasks.json_logs import JsonFormatter, _on_setup_logger
from maskfleet.tasks.settings import model_queue

from maskfleet.client import _app, submit

CASE = IN_REPO_GOLDEN / "cases" / "c03_euler_normal_s6_o0"


def record(msg: str = "hello %s", args=("world",), exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("maskfleet.test", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_formatter_writes_one_json_object():
    line = JsonFormatter().format(record())
    assert "\n" not in line
    out = json.loads(line)
    assert out["message"] == "hello world"
    assert out["level"] == "WARNING"
    assert out["logger"] == "maskfleet.test"
    assert out["ts"].startswith(time.strftime("%Y", time.gmtime()))
    assert "job_id" not in out and "task_id" not in out  # no task running


def test_formatter_keeps_traceback_on_one_line():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        line = JsonFormatter().format(record("failed", (), sys.exc_info()))
    assert "\n" not in line
    assert "ValueError" in json.loads(line)["exc_info"]


def test_signal_handler_only_when_asked(monkeypatch):
    logger = logging.getLogger("maskfleet.test.json")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    try:
        monkeypatch.delenv("MASKFLEET_LOG_FORMAT", raising=False)
        _on_setup_logger(logger=logger)
        assert not isinstance(handler.formatter, JsonFormatter)
        monkeypatch.setenv("MASKFLEET_LOG_FORMAT", "json")
        _on_setup_logger(logger=logger)
        assert isinstance(handler.formatter, JsonFormatter)
    finally:
        logger.removeHandler(handler)


def test_worker_logs_json_with_job_id(tmp_path):
    require_redis()
    url = claim_db_url()
    flush(url)
    worker = Worker("jsonlogs", [model_queue("tiny")], url, make_models_dir(tmp_path), tmp_path / "worker.log",
                    extra_env={"MASKFLEET_LOG_FORMAT": "json", "MASKFLEET_METRICS_PORT": "0"})
    try:
        worker.wait_ready(_app(url))
        write_case_job(CASE, tmp_path / "job")
        job = json.loads((tmp_path / "job" / "job.json").read_text())
        job["job_id"] = f"jsonlogs-{time.time_ns()}"
        assert submit(job, broker_url=url).wait(60)["shape"] == [1, 4, 32, 32]
    finally:
        worker.stop()
        flush(url)
    text = worker.log.read_text()
    entries = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            # Celery's startup banner is printed, not logged; everything after it is JSON.
            continue
    assert entries, text[-3000:]
    assert all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
    assert any(e.get("job_id") == job["job_id"] and e.get("task_id") for e in entries), text[-3000:]
