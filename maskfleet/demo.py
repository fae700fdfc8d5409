"""`maskfleet demo`: a first real job on a fresh machine, with nothing to download.

The model is small but trained: a class-conditional UNet (0.43 M parameters) that draws
handwritten digits (scikit-learn's 8x8 digits, upsampled to 16x16), trained by
`bench/digits_demo.py` and shipped in `maskfleet/demo_model/` (a bare diffusers UNet
folder plus its class tokens). It works in pixel space, one channel, no VAE: to the store
it is a bare UNet, so the job's latents are in its default latent space (pixels = latent
x 0.18215).

The job asks the base sampler for one digit and the mask sampler (mask = the right half)
for another on a 16x32 latent; `maskfleet demo` sends it through the fleet's Celery task
with an in-process broker and worker (maskfleet/embedded.py), then draws `demo.png`: the
starting noise, the mask and the result, each enlarged 8x. The files stay there to be
edited and run again; `maskfleet run` on the same job gives the same output bit for bit.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

DEMO_MODEL = "digits"
SHIPPED_MODEL = Path(__file__).resolve().parent / "demo_model"
CLASS_TOKENS = "class_tokens.safetensors"  # [11, 32]: a token per digit, row 10 the unconditional one
NO_DIGIT = 10
LEFT_DIGIT, RIGHT_DIGIT = 3, 7  # asked of the base sampler (left half) and the mask sampler (right half)
CELL = 16  # one digit's side, in latent (= picture) pixels
SEED = 1
ZOOM = 8  # demo.png shows each latent pixel as 8 x 8


def write_demo_files(folder: Path) -> Path:
    """Write everything the job needs under `folder` (the model copied from the package); return the job file."""
    folder.mkdir(parents=True, exist_ok=True)
    model_dir = folder / "models" / DEMO_MODEL
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copyfile(SHIPPED_MODEL / name, model_dir / name)
    save_file({"latent_tensor": torch.zeros(1, 1, CELL, 2 * CELL), "latent_format_version_0": torch.tensor([])},
              folder / "input.latent")
    mask = torch.zeros(CELL * ZOOM, 2 * CELL * ZOOM, dtype=torch.uint8)
    mask[:, CELL * ZOOM:] = 255  # the right half, at picture size (the node's masks are)
    Image.fromarray(mask.numpy(), mode="L").save(folder / "mask.png")
    tokens = load_file(SHIPPED_MODEL / CLASS_TOKENS)["tokens"]
    for digit in (LEFT_DIGIT, RIGHT_DIGIT, NO_DIGIT):
        save_file({"prompt_embeds": tokens[digit][None, None].contiguous()}, folder / _prompt_file(digit))

    def sampler(name: str, digit: int) -> dict:
        return {
            "model": DEMO_MODEL,
            "sampler_name": name,
            "scheduler": "karras",
            "cfg": 3.0,
            "positive": (folder / _prompt_file(digit)).resolve().as_uri(),
            "negative": (folder / _prompt_file(NO_DIGIT)).resolve().as_uri(),
        }

    job = {
        "job_id": "demo",
        "seed": SEED,
        "steps": 20,
        "denoise": 1.0,
        "overlap_factor": 4,
        "latent": (folder / "input.latent").resolve().as_uri(),
        "mask": (folder / "mask.png").resolve().as_uri(),
        "base_sampler": sampler("euler", LEFT_DIGIT),
        "mask_sampler": sampler("dpmpp_2m", RIGHT_DIGIT),
        "output": (folder / "output.latent").resolve().as_uri(),
    }
    job_path = folder / "job.json"
    job_path.write_text(json.dumps(job, indent=2) + "\n")
    return job_path


def _prompt_file(digit: int) -> str:
    return "no_digit.safetensors" if digit == NO_DIGIT else f"digit_{digit}.safetensors"


def output_pixels(latent: torch.Tensor) -> torch.Tensor:
    """The demo model's output latent [1, 1, H, W] as its picture in [-1, 1] (the store's default latent scale undone)."""
    from .sampling.unet_denoiser import SD15_LATENT_SCALE

    return (latent.float() * SD15_LATENT_SCALE).clamp(-1, 1)


def write_demo_picture(folder: Path) -> Path:
    """`demo.png` beside the job: the starting noise (the seed's), the mask, and the result, each 8x, labelled."""
    from .sampling.noise_sources import JobRandomness

    job = json.loads((folder / "job.json").read_text())
    result = output_pixels(load_file(folder / "output.latent")["latent_tensor"])[0, 0]
    noise = JobRandomness(job["seed"]).start_noise(result.shape).clamp(-3, 3) / 3
    mask = torch.from_numpy(np.array(Image.open(folder / "mask.png").convert("L"))).float() / 127.5 - 1
    panels = [("starting noise (seed %d)" % job["seed"], noise), ("mask: the mask sampler's half", mask),
              (f"result: {LEFT_DIGIT} (base) | {RIGHT_DIGIT} (mask)", result)]
    pad, head = 12, 20
    width, height = 2 * CELL * ZOOM, CELL * ZOOM
    picture = Image.new("L", (pad + len(panels) * (width + pad), head + height + pad), 255)
    draw = ImageDraw.Draw(picture)
    for i, (label, values) in enumerate(panels):
        x = pad + i * (width + pad)
        gray = ((values + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        picture.paste(Image.fromarray(gray, mode="L").resize((width, height), Image.NEAREST), (x, head))
        draw.rectangle((x - 1, head - 1, x + width, head + height), outline=0)
        draw.text((x, 4), label, fill=0)
    path = folder / "demo.png"
    picture.save(path, optimize=True)
    return path
