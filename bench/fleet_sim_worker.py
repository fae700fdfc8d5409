"""The simulated fleet's worker (bench/fleet_sim.py): the fleet's Redis traffic with no model behind it.

The app is configured by the fleet's own `configure` (transport, leases' visibility timeout,
acks, events switch), takes the same Request class, leases and delivery counting, and runs
the lifecycle concerns that talk to Redis in the task's order (StartedState, PoisonCheck,
ParsedJob, StartAnnouncement, Cancellation, FinishedBefore, TaskProgress; the done record
on success). Left out are the concerns that only touch the device or storage (OutOfMemory,
StorageRetry, BadInput, PrefetchedInputs, ThreadTimeLimit). The body sleeps
MASKFLEET_SIM_STEP_MS per sampler call where the real one samples, asking `should_stop` and
reporting progress as the sampling loop does. No torch is imported: a process is about
60 MB, so fifty fit on a laptop.

    celery -A fleet_sim_worker worker -P solo   (with bench/ on PYTHONPATH)
"""
from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from maskfleet.settings import load_settings
from maskfleet.tasks.app import configure
from maskfleet.tasks.cancellation import Cancellation
from maskfleet.tasks.deliveries import PoisonCheck
from maskfleet.tasks.errors import InvalidJob
from maskfleet.tasks.idempotency import FinishedBefore
from maskfleet.tasks.job_document import ParsedJob
from maskfleet.tasks.lifecycle import TaskRun, run_task
from maskfleet.tasks.progress import TaskProgress
from maskfleet.tasks.settings import TASK_NAME
from maskfleet.tasks.status_events import StartAnnouncement
from maskfleet.tasks.task_state import StartedState

STEP_SECONDS = float(os.environ.get("MASKFLEET_SIM_STEP_MS", "10")) / 1000

app = Celery("maskfleet-sim", include=["maskfleet.tasks.leases", "maskfleet.tasks.deliveries"])
configure(app, load_settings())

LIFECYCLE = [StartedState(), PoisonCheck(), ParsedJob(), StartAnnouncement(), Cancellation(), FinishedBefore(),
             TaskProgress()]


class Stopped(Exception):
    """The stub's SamplingStopped: the cancel was seen between sampler calls."""


def stub_body(run: TaskRun) -> dict:
    """Two sampler calls per step, each a sleep, with the loop's stop check and progress hook."""
    job = run.job
    total = 2 * job.steps  # type: ignore[union-attr]
    for done in range(1, total + 1):
        if run.should_stop():
            raise Stopped()
        time.sleep(STEP_SECONDS)
        if run.on_progress is not None:
            run.on_progress(done, total, "base" if done % 2 else "mask")
    return {"output": job.output, "steps": job.steps}  # type: ignore[union-attr]


@app.task(bind=True, name=TASK_NAME, Request="maskfleet.tasks.sample_request:SampleRequest", throws=(InvalidJob,))
def sample(self: Any, job_data: dict) -> dict:
    return run_task(self, job_data, LIFECYCLE, stub_body)
