"""A producer never imports the engine: the client and the producer commands run without torch.

`pip install maskfleet` installs pydantic and celery[redis] only (the worker's libraries are
the `worker` extra), so `import maskfleet.client` and `maskfleet submit/status/cancel/schema`
must not import torch, diffusers, transformers or the storage back ends. Checked in a fresh
interpreter, against the run's own Redis.
"""
from __future__ import annotations

import json
import subprocess
import sys

from fleet_workers import claim_db_url, flush, require_redis

HEAVY = ("torch", "diffusers", "transformers", "boto3", "numpy", "PIL", "safetensors")

PRODUCER = r"""
import contextlib, io, json, sys
from maskfleet.cli import main
import maskfleet.client

job_path, broker = sys.argv[1], sys.argv[2]
codes = {}
with contextlib.redirect_stdout(io.StringIO()):
    codes["schema"] = main(["schema"])
    codes["submit"] = main(["submit", job_path, "--broker", broker, "--queue", "maskfleet.test.nobody-consumes"])
    codes["status"] = main(["status", "producer-no-torch"])
    codes["cancel"] = main(["cancel", "producer-no-torch"])
print(json.dumps({"codes": codes, "loaded": sorted(set(sys.argv[3:]) & set(sys.modules))}))
"""


def test_the_client_and_producer_commands_import_no_engine(tmp_path, monkeypatch):
    require_redis()
    url = claim_db_url()
    job = {"job_id": "producer-no-torch", "latent": "s3://bucket/in.latent", "mask": "s3://bucket/mask.png",
           "output": "s3://bucket/out.latent",
           **{field: {"model": "sd15", "sampler_name": "euler", "scheduler": "normal",
                      "positive": "s3://bucket/p.safetensors", "negative": "s3://bucket/n.safetensors"}
              for field in ("base_sampler", "mask_sampler")}}
    (tmp_path / "job.json").write_text(json.dumps(job))
    monkeypatch.setenv("MASKFLEET_BROKER_URL", url)
    try:
        proc = subprocess.run([sys.executable, "-c", PRODUCER, str(tmp_path / "job.json"), url, *HEAVY],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["codes"] == {"schema": 0, "submit": 0, "status": 0, "cancel": 0}, (out, proc.stderr)
        assert out["loaded"] == [], f"a producer imported {out['loaded']}"
    finally:
        flush(url)
