"""The metrics endpoint of a real worker process (tasks/metrics.py) after one good and one failing job."""
from __future__ import annotations

import json
import time

import pytest
from golden_jobs import IN_REPO_GOLDEN, make_models_dir, write_case_job
from metrics_scrape import free_port, scrape
from webhook_receiver import SECRET, Receiver, clear_proxies

from maskfleet.client import JobFailed, _app, submit
from maskfleet.tasks.settings import model_queue
from fleet_workers import Worker, claim_db_url, flush, require_redis

CASE = IN_REPO_GOLDEN / "cases" / "c03_euler_normal_s6_o0"

require_redis()


def make_job(root, name: str) -> dict:
    write_case_job(CASE, root / name)
    job = json.loads((root / name / "job.json").read_text())
    job["job_id"] = f"{name}-{time.time_ns()}"
    return job


def test_worker_serves_job_metrics(tmp_path, monkeypatch):
    url = claim_db_url()
    flush(url)
    port = free_port()
    hook = Receiver()
    allowed = f"127.0.0.1:{hook.server.server_address[1]}"
    clear_proxies(monkeypatch)
    monkeypatch.setenv("MASKFLEET_CALLBACK_ALLOWLIST", allowed)
    worker = Worker("metrics", [model_queue("tiny")], url, make_models_dir(tmp_path), tmp_path / "worker.log",
                    extra_env={"MASKFLEET_METRICS_PORT": str(port), "MASKFLEET_METRICS_ADDR": "127.0.0.1",
                               "MASKFLEET_WEBHOOK_SECRET": SECRET, "MASKFLEET_CALLBACK_ALLOWLIST": allowed})
    try:
        worker.wait_ready(_app(url))
        good = make_job(tmp_path, "good")
        good["callback"] = {"url": hook.url, "events": ["started", "succeeded"]}
        assert submit(good, broker_url=url).wait(60)["shape"] == [1, 4, 32, 32]
        bad = make_job(tmp_path, "bad")
        bad["base_sampler"]["model"] = "missing"
        with pytest.raises(JobFailed):
            submit(bad, broker_url=url, queue=model_queue("tiny")).wait(60)

        end = time.monotonic() + 15
        while True:
            try:
                metrics = scrape(port)
                if (metrics.get(("maskfleet_jobs_total", (("outcome", "failed"),))) == 1
                        and metrics.get(("maskfleet_webhooks_total", (("outcome", "delivered"),))) == 2
                        and metrics.get(("maskfleet_webhooks_pending", ())) == 0):
                    break
            except OSError:
                metrics = {}
            assert time.monotonic() < end, f"no metrics on {port}: {metrics}\n{worker.log.read_text()[-3000:]}"
            time.sleep(0.2)
        assert metrics[("maskfleet_jobs_total", (("outcome", "succeeded"),))] == 1
        assert metrics[("maskfleet_jobs_total", (("outcome", "cancelled"),))] == 0
        assert metrics[("maskfleet_job_duration_seconds_count", (("outcome", "succeeded"),))] >= 1
        assert metrics[("maskfleet_job_duration_seconds_count", (("outcome", "failed"),))] >= 1
        assert metrics[("maskfleet_queue_wait_seconds_count", ())] == 2  # both sent by submit, with sent_at
        assert metrics[("maskfleet_sampling_steps_per_second", ())] > 0
        assert metrics[("maskfleet_model_loads_total", ())] >= 1
        assert ("maskfleet_model_cache_hits_total", ()) in metrics
        assert metrics[("maskfleet_model_bytes", ())] > 0  # the tiny UNet's weights, held
        assert not any(name.startswith("maskfleet_gpu_memory") for name, _ in metrics)  # CPU worker: absent
        assert hook.types() == ["job.started", "job.succeeded"]
        assert metrics[("maskfleet_webhooks_total", (("outcome", "dead_lettered"),))] == 0
    finally:
        worker.stop()
        hook.close()
        flush(url)
