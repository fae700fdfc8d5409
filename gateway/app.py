"""The HTTP API (FastAPI): routes, authentication, the job document read as `maskfleet run` reads it.

The request body of a job is read and validated by `maskfleet.job.parse_job` itself (the
same cap, the same `<field>: <reason>` messages); the OpenAPI document still describes it,
from the same pydantic model (`Job.model_json_schema`), under `components/schemas`.
`Prefer: wait=N` (RFC 7240, at most MASKFLEET_MAX_WAIT_SECONDS) holds the answer until the
job ends or N seconds pass: the finished job, else 202 with the job as it stands.
"""
from __future__ import annotations

import re
from typing import Literal

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..job import MAX_JOB_BYTES, Job, JobError, parse_job
from ..names import JOB_ID_PATTERN
from ..settings import Settings, load_settings
from .api_keys import NO_AUTH, ApiKey, find_key, load_keys
from .errors import ApiError, install_error_handlers
from .http_metrics import install_metrics
from .job_desk import JobDesk
from .job_events import JobEvents
from .job_views import FINISHED, JOBS_PATH, JobView
from .presigned import UploadRequest, Uploads, presign_outputs, presign_uploads

PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+)", re.I)


class CancelView(JobView):
    cancelled: Literal["queued", "running"] = Field(description="What the job was when cancelled: queued (dropped) "
                                                                "or running (stopped at its next sampler call).")


def create_app(settings: Settings | None = None, insecure_no_auth: bool = False) -> FastAPI:
    """The gateway's app; ValueError when it has no API keys and is not told to run without them."""
    settings = settings or load_settings()
    if insecure_no_auth:
        keys = None
    elif settings.api_keys_file is None:
        raise ValueError("MASKFLEET_API_KEYS_FILE: the gateway needs API keys (maskfleet api-key makes them); "
                         "--insecure-no-auth runs it without, on loopback only")
    else:
        keys = load_keys(settings.api_keys_file)
    desk = JobDesk(settings)
    # One subscription per Redis group (MASKFLEET_BROKER_ROUTES); after the route checked the caller may see
    # the job (which also found its group), its followers share one read per change.
    feeds = {group: JobEvents(group_app.conf.result_backend,
                              lambda job_id: desk.app.backend.get_key_for_task(job_id).decode(),
                              lambda job_id: run_in_threadpool(desk.view, job_id, NO_AUTH))
             for group, group_app in desk.apps.items()}

    def events(job_id: str) -> JobEvents:
        return feeds[desk.group_of(job_id)]

    app = FastAPI(title="maskfleet", version=__version__, description="Submit, watch and cancel maskfleet jobs.")
    install_error_handlers(app)
    install_metrics(app, lambda: sum(feed.following for feed in feeds.values()))
    bearer = HTTPBearer(auto_error=False, description="An API key: Authorization: Bearer <key>")

    def caller(scope: str):
        def authenticate(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ApiKey:
            if keys is None:
                return NO_AUTH
            if credentials is None:
                raise ApiError(401, "Unauthorized", "an API key is required: Authorization: Bearer <key>",
                               {"WWW-Authenticate": "Bearer"})
            key = find_key(keys, credentials.credentials)
            if key is None:
                raise ApiError(401, "Unauthorized", "the API key is not valid", {"WWW-Authenticate": "Bearer"})
            if not key.allows(scope):
                raise ApiError(403, "Forbidden", f"this API key has no {scope!r} scope")
            return key

        return Depends(authenticate)

    job_body = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Job"}}}}}

    async def answer(created: bool, view: JobView, request: Request, response: Response) -> JobView:
        seconds = _prefer_wait(request, settings.max_wait_seconds)
        if seconds is not None:
            if view.state not in FINISHED:
                view = await events(view.id).wait(view.id, seconds)
            response.headers["Preference-Applied"] = f"wait={seconds}"
            if view.state not in FINISHED:
                response.status_code = 202
                return view
        response.status_code = 201 if created else 200
        if created:
            response.headers["Location"] = view.links.self
        return view

    @app.post(JOBS_PATH, response_model=JobView, status_code=201, openapi_extra=job_body,
              responses={200: {"model": JobView, "description": "this job_id was submitted before with this document"},
                         202: {"model": JobView, "description": "Prefer: wait=N passed before the job ended"}})
    async def submit_job(request: Request, response: Response, key: ApiKey = caller("submit")) -> JobView:
        """Submit a job; a job_id already submitted with the same document is that job (200), with another 409."""
        job = await _read_job(request)
        created, view = await run_in_threadpool(desk.submit, job, key)
        return await answer(created, view, request, response)

    @app.put(JOBS_PATH + "/{job_id}", response_model=JobView, status_code=201, openapi_extra=job_body)
    async def put_job(job_id: str, request: Request, response: Response, key: ApiKey = caller("submit")) -> JobView:
        """Submit a job under this id (idempotent: the same document again is the same job)."""
        _check_id(job_id)
        job = await _read_job(request)
        if job.job_id not in (None, job_id):
            raise ApiError(422, "InvalidJob", f"job_id: {job.job_id!r} in the document is not the path's {job_id!r}")
        created, view = await run_in_threadpool(desk.submit, job.model_copy(update={"job_id": job_id}), key)
        return await answer(created, view, request, response)

    @app.get(JOBS_PATH + "/{job_id}", response_model=JobView)
    async def get_job(job_id: str, request: Request, response: Response, key: ApiKey = caller("read"),
                      presign: bool = False) -> JobView:
        """The job's state; with `Prefer: wait=N`, once it ends (or 202 after N seconds); with `presign=true`,
        presigned GET URLs of its outputs on S3 once it succeeded."""
        _check_id(job_id)
        view = await run_in_threadpool(desk.view, job_id, key)
        view = await answer(False, view, request, response)
        if presign and view.result is not None:
            downloads = await run_in_threadpool(presign_outputs, view.result, settings.presign_seconds)
            view = view.model_copy(update={"downloads": downloads})
        return view

    @app.post("/v1/uploads", response_model=Uploads, status_code=201)
    async def uploads(body: UploadRequest, key: ApiKey = caller("submit")) -> Uploads:
        """Presigned PUT URLs for a job's input files, and the s3:// URIs to name them by in the job."""
        return await run_in_threadpool(presign_uploads, body, settings.upload_prefix, key.name, settings.presign_seconds)

    @app.post(JOBS_PATH + "/{job_id}/cancel", response_model=CancelView)
    async def cancel_job(job_id: str, key: ApiKey = caller("cancel")) -> CancelView:
        """Cancel a queued job (dropped) or a running one (stopped at its next sampler call); `cancelled` says which."""
        _check_id(job_id)
        was, view = await run_in_threadpool(desk.cancel, job_id, key)
        return CancelView(**view.model_dump(), cancelled=was)

    @app.get(JOBS_PATH + "/{job_id}/events", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "queued, started, progress, then succeeded, failed or cancelled"}})
    async def job_events(job_id: str, key: ApiKey = caller("read"),
                         last_event_id: str | None = Header(None, description="resume after this event")):
        """The job's events as Server-Sent Events, ending with its terminal event (sent at once if it has ended)."""
        _check_id(job_id)
        await run_in_threadpool(desk.view, job_id, key)  # 404 before the stream starts

        last = int(last_event_id) if last_event_id is not None and last_event_id.isdigit() else -1
        return StreamingResponse(events(job_id).follow(job_id, last), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/healthz")
    async def healthz() -> dict:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict:
        """Redis answers, and the upload bucket when uploads are on (503 otherwise)."""
        return await run_in_threadpool(desk.ready)

    _describe_job_in_openapi(app)
    return app


async def _read_job(request: Request) -> Job:
    """The body as a job: JSON (415 otherwise), at most MAX_JOB_BYTES (413), valid (422 naming the field)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, "UnsupportedMediaType", f"content-type: expected application/json, got {media or 'none'!r}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_JOB_BYTES:
        raise ApiError(413, "TooLarge", f"job: the document is {declared} bytes, over the {MAX_JOB_BYTES}-byte cap")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JOB_BYTES:
            raise ApiError(413, "TooLarge", f"job: the document is over the {MAX_JOB_BYTES}-byte cap")
    try:
        return parse_job(bytes(body))
    except JobError as e:
        raise ApiError(422, "InvalidJob", str(e)) from None


def _check_id(job_id: str) -> None:
    if not re.fullmatch(JOB_ID_PATTERN, job_id):
        raise ApiError(422, "InvalidRequest", f"job_id: {job_id[:64]!r} does not match {JOB_ID_PATTERN}")


def _prefer_wait(request: Request, cap: int) -> int | None:
    match = PREFER_WAIT.search(request.headers.get("prefer", ""))
    return None if match is None else min(int(match.group(1)), cap)


def _describe_job_in_openapi(app: FastAPI) -> None:
    """Add the job document's JSON Schema (from the pydantic model) to the OpenAPI components."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            job = Job.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(job.pop("$defs", {}))
            components["Job"] = job
        return app.openapi_schema

    app.openapi = openapi
