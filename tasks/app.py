"""The one Celery app of the fleet, configured from tasks/settings.py.

Producers import it to send jobs (maskfleet/client.py), workers run it
(`celery -A maskfleet.tasks.app worker`), Flower watches it
(`celery -A maskfleet.tasks.app flower`). Each reliability setting is here once, with why.
"""
from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import celeryd_init

from ..settings import unknown_variables
from .leases import poll_interval, restore_interval
from .redis_urls import celery_transport_options
from .settings import DEFAULT_QUEUE, TASK_NAME, Settings, load_settings, model_queue


log = logging.getLogger(__name__)


def route_job(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> dict | None:
    """Send a job to the queue of its base sampler's model; anything malformed goes to the default queue.

    A `queue=` given to send_task/apply_async wins over this route (Celery merges the
    caller's options last), so a producer may still pick a queue itself.
    """
    if name != TASK_NAME:
        return None
    try:
        model = args[0]["base_sampler"]["model"]
    except (IndexError, KeyError, TypeError):
        return {"queue": DEFAULT_QUEUE}
    return {"queue": model_queue(model)} if isinstance(model, str) and model else {"queue": DEFAULT_QUEUE}


def configure(app: Celery, settings: Settings) -> None:
    # An unacked job whose lease (its score in Redis's unacked_index, refreshed by its
    # worker's heartbeat: leases.py) is older than the visibility timeout goes back to its
    # queue; every worker's kombu sweeps for those every few seconds.
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": restore_interval(settings.lease_seconds),
        "unacked_restore_throttle": 1,
        # An idle worker sends BRPOP every few seconds, not every second (leases.poll_interval).
        "polling_interval": poll_interval(settings.lease_seconds),
        # The job document as JSON text in the message, not base64 of it (a third smaller; a
        # message says its own encoding, so either kind is read).
        "body_encoding": "utf-8",
        **celery_transport_options(settings.broker_url, settings),
    }
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        result_backend_transport_options=celery_transport_options(settings.result_backend, settings),
        # JSON only: a worker never unpickles what a producer sent.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Ack after the job ends, so a job whose worker died is delivered again...
        task_acks_late=True,
        # ...also when the child process is killed (OOM, segfault) rather than the worker.
        task_reject_on_worker_lost=True,
        # A worker holds the job it runs and MASKFLEET_PREFETCH_JOBS more (default none): other
        # jobs wait in Redis for a free GPU, not in a busy worker. A job held ahead has its
        # inputs read while the previous one samples (input_prefetch.py); leases cover it too.
        worker_prefetch_multiplier=1 + settings.prefetch_jobs,
        # Redis redelivers an unacked job once its lease ran out: a dead worker's job within
        # a minute, a live worker's never, however long it runs (leases.py).
        broker_transport_options=transport,
        # On broker connection loss the running job is cancelled (it will be redelivered)
        # rather than finished and then run a second time.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # STARTED and PROGRESS are written by the task itself (task_state.py), two commands each
        # instead of Celery's five; the job document stays out of every state write (the
        # submission record holds it once). Task events (Flower's task views) only when asked.
        task_track_started=False,
        worker_send_task_events=settings.monitor_events,
        task_send_sent_event=settings.monitor_events,
        result_extended=False,
        result_expires=settings.result_expires,
        task_time_limit=settings.max_job_seconds,
        task_soft_time_limit=settings.soft_time_limit,
        task_default_queue=DEFAULT_QUEUE,
        task_routes=(route_job,),
        broker_connection_retry_on_startup=True,
    )
    app.conf.update(settings.celery_options)  # the operator's word over ours (MASKFLEET_CELERY_OPTIONS)


@celeryd_init.connect
def worker_only_settings(conf: Any = None, options: Any = None, **_: Any) -> None:
    """Settings for worker processes, not for producers that share this app.

    A result write that finds Redis down waits for it (with backoff) instead of failing.
    It matters on a broker outage: Celery cancels the running job and records RETRY; if
    that write failed, Celery would later take the killed child for a revoke, store
    REVOKED and ack the message once reconnected, and the job would never run again.
    Producers keep failing fast: their status() calls should raise, not hang, while
    Redis is away. `MASKFLEET_*` variables that are no setting are logged as a warning.

    In the thread pool (the pipelined worker, pipelined_worker.py) a running job cannot be
    terminated, so the job is not cancelled on a broker connection loss there.
    """
    unknown = unknown_variables()
    if unknown:  # a typo in a deployment's environment would otherwise be ignored in silence
        log.warning("unknown settings in the environment, ignored: %s (the settings are listed in docs/settings.md)",
                    ", ".join(unknown))
    if conf is not None:
        conf.result_backend_always_retry = True
        if str((options or {}).get("pool_cls") or "") in ("threads", "celery.concurrency.thread:TaskPool"):
            conf.worker_cancel_long_running_tasks_on_connection_loss = False
        conf.update(load_settings().celery_options)


app = Celery("maskfleet", include=["maskfleet.tasks.sample_task", "maskfleet.tasks.metrics", "maskfleet.tasks.json_logs",
                                   "maskfleet.tasks.leases", "maskfleet.tasks.deliveries",
                                   "maskfleet.tasks.input_prefetch", "maskfleet.tasks.outbox_sweeper"])
configure(app, load_settings())
