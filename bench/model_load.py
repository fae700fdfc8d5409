"""Loading a model from a single-file checkpoint vs from a diffusers folder: time, peak memory, first job.

The same UNet (the real SD1.5 or SDXL base architecture, seeded random weights; `tiny`:
the golden SD1.5-style test UNet) saved both ways: a diffusers folder (config.json +
safetensors) and a ComfyUI checkpoint (LDM key names under `model.diffusion_model.`).
Each load runs in a fresh process (the page cache warm after a first read of both
files, so disk speed is out of the figure): seconds from start to a ready denoiser, the
process's peak RSS, and the seconds of a first 1-step job on a 1x4x16x16 latent (SDXL:
with pooled embeddings). Printed per layout, with the single-file / folder ratios,
medians of --repeats runs. The single file should cost no more than 1.2x the folder.

    python bench/model_load.py [--family tiny|sd15|sdxl] [--dtype float16|float32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

SD15 = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SDXL = dict(block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
            transformer_layers_per_block=[1, 2, 10], use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])

# Run in a fresh process: load, then one 1-step job; prints JSON.
CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import torch
from maskfleet.model_dirs import load_unet_denoiser
from maskfleet.sampling import AdvancedSampler, sample_two_samplers
from maskfleet.sampling.sdxl_conditioning import default_size_ids, pack
path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
den = load_unet_denoiser(path, "cpu", dtype)
loaded = time.perf_counter()
width = den.unet.config.cross_attention_dim
cond = torch.randn(1, 77, width, generator=torch.Generator().manual_seed(0))
if den.pooled_width:
    cond = pack(cond, torch.randn(1, den.pooled_width), default_size_ids(16, 16))
sampler = AdvancedSampler(den, 5.0, "euler", "normal", cond, cond)
mask = torch.zeros(1, 128, 128); mask[:, 32:96, 32:96] = 1
sample_two_samplers(torch.randn(1, 4, 16, 16), mask, sampler, sampler, seed=0, steps=1, overlap_factor=2)
done = time.perf_counter()
print(json.dumps({"load": loaded - t0, "job": done - loaded, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def build(family: str, dtype: str, work: Path) -> tuple[Path, Path]:
    """The folder and the checkpoint of the same UNet."""
    import torch
    from diffusers import UNet2DConditionModel

    from golden_jobs import TINY_UNET
    from ldm_checkpoints import write_checkpoint

    folder = work / "folder"
    if family == "tiny":
        unet = UNet2DConditionModel.from_pretrained(TINY_UNET)
    else:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**(SD15 if family == "sd15" else SDXL))
    unet.to(getattr(torch, dtype)).save_pretrained(folder)
    checkpoint = write_checkpoint(folder, work / f"{family}.safetensors")
    return folder, checkpoint


def measure(path: Path, dtype: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["tiny", "sd15", "sdxl"], default="tiny")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, checkpoint = build(args.family, args.dtype, Path(tmp))
        sizes = {"folder": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()), "file": checkpoint.stat().st_size}
        for path in (folder, checkpoint):  # warm the page cache: the figures are about our work, not the disk
            for f in ([path] if path.is_file() else path.rglob("*")):
                if f.is_file():
                    f.read_bytes()
        runs = {"folder": [], "file": []}
        for _ in range(args.repeats):  # interleaved, so a busy moment hits both
            runs["folder"].append(measure(folder, args.dtype))
            runs["file"].append(measure(checkpoint, args.dtype))
    med = {layout: {k: statistics.median(r[k] for r in rs) for k in ("load", "job", "rss_mb")} for layout, rs in runs.items()}
    print(f"model_load: {args.family} UNet, {args.dtype}, {args.repeats} fresh processes per layout; {cpu_model()}")
    for layout in ("folder", "file"):
        m = med[layout]
        print(f"  {layout:6s} {sizes[layout] / 2**20:9.1f} MiB on disk   load {m['load']:7.2f} s   "
              f"peak RSS {m['rss_mb']:8.0f} MiB   first 1-step job {m['job']:6.2f} s")
    f, d = med["file"], med["folder"]
    print(f"  single file / folder: load {f['load'] / d['load']:.2f}x, peak RSS {f['rss_mb'] / d['rss_mb']:.2f}x, "
          f"first job {f['job'] / d['job']:.2f}x")


if __name__ == "__main__":
    main()
