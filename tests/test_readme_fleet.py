"""The README's first job and fleet quick-start, run as written (bash, in a fresh folder).

Only the ports change (Redis 6399 and Flower 5555 become free ones, so a run never meets
another's); everything else is the README's text: the demo, `maskfleet run`, a Redis of
its own, Flower, a CPU worker, `submit --wait`, `status`, Flower's API by curl, and the
shutdown. Whatever happens, the test then stops that Redis and every process the script
left; if the script hangs, the failure shows every Python process's stacks.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from metrics_scrape import free_port

README = Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.skipif(not (shutil.which("redis-server") and shutil.which("curl")),
                                reason="the quick-start needs redis-server and curl")


def sh_block(section: str) -> str:
    """The first ```sh block under the README heading `## {section}`."""
    text = README.read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```sh\n(.*?)```", body, re.S).group(1)


def processes_marked(marker: str) -> list[int]:
    """Every process whose environment holds `marker`: the script, what it started (the worker's
    Celery processes lead their own sessions) and the daemonized redis-server."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                pids.append(int(environ.parent.name))
        except OSError:
            continue
    return [pid for pid in pids if pid != os.getpid()]


def pythons_marked(marker: str) -> list[int]:
    pids = []
    for pid in processes_marked(marker):
        try:
            if "python" in os.readlink(f"/proc/{pid}/exe"):
                pids.append(pid)
        except OSError:
            continue
    return pids


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def kill_marked(marker: str) -> None:
    deadline = time.monotonic() + 30
    while (pids := processes_marked(marker)) and time.monotonic() < deadline:
        signal_all(pids, signal.SIGKILL)
        time.sleep(0.1)
    assert not processes_marked(marker), "processes of the quick start outlived it"


def run_script(script: str, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run `script` in bash; past `timeout`, every Python process it left prints its threads' stacks
    (faulthandler, on SIGABRT) into the failure, so a hang says where it hangs. Whatever happens,
    nothing it started outlives it."""
    marker = f"readme-fleet-{uuid.uuid4().hex}"
    proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=cwd, env={**env, "README_FLEET": marker, "PYTHONFAULTHANDLER": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_all(pythons_marked(marker), signal.SIGABRT)
            deadline = time.monotonic() + 15
            while pythons_marked(marker) and time.monotonic() < deadline:  # each dumps its stacks, then dies
                time.sleep(0.1)
            kill_marked(marker)
            out, err = proc.communicate(timeout=30)
            pytest.fail(f"the script was still running after {timeout:.0f} s; the stacks of its Python processes:\n"
                        f"{err[-20000:]}\n--- stdout ---\n{out[-3000:]}")
    finally:
        kill_marked(marker)
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_first_job_and_fleet_quick_start_as_written(tmp_path):
    redis_port, flower_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASKFLEET_", "FLOWER_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", CUDA_VISIBLE_DEVICES="",
               HF_HUB_OFFLINE="1")

    first = run_script(sh_block("A first job"), tmp_path, env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    demo_result, run_result = [json.loads(line) for line in first.stdout.splitlines()]
    assert demo_result["sha256"] == run_result["sha256"]  # the demo's job, run again: the same bits
    assert (tmp_path / "maskfleet-demo" / "demo.png").is_file()

    fleet = sh_block("A fleet on this machine").replace("6399", str(redis_port)).replace("5555", str(flower_port))
    try:
        done = run_script(fleet, tmp_path, env, timeout=400)
    finally:
        subprocess.run(["redis-cli", "-p", str(redis_port), "shutdown", "nosave"], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr[-3000:]
    # The script's own output lines are JSON; the worker's banner and log lines share stdout with them.
    submitted, status, flower = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert submitted["sha256"] == demo_result["sha256"]  # the fleet's output: the same bits again
    assert status["state"] == "SUCCESS" and status["meta"]["sha256"] == demo_result["sha256"]
    assert flower["uuid"] == "demo" and flower["state"] == "SUCCESS"
    assert "[maskfleet] step 20/20 (mask sampler)" in done.stderr  # submit --wait's progress lines (no terminal)
