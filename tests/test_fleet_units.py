"""Fleet pieces without a broker: settings, routing, the progress throttle, the launcher's plan, the write retry."""
from __future__ import annotations

import pytest

from maskfleet.tasks.app import app, route_job
from maskfleet.tasks.progress import Throttle
from maskfleet.tasks.settings import DEFAULT_QUEUE, load_settings, model_queue
from maskfleet.worker import launcher


def test_settings_defaults_and_derived_limits():
    s = load_settings({})
    assert s.broker_url == s.result_backend == "redis://127.0.0.1:6379/0"
    assert s.max_job_seconds == 3600 and 3000 < s.soft_time_limit < 3600
    assert s.visibility_timeout == s.lease_seconds == 30 and s.max_deliveries == 3 and s.storage_retries == 5
    t = load_settings({"MASKFLEET_BROKER_URL": "rediss://:pw@h:6380/1?ssl_cert_reqs=required", "MASKFLEET_MAX_JOB_SECONDS": "10",
                       "MASKFLEET_LEASE_SECONDS": "4", "MASKFLEET_STORAGE_RETRIES": "0"})
    assert t.result_backend == t.broker_url and 0 < t.soft_time_limit < 10
    assert t.visibility_timeout == 4 and t.storage_retries == 0
    for name, value in (("MASKFLEET_LEASE_SECONDS", "0"), ("MASKFLEET_STORAGE_RETRIES", "-1"), ("MASKFLEET_MAX_DELIVERIES", "x")):
        with pytest.raises(ValueError, match=name):
            load_settings({name: value})


def test_app_is_json_only_with_late_acks_and_transport_timeouts():
    c = app.conf
    assert c.accept_content == ["json"] and c.task_serializer == c.result_serializer == "json"
    assert c.task_acks_late and c.task_reject_on_worker_lost and c.worker_prefetch_multiplier == 1
    transport = c.broker_transport_options
    assert transport["visibility_timeout"] == load_settings().lease_seconds
    assert transport["unacked_restore_throttle"] == 1 and 1 <= transport["unacked_restore_interval"] <= 10


def test_route_by_base_sampler_model():
    assert route_job("maskfleet.sample", [{"base_sampler": {"model": "sdxl"}}], {}, {}) == {"queue": model_queue("sdxl")}
    assert route_job("maskfleet.sample", [{}], {}, {}) == {"queue": DEFAULT_QUEUE}
    assert route_job("other.task", [], {}, {}) is None


def test_throttle_passes_first_last_and_a_few_per_interval():
    now = [0.0]
    sent = []
    hook = Throttle(lambda d, t, w: sent.append(d), min_interval=0.25, clock=lambda: now[0])
    for done in range(1, 101):
        now[0] = done * 0.01  # 100 calls over one second
        hook(done, 100, "base")
    assert sent[0] == 1 and sent[-1] == 100 and len(sent) <= 6


def test_the_cancel_is_asked_a_few_times_a_second_not_per_sampler_call():
    from maskfleet.tasks import cancellation

    now, reads, flag = [0.0], [], [False]
    should_stop = cancellation.stop_hook(lambda: reads.append(1) or flag[0], min_interval=0.25, clock=lambda: now[0])
    for call in range(100):  # 100 sampler calls over one second
        now[0] = call * 0.01
        assert should_stop() is False
    assert 1 < len(reads) <= 4  # the first call, then one per 0.25 s
    flag[0] = True
    now[0] += 0.25
    assert should_stop() is True
    read = len(reads)
    assert should_stop() is True and len(reads) == read  # once seen, not read again


def test_launcher_plans_one_cpu_worker_or_one_per_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    [cpu] = launcher.worker_specs("auto", ["q"])
    assert cpu.name.endswith("-cpu") and cpu.env["MASKFLEET_DEVICE"] == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    gpus = launcher.worker_specs("auto", [model_queue("a")])
    assert [s.name.rsplit("-", 1)[1] for s in gpus] == ["gpu0", "gpu1"]
    assert gpus[1].env["CUDA_VISIBLE_DEVICES"] == "1" and gpus[1].env["MASKFLEET_DEVICE"] == "cuda"
    assert gpus[0].argv[gpus[0].argv.index("-Q") + 1] == "maskfleet.model.a"
    assert launcher.worker_queues(["a", "b"]) == ["maskfleet.model.a", "maskfleet.model.b"]
    [flagged] = launcher.worker_specs("cpu", ["q"], celery_args=["--prefetch-multiplier=4"])
    assert flagged.argv[-1] == "--prefetch-multiplier=4" and "--without-heartbeat" in flagged.argv  # ours, then theirs


def test_workers_on_one_host_get_node_names_of_their_own(monkeypatch, tmp_path):
    """A second `maskfleet worker` on the host gets -2 (its node name held by a lock file while it runs)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    [first] = launcher.reserve_names(launcher.worker_specs("cpu", ["q"]), tmp_path)
    assert first.name.endswith("-cpu")
    [second] = launcher.reserve_names(launcher.worker_specs("cpu", ["q"]), tmp_path)
    assert second.name == f"{first.name}-2" and second.argv[second.argv.index("-n") + 1] == second.name
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    gpus = launcher.reserve_names(launcher.worker_specs("auto", ["q"]), tmp_path)
    assert [s.name.rsplit("-", 1)[1] for s in gpus] == ["gpu0", "gpu1"]  # names nobody holds stay as they are


def test_launcher_default_queues_cover_the_local_store(tmp_path, monkeypatch):
    (tmp_path / "m1").mkdir()
    monkeypatch.setenv("MASKFLEET_MODELS", str(tmp_path))
    assert launcher.worker_queues(None) == [DEFAULT_QUEUE, model_queue("m1")]


def test_a_job_that_cannot_reach_redis_is_handed_back_not_failed(monkeypatch, tmp_path):
    """Our keys unreachable (a closed port): the task rejects its message for requeue, with no FAILURE."""
    import socket

    from tiny_jobs import job_from, write_tiny_inputs

    from celery.exceptions import Reject

    from maskfleet.tasks.sample_task import sample

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASKFLEET_RESULT_BACKEND", f"redis://127.0.0.1:{port}/0")
    with pytest.raises(Reject) as caught:
        sample.run(job_from(write_tiny_inputs(tmp_path), "unreachable", tmp_path / "out.latent"))
    assert caught.value.requeue is True
    assert "Redis unreachable" in str(caught.value.reason)


def flaky_pipeline(monkeypatch, failures: int, retries: int):
    """A JobPipeline whose output write fails `failures` times with StorageUnavailable, then succeeds;
    the waits between attempts recorded instead of slept."""
    from maskfleet import job_pipeline
    from maskfleet.storage.errors import StorageUnavailable

    class FlakyPipeline(job_pipeline.JobPipeline):
        def __init__(self):  # no models, no device: only the write path is exercised
            self.write_retries, self.calls = retries, 0

        def outputs(self, prepared, out) -> dict:
            return {"output": b"latent"}

        def finish(self, prepared, out, files) -> dict:
            self.calls += 1
            if self.calls <= failures:
                raise StorageUnavailable("output", "S3 error SlowDown (HTTP 503), after retries")
            return {"written": self.calls}

    waits: list[float] = []
    monkeypatch.setattr(job_pipeline.time, "sleep", waits.append)
    return FlakyPipeline(), waits


def write(flaky, should_stop=lambda: False) -> dict:
    from types import SimpleNamespace

    prepared = SimpleNamespace(job=SimpleNamespace(job_id="write-retry", output="s3://b/out.latent"))
    return flaky.write(prepared, None, should_stop)


def test_output_write_is_retried_alone_with_the_tasks_backoff(monkeypatch):
    flaky, waits = flaky_pipeline(monkeypatch, failures=2, retries=3)
    assert write(flaky) == {"written": 3}
    assert flaky.calls == 3 and len(waits) == 2
    assert 1 <= waits[0] <= 2 and 2 <= waits[1] <= 4  # storage_retry_countdown(0), (1)


def test_output_write_gives_up_after_its_retries_with_the_storage_error(monkeypatch):
    from maskfleet.storage.errors import StorageUnavailable
    from maskfleet.job_pipeline import OutputWriteFailed

    flaky, _ = flaky_pipeline(monkeypatch, failures=10, retries=2)
    with pytest.raises(OutputWriteFailed) as failed:
        write(flaky)
    assert isinstance(failed.value.error, StorageUnavailable) and str(failed.value).startswith("output: ")
    assert flaky.calls == 3


def test_cancelling_between_write_attempts_stops_without_writing_again(monkeypatch):
    from maskfleet.sampling.errors import SamplingStopped

    flaky, _ = flaky_pipeline(monkeypatch, failures=10, retries=5)
    with pytest.raises(SamplingStopped):
        write(flaky, should_stop=lambda: True)
    assert flaky.calls == 1


def test_progress_counts_the_jobs_steps_not_sampler_calls():
    """Both samplers' calls of a step are that step; the base sampler's starts it, the last call says total/total."""
    from maskfleet.tasks.progress import progress_meta

    calls = [(done, "base" if done % 2 else "mask") for done in range(1, 21)]  # a 10-step job: 20 calls
    metas = [progress_meta(done, 20, which) for done, which in calls]
    assert [(m["step"], m["total"], m["sampler"]) for m in metas[:4]] == [(1, 10, "base"), (1, 10, "mask"),
                                                                          (2, 10, "base"), (2, 10, "mask")]
    assert (metas[-1]["step"], metas[-1]["total"], metas[-1]["sampler"]) == (10, 10, "mask")


def test_sentinel_urls_give_the_sentinels_the_master_and_celery_options():
    from maskfleet.tasks import redis_urls

    url = "sentinel://:pw%40x@10.0.0.1:26379/2;sentinel://:pw%40x@10.0.0.2;sentinel://:pw%40x@10.0.0.3:26380/2"
    sentinels, master = redis_urls._sentinel_parts(url)
    assert sentinels == [("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380)]
    assert master == {"db": 2, "password": "pw@x"}
    settings = load_settings({"MASKFLEET_BROKER_URL": url, "MASKFLEET_SENTINEL_MASTER": "fleet",
                              "MASKFLEET_SENTINEL_PASSWORD": "s3cret"})
    assert redis_urls.celery_transport_options(url, settings) == {"master_name": "fleet",
                                                                    "sentinel_kwargs": {"password": "s3cret"}}
    assert redis_urls.celery_transport_options("redis://h:6379/0", settings) == {}
    with pytest.raises(ValueError, match="sentinel://"):
        redis_urls._sentinel_parts("sentinel://h:26379;redis://h:6379")
    client = redis_urls.redis_client(url, settings)  # no connection until a command
    assert client.connection_pool.service_name == "fleet"


def test_operators_options_win_and_task_events_follow_the_switch():
    from celery import Celery

    from maskfleet.tasks.app import configure

    app = Celery("t")
    configure(app, load_settings({"MASKFLEET_CELERY_OPTIONS": '{"worker_prefetch_multiplier": 7, "result_extended": true}'}))
    assert app.conf.worker_prefetch_multiplier == 7 and app.conf.result_extended is True
    assert app.conf.worker_send_task_events is False and app.conf.task_send_sent_event is False
    configure(app, load_settings({"MASKFLEET_MONITOR_EVENTS": "1"}))
    assert app.conf.worker_send_task_events is True and app.conf.task_send_sent_event is True
    assert app.conf.worker_prefetch_multiplier == 1
    assert launcher.peer_flags(load_settings({"MASKFLEET_MONITOR_EVENTS": "1"})) == ["--without-mingle", "--without-gossip"]
