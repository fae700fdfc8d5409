"""Does a worker's memory grow with the jobs it runs? Peak RSS after 10 jobs vs after 100.

One real Celery worker (`-P prefork -c 1`, one torch thread, as tests/fleet_workers.py starts
it) on an empty DB of the machine's Redis, model `tiny` (the golden UNet) from a local
store, golden case c03's inputs as local files, --steps steps per job, each job its own
output file. After --first jobs and again after --total jobs, the pool child's peak RSS
(VmHWM) and current RSS (VmRSS) are read from /proc; the ratio of the peaks is the figure
(target: within 1.05). On a GPU worker the same question is asked of
torch.cuda.max_memory_allocated; this script covers the CPU worker.

    python bench/memory_growth.py [--first 10] [--total 100] [--steps 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fleet_workers import Worker, claim_db_url, flush  # noqa: E402
from golden_jobs import IN_REPO_GOLDEN, make_models_dir, write_case_job  # noqa: E402

from maskfleet.client import _app, submit  # noqa: E402
from maskfleet.tasks.settings import model_queue  # noqa: E402
from machine import cpu_model  # bench/machine.py (scripts run with bench/ on sys.path)

CASE = IN_REPO_GOLDEN / "cases" / "c03_euler_normal_s6_o0"


def child_memory_kib(worker: Worker) -> dict[str, int]:
    """VmHWM (peak) and VmRSS of the worker's one pool child."""
    pid = worker.proc.pid
    (child,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{child}/status").read_text().splitlines() if ":" in line)
    return {"pid": int(child), "peak": int(fields["VmHWM"].split()[0]), "rss": int(fields["VmRSS"].split()[0])}


def run_jobs(url: str, template: dict, out: Path, first: int, count: int) -> None:
    handles = []
    for i in range(first, first + count):
        job = dict(template, job_id=f"mem-{i}-{time.time_ns()}", output=(out / f"{i}.latent").as_uri())
        handles.append(submit(job, broker_url=url))
    for handle in handles:
        handle.wait(600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first", type=int, default=10)
    parser.add_argument("--total", type=int, default=100)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="maskfleet-memory-"))
    job_path, _, _ = write_case_job(CASE, work / "case")
    template = dict(json.loads(job_path.read_text()), steps=args.steps)
    (work / "out").mkdir()
    url = claim_db_url()
    worker = Worker("memory", [model_queue("tiny")], url, make_models_dir(work), work / "worker.log",
                    extra_env={"MASKFLEET_TORCH_THREADS": "1", "MASKFLEET_METRICS_PORT": "0"})
    try:
        worker.wait_ready(_app(url))
        run_jobs(url, template, work / "out", 0, args.first)
        after_first = child_memory_kib(worker)
        run_jobs(url, template, work / "out", args.first, args.total - args.first)
        after_total = child_memory_kib(worker)
    finally:
        worker.stop()
        flush(url)
    assert after_first["pid"] == after_total["pid"], "the pool child was replaced between the readings"
    print(f"machine: {cpu_model()}, CPU worker, 1 torch thread; job: golden c03 (32x32), {args.steps} steps")
    for label, m in ((f"after {args.first} jobs", after_first), (f"after {args.total} jobs", after_total)):
        print(f"{label:>16}: peak RSS {m['peak'] / 1024:7.1f} MiB, RSS {m['rss'] / 1024:7.1f} MiB")
    print(f"peak RSS ratio ({args.total} / {args.first} jobs): {after_total['peak'] / after_first['peak']:.3f}"
          f"  (RSS ratio {after_total['rss'] / after_first['rss']:.3f})")


if __name__ == "__main__":
    main()
