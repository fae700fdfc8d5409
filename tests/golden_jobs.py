"""Turn a golden case (tensors + case.json) into job files that `maskfleet run` takes."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
IN_REPO_GOLDEN = REPO / "tests" / "data" / "golden"
TINY_UNET = IN_REPO_GOLDEN / "tiny_unet"


def golden_case_dirs() -> list[Path]:
    """The cases kept in the repo plus any under $MASKFLEET_GOLDEN_DIR/cases (held-out sets)."""
    dirs = sorted((IN_REPO_GOLDEN / "cases").iterdir())
    extra = os.environ.get("MASKFLEET_GOLDEN_DIR")
    if extra:
        known = {d.name for d in dirs}
        dirs += sorted(d for d in (Path(extra) / "cases").iterdir() if d.name not in known and (d / "case.json").is_file())
    return dirs


def make_models_dir(root: Path) -> Path:
    """A model store holding the tiny golden UNet under the name `tiny`."""
    models = root / "models"
    models.mkdir(exist_ok=True)
    if not (models / "tiny").exists():
        shutil.copytree(TINY_UNET, models / "tiny")  # a symlink would point outside the store
    return models


def write_case_job(case_dir: Path, work: Path) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """Write the case's inputs as files plus a job JSON; return (job path, case, tensors)."""
    case = json.loads((case_dir / "case.json").read_text())
    t = load_file(case_dir / "data.safetensors")
    work.mkdir(parents=True, exist_ok=True)
    save_file({"latent_tensor": t["latent_in"].contiguous(), "latent_format_version_0": torch.tensor([])}, work / "in.latent")
    save_file({"mask": t["mask"].contiguous()}, work / "mask.safetensors")
    for key in ("pos_base", "neg_base", "pos_mask", "neg_mask"):
        save_file({"prompt_embeds": t[key].contiguous()}, work / f"{key}.safetensors")

    def sampler(which: str, suffix: str) -> dict:
        spec = case[which]
        return {
            "model": "tiny",
            "sampler_name": spec["sampler_name"],
            "scheduler": spec["scheduler"],
            "cfg": spec["cfg"],
            "positive": (work / f"pos_{suffix}.safetensors").as_uri(),
            "negative": (work / f"neg_{suffix}.safetensors").as_uri(),
        }

    job = {
        "job_id": case["id"],
        "seed": case["seed"],
        "steps": case["steps"],
        "denoise": case["denoise"],
        "overlap_factor": case["overlap_factor"],
        "latent": (work / "in.latent").as_uri(),
        "mask": (work / "mask.safetensors").as_uri(),
        "base_sampler": sampler("base_sampler", "base"),
        "mask_sampler": sampler("mask_sampler", "mask"),
        "output": (work / "out.latent").as_uri(),
    }
    job_path = work / "job.json"
    job_path.write_text(json.dumps(job, indent=1))
    return job_path, case, t


def upload_case_inputs(client, bucket: str, work: Path, case: Path) -> dict:
    """The golden case's inputs under s3://bucket/in/; the job document naming them."""
    job_path, _, _ = write_case_job(case, work)
    job = json.loads(job_path.read_text())

    def upload(uri: str) -> str:
        name = uri.rsplit("/", 1)[1]
        client.upload_file(uri.removeprefix("file://"), bucket, f"in/{name}")
        return f"s3://{bucket}/in/{name}"

    job["latent"], job["mask"] = upload(job["latent"]), upload(job["mask"])
    for field in ("base_sampler", "mask_sampler"):
        for kind in ("positive", "negative"):
            job[field][kind] = upload(job[field][kind])
    return job
