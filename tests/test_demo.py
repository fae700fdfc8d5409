"""`maskfleet demo`: a whole job through the Celery task path with no Redis and no S3 running,
on the trained digits model it ships: the picture shows the two digits asked for."""
from __future__ import annotations

import importlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from maskfleet.cli import main
from maskfleet.demo import CELL, LEFT_DIGIT, RIGHT_DIGIT, output_pixels, write_demo_files, write_demo_picture
from maskfleet.embedded import MemoryKeys

BENCH = Path(__file__).resolve().parent.parent / "bench"

# Runs `maskfleet demo` like the console script, then says which Python threads are still alive.
DEMO_THEN_THREADS = (
    "import json, sys, threading\n"
    "from maskfleet.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "alive = [(t.name, t.daemon) for t in threading.enumerate() if t is not threading.main_thread()]\n"
    "print('THREADS ' + json.dumps(alive), file=sys.stderr)\n"
    # Would a metrics server answer on the port the environment names? (The demo must open none.)
    "import os, socket\n"
    "probe = socket.socket()\n"
    "served = probe.connect_ex(('127.0.0.1', int(os.environ['MASKFLEET_METRICS_PORT']))) == 0\n"
    "probe.close()\n"
    "print('METRICS ' + json.dumps(served), file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def test_demo_runs_through_celery_in_process_and_matches_maskfleet_run(tmp_path, capsys):
    folder = tmp_path / "demo"
    env = dict(os.environ)
    # Nothing listens on port 1: a demo that reached for these would fail or hang.
    env["MASKFLEET_BROKER_URL"] = env["MASKFLEET_RESULT_BACKEND"] = "redis://127.0.0.1:1/0"
    env.pop("MASKFLEET_MODELS", None)
    with socket.socket() as s:  # a free port the demo is told about, and must not open
        s.bind(("127.0.0.1", 0))
        env["MASKFLEET_METRICS_PORT"] = str(s.getsockname()[1])
    started = time.monotonic()
    demo = subprocess.run(
        [sys.executable, "-c", DEMO_THEN_THREADS, "demo", "--dir", str(folder), "--device", "cpu"],
        capture_output=True, text=True, timeout=240, env=env,
    )
    seconds = time.monotonic() - started
    assert demo.returncode == 0, demo.stderr
    err = demo.stderr

    # Progress from the task's PROGRESS state, read back through the result backend.
    steps = re.findall(r"^\[maskfleet\] step (\d+)/20 \((base|mask) sampler\)$", err, re.M)  # the job's 20 steps
    assert steps, err
    assert [int(s) for s, _ in steps] == sorted(int(s) for s, _ in steps)
    assert steps[-1] == ("20", "mask")  # the end, whatever the last poll saw
    assert "in-process Celery worker" in err

    result = json.loads(demo.stdout)
    output, picture = folder / "output.latent", folder / "demo.png"
    assert result["output"] == output.resolve().as_uri() and output.is_file()
    assert f"output latent: {output.resolve()}" in err and f"picture:       {picture.resolve()}" in err
    with Image.open(picture) as shown:  # three panels of 256 x 128 (16 x 32 latent pixels, 8x)
        assert shown.width > 3 * 256 and shown.height > 128

    # The worker thread was stopped and joined; nothing left that keeps the process alive.
    alive = json.loads(err.split("THREADS ", 1)[1].splitlines()[0])
    assert not [name for name, daemon in alive if not daemon], alive
    assert "maskfleet-embedded-worker" not in [name for name, _ in alive]
    assert err.split("METRICS ", 1)[1].splitlines()[0] == "false", "the demo served metrics"
    assert seconds < 200

    # The same job run by `maskfleet run` in this process gives bitwise the same latent.
    from_celery = load_file(output)["latent_tensor"]
    output.unlink()
    code = main(["run", str(folder / "job.json"), "--models", str(folder / "models"), "--device", "cpu", "--quiet"])
    local = json.loads(capsys.readouterr().out)
    assert code == 0
    assert local["sha256"] == result["sha256"]
    assert from_celery.numpy().tobytes() == load_file(output)["latent_tensor"].numpy().tobytes()


def test_memory_keys_behave_like_the_redis_calls_tasks_use():
    keys = MemoryKeys()
    assert keys.set("a", "1", nx=True, ex=60) is True
    assert keys.set("a", "2", nx=True, ex=60) is None  # a second claim of a job id fails
    assert keys.get("a") == b"1" and keys.exists("a") == 1 and keys.exists("b") == 0
    assert keys.set("a", json.dumps({"x": 1})) is True and json.loads(keys.get("a")) == {"x": 1}
    keys.set("short", "1", ex=0)
    assert keys.get("short") is None and keys.exists("short") == 0
    assert keys.delete("a", "b") == 1 and keys.get("a") is None


def test_the_demo_draws_the_two_digits_it_asks_for(tmp_path):
    """The classifier of bench/digits_demo.py (a logistic regression on the 8x8 digits) reads the
    base sampler's digit on the left half and the mask sampler's on the right."""
    pytest.importorskip("sklearn", reason="scikit-learn (the test extra) reads the digits")
    sys.path.insert(0, str(BENCH))
    try:
        digits_demo = importlib.import_module("digits_demo")
    finally:
        sys.path.remove(str(BENCH))
    job_path = write_demo_files(tmp_path)
    assert main(["run", str(job_path), "--models", str(tmp_path / "models"), "--device", "cpu", "--quiet"]) == 0
    pixels = output_pixels(load_file(tmp_path / "output.latent")["latent_tensor"])
    train_x, train_y, test_x, test_y = digits_demo.load_split(seed=0)
    classifier, accuracy = digits_demo.train_classifier(train_x, train_y, test_x, test_y)
    assert accuracy > 0.9
    halves = torch.cat([pixels[..., :CELL], pixels[..., CELL:]])
    read = classifier.predict(digits_demo.classifier_features(halves)).tolist()
    assert read == [LEFT_DIGIT, RIGHT_DIGIT], read
    assert classifier.predict_proba(digits_demo.classifier_features(halves)).max(axis=1).min() > 0.9  # clearly
    assert write_demo_picture(tmp_path) == tmp_path / "demo.png"
