"""Worker death, leases, poison jobs and out-of-memory, with real worker processes and a real receiver.

Each test starts its own workers (real `celery worker -P prefork -c 1` processes on a
private DB of the machine's Redis), sends jobs with the producer client and kills
processes with SIGKILL as a crashing host would. Jobs carry a callback to a real HTTP
receiver that verifies signatures, so each test also counts the webhooks a producer
would see: `started` comes once per delivery (each with its own webhook-id), `succeeded`
once per job.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import redis
import torch
from golden_jobs import IN_REPO_GOLDEN, make_models_dir, write_case_job
from safetensors.torch import save_file
from webhook_receiver import SECRET, Receiver, clear_proxies

from maskfleet.client import JobFailed, JobHandle, _app, submit
from maskfleet.job import parse_job
from maskfleet.job_pipeline import RunOptions, run_job
from maskfleet.tasks.leases import UNACKED_INDEX_KEY
from maskfleet.tasks.settings import model_queue
from fleet_workers import Worker, claim_db_url, flush, require_redis, stop_workers, wait_for

CASE = IN_REPO_GOLDEN / "cases" / "c03_euler_normal_s6_o0"
LONG_STEPS = 24  # a job of several seconds on this machine: long enough to be killed in the middle
POISON_SEED = 4242
# Loaded by the workers of the poison test only (PYTHONPATH): the job with POISON_SEED kills
# its process at its first progress update, as a crashing kernel would, on every delivery.
POISON_SITECUSTOMIZE = f'''
import os, signal
from maskfleet.tasks.progress import subscribe

@subscribe
def _poison(task, meta):
    if task.request.args and task.request.args[0].get("seed") == {POISON_SEED}:
        os.kill(os.getpid(), signal.SIGKILL)
'''

require_redis()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    job_path, _, _ = write_case_job(CASE, root / "case")
    hook = Receiver()
    allowed = f"127.0.0.1:{hook.server.server_address[1]}"
    env = pytest.MonkeyPatch()
    env.setenv("MASKFLEET_CALLBACK_ALLOWLIST", allowed)
    clear_proxies(env)
    try:
        yield {"root": root, "models": make_models_dir(root), "job": json.loads(job_path.read_text()),
               "hook": hook, "worker_env": {"MASKFLEET_WEBHOOK_SECRET": SECRET, "MASKFLEET_CALLBACK_ALLOWLIST": allowed,
                                            "MASKFLEET_TORCH_THREADS": "1"}}
    finally:
        env.undo()
        hook.close()


@pytest.fixture
def fleet(base, tmp_path):
    """Start workers with `start(name, **env)`; all stopped and the DB flushed at the end."""
    url = claim_db_url()
    app = _app(url)
    workers: list[Worker] = []

    def start(*names: str, **env: str) -> list[Worker]:
        started = [Worker(n, [model_queue("tiny")], url, base["models"], tmp_path / f"{n}.log",
                          extra_env={**base["worker_env"], **env}) for n in names]
        workers.extend(started)
        for w in started:
            w.wait_ready(app)
        return started

    try:
        yield {"url": url, "app": app, "start": start, "dir": tmp_path, **base}
    finally:
        stop_workers(workers)
        flush(url)


def make_job(fleet, name: str, **changes) -> dict:
    job = json.loads(json.dumps(fleet["job"]))
    job.update(job_id=f"{name}-{time.time_ns()}", output=(fleet["dir"] / f"{name}.latent").as_uri(),
               callback={"url": fleet["hook"].url}, **changes)
    return job


@pytest.fixture(scope="module")
def long_job_sha256(base, tmp_path_factory):
    """The sha256 of the long job's output, run in this process with the workers' one thread
    (CPU runs with the same thread count are bitwise repeatable)."""
    job = dict(base["job"], steps=LONG_STEPS, output=(tmp_path_factory.mktemp("ref") / "ref.latent").as_uri())
    threads = torch.get_num_threads()
    torch.set_num_threads(int(base["worker_env"]["MASKFLEET_TORCH_THREADS"]))
    try:
        return run_job(parse_job(job), RunOptions(str(base["models"]), "cpu"))["sha256"]
    finally:
        torch.set_num_threads(threads)


def events(hook: Receiver, job_id: str, kind: str | None = None) -> list[tuple[str, dict]]:
    """(webhook-id, data) of this job's delivered events, of type job.<kind> when given."""
    with hook.lock:
        return [(msg_id, body["data"]) for msg_id, event_type, body in hook.received
                if body["data"].get("job_id") == job_id and (kind is None or event_type == f"job.{kind}")]



def pool_child(worker: Worker) -> int:
    """The pid of the worker's one prefork child."""
    pid = worker.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def received_count(fleet, workers: list[Worker], task_id: str) -> int:
    """How many times the workers took this job from the queue (Celery's 'received' log line)."""
    return sum(w.log.read_text().count(f"maskfleet.sample[{task_id}] received") for w in workers)


def running_on(fleet, job_id: str, workers: list[Worker], after: int = 0) -> Worker:
    """The worker whose delivery number `after + 1` of this job sent its first progress webhook."""
    def progressed():
        started = events(fleet["hook"], job_id, "started")
        return len(started) > after and events(fleet["hook"], job_id, "progress") and started[after][1]["worker"]
    hostname = wait_for(progressed, 120, f"{job_id} running")
    return next(w for w in workers if w.name == hostname)


def check_done_once(fleet, handle: JobHandle, job: dict, sha256: str, deliveries: int) -> None:
    result = handle.wait(180)
    assert result["sha256"] == sha256  # the same bytes as an uninterrupted run
    assert Path(job["output"][len("file://"):]).is_file()
    wait_for(lambda: events(fleet["hook"], job["job_id"], "succeeded"), 30, "succeeded webhook")
    # One succeeded event per job: a repeat would reuse its webhook-id, so distinct ids count events.
    assert len({m for m, _ in events(fleet["hook"], job["job_id"], "succeeded")}) == 1
    # `started` comes once per delivery, each its own event (its own webhook-id).
    assert len({m for m, _ in events(fleet["hook"], job["job_id"], "started")}) == deliveries


def test_killed_pool_child_job_is_requeued_at_once_and_done_once(fleet, long_job_sha256):
    workers = fleet["start"]("childa", "childb")
    job = make_job(fleet, "child", steps=LONG_STEPS)
    handle = submit(job, broker_url=fleet["url"])
    victim = running_on(fleet, job["job_id"], workers)
    old_child = pool_child(victim)
    killed_at = time.monotonic()
    os.kill(old_child, signal.SIGKILL)  # the OOM killer or a segfault, the worker's main process lives
    running_on(fleet, job["job_id"], workers, after=1)
    requeued_in = time.monotonic() - killed_at
    check_done_once(fleet, handle, job, long_job_sha256, deliveries=2)
    assert victim.proc.poll() is None and wait_for(lambda: pool_child(victim) != old_child, 30, "new child")
    assert requeued_in < 30, requeued_in  # task_reject_on_worker_lost: no lease to wait for
    print(f"\nchild SIGKILL: job running again {requeued_in:.1f} s after the kill")


def received_order(worker: Worker) -> list[str]:
    """The task ids this worker took from the queue, in the order it took them."""
    return re.findall(r"maskfleet\.sample\[([^\]]+)\] received", worker.log.read_text())


def test_killed_pool_child_job_goes_back_to_the_front_of_the_queue(fleet, long_job_sha256):
    """With jobs queued behind it, a job whose process died runs again first, within seconds.

    kombu's Redis transport requeues a rejected message at the tail (LPUSH; workers BRPOP
    from the other end): the job would wait behind every job submitted after it.
    """
    (worker,) = fleet["start"]("front")
    job = make_job(fleet, "front", steps=LONG_STEPS)
    handle = submit(job, broker_url=fleet["url"])
    running_on(fleet, job["job_id"], [worker])
    behind = [make_job(fleet, f"behind{n}") for n in range(6)]
    handles = [submit(b, broker_url=fleet["url"]) for b in behind]
    broker = redis.Redis.from_url(fleet["url"])
    wait_for(lambda: broker.llen(model_queue("tiny")) == len(behind), 30, "the jobs behind queued")
    killed_at = time.monotonic()
    os.kill(pool_child(worker), signal.SIGKILL)
    running_on(fleet, job["job_id"], [worker], after=1)
    requeued_in = time.monotonic() - killed_at
    check_done_once(fleet, handle, job, long_job_sha256, deliveries=2)
    for h in handles:
        h.wait(180)
    order = received_order(worker)
    assert order[:2] == [job["job_id"], job["job_id"]], order  # taken again before any job behind it
    assert sorted(order[2:]) == sorted(b["job_id"] for b in behind), order
    assert requeued_in < 30, requeued_in
    print(f"\nchild SIGKILL with {len(behind)} jobs queued behind: running again {requeued_in:.1f} s after the kill, first in line")


def test_killed_worker_job_is_recovered_within_a_minute_by_another_worker(fleet, long_job_sha256):
    workers = fleet["start"]("hosta", "hostb")  # the default lease (30 s)
    job = make_job(fleet, "host", steps=LONG_STEPS)
    handle = submit(job, broker_url=fleet["url"])
    victim = running_on(fleet, job["job_id"], workers)
    survivor = next(w for w in workers if w is not victim)
    killed_at = time.monotonic()
    os.killpg(victim.proc.pid, signal.SIGKILL)  # parent and child at once: the host is gone
    assert running_on(fleet, job["job_id"], workers, after=1) is survivor
    recovered_in = time.monotonic() - killed_at
    check_done_once(fleet, handle, job, long_job_sha256, deliveries=2)
    assert recovered_in < 60, recovered_in
    print(f"\nwhole-worker SIGKILL: job running on the other worker {recovered_in:.1f} s after the kill")


def test_job_longer_than_the_lease_runs_once(fleet):
    lease = 2
    workers = fleet["start"]("longa", "longb", MASKFLEET_LEASE_SECONDS=str(lease))
    job = make_job(fleet, "long", steps=2 * LONG_STEPS)
    handle = submit(job, broker_url=fleet["url"])
    running_on(fleet, job["job_id"], workers)
    broker = redis.Redis.from_url(fleet["url"])
    started = time.monotonic()
    # Well past several leases, the running job's unacked entry keeps a fresh score (its heartbeat).
    ages = []
    while time.monotonic() - started < 3 * lease and handle.status()["state"] != "SUCCESS":
        scores = broker.zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True)
        ages.extend(time.time() - score for _, score in scores)
        time.sleep(0.2)
    result = handle.wait(180)
    assert result["seconds"]["total"] > 3 * lease, result["seconds"]  # the job outlived its lease several times
    assert ages and max(ages) < lease, max(ages, default=None)
    assert received_count(fleet, workers, job["job_id"]) == 1  # never handed to the idle worker
    assert len(events(fleet["hook"], job["job_id"], "started")) == 1
    print(f"\njob of {result['seconds']['total']:.1f} s with a {lease} s lease: delivered once, "
          f"oldest lease seen {max(ages):.2f} s")


def test_poison_job_fails_after_bounded_deliveries_and_the_queue_moves_on(fleet):
    poison_dir = fleet["dir"] / "poison"
    poison_dir.mkdir()
    (poison_dir / "sitecustomize.py").write_text(POISON_SITECUSTOMIZE)
    paths = os.pathsep.join(p for p in (str(poison_dir), os.environ.get("PYTHONPATH", "")) if p)
    workers = fleet["start"]("poison", PYTHONPATH=paths, MASKFLEET_MAX_DELIVERIES="2")
    poison = make_job(fleet, "poison", seed=POISON_SEED)
    handle = submit(poison, broker_url=fleet["url"])
    after = submit(make_job(fleet, "after"), broker_url=fleet["url"])
    with pytest.raises(JobFailed) as failed:
        handle.wait(180)
    assert failed.value.state == "FAILURE"
    meta = handle.status()["meta"]
    assert meta["error"] == "PoisonJob" and "each of its last 2 deliveries" in meta["message"], meta
    assert received_count(fleet, workers, poison["job_id"]) == 3  # two deaths, then failed at the third start
    assert not Path(poison["output"][len("file://"):]).exists()
    failed_events = wait_for(lambda: events(fleet["hook"], poison["job_id"], "failed"), 30, "failed webhook")
    assert failed_events[0][1]["exception"] == "PoisonJob"
    assert after.wait(120)["output"].endswith("after.latent")  # the queue moved on
    assert workers[0].proc.poll() is None


def child_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def test_out_of_memory_fails_with_its_own_error_once_and_the_next_job_runs(fleet):
    (worker,) = fleet["start"]("oom", MASKFLEET_MEMORY_LIMIT_MB="1200")
    small = make_job(fleet, "small")
    submit(small, broker_url=fleet["url"]).wait(120)  # models loaded: what the process holds between jobs
    child = pool_child(worker)
    rss_before = child_rss_kib(child)

    big_dir = fleet["dir"] / "big"
    big_dir.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"latent": torch.randn(256, 4, 64, 64, generator=g)}, big_dir / "big.safetensors")
    save_file({"mask": torch.ones(1, 64, 64)}, big_dir / "mask.safetensors")
    big = make_job(fleet, "big", latent=(big_dir / "big.safetensors").as_uri(),
                   mask=(big_dir / "mask.safetensors").as_uri(), steps=2)
    handle = submit(big, broker_url=fleet["url"])
    with pytest.raises(JobFailed):
        handle.wait(120)
    meta = handle.status()["meta"]
    assert meta["error"] == "JobOutOfMemory" and "out of memory on cpu" in meta["message"], meta
    assert "MASKFLEET_MEMORY_LIMIT_MB=1200" in meta["message"]
    assert fleet["app"].AsyncResult(handle.task_id).retries in (0, None)
    assert received_count(fleet, [worker], big["job_id"]) == 1  # failed, not redelivered
    assert not Path(big["output"][len("file://"):]).exists()

    again = make_job(fleet, "again")
    assert submit(again, broker_url=fleet["url"]).wait(120)["shape"] == [1, 4, 32, 32]
    assert pool_child(worker) == child  # the same process went on, it was not replaced
    rss_after = child_rss_kib(child)
    assert rss_after - rss_before < 300 * 1024, (rss_before, rss_after)  # what the big job held was freed
    print(f"\nOOM: child RSS {rss_before // 1024} MiB before, {rss_after // 1024} MiB after the failed job")
