"""Tiny fleet jobs for fault and load tests, and what the workers' logs say about them.

One set of input files (a 1x4xSxS latent, a square mask, two conditioning files for the
`tiny` model of golden_jobs.make_models_dir) is shared by many jobs that differ only in
job_id and output URI, so hundreds of jobs cost nothing to write and each one runs in
milliseconds. Since every job has the same inputs and seed, every correct output has the
same bytes: one in-process reference run tells what each fleet output must be.

`completions(logs)` reads Celery's "Task maskfleet.sample[<id>] succeeded in <t>s: <result>"
lines. A job sampled twice logs two different results (their `seconds` timings differ);
a redelivered job that finds its stored result (idempotency.py) logs the same result
again without sampling. So the number of *distinct* results per id counts the runs that
completed, and the number of lines counts the successes Celery reported.
"""
from __future__ import annotations

import hashlib
import time
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from maskfleet.job import parse_job
from maskfleet.job_pipeline import RunOptions, run_job
from maskfleet.tasks.settings import TASK_NAME

SUCCEEDED = re.compile(rf"Task {re.escape(TASK_NAME)}\[([^\]]+)\] succeeded in [0-9.e-]+s: (.*)$", re.M)
RECEIVED = re.compile(rf"Task {re.escape(TASK_NAME)}\[([^\]]+)\] received")


def write_tiny_inputs(work: Path, size: int = 8) -> dict:
    """Write the shared inputs under `work`; return a job template without job_id and output."""
    work.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    save_file({"latent_tensor": torch.randn(1, 4, size, size, generator=g),
               "latent_format_version_0": torch.tensor([])}, work / "in.latent")
    mask = torch.zeros(1, size, size)
    mask[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    save_file({"mask": mask}, work / "mask.safetensors")
    for name in ("pos", "neg"):
        save_file({"prompt_embeds": torch.randn(1, 77, 32, generator=g)}, work / f"{name}.safetensors")
    sampler = {"model": "tiny", "sampler_name": "euler", "scheduler": "normal", "cfg": 5.0,
               "positive": (work / "pos.safetensors").as_uri(), "negative": (work / "neg.safetensors").as_uri()}
    return {"seed": 3, "steps": 1, "overlap_factor": 1, "latent": (work / "in.latent").as_uri(),
            "mask": (work / "mask.safetensors").as_uri(), "base_sampler": sampler, "mask_sampler": dict(sampler)}


def job_from(template: dict, job_id: str, output: Path, **changes) -> dict:
    return {**template, "job_id": job_id, "output": output.as_uri(), **changes}


def output_path(job: dict) -> Path:
    return Path(job["output"][len("file://"):])


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def completions(logs: list[Path]) -> dict[str, list[str]]:
    """job id -> the result text of every 'succeeded' line for it, across the workers' logs."""
    found: dict[str, list[str]] = defaultdict(list)
    for log in logs:
        for task_id, result in SUCCEEDED.findall(log.read_text(errors="replace")):
            found[task_id].append(result.strip())
    return dict(found)


def deliveries(logs: list[Path]) -> dict[str, int]:
    """job id -> how many times a worker logged it as received."""
    found: dict[str, int] = defaultdict(int)
    for log in logs:
        for task_id in RECEIVED.findall(log.read_text(errors="replace")):
            found[task_id] += 1
    return dict(found)


def publish_report(capsys, path: Path, report: str) -> None:
    """Show a test's figures on the terminal (even without -s) and keep them in `path`."""
    with capsys.disabled():
        print("\n" + report)
    path.write_text(report + "\n")


def reference_sha256(template: dict, path: Path, models: Path) -> str:
    """The output every job must have, from an in-process run on one thread as the workers use."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_job(parse_job(job_from(template, "reference", path)), RunOptions(str(models), "cpu"))
    finally:
        torch.set_num_threads(threads)
    return file_sha256(path)


def job_states(handles) -> dict[str, str | None]:
    """State of each job; None for those whose state Redis could not tell right now (it is away)."""
    import redis

    found: dict[str, str | None] = {}
    for handle in handles:
        try:
            found[handle.task_id] = handle.status()["state"]
        except (redis.RedisError, OSError):
            found[handle.task_id] = None
    return found


def submit_batch(template: dict, out: Path, name: str, count: int, url: str) -> tuple[list[dict], list]:
    """`count` jobs named `name`-<ns>-<i>, their outputs under `out`, submitted; (jobs, handles)."""
    from maskfleet.client import submit

    stamp = time.time_ns()
    jobs = [job_from(template, f"{name}-{stamp}-{i:02d}", out / f"{name}{i:02d}.latent") for i in range(count)]
    handles = [submit(job, broker_url=url) for job in jobs]
    assert all(h.submitted for h in handles)
    return jobs, handles


def wait_two_running(handles, deadline_s: float = 120.0) -> dict[str, str | None]:
    """The jobs' states once two of them run and one at least samples (or the deadline passed)."""
    end = time.monotonic() + deadline_s
    while True:
        now = job_states(handles)
        running = [s for s in now.values() if s in ("STARTED", "PROGRESS")]
        if (len(running) >= 2 and "PROGRESS" in running) or time.monotonic() > end:
            return now
        time.sleep(0.05)
