"""The README's first job and fleet quick-start, run as written (bash, in a fresh folder).

Only the ports change (Redis 6399 and Flower 5555 become free ones, so a run never meets
another's); everything else is the README's text: the demo, `maskfleet run`, a Redis of
its own, Flower, a CPU worker, `submit --wait`, `status`, Flower's API by curl, and the
shutdown. Whatever happens, the test then stops that Redis and every process the script
left.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
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


def run_script(script: str, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the script started in the background
        except ProcessLookupError:
            pass
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
