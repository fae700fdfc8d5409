"""Prometheus metrics of a worker, hooked to the task's lifecycle (Celery signals), never the task body.

Served with prometheus_client's HTTP server from the process that runs the jobs (the
prefork child, started at ``worker_process_init``) on ``MASKFLEET_METRICS_PORT``
(default 9808; ``0`` disables it), bound to ``MASKFLEET_METRICS_ADDR`` (default
``0.0.0.0``). Each pool process serves its own numbers on ``port + its pool index``: with
``-c 1`` (one GPU, one child: how the fleet runs) that is just the port. A child that is
replaced (``max_tasks_per_child``, a crash) starts again from zero on the same port;
Prometheus counters handle such resets. A port already taken is logged, not fatal.

Metrics (all ``maskfleet_``-prefixed; only the task ``maskfleet.sample`` is counted):

- ``maskfleet_jobs_total{outcome}``: succeeded, failed, cancelled (the task raised Ignore:
  cancellation.end_cancelled), retried (storage unavailable; the job comes back). A job
  killed by the hard time limit or OOM dies with its process and is not counted here.
- ``maskfleet_job_duration_seconds``: histogram of the task's run time in this process,
  from ``task_prerun`` to ``task_postrun``, labelled by outcome.
- ``maskfleet_queue_wait_seconds``: histogram of the time from ``maskfleet submit`` (the
  ``sent_at`` header maskfleet.client adds, wall clock) to ``task_prerun``, first
  attempts only. Messages sent without the header (another producer) are not observed.
  Producer and worker clocks must agree (NTP).
- ``maskfleet_job_step`` / ``maskfleet_job_total_steps``: gauges, the step and total of the
  last PROGRESS update this process sent (the numbers status and webhooks carry).
- ``maskfleet_sampling_steps_per_second``: gauge, the last job's ``steps / seconds.sampling``
  from its result (a result returned again for a finished job_id is not counted).
- ``maskfleet_model_loads_total``, ``maskfleet_model_cache_hits_total``,
  ``maskfleet_model_load_seconds_total``: the JobPipeline's LoadedModels counters (a load
  that failed counts as a load), read at scrape time; ``maskfleet_model_bytes``: the bytes
  of weights it keeps (its budget: MASKFLEET_MODEL_MEMORY_MB).
- ``maskfleet_webhooks_total{outcome}``: webhook deliveries of this process: delivered,
  retried, dead_lettered, dropped (a progress event given up on). Events a worker's main
  process takes over from a dead worker (outbox_sweeper.py) are counted there, not served.
  ``maskfleet_webhooks_pending``: events in the fleet's webhook outbox, read at scrape time.
- ``maskfleet_gpu_memory_allocated_bytes{device}`` / ``..._reserved_bytes{device}``: torch's
  CUDA allocator, only where ``torch.cuda.is_available()``; absent on CPU workers.

Flower serves its own Prometheus endpoint at ``/metrics`` on its port (5555): task events
across the fleet, seen from the broker. These are the worker's view, with what Flower
cannot see (GPU memory, model cache, steps per second).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Iterator

import redis
from celery import states
from celery.signals import task_postrun, task_prerun, worker_process_init, worker_ready
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .progress import subscribe
from .settings import TASK_NAME, load_settings
from .webhook_outbox import fleet_outbox
from .worker_pipeline import current_pipeline

log = logging.getLogger(__name__)

SENT_AT_HEADER = "sent_at"

OUTCOMES = {states.SUCCESS: "succeeded", states.FAILURE: "failed", states.IGNORED: "cancelled", states.RETRY: "retried"}
# Diffusion jobs take a tenth of a second (a small latent on a fast GPU) to an hour; queue waits
# from nothing to hours.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))
WAIT_BUCKETS = (0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, 1800, 3600, 4 * 3600, float("inf"))

registry = CollectorRegistry()
jobs_total = Counter("maskfleet_jobs", "Jobs ended in this process, by outcome", ["outcome"], registry=registry)
job_duration = Histogram("maskfleet_job_duration_seconds", "Run time of a job in the worker", ["outcome"],
                         buckets=DURATION_BUCKETS, registry=registry)
queue_wait = Histogram("maskfleet_queue_wait_seconds", "Time from submit to the job starting",
                       buckets=WAIT_BUCKETS, registry=registry)
steps_per_second = Gauge("maskfleet_sampling_steps_per_second", "Sampling steps per second of the last job",
                         registry=registry)
job_step = Gauge("maskfleet_job_step", "The step of the last PROGRESS update (status and webhooks say the same)",
                 registry=registry)
job_total_steps = Gauge("maskfleet_job_total_steps", "The job's steps in the last PROGRESS update", registry=registry)
for _outcome in OUTCOMES.values():
    jobs_total.labels(_outcome)
WEBHOOK_OUTCOMES = ("delivered", "retried", "dead_lettered", "dropped")
webhooks_total = Counter("maskfleet_webhooks", "Webhook deliveries by outcome in this process: delivered (2xx), "
                         "retried (an attempt failed), dead_lettered (a durable event given up on), dropped "
                         "(a progress event given up on)", ["outcome"], registry=registry)
for _outcome in WEBHOOK_OUTCOMES:
    webhooks_total.labels(_outcome)


def count_webhook(outcome: str) -> None:
    """The WebhookSender's outcome hook (status_events.webhook_sender)."""
    webhooks_total.labels(outcome).inc()

_started: dict[str, float] = {}  # task id -> perf_counter at prerun
_lock = threading.Lock()
_server: tuple[int, int] | None = None  # (pid, port) of the server this process started


class RunnerCollector(Collector):
    """The model cache's counters and CUDA memory, read when Prometheus scrapes."""

    def collect(self) -> Iterator:
        loads = CounterMetricFamily("maskfleet_model_loads", "Models loaded (cache misses) by this process")
        hits = CounterMetricFamily("maskfleet_model_cache_hits", "Models found already loaded")
        load_seconds = CounterMetricFamily("maskfleet_model_load_seconds", "Time spent loading models")
        models = _loaded_models()
        loads.add_metric([], models.misses if models else 0)
        hits.add_metric([], models.hits if models else 0)
        load_seconds.add_metric([], models.loads_seconds if models else 0.0)
        held = GaugeMetricFamily("maskfleet_model_bytes", "Bytes of loaded model weights this process keeps")
        held.add_metric([], models.bytes_held if models else 0)
        yield from (loads, hits, load_seconds, held)
        yield from _gpu_memory()
        yield from _webhook_outbox()


def _loaded_models() -> Any:
    pipeline = current_pipeline()
    return pipeline.models if pipeline is not None else None


def _gpu_memory() -> Iterator:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return
    allocated = GaugeMetricFamily("maskfleet_gpu_memory_allocated_bytes", "GPU memory held by tensors", labels=["device"])
    reserved = GaugeMetricFamily("maskfleet_gpu_memory_reserved_bytes", "GPU memory reserved by torch's allocator",
                                 labels=["device"])
    for index in range(torch.cuda.device_count()):  # an uninitialised device reads 0, and stays uninitialised
        allocated.add_metric([f"cuda:{index}"], torch.cuda.memory_allocated(index))
        reserved.add_metric([f"cuda:{index}"], torch.cuda.memory_reserved(index))
    yield allocated
    yield reserved


def _webhook_outbox() -> Iterator:
    """The fleet's pending webhook events (the outbox on this worker's Redis): one ZCARD per scrape."""
    outbox = fleet_outbox()
    if outbox is None:
        return
    try:
        pending = outbox.size()
    except redis.RedisError:
        return
    gauge = GaugeMetricFamily("maskfleet_webhooks_pending", "Webhook events in the outbox, not yet delivered (the whole fleet's)")
    gauge.add_metric([], pending)
    yield gauge


registry.register(RunnerCollector())


def metrics_port() -> int:
    """MASKFLEET_METRICS_PORT (default 9808); 0 disables the server."""
    return load_settings().metrics_port


def serve(index: int = 0) -> int | None:
    """Start this process's metrics server on port + index; return the port, None when disabled or taken."""
    global _server
    port = metrics_port()
    if port == 0:
        return None
    with _lock:
        if _server is not None and _server[0] == os.getpid():
            return _server[1]
        try:
            start_http_server(port + index, addr=load_settings().metrics_addr, registry=registry)
        except OSError as e:
            log.warning("metrics not served on port %d: %s", port + index, e)
            return None
        _server = (os.getpid(), port + index)
        return port + index


@subscribe
def _on_progress(task: Any, meta: dict) -> None:
    job_step.set(meta["step"])
    job_total_steps.set(meta["total"])


@worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    from billiard.process import current_process

    serve(getattr(current_process(), "index", 0) or 0)


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    """A thread-pool worker (the pipelined worker) runs jobs in its main process: serve from there."""
    pool = getattr(sender, "pool", None)
    if pool is not None and type(pool).__module__ == "celery.concurrency.thread":
        serve(0)


def _ours(task: Any) -> bool:
    return getattr(task, "name", None) == TASK_NAME


@task_prerun.connect
def _on_prerun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    if not _ours(sender) or task_id is None:
        return
    _started[task_id] = time.perf_counter()
    request = sender.request
    sent_at = getattr(request, SENT_AT_HEADER, None)
    if isinstance(sent_at, (int, float)) and not request.retries:
        queue_wait.observe(max(0.0, time.time() - sent_at))


@task_postrun.connect
def _on_postrun(sender: Any = None, task_id: str | None = None, args: Any = None, retval: Any = None,
                state: str | None = None, **_: Any) -> None:
    if not _ours(sender) or task_id is None:
        return
    started = _started.pop(task_id, None)
    outcome = OUTCOMES.get(state or "")
    if outcome is None:
        return
    jobs_total.labels(outcome).inc()
    if started is None:
        return
    took = time.perf_counter() - started
    job_duration.labels(outcome).observe(took)
    if outcome == "succeeded":
        _observe_steps(args, retval, took)


def _observe_steps(args: Any, result: Any, took: float) -> None:
    try:
        steps = args[0]["steps"]
        seconds = result["seconds"]
    except (IndexError, KeyError, TypeError):
        return
    sampling, total = seconds.get("sampling"), seconds.get("total")
    if not isinstance(steps, int) or not isinstance(sampling, (int, float)) or sampling <= 0:
        return
    if isinstance(total, (int, float)) and total > took + 0.5:  # an earlier run's result, returned again
        return
    steps_per_second.set(steps / sampling)
