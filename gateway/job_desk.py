"""What the gateway does with jobs, in the producer client's terms (maskfleet/client.py): submit, look up,
cancel; who may see which job; when a queue is too full to take more (waiting is job_events.py's).

Blocking calls (Redis, the result backend): the routes run them in Starlette's thread pool.
A job is visible to the key that submitted it (the `owner` in its submission record) and to
admin keys; to anyone else it does not exist (404, never 403, so ids do not leak). Jobs
sent by other means (no record, or no owner) are visible to admin keys only.
"""
from __future__ import annotations

import uuid
from collections import OrderedDict
from typing import Any

import redis

from ..client import JobHandle, UnknownJob, app_for, submit
from ..job import Job, JobError
from ..settings import Settings
from ..tasks.broker_routes import group_urls, route_url, routed
from ..tasks.idempotency import first_on_record, job_digest
from ..tasks.queue_depth import queue_depth
from ..tasks.redis_urls import redis_client
from ..tasks.settings import model_queue
from .api_keys import ApiKey
from .errors import ApiError
from .job_views import FINISHED, JobView, job_view

RETRY_AFTER_SECONDS = 10  # what a 429 asks a producer to wait before trying again
REMEMBERED_JOBS = 65536  # job ids whose group the desk keeps (the SSE streams find their Redis by it)


class JobDesk:
    def __init__(self, settings: Settings):
        self.settings = settings
        # One producer app per Redis group (MASKFLEET_BROKER_ROUTES: broker_routes.py), the default group's first.
        self.apps = {group: app_for(routed(settings, group)) for group in group_urls(settings)}
        self.app = self.apps[None]
        self.brokers = {group: redis_client(app.conf.broker_url, settings) for group, app in self.apps.items()}
        self._groups: OrderedDict[str, str | None] = OrderedDict()  # job id -> its group, the latest found

    def submit(self, job: Job, key: ApiKey) -> tuple[bool, JobView]:
        """(created, view): a new job is sent; the same job_id with the same document is the existing job."""
        if job.job_id is None:
            job = job.model_copy(update={"job_id": str(uuid.uuid4())})
        _, record = self._find(job.job_id)
        if record is not None:
            return False, self._repeat(job, record, key)
        self._check_storage(job)
        group = route_url(self.settings, job.base_sampler.model)
        self._check_room(group, model_queue(job.base_sampler.model))
        try:
            handle = submit(job, app=self.apps[group], owner=key.name)
        except JobError as e:  # time_limit over the maximum, a callback the policy refuses
            raise ApiError(422, "InvalidJob", str(e)) from None
        self._remember(job.job_id, group)
        if not handle.submitted:  # another request with this id won the claim meanwhile
            return False, self._repeat(job, self._find(job.job_id)[1] or {}, key)
        return True, self.view(job.job_id, key)

    def view(self, job_id: str, key: ApiKey) -> JobView:
        group, record = self._find(job_id)
        status = JobHandle(job_id, self.apps[group]).status()
        if not self._visible(record, key) or (record is None and status["state"] == "PENDING"):
            raise ApiError(404, "NotFound", f"no job {job_id!r}")
        return job_view(status, record)

    def group_of(self, job_id: str) -> str | None:
        """The group of a job this desk has looked up or sent (the default group's None otherwise)."""
        return self._groups.get(job_id)

    def cancel(self, job_id: str, key: ApiKey) -> tuple[str, JobView]:
        """(what it was: queued or running, the job after the request); 409 for a job that already ended."""
        before = self.view(job_id, key)
        if before.state in FINISHED:
            raise ApiError(409, "AlreadyFinished", f"job {job_id!r} already {before.state}")
        try:
            JobHandle(job_id, self.apps[self.group_of(job_id)]).cancel()
        except UnknownJob as e:
            raise ApiError(404, "NotFound", str(e)) from None
        return before.state, self.view(job_id, key)

    def ready(self) -> dict[str, Any]:
        """What /readyz checks: every group's broker Redis answers (and the result backend's, when set apart); with
        uploads on, their bucket answers too."""
        try:
            for group, app in self.apps.items():
                self.brokers[group].ping()
                if app.conf.result_backend != app.conf.broker_url:
                    redis_client(app.conf.result_backend, self.settings).ping()
        except redis.RedisError as e:
            raise ApiError(503, "NotReady", f"Redis does not answer: {e}") from None
        if self.settings.upload_prefix is None:
            return {"redis": "ok"}
        from botocore.exceptions import BotoCoreError, ClientError

        from ..storage.s3_client import get_s3_client
        from .presigned import upload_location

        bucket, _ = upload_location(self.settings.upload_prefix)
        try:
            get_s3_client().head_bucket(Bucket=bucket)
        except (BotoCoreError, ClientError) as e:
            raise ApiError(503, "NotReady", f"the upload bucket {bucket!r} does not answer: {e}") from None
        return {"redis": "ok", "store": "ok"}

    def _repeat(self, job: Job, record: dict, key: ApiKey) -> JobView:
        if not self._visible(record, key) or record.get("digest") not in (None, job_digest(job)):
            raise ApiError(409, "Conflict", f"job_id: {job.job_id!r} was already submitted with a different document")
        return self.view(job.job_id, key)

    def _check_storage(self, job: Job) -> None:
        """Through HTTP, jobs name objects on S3: a local path would be a file on whichever worker takes the job."""
        if self.settings.gateway_local_files:
            return
        named = {**job.input_uris(), **{f: getattr(job, f) for f in ("output", "preview", "output_image")}}
        for field, uri in named.items():
            if uri is not None and uri[:5].lower() != "s3://":
                raise ApiError(422, "InvalidJob", f"{field}: {uri[:80]!r} is a local path; jobs sent to the gateway name "
                                                  "s3:// objects (POST /v1/uploads gives upload URLs)")

    def _find(self, job_id: str) -> tuple[str | None, dict | None]:
        """(its group, its submission record): each group's Redis asked, the one it was last found in first."""
        known = self._groups.get(job_id)
        order = [known, *(g for g in self.apps if g != known)]
        found = first_on_record(job_id, [self.apps[group].conf.result_backend for group in order])
        if found is None:
            return known, None
        group = order[found[0]]
        self._remember(job_id, group)
        return group, found[1]

    def _remember(self, job_id: str, group: str | None) -> None:
        self._groups[job_id] = group
        self._groups.move_to_end(job_id)
        while len(self._groups) > REMEMBERED_JOBS:
            self._groups.popitem(last=False)

    def _check_room(self, group: str | None, queue: str) -> None:
        limit = self.settings.max_queue_depth
        if limit is None:
            return
        depth = queue_depth(self.brokers[group], queue)
        if depth >= limit:
            raise ApiError(429, "QueueFull", f"queue {queue} holds {depth} jobs (MASKFLEET_MAX_QUEUE_DEPTH={limit}); "
                                             f"try again in {RETRY_AFTER_SECONDS} s",
                           {"Retry-After": str(RETRY_AFTER_SECONDS)})

    @staticmethod
    def _visible(record: dict | None, key: ApiKey) -> bool:
        return key.admin or (record is not None and record.get("owner") == key.name)
