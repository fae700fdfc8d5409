"""The README and docs/ match the code: generated pages are current, links lead somewhere,
and the README's quick-start commands run as written (on a free port instead of 6399)."""
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

from maskfleet.job import fields_markdown
from redis_server import _free_port

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
QUICK_START_PORT = "6399"


def shell_block(heading: str) -> str:
    """The first ```sh block under a README heading."""
    section = README.split(f"## {heading}\n", 1)[1]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def test_docs_job_md_is_generated_from_the_job_model():
    assert (REPO / "docs" / "job.md").read_text() == fields_markdown(), \
        "docs/job.md is stale: maskfleet schema --markdown > docs/job.md"


@pytest.mark.parametrize("page", [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_lead_to_files(page):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_readme_names_only_existing_paths():
    for path in re.findall(r"`((?:docs|deploy|tests|bench|sampling|storage|tasks|worker|maskfleet)/[\w./-]*)`", README):
        assert (REPO / path).exists(), f"README names {path}, which does not exist"


def _processes_marked(marker: str) -> list[int]:
    """Every process whose environment holds the marker: the script, its workers (which lead
    their own sessions) and the daemonized redis-server."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                pids.append(int(environ.parent.name))
        except OSError:
            continue
    return [pid for pid in pids if pid != os.getpid()]


def _kill_marked(marker: str) -> None:
    deadline = time.monotonic() + 30
    while (pids := _processes_marked(marker)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    assert not _processes_marked(marker), "processes of the quick start outlived it"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_readme_quick_start_runs_as_written(tmp_path):
    first_job, fleet = shell_block("A first job"), shell_block("A fleet on this machine")
    assert QUICK_START_PORT in fleet
    demo = next(line for line in first_job.splitlines() if line.startswith("maskfleet demo"))
    script = "set -euo pipefail\n" + demo + "\n" + fleet.replace(QUICK_START_PORT, str(_free_port()))
    marker = f"quick-start-{uuid.uuid4().hex}"
    env = {name: value for name, value in os.environ.items() if not name.startswith("MASKFLEET_")}
    env |= {"QUICK_START_MARKER": marker, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    try:
        done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600, start_new_session=True)
        assert done.returncode == 0, done.stderr[-4000:]
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        demo_result, fleet_result, status = lines[0], lines[1], lines[2]
        # The fleet computes what the in-process demo computed, and status reads it back.
        assert fleet_result["sha256"] == demo_result["sha256"]
        assert status["state"] == "SUCCESS" and status["meta"]["sha256"] == demo_result["sha256"]
    finally:
        _kill_marked(marker)
