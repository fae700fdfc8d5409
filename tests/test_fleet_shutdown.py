"""`maskfleet worker` on the CPU, then SIGTERM during a job: once, the job finishes and the
worker exits (warm shutdown); twice, the worker stops at once (cold shutdown) and the job,
never acknowledged, is run by the next worker: not lost."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from golden_jobs import IN_REPO_GOLDEN, make_models_dir, write_case_job

from maskfleet.client import JobHandle, submit
from fleet_workers import claim_db_url, flush, require_redis, start_launcher, stop_launcher, wait_logged, worker_pids

require_redis()


def long_job(tmp_path: Path, name: str) -> dict:
    job_path, _, _ = write_case_job(IN_REPO_GOLDEN / "cases" / "c03_euler_normal_s6_o0", tmp_path / name)
    return json.loads(job_path.read_text()) | {"job_id": f"{name}-{time.time_ns()}", "steps": 24}


def wait_running(handle: JobHandle, proc: subprocess.Popen, log: Path) -> None:
    end = time.monotonic() + 120
    while handle.status()["state"] != "PROGRESS":
        assert time.monotonic() < end and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)


def test_sigterm_finishes_the_running_job_then_exits(tmp_path):
    url = claim_db_url()
    flush(url)
    log = tmp_path / "worker.log"
    job = long_job(tmp_path, "warm")
    proc = start_launcher(url, make_models_dir(tmp_path), log)
    workers: list[int] = []
    try:
        handle = submit(job, broker_url=url)
        wait_running(handle, proc, log)
        workers = worker_pids(proc)
        proc.send_signal(signal.SIGTERM)
        assert handle.wait(120)["output"] == job["output"]
        assert proc.wait(60) == 0
        assert Path(job["output"][len("file://"):]).is_file()
    finally:
        stop_launcher(proc, workers)
        flush(url)


def test_second_sigterm_stops_at_once_and_the_job_runs_on_the_next_worker(tmp_path):
    url = claim_db_url()
    flush(url)
    models, log = make_models_dir(tmp_path), tmp_path / "worker.log"
    job = long_job(tmp_path, "cold")
    output = Path(job["output"][len("file://"):])
    first = start_launcher(url, models, log, lease_seconds=5)
    second, workers = None, []
    try:
        handle = submit(job, broker_url=url)
        wait_running(handle, first, log)
        workers += worker_pids(first)
        first.send_signal(signal.SIGTERM)
        wait_logged(log, "Warm shutdown", first)  # the first one reached the worker; now an operator's second
        first.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        first.wait(30)
        gone_in = time.monotonic() - stopped_at
        assert handle.status()["state"] != "SUCCESS" and not output.exists()  # stopped mid-job, nothing written
        second = start_launcher(url, models, log, lease_seconds=5)
        result = handle.wait(120)
        workers += worker_pids(second)
        assert result["output"] == job["output"] and output.is_file()
        print(f"\ncold shutdown: worker gone {gone_in:.1f} s after the second SIGTERM; the job succeeded on the next worker")
    finally:
        stop_launcher(first, workers)
        if second is not None:
            stop_launcher(second, workers)
        flush(url)
