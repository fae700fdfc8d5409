"""`maskfleet run`, `demo` and `schema` as a user meets them: results, clear errors, nothing half-written."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from golden_jobs import IN_REPO_GOLDEN, make_models_dir, write_case_job
from maskfleet.cli import main

CASE = IN_REPO_GOLDEN / "cases" / "c03_euler_normal_s6_o0"


@pytest.fixture
def job(tmp_path):
    """A valid job (golden case c03) as (dict, path, models dir); tests break one thing each."""
    job_path, _, _ = write_case_job(CASE, tmp_path / "job")
    return json.loads(job_path.read_text()), job_path, make_models_dir(tmp_path)


def run_cli(job_dict, job_path, models, capsys):
    job_path.write_text(json.dumps(job_dict))
    code = main(["run", str(job_path), "--models", str(models), "--device", "cpu", "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def output_path(job_dict):
    return job_dict["output"].removeprefix("file://")


def test_run_prints_result_and_writes_a_comfyui_latent(job, capsys):
    job_dict, job_path, models = job
    code, out, err = run_cli(job_dict, job_path, models, capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["output"] == job_dict["output"] and result["shape"] == [1, 4, 32, 32]
    tensors = load_file(output_path(job_dict))
    assert set(tensors) == {"latent_tensor", "latent_format_version_0"}  # what ComfyUI's LoadLatent reads unscaled


def test_run_takes_several_jobs_and_reports_a_bad_one_by_file(job, tmp_path, capsys):
    job_dict, job_path, models = job
    second = {**job_dict, "job_id": "second", "output": (tmp_path / "second.latent").as_uri()}
    second_path = tmp_path / "second.json"
    second_path.write_text(json.dumps(second))
    bad_path = tmp_path / "bad.json"
    bad_path.write_text(json.dumps({**job_dict, "steps": 0}))
    code = main(["run", str(job_path), str(bad_path), str(second_path), "--models", str(models), "--device", "cpu", "--quiet"])
    captured = capsys.readouterr()
    assert code == 2
    results = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["job_id"] for r in results] == [job_dict["job_id"], "second"]
    assert results[0]["sha256"] == results[1]["sha256"]  # the same job twice: the same bits
    assert f"invalid job {bad_path}: steps" in captured.err


def _set(d, dotted, value):
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d[k]
    if value is _DELETE:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value


_DELETE = object()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, "steps"),
        ("denoise", 0, "denoise"),
        ("seed", 2**64, "seed"),
        ("overlap_factor", -2, "overlap_factor"),
        ("base_sampler.sampler_name", "euler_x", "base_sampler.sampler_name"),
        ("mask_sampler.scheduler", "cosine", "mask_sampler.scheduler"),
        ("mask_sampler.cfg", "high", "mask_sampler.cfg"),
        ("bogus", 1, "bogus: Extra inputs are not permitted"),
        ("latent", _DELETE, "latent: required"),
        ("base_sampler.model", "../tiny", "base_sampler.model"),
        ("base_sampler.model", "missing", "base_sampler.model"),
        ("mask", "file:///nonexistent/mask.png", "mask"),
        ("latent", "s3://Bad_Bucket!/x.latent", "latent"),
        ("output", "file:///tmp/out.png", "output"),
        ("mode", "fast", "mode"),
    ],
)
def test_bad_job_exits_2_names_the_field_and_writes_nothing(job, capsys, field, value, message):
    job_dict, job_path, models = job
    _set(job_dict, field, value)
    code, out, err = run_cli(job_dict, job_path, models, capsys)
    assert code == 2
    assert message in err
    assert out == ""
    assert not (job_path.parent / "out.latent").exists()


def test_nan_in_latent_is_refused(job, capsys):
    job_dict, job_path, models = job
    bad = job_path.parent / "nan.latent"
    save_file({"latent_tensor": torch.full((1, 4, 32, 32), float("nan")), "latent_format_version_0": torch.tensor([])}, bad)
    job_dict["latent"] = bad.as_uri()
    code, _, err = run_cli(job_dict, job_path, models, capsys)
    assert code == 2 and "latent" in err and "NaN" in err
    assert not (job_path.parent / "out.latent").exists()


def test_output_may_not_overwrite_an_input(job, capsys):
    job_dict, job_path, models = job
    job_dict["output"] = job_dict["latent"]
    before = (job_path.parent / "in.latent").read_bytes()
    code, _, err = run_cli(job_dict, job_path, models, capsys)
    assert code == 2 and "output" in err
    assert (job_path.parent / "in.latent").read_bytes() == before


def test_safetensors_output_and_png_preview(job, capsys):
    job_dict, job_path, models = job
    job_dict["output"] = (job_path.parent / "out.safetensors").as_uri()
    job_dict["preview"] = (job_path.parent / "out.png").as_uri()
    code, _, err = run_cli(job_dict, job_path, models, capsys)
    assert code == 0, err
    assert list(load_file(job_path.parent / "out.safetensors")) == ["latent"]
    assert (job_path.parent / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_schema_lists_every_job_field(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"seed", "steps", "denoise", "overlap_factor", "latent", "mask", "base_sampler", "mask_sampler", "output"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False
