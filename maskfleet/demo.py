"""`maskfleet demo`: a first real job on a fresh machine, with nothing to download.

Writes a tiny UNet with seeded random weights (diffusers format), a latent, a PNG mask,
four conditioning files and a job JSON into a folder; `maskfleet demo` then sends the job
through the fleet's Celery task with an in-process broker and worker (maskfleet/embedded.py),
which gives the same output as `maskfleet run` on the same job. The files stay there to be
edited and run again.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

DEMO_MODEL = "tiny-demo"
TOKENS, WIDTH = 77, 32


def make_tiny_unet(directory: Path, seed: int = 0) -> None:
    """Save a small SD1.5-shaped UNet with random weights; same seed, same weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    unet.save_pretrained(directory, safe_serialization=True)


def write_demo_files(folder: Path, size: int = 32) -> Path:
    """Write everything a job needs under `folder`; return the job file's path."""
    folder.mkdir(parents=True, exist_ok=True)
    model_dir = folder / "models" / DEMO_MODEL
    if not (model_dir / "config.json").is_file():
        make_tiny_unet(model_dir)
    gen = torch.Generator().manual_seed(1234)
    save_file({"latent_tensor": torch.randn(1, 4, size, size, generator=gen), "latent_format_version_0": torch.tensor([])}, folder / "input.latent")
    yy, xx = torch.meshgrid(torch.arange(size * 8), torch.arange(size * 8), indexing="ij")
    circle = ((yy - size * 4) ** 2 + (xx - size * 4) ** 2) < (size * 2.4) ** 2
    Image.fromarray((circle.numpy() * 255).astype("uint8"), mode="L").save(folder / "mask.png")
    for name in ("base_positive", "base_negative", "mask_positive", "mask_negative"):
        save_file({"prompt_embeds": torch.randn(1, TOKENS, WIDTH, generator=gen)}, folder / f"{name}.safetensors")

    def sampler(prefix: str, name: str, scheduler: str, cfg: float) -> dict:
        return {
            "model": DEMO_MODEL,
            "sampler_name": name,
            "scheduler": scheduler,
            "cfg": cfg,
            "positive": (folder / f"{prefix}_positive.safetensors").resolve().as_uri(),
            "negative": (folder / f"{prefix}_negative.safetensors").resolve().as_uri(),
        }

    job = {
        "job_id": "demo",
        "seed": 42,
        "steps": 10,
        "denoise": 1.0,
        "overlap_factor": 3,
        "latent": (folder / "input.latent").resolve().as_uri(),
        "mask": (folder / "mask.png").resolve().as_uri(),
        "base_sampler": sampler("base", "euler", "normal", 7.0),
        "mask_sampler": sampler("mask", "dpmpp_2m", "karras", 4.0),
        "output": (folder / "output.latent").resolve().as_uri(),
        "preview": (folder / "output.png").resolve().as_uri(),
    }
    job_path = folder / "job.json"
    job_path.write_text(json.dumps(job, indent=2) + "\n")
    return job_path
