"""`maskfleet worker` on the CPU, then SIGTERM during a job: once, the job finishes and the
worker exits (warm shutdown); twice, the worker stops at once (cold shutdown) and the job,
never acknowledged, is run by the next worker: not lost."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from golden_jobs import IN_REPO_GOLDEN, make_models_dir, write_case_job

from maskfleet.client import JobHandle, submit
from fleet_workers import claim_db_url, flush, require_redis

require_redis()


def start_launcher(url: str, models: Path, log: Path, lease_seconds: int = 30) -> subprocess.Popen:
    env = {**os.environ, "MASKFLEET_BROKER_URL": url, "MASKFLEET_RESULT_BACKEND": url, "MASKFLEET_MODELS": str(models),
           "CUDA_VISIBLE_DEVICES": "", "MASKFLEET_LEASE_SECONDS": str(lease_seconds)}
    return subprocess.Popen([sys.executable, "-m", "maskfleet.cli", "worker", "--models-served", "tiny", "--device", "cpu"],
                            env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def worker_pids(launcher: subprocess.Popen) -> list[int]:
    """The launcher's Celery workers: its children (each leads its own session, pool included)."""
    try:
        text = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text()
    except OSError:
        return []
    return [int(pid) for pid in text.split()]


def wait_logged(log: Path, text: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < end and proc.poll() is None, log.read_text(errors="replace")[-3000:]
        time.sleep(0.05)


def stop(proc: subprocess.Popen, workers: list[int]) -> None:
    """End a launcher and every worker it started; the workers lead their own sessions, so
    killing the launcher's group would leave them running (and consuming the next test's DB)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid in workers:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


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
        stop(proc, workers)
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
        stop(first, workers)
        if second is not None:
            stop(second, workers)
        flush(url)
