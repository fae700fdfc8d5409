"""Every `MASKFLEET_*` setting: one pydantic model, and the only place the environment is read.

A field `lease_seconds` is the variable `MASKFLEET_LEASE_SECONDS`; its type, default, range
and description are declared here once, and `docs/settings.md` is generated from them
(`python -m maskfleet.settings`, checked by tests/test_settings.py). Unset and empty
variables take the default (except MASKFLEET_ALLOWED_ROOTS, where empty means "no local
files at all"). A bad value is a ValueError naming the variable, its value and the rule.
`unknown_variables` lists `MASKFLEET_*` names that are no setting (typos): workers log them.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Literal, Mapping, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, Json, ValidationError, field_validator, model_validator

PREFIX = "MASKFLEET_"
REDIS_SCHEMES = ("redis", "rediss", "unix", "sentinel")  # what a broker, result backend or route URL may be
EMPTY_IS_A_VALUE = frozenset({"allowed_roots"})


def scheme(url: str) -> str:
    """A URL's scheme in lower case; empty when it has none."""
    return url.split("://", 1)[0].lower() if "://" in url else ""


class Settings(BaseModel):
    """The fleet's and the worker's settings, as the environment gives them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # -- broker, results, limits (producers and workers must agree on these)
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker: redis:// or rediss:// (password in the URL), or Redis Sentinel as sentinel://[:password@]host:port[/db] URLs joined by `;`, one per sentinel (docs/scaling.md).")
    result_backend: str = Field("", description="Celery result backend, where our own keys live too; default: the broker URL.")
    broker_routes: Json[dict[str, str]] = Field({}, description="Model groups on Redis deployments of their own: a JSON object from a model name or pattern (`sdxl-*`, fnmatch) to a Redis URL, the broker and result backend of those models' jobs; the first match wins, an exact name before any pattern; unmatched models use MASKFLEET_BROKER_URL. Producers, workers and the gateway must share it (docs/scaling.md).")
    sentinel_master: str = Field("mymaster", description="The master name the sentinels monitor (sentinel:// URLs only).")
    sentinel_password: str | None = Field(None, repr=False, description="The sentinels' own password, when they have one (the master's is in the URL).")
    max_job_seconds: int = Field(3600, ge=1, description="Hard time limit of a job (seconds); the soft limit and `time_limit` caps derive from it.")
    result_expires: int = Field(86400, ge=1, description="Seconds results, done records and submission keys are kept.")
    lease_seconds: int = Field(30, ge=1, description="A worker's hold on the jobs it reserved, refreshed by its heartbeat; also the broker's visibility timeout.")
    max_deliveries: int = Field(3, ge=1, description="Deliveries whose worker died before a job fails as PoisonJob.")
    storage_retries: int = Field(5, ge=0, description="Retries with backoff after botocore's own, when storage is unavailable.")
    callback_allowlist: str = Field("", description="Comma-separated host[:port] entries that callbacks may reach although internal (loopback, private).")
    # -- worker
    models: str | None = Field(None, description="Model store: a directory or s3://bucket/prefix.")
    model_cache: str | None = Field(None, description="Where models from S3 are downloaded; default ~/.cache/maskfleet/models.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Model weights dtype.")
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads in the process that runs jobs; default: torch's.")
    max_loaded_models: int = Field(2, ge=1, description="Models (and text encoders) kept loaded, least recently used dropped first.")
    model_memory_mb: int | None = Field(None, gt=0, description="Megabytes of loaded model weights a worker process keeps, least recently used dropped first; default: half the GPU's memory on CUDA, no byte bound on the CPU. An SDXL UNet is ~5 GB in fp16, an SD1.5 one ~1.7 GB.")
    prompt_cache_size: int = Field(256, description="Prompt encodings kept per worker process; 0 keeps none.")
    memory_limit_mb: int | None = Field(None, gt=0, description="Cap on a job process's memory (CUDA: the caching allocator's share; CPU: the data limit); default: the device's size.")
    allowed_roots: str | None = Field(None, description="Colon-separated absolute directories local reads and writes must stay in; empty: no local files; unset: no confinement.")
    prefetch_jobs: int = Field(0, ge=0, description="Jobs a worker reserves beyond the one it runs, their S3 inputs read ahead.")
    pipeline: bool = Field(False, description="1: job threads around one model lane instead of one job process.")
    batch_jobs: int = Field(1, ge=1, description="The most jobs a pipelined worker samples as one batch (needs MASKFLEET_PIPELINE=1).")
    batch_forward: Literal["fused", "per_job"] = Field("fused", description="A batch's model forward: fused (one) or per_job (bitwise the unbatched runs).")
    # -- webhooks
    webhook_secret: str | None = Field(None, repr=False, description="whsec_<base64> key that signs webhooks (Standard Webhooks); required by workers that send them.")
    webhook_max_attempts: int = Field(6, gt=0, description="Attempts per webhook delivery.")
    webhook_backoff: float = Field(0.5, gt=0, description="Seconds before the second attempt, doubled after each.")
    webhook_deadline: float = Field(60.0, gt=0, description="Seconds from the first attempt after which a delivery gives up.")
    webhook_timeout: float = Field(5.0, gt=0, description="Seconds each attempt may take.")
    webhook_lease: float = Field(30.0, gt=0, description="Seconds a worker's hold on the webhook events it is delivering lasts unless renewed: the started and final events of a worker that died are taken over by another worker within about 1.5 times this (docs/operations.md).")
    webhook_max_age: float = Field(86400.0, gt=0, description="An outbox event older than this many seconds when another worker takes it over is dead-lettered, not delivered.")
    webhook_outbox_max: int = Field(100_000, ge=1, description="Events the webhook outbox holds at most; past it the oldest are dead-lettered.")
    webhook_dead_max: int = Field(10_000, ge=1, description="Dead-lettered webhook events kept (about; the oldest go first) for `maskfleet webhooks list-failed` and `replay`.")
    # -- S3 (botocore configuration; boto3's own AWS_* variables apply too)
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field("auto", description="path for MinIO/Ceph, virtual, or auto.")
    s3_max_attempts: int = Field(5, gt=0, description="Total tries per request (botocore standard retry mode).")
    s3_connect_timeout: float = Field(5.0, gt=0, description="Seconds.")
    s3_read_timeout: float = Field(60.0, gt=0, description="Seconds.")
    s3_max_pool: int = Field(16, gt=0, description="Connections kept in the pool.")
    # -- HTTP gateway (`maskfleet gateway`)
    api_keys_file: str | None = Field(None, description="File of the gateway's API keys: {name, sha256 of the key, scopes} entries, one per line or as a JSON list (`maskfleet api-key` makes an entry). Required unless the gateway runs with --insecure-no-auth.")
    max_queue_depth: int | None = Field(None, ge=1, description="Jobs a model's queue may hold (waiting or running) before the gateway answers 429 with Retry-After; unset: no limit.")
    gateway_local_files: bool = Field(False, description="Accept local paths (file:// or plain) in jobs sent to the gateway: the workers' own files, confined by their MASKFLEET_ALLOWED_ROOTS. Off: HTTP producers give s3:// URIs.")
    upload_prefix: str | None = Field(None, description="s3://bucket/prefix where the gateway's POST /v1/uploads places producers' files; unset: no uploads.")
    presign_seconds: int = Field(3600, ge=60, le=604800, description="Seconds the gateway's presigned upload and download URLs stay valid.")
    max_wait_seconds: int = Field(60, ge=0, le=600, description="The longest the gateway holds a request that asks `Prefer: wait=N`.")
    # -- operations
    worker_gossip: bool = Field(False, description="Celery's mingle and gossip between workers (off: the leases and cancel flags do their work here, and with them on every worker hears every other, so idle traffic grows with the square of the fleet).")
    monitor_events: bool = Field(False, description="Celery's task events and worker heartbeats, which Flower needs (its task views and workers' online status); set it on workers and producers where Flower runs. Off: about 5 fewer Redis commands and 4 KB per job, and no heartbeat every 2 s per worker (docs/scaling.md).")
    progress_seconds: float = Field(1.0, gt=0, description="The least time between a job's status writes (PROGRESS state, progress webhooks): the first sampler call and the last always write, between them at most one write per this many seconds.")
    celery_options: Json[dict[str, Any]] = Field({}, description="Celery settings applied over the fleet's own, as a JSON object of lower-case Celery setting names (for example {\"broker_pool_limit\": 4}); for what no setting here covers.")
    metrics_port: int = Field(9808, ge=0, le=65535, description="Prometheus metrics port (worker N serves port + N); 0 disables.")
    metrics_addr: str = Field("0.0.0.0", description="Address the metrics server binds.")
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line.")

    @field_validator("s3_addressing_style", "log_format", mode="before")
    @classmethod
    def _lower(cls, value):
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _backend_defaults_to_the_broker(cls, values: dict) -> dict:
        if not values.get("result_backend"):
            values = {**values, "result_backend": values.get("broker_url") or cls.model_fields["broker_url"].default}
        return values

    @field_validator("broker_routes")
    @classmethod
    def _routes_name_redis(cls, routes: dict[str, str]) -> dict[str, str]:
        for pattern, url in routes.items():
            if not pattern.strip():
                raise ValueError("a route's model pattern is empty")
            if scheme(url) not in REDIS_SCHEMES:
                raise ValueError(f"the route of {pattern!r} is no Redis URL ({', '.join(s + '://' for s in REDIS_SCHEMES)})")
        return routes

    @model_validator(mode="after")
    def _batching_needs_the_pipeline(self) -> "Settings":
        if self.batch_jobs > 1 and not self.pipeline:
            raise ValueError("MASKFLEET_BATCH_JOBS: batching needs the pipelined worker (MASKFLEET_PIPELINE=1)")
        return self

    @property
    def soft_time_limit(self) -> int:
        """SoftTimeLimitExceeded is raised inside the job this long after it starts."""
        return soft_limit(self.max_job_seconds)

    @property
    def visibility_timeout(self) -> int:
        """The broker's visibility timeout is the lease: workers heartbeat what they hold (tasks/leases.py)."""
        return self.lease_seconds

    @property
    def key_ttl(self) -> int:
        return self.result_expires


def soft_limit(hard: int) -> int:
    """The soft time limit below a hard one: 60 s of headroom for long limits, 5 % (at least 5 s) for short."""
    return max(1, hard - max(5, min(60, hard // 20)))


def variable(field: str) -> str:
    """The environment variable of a setting."""
    return PREFIX + field.upper()


def _reason(error: dict) -> str:
    """A pydantic error as the short rule it broke."""
    ctx = error.get("ctx") or {}
    kind = error["type"]
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return "expected a whole number"
    if kind in ("float_parsing", "float_type"):
        return "expected a number"
    if kind == "bool_parsing":
        return "expected 0 or 1"
    if kind == "greater_than":
        return "must be positive" if ctx.get("gt") == 0 else f"must be greater than {ctx.get('gt')}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}"
    if kind == "dict_type":
        return "expected a JSON object"
    if kind == "json_invalid":
        return f"not JSON ({ctx.get('error', error['msg'])})"
    if kind == "value_error":
        return str(ctx.get("error") or error["msg"])
    if kind == "literal_error":
        return "expected one of " + ctx.get("expected", "").replace("'", "").replace(" or ", ", ")
    return error["msg"]


@lru_cache(maxsize=64)
def _validated(items: tuple[tuple[str, str], ...]) -> Settings:
    values = dict(items)
    try:
        return Settings(**values)
    except ValidationError as e:
        parts = []
        for error in e.errors():
            if not error["loc"]:  # a rule across settings: its message names them
                parts.append(str(error.get("ctx", {}).get("error") or error["msg"]).removeprefix("Value error, "))
                continue
            field = str(error["loc"][0])
            parts.append(f"{variable(field)}={values.get(field)!r}: {_reason(error)}")
        raise ValueError("; ".join(parts)) from None


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """The settings from `env` (default: this process's environment), validated; cached per distinct environment."""
    env = os.environ if env is None else env
    items = []
    for field in Settings.model_fields:
        raw = env.get(variable(field))
        if raw is None:
            continue
        value = raw.strip()
        if value or field in EMPTY_IS_A_VALUE:
            items.append((field, value))
    return _validated(tuple(items))


def unknown_variables(env: Mapping[str, str] | None = None) -> list[str]:
    """`MASKFLEET_*` names in `env` that are no setting (a typo, or one removed)."""
    env = os.environ if env is None else env
    known = {variable(field) for field in Settings.model_fields}
    return sorted(name for name in env if name.startswith(PREFIX) and name not in known)


def _type_name(annotation) -> str:
    options = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is dict:
        return "JSON object"
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in options)
    if options:  # X | None
        return _type_name(options[0])
    return {bool: "0 or 1", int: "integer", float: "number", str: "text"}.get(annotation, str(annotation))


def settings_markdown() -> str:
    """docs/settings.md: one row per setting, from the model."""
    lines = ["# Settings", "",
             "Every setting is an environment variable, read by `maskfleet/settings.py` (generated from it by",
             "`python -m maskfleet.settings > docs/settings.md`). Unset or empty takes the default; a bad value",
             "stops the process with a message naming the variable. A worker logs any `MASKFLEET_*` variable",
             "that is no setting.", "",
             "| variable | type | default | meaning |", "| --- | --- | --- | --- |"]
    for field, info in Settings.model_fields.items():
        bounds = [f"{op} {getattr(m, attr)}" for m in info.metadata
                  for attr, op in (("gt", ">"), ("ge", ">="), ("le", "<=")) if getattr(m, attr, None) is not None]
        kind = _type_name(info.annotation) + (f" ({', '.join(bounds)})" if bounds else "")
        shown = int(info.default) if isinstance(info.default, bool) else info.default
        default = "(unset)" if shown in (None, "") else f"`{shown}`"
        lines.append(f"| `{variable(field)}` | {kind} | {default} | {info.description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(settings_markdown(), end="")
