"""The `maskfleet` command: run a job on local files, print the job schema, and use the fleet
(submit, status, cancel a job; start workers).

Exit status: 0 on success, 2 when the job or its inputs are invalid (the message names
the field and the reason, and nothing is written), 1 on any other failure.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .job import MAX_JOB_BYTES, JobError, field_help, fields_markdown, job_schema, parse_job
from .step_display import StepDisplay, progress_line

EXIT_INVALID = 2


def _progress_printer(stream):
    """`maskfleet run`'s progress hook: the job's step, as the fleet's status reports it."""
    from .sampling.hooks import job_step

    def report(done: int, total: int, which: str) -> None:
        print(progress_line(*job_step(done, total), which), file=stream, flush=True)

    return report


def _follow(handle, quiet: bool, alive=lambda: True, timeout: float | None = None) -> dict:
    """Poll `handle` until its job ends, showing each new progress step on stderr (step_display.py);
    its last status (not final when `alive()` turned false or `timeout` seconds passed)."""
    from .client import FINAL_STATES

    deadline = None if timeout is None else time.monotonic() + timeout
    display = StepDisplay(sys.stderr, quiet)
    try:
        while True:
            status = handle.status()
            meta = status["meta"]
            if status["state"] == "PROGRESS" and isinstance(meta, dict):
                display.show(meta.get("step"), meta.get("total"), meta.get("sampler"))
            if status["state"] in FINAL_STATES:
                if status["state"] == "SUCCESS":
                    display.succeeded()
                return status
            if not alive() or (deadline is not None and time.monotonic() >= deadline):
                return status
            time.sleep(0.05)
    finally:
        display.close()


def _read_job(path: str):
    """The job file at `path`, validated; JobError names the field (or the file) on failure.

    Read like every input: a regular file (not /dev/zero or a FIFO) of at most MAX_JOB_BYTES.
    """
    from .storage.errors import InvalidFile
    from .storage.file_uris import read_bytes

    try:
        text = read_bytes(Path(path), "job", MAX_JOB_BYTES)
    except InvalidFile as e:
        raise JobError(str(e)) from None
    return parse_job(text)


def cmd_run(args: argparse.Namespace) -> int:
    """Each job in turn in one pipeline (models load once); a result line per job, an invalid job
    reported (naming its file when there are several) and the others run."""
    from .job_pipeline import JobPipeline, RunOptions
    from .sampling.errors import InvalidInput
    from .storage.errors import InvalidFile
    from .storage.model_store import models_root_from

    code, pipeline = 0, None
    for path in args.job:
        try:
            job = _read_job(path)
            if pipeline is None:
                pipeline = JobPipeline(RunOptions(models_root=models_root_from(args.models), device=args.device,
                                                  dtype=args.dtype))
            result = pipeline.run(job, None if args.quiet else _progress_printer(sys.stderr))
        except (JobError, InvalidInput, InvalidFile) as e:
            where = f" {path}" if len(args.job) > 1 else ""
            print(f"maskfleet: invalid job{where}: {e}", file=sys.stderr)
            code = EXIT_INVALID
            continue
        print(json.dumps(result), flush=True)
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    """Write the demo files, then run the job through the Celery task path, all in this process.

    Broker, result backend and worker are in memory (maskfleet/embedded.py): no Redis, no S3.
    """
    from .demo import write_demo_files, write_demo_picture
    from .embedded import embedded_fleet
    from .tasks.settings import DEFAULT_QUEUE, model_queue

    folder = Path(args.dir)
    job_path = write_demo_files(folder)
    job = parse_job(job_path.read_bytes())
    print(f"[maskfleet] demo files written to {folder}; sending {job_path} to an in-process Celery worker", file=sys.stderr)
    queues = [DEFAULT_QUEUE, model_queue(job.base_sampler.model)]
    with embedded_fleet(str(folder / "models"), queues, device=args.device, dtype=args.dtype) as worker:
        from .client import FINAL_STATES, JobFailed, submit  # the producer's client, as against a real fleet

        handle = submit(job)
        status = _follow(handle, args.quiet, worker.is_alive)
        meta = status["meta"]
        if status["state"] not in FINAL_STATES:
            print("maskfleet: the in-process worker stopped before the job ended", file=sys.stderr)
            return 1
        try:
            result = handle.wait(0)
        except JobFailed as e:
            print(f"maskfleet: {e}", file=sys.stderr)
            return EXIT_INVALID if isinstance(meta, dict) and meta.get("error") == "InvalidJob" else 1
    print(json.dumps(result))
    print(f"[maskfleet] output latent: {_local_path(result['output'])}", file=sys.stderr)
    print(f"[maskfleet] picture:       {write_demo_picture(folder).resolve()} (noise, mask, result)", file=sys.stderr)
    return 0


def _local_path(uri: str) -> str:
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    return unquote(parsed.path) if parsed.scheme == "file" else uri


def cmd_schema(args: argparse.Namespace) -> int:
    if args.markdown:
        print(fields_markdown(), end="")
    else:
        print(json.dumps(job_schema(), indent=2))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from .client import FINAL_STATES, JobFailed, submit

    try:
        handle = submit(_read_job(args.job), broker_url=args.broker, queue=args.queue)
    except JobError as e:
        print(f"maskfleet: invalid job: {e}", file=sys.stderr)
        return EXIT_INVALID
    if not handle.submitted:
        print(f"[maskfleet] job id {handle.task_id} was submitted before; not sent again", file=sys.stderr)
    if not args.wait:
        print(json.dumps({"id": handle.task_id, "submitted": handle.submitted}))
        return 0
    try:
        status = _follow(handle, quiet=False, timeout=args.timeout)  # progress lines on stderr while it runs
        if status["state"] not in FINAL_STATES:
            raise JobFailed(handle.task_id, "TIMEOUT", f"not finished after {args.timeout} s (state {status['state']})")
        print(json.dumps(handle.wait(0)))
    except JobFailed as e:
        print(f"maskfleet: {e}", file=sys.stderr)
        meta = handle.status()["meta"]
        return EXIT_INVALID if isinstance(meta, dict) and meta.get("error") == "InvalidJob" else 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .client import handle

    print(json.dumps(handle(args.id).status(), default=str))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from .client import UnknownJob, handle

    h = handle(args.id)
    try:
        h.cancel(force=args.force)
    except UnknownJob as e:
        print(f"maskfleet: {e}; --force records it anyway", file=sys.stderr)
        return 1
    print(json.dumps(h.status(), default=str))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from .settings import load_settings
    from .tasks.broker_routes import common_route
    from .tasks.redis_urls import redacted
    from .worker.launcher import reserve_names, run_workers, worker_queues, worker_specs

    served = [m.strip() for m in args.models_served.split(",") if m.strip()] if args.models_served else None
    extra = args.celery_args[1:] if args.celery_args[:1] == ["--"] else args.celery_args
    try:
        group = common_route(load_settings(), served or [])
    except ValueError as e:
        raise SystemExit(f"maskfleet worker: {e}") from None
    specs = reserve_names(worker_specs(args.device, worker_queues(served), args.concurrency, args.loglevel, extra, group))
    for spec in specs:
        print(f"[maskfleet] starting {spec.name} on queues {spec.argv[spec.argv.index('-Q') + 1]} "
              f"(Redis {redacted(load_settings(spec.env).broker_url)})", file=sys.stderr)
    return run_workers(specs)


def cmd_webhooks(args: argparse.Namespace) -> int:
    """The dead-lettered webhook events (tasks/webhook_outbox.py): list them, or put one back for delivery."""
    from datetime import datetime, timezone

    from .tasks.redis_keys import connection
    from .tasks.webhook_outbox import Outbox, OutboxEvent
    from .tasks.webhooks import url_for_log

    outbox = Outbox(connection(args.redis))
    if args.action == "list-failed":
        for entry in outbox.dead():
            event = OutboxEvent.of(entry["event"])
            print(json.dumps({"id": entry["id"], "webhook_id": event.msg_id, "type": event.type, "job_id": event.job_id,
                              "url": url_for_log(event.url), "error": entry["error"], "attempts": entry["attempts"],
                              "dead_at": datetime.fromtimestamp(entry["dead_at"], timezone.utc).isoformat(timespec="seconds")}))
        return 0
    try:
        event = outbox.replay(args.id)
    except KeyError:
        print(f"maskfleet: no dead-lettered webhook {args.id!r} (see maskfleet webhooks list-failed)", file=sys.stderr)
        return 1
    print(json.dumps({"replayed": event.msg_id, "type": event.type, "job_id": event.job_id}))
    return 0


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def cmd_gateway(args: argparse.Namespace) -> int:
    """Serve the HTTP API with uvicorn (the `gateway` extra)."""
    if args.insecure_no_auth and args.host not in LOOPBACK:
        print(f"maskfleet: --insecure-no-auth serves loopback only, not {args.host!r}", file=sys.stderr)
        return EXIT_INVALID
    try:
        import uvicorn

        from .gateway.app import create_app
    except ImportError as e:
        print(f"maskfleet: the gateway needs its extra: pip install 'maskfleet[gateway]' ({e})", file=sys.stderr)
        return 1
    try:
        app = create_app(insecure_no_auth=args.insecure_no_auth)
    except ValueError as e:
        print(f"maskfleet: {e}", file=sys.stderr)
        return EXIT_INVALID
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, proxy_headers=True)
    return 0


def cmd_api_key(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .gateway.api_keys import new_key

    try:
        token, entry = new_key(args.name, [s.strip() for s in args.scopes.split(",") if s.strip()])
    except ValidationError as e:
        print(f"maskfleet: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}", file=sys.stderr)
        return EXIT_INVALID
    print(f"key (shown once, give it to the producer): {token}", file=sys.stderr)
    print(json.dumps(entry))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskfleet", description="Two-sampler masked diffusion sampling.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run a job in this process on local files",
        description="Run jobs (JSON files) in this process, one after another with the models loaded once, and "
                    "print a JSON result line for each.",
        epilog="job fields:\n" + field_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("job", nargs="+", help="path of a job JSON file (several: run in turn)")
    run.add_argument("--models", help="model store: a directory or s3://bucket/prefix (default: $MASKFLEET_MODELS)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    run.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model weights dtype")
    run.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser(
        "demo",
        help="write the trained digits model and a job into a folder, then run it through Celery, all in this process",
        description="Write the digits model shipped with maskfleet and a job (a 3 outside the mask, a 7 inside) into "
        "--dir, run it through the Celery task (maskfleet.sample) with an in-process broker, result backend and "
        "worker (no Redis or S3 needed), and draw demo.png: the starting noise, the mask and the result.",
    )
    demo.add_argument("--dir", default="maskfleet-demo", help="folder for the demo files (default: ./maskfleet-demo)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    demo.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model weights dtype")
    demo.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    demo.set_defaults(func=cmd_demo)

    submit = sub.add_parser("submit", help="send a job to the fleet (broker: $MASKFLEET_BROKER_URL)")
    submit.add_argument("job", help="path of the job JSON file")
    submit.add_argument("--wait", action="store_true", help="wait for the result and print it")
    submit.add_argument("--timeout", type=float, default=None, help="seconds to wait with --wait (default: no limit)")
    submit.add_argument("--queue", default=None, help="queue to send to (default: the base sampler's model queue)")
    submit.add_argument("--broker", default=None,
                        help="broker URL, also used as the result backend (default: $MASKFLEET_BROKER_URL and $MASKFLEET_RESULT_BACKEND)")
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="print a job's state and progress/result as JSON")
    status.add_argument("id", help="task id (the job_id when the job has one)")
    status.set_defaults(func=cmd_status)

    cancel = sub.add_parser("cancel", help="cancel a queued or running job (no output is written)")
    cancel.add_argument("id", help="task id (the job_id when the job has one)")
    cancel.add_argument("--force", action="store_true",
                        help="record the cancellation even when no such job is on record (a job sent by name from "
                             "another Celery app, still queued); it expires with the results")
    cancel.set_defaults(func=cmd_cancel)

    worker = sub.add_parser("worker", help="start one Celery worker per visible GPU, or one on the CPU")
    worker.add_argument("--models-served", default=None, help="comma-separated model names: consume only their queues")
    worker.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto (GPUs if any)")
    worker.add_argument("--concurrency", type=int, default=1, help="pool processes per worker (default: 1; a pipelined worker, MASKFLEET_PIPELINE=1, runs 2 x MASKFLEET_BATCH_JOBS job threads instead)")
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("celery_args", nargs=argparse.REMAINDER,
                        help="after --: options for every `celery worker` (for example -- --autoscale=2,1 or "
                             "--without-heartbeat), given last so they win over ours; Celery settings go in "
                             "MASKFLEET_CELERY_OPTIONS")
    worker.set_defaults(func=cmd_worker)

    gateway = sub.add_parser("gateway", help="serve the HTTP API (submit, watch, cancel jobs from any language)",
                             description="The HTTP gateway in front of the fleet (docs/gateway.md); API keys from "
                                         "$MASKFLEET_API_KEYS_FILE.")
    gateway.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    gateway.add_argument("--port", type=int, default=8080, help="default: 8080")
    gateway.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    gateway.add_argument("--insecure-no-auth", action="store_true",
                         help="no API keys: every request may do everything; loopback only")
    gateway.set_defaults(func=cmd_gateway)

    api_key = sub.add_parser("api-key", help="make an API key for the gateway: the key, and the entry for the key file",
                             description="Print a new key on stderr (once: only its SHA-256 is kept) and its entry "
                                         "for $MASKFLEET_API_KEYS_FILE (a JSON list) on stdout.")
    api_key.add_argument("name", help="the key's name (owner of the jobs it submits)")
    api_key.add_argument("--scopes", default="submit,read,cancel", help="comma-separated: submit, read, cancel, admin")
    api_key.set_defaults(func=cmd_api_key)

    webhooks = sub.add_parser("webhooks", help="webhook events the workers gave up on: list them, replay one",
                              description="Started and final webhook events that could not be delivered within the "
                                          "workers' retry bound are kept as dead letters in Redis.")
    webhooks.add_argument("--redis", default=None, help="the Redis holding them (default: $MASKFLEET_RESULT_BACKEND)")
    actions = webhooks.add_subparsers(dest="action", required=True)
    actions.add_parser("list-failed", help="print each dead-lettered event as a JSON line, the oldest first")
    replay = actions.add_parser("replay", help="deliver a dead-lettered event again (the next worker sweep sends it, "
                                               "with the same webhook-id)")
    replay.add_argument("id", help="the event's id or webhook_id, as list-failed prints them")
    webhooks.set_defaults(func=cmd_webhooks)

    schema = sub.add_parser("schema", help="print the JSON Schema of a job")
    schema.add_argument("--markdown", action="store_true", help="a table of the fields instead (docs/job.md)")
    schema.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def console_main() -> None:
    """Entry point of the installed `maskfleet` script."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
