"""Turn a golden case (tensors + case.json) into job files that `maskfleet run` takes."""
from __future__ import annotations

import json
import os
import shutil
import time
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


def golden_models() -> dict[str, Path]:
    """The golden model folders by model name: `tiny` (tiny_unet), then each other tiny_unet_* by its
    folder name, from the repo and from $MASKFLEET_GOLDEN_DIR."""
    roots = [IN_REPO_GOLDEN] + ([Path(os.environ["MASKFLEET_GOLDEN_DIR"])] if os.environ.get("MASKFLEET_GOLDEN_DIR") else [])
    found: dict[str, Path] = {}
    for root in roots:
        for folder in sorted(root.glob("tiny_unet*")):
            found.setdefault(case_model_name(folder.name), folder)
    return found


def case_model_name(folder: str) -> str:
    """The model name a golden model folder gets in the store (`tiny_unet` is `tiny`, as it always was)."""
    folder = Path(folder).name
    return "tiny" if folder == "tiny_unet" else folder


def make_models_dir(root: Path, every_golden_model: bool = False) -> Path:
    """A model store holding the tiny golden UNet under the name `tiny`; with `every_golden_model`, also
    the others (v-prediction, SDXL-style) under their folder names."""
    models = root / "models"
    models.mkdir(exist_ok=True)
    for name, folder in golden_models().items():
        if (name == "tiny" or every_golden_model) and not (models / name).exists():
            shutil.copytree(folder, models / name)  # a symlink would point outside the store
    return models


def write_case_job(case_dir: Path, work: Path, mode: str = "comfy") -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """Write the case's inputs as files plus a job JSON in `mode`; return (job path, case, tensors)."""
    case = json.loads((case_dir / "case.json").read_text())
    t = load_file(case_dir / "data.safetensors")
    work.mkdir(parents=True, exist_ok=True)
    save_file({"latent_tensor": t["latent_in"].contiguous(), "latent_format_version_0": torch.tensor([])}, work / "in.latent")
    save_file({"mask": t["mask"].contiguous()}, work / "mask.safetensors")
    for key in ("pos_base", "neg_base", "pos_mask", "neg_mask"):
        tensors = {"prompt_embeds": t[key].contiguous()}
        if f"pooled_{key}" in t:  # SDXL-style cases
            tensors["pooled_prompt_embeds"] = t[f"pooled_{key}"].contiguous()
        save_file(tensors, work / f"{key}.safetensors")
    model = case_model_name(case.get("model", {}).get("diffusers_dir", "tiny_unet"))

    def sampler(which: str, suffix: str) -> dict:
        spec = case[which]
        return {
            "model": model,
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
    if mode != "comfy":  # the default, left out as producers leave it out
        job["mode"] = mode
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


def fleet_job(case_dir: Path, root: Path, name: str, **changes) -> dict:
    """The case's job, its files under root/name, with a job_id of its own (`name`-<ns>) and `changes` applied."""
    job_path, _, _ = write_case_job(case_dir, root / name)
    job = json.loads(job_path.read_text())
    job["job_id"] = f"{name}-{time.time_ns()}"
    job.update(changes)
    return job
