"""`maskfleet worker`: one Celery worker process per visible GPU, or one on the CPU.

Each child is `celery -A maskfleet.tasks.app worker -P prefork -c 1`, pinned to its GPU
with CUDA_VISIBLE_DEVICES and named maskfleet@<host>-gpuN (or -cpu; a second `maskfleet
worker` on the same host gets -cpu-2, and so on: `reserve_names`). Prefork with one
child keeps time limits and termination working, and the model is loaded in that child
after the fork. With MASKFLEET_PIPELINE=1 each is a thread-pool worker instead
(tasks/pipelined_worker.py): job threads around one model lane, so the GPU never waits
on a job's I/O or on Celery's handover. GPUs are counted with nvidia-smi (or CUDA_VISIBLE_DEVICES), never by
initialising CUDA in this process.

Queues: with --models-served a,b the worker takes only maskfleet.model.a and
maskfleet.model.b. Without it, it takes the default queue `maskfleet` (jobs sent by name
without a route) plus maskfleet.model.<name> for every model in its model store at start
that MASKFLEET_BROKER_ROUTES leaves on MASKFLEET_BROKER_URL. Models routed to another
Redis (tasks/broker_routes.py) are served by workers started for them: the children then
get that Redis as their broker and result backend, and models of two groups in one
--models-served are refused.

Signals: the first SIGTERM/SIGINT is passed on to every child (Celery's warm shutdown:
the running job finishes, then the worker exits); a second one sends SIGQUIT (cold
shutdown: stop now; the unacked job is redelivered). The launcher exits when they all have.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..tasks.broker_routes import route_url
from ..tasks.pipelined_worker import pool_arguments
from ..tasks.settings import DEFAULT_QUEUE, load_settings, model_queue


def visible_gpus() -> list[str]:
    """GPU indices to run on: CUDA_VISIBLE_DEVICES if set, else nvidia-smi's list, else none."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def worker_queues(models_served: list[str] | None) -> list[str]:
    """The queues of `models_served`; without them, the default queue and the store's models of the default group."""
    if models_served:
        return [model_queue(m) for m in models_served]
    from ..storage.model_store import ModelStore, available_models, models_root_from

    try:
        store = ModelStore(models_root_from(None))
        names = store._available() if store.is_s3 else available_models(store.local_root)
    except Exception:  # no store configured: the default queue only
        names = []
    settings = load_settings()
    return [DEFAULT_QUEUE] + [model_queue(n) for n in names if route_url(settings, n) is None]


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    env: dict[str, str]
    argv: list[str]


def peer_flags(settings) -> list[str]:
    """Mingle and gossip off unless MASKFLEET_WORKER_GOSSIP: workers need not hear each other; the event
    heartbeat off unless MASKFLEET_MONITOR_EVENTS: only Flower listens to it (docs/scaling.md)."""
    flags = [] if settings.worker_gossip else ["--without-mingle", "--without-gossip"]
    return flags if settings.monitor_events else [*flags, "--without-heartbeat"]


def worker_specs(device: str, queues: list[str], concurrency: int = 1, loglevel: str = "INFO",
                 celery_args: list[str] | None = None, group_url: str | None = None) -> list[WorkerSpec]:
    """One spec per GPU (or one on the CPU); `celery_args` go to every `celery worker` last, so they win;
    `group_url` (a route's Redis, broker_routes.common_route) becomes the children's broker and result backend."""
    host = socket.gethostname()
    gpus = visible_gpus() if device in ("auto", "cuda") else []
    if device == "cuda" and not gpus:
        raise SystemExit("maskfleet worker: --device cuda but no GPU is visible")
    slots = [(f"gpu{g}", {"CUDA_VISIBLE_DEVICES": g, "MASKFLEET_DEVICE": "cuda"}) for g in gpus] or [
        ("cpu", {"CUDA_VISIBLE_DEVICES": "", "MASKFLEET_DEVICE": "cpu"})
    ]
    pool = pool_arguments(load_settings(), concurrency)
    group = {} if group_url is None else {"MASKFLEET_BROKER_URL": group_url, "MASKFLEET_RESULT_BACKEND": group_url}
    specs = []
    for suffix, extra in slots:
        name = f"maskfleet@{host}-{suffix}"
        argv = [sys.executable, "-m", "celery", "-A", "maskfleet.tasks.app", "worker", *pool,
                "-n", name, "-Q", ",".join(queues), "--loglevel", loglevel, *peer_flags(load_settings()),
                *(celery_args or [])]
        specs.append(WorkerSpec(name, {**os.environ, **group, **extra}, argv))
    return specs


_reserved: list = []  # the open lock files of this process's node names, held until it exits


def reserve_names(specs: list[WorkerSpec], lock_dir: Path | None = None) -> list[WorkerSpec]:
    """The specs with node names no other `maskfleet worker` on this host holds: the first keeps
    its name (maskfleet@<host>-cpu), later ones get -2, -3... (several CPU workers on one host
    would otherwise share one name, which Celery warns about and its remote control confuses).

    A name is held with an flock on a file in `lock_dir` (the temp dir's maskfleet-nodes),
    for the life of this process; without a usable lock dir the names stay as they are.
    """
    lock_dir = lock_dir or Path(tempfile.gettempdir()) / "maskfleet-nodes"
    try:
        lock_dir.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return specs
    named = []
    for spec in specs:
        for n in range(1, 1000):
            name = spec.name if n == 1 else f"{spec.name}-{n}"
            held = open(lock_dir / name, "a")
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.close()
                continue
            _reserved.append(held)
            argv = list(spec.argv)
            argv[argv.index("-n") + 1] = name
            named.append(WorkerSpec(name, spec.env, argv))
            break
        else:
            named.append(spec)
    return named


def run_workers(specs: list[WorkerSpec]) -> int:
    """Start every worker, forward SIGTERM/SIGINT (warm, then cold), return when all have exited."""
    # Own process groups: a Ctrl-C at the terminal reaches the children once, through us.
    children = [subprocess.Popen(s.argv, env=s.env, start_new_session=True) for s in specs]
    signals_seen = 0

    def forward(signum: int, _frame: object) -> None:
        nonlocal signals_seen
        signals_seen += 1
        sig = signal.SIGTERM if signals_seen == 1 else signal.SIGQUIT
        for child in children:
            if child.poll() is None:
                child.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)
