"""`maskfleet worker` on the CPU, then SIGTERM during a job: the job finishes, the worker exits."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from golden_jobs import IN_REPO_GOLDEN, make_models_dir, write_case_job

from maskfleet.client import submit
from fleet_workers import claim_db_url, flush, require_redis

require_redis()


def test_sigterm_finishes_the_running_job_then_exits(tmp_path):
    url = claim_db_url()
    flush(url)
    models = make_models_dir(tmp_path)
    job_path, _, _ = write_case_job(IN_REPO_GOLDEN / "cases" / "c03_euler_normal_s6_o0", tmp_path / "job")
    job = json.loads(job_path.read_text()) | {"job_id": f"warm-{time.time_ns()}", "steps": 24}
    env = {**os.environ, "MASKFLEET_BROKER_URL": url, "MASKFLEET_RESULT_BACKEND": url, "MASKFLEET_MODELS": str(models),
           "CUDA_VISIBLE_DEVICES": ""}
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "maskfleet.cli", "worker", "--models-served", "tiny", "--device", "cpu"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        handle = submit(job, broker_url=url)
        end = time.monotonic() + 120
        while handle.status()["state"] != "PROGRESS":
            assert time.monotonic() < end and proc.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert handle.wait(120)["output"] == job["output"]
        assert proc.wait(60) == 0
        assert Path(job["output"][len("file://"):]).is_file()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        flush(url)
