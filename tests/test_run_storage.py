"""`maskfleet run` against real storage: every input, output and the model store on S3; prompts as text."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load, save_file

from golden_jobs import IN_REPO_GOLDEN, TINY_UNET, write_case_job
from maskfleet.cli import main
from test_prompt_encoder import direct_encoding, make_model_dir

CASE = IN_REPO_GOLDEN / "cases" / "c04_dpmpp2m_karras_o5"


def upload_tree(client, bucket, local_dir, prefix):
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local_dir)}")


def test_run_with_every_uri_and_the_model_store_on_s3(s3_server, tmp_path):
    client, bucket = s3_server.client, s3_server.make_bucket()
    job_path, case, tensors = write_case_job(CASE, tmp_path / "local")
    job = json.loads(job_path.read_text())
    for field in ("latent", "mask"):
        name = job[field].rsplit("/", 1)[1]
        client.upload_file(job[field].removeprefix("file://"), bucket, f"in/{name}")
        job[field] = f"s3://{bucket}/in/{name}"
    for field in ("base_sampler", "mask_sampler"):
        for kind in ("positive", "negative"):
            name = job[field][kind].rsplit("/", 1)[1]
            client.upload_file(job[field][kind].removeprefix("file://"), bucket, f"cond/{name}")
            job[field][kind] = f"s3://{bucket}/cond/{name}"
    upload_tree(client, bucket, TINY_UNET, "models/tiny")
    job["output"] = f"s3://{bucket}/out/result.latent"
    job["preview"] = f"s3://{bucket}/out/result.png"
    job_path.write_text(json.dumps(job))

    env = {**os.environ, "MASKFLEET_MODEL_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "maskfleet.cli", "run", str(job_path), "--models", f"s3://{bucket}/models", "--device", "cpu", "--quiet"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)

    obj = client.get_object(Bucket=bucket, Key="out/result.latent")
    assert obj["Metadata"]["sha256"] == result["sha256"]
    out = load(obj["Body"].read())["latent_tensor"]
    ref = tensors["out_intended"]
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-4
    preview = client.get_object(Bucket=bucket, Key="out/result.png")
    assert preview["Body"].read()[:4] == b"\x89PNG" and "sha256" in preview["Metadata"]
    assert (tmp_path / "cache").is_dir()  # the model came through the local cache


def test_failed_output_write_leaves_nothing(s3_server, tmp_path, capsys):
    bucket = s3_server.make_bucket()
    job_path, _, _ = write_case_job(CASE, tmp_path / "local")
    job = json.loads(job_path.read_text())
    job["preview"] = f"s3://{bucket}/out/result.png"
    job["output"] = "s3://no-such-bucket-maskfleet/out/result.latent"
    job_path.write_text(json.dumps(job))
    shutil.copytree(TINY_UNET, tmp_path / "models" / "tiny")
    code = main(["run", str(job_path), "--models", str(tmp_path / "models"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "output" in err
    assert s3_server.client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0  # preview taken back


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("textmodels"))


def test_prompts_as_text_equal_the_same_prompts_as_embedding_files(text_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    job_path, _, _ = write_case_job(CASE, tmp_path / "local")
    job = json.loads(job_path.read_text())
    prompts = {"base_sampler": ("a red house", ""), "mask_sampler": ("a cat", "blurry")}
    text_job = json.loads(json.dumps(job))
    for field, (pos, neg) in prompts.items():
        text_job[field]["positive"] = {"prompt": pos}
        text_job[field]["negative"] = {"prompt": neg}
        for kind, text in (("positive", pos), ("negative", neg)):
            path = tmp_path / f"{field}_{kind}.safetensors"
            save_file({"prompt_embeds": direct_encoding(text_model, text).contiguous()}, path)
            job[field][kind] = path.as_uri()
    text_job["output"] = (tmp_path / "from_text.latent").as_uri()
    job["output"] = (tmp_path / "from_files.latent").as_uri()
    models = str(text_model.parent)
    for name, doc in (("text.json", text_job), ("files.json", job)):
        (tmp_path / name).write_text(json.dumps(doc))
        assert main(["run", str(tmp_path / name), "--models", models, "--device", "cpu", "--quiet"]) == 0, capsys.readouterr().err
    from_text = load((tmp_path / "from_text.latent").read_bytes())["latent_tensor"]
    from_files = load((tmp_path / "from_files.latent").read_bytes())["latent_tensor"]
    assert torch.isfinite(from_text).all()
    assert torch.equal(from_text, from_files)


def test_prompt_on_a_model_without_text_encoder_names_the_field(tmp_path, capsys):
    job_path, _, _ = write_case_job(CASE, tmp_path / "local")
    job = json.loads(job_path.read_text())
    job["mask_sampler"]["negative"] = {"prompt": "blurry"}
    job_path.write_text(json.dumps(job))
    shutil.copytree(TINY_UNET, tmp_path / "models" / "tiny")
    code = main(["run", str(job_path), "--models", str(tmp_path / "models"), "--device", "cpu", "--quiet"])
    assert code == 2
    assert "mask_sampler.negative" in capsys.readouterr().err
    assert not (tmp_path / "local" / "out.latent").exists()
