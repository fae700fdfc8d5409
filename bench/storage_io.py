"""What storage costs a job, next to sampling: S3 I/O per job, and model cold load vs cache hit.

A worker reads every input from and writes its output to an S3-compatible store, and
finds models by name in an S3 model store, so two questions matter:

1. Is a job's I/O small next to its sampling? I/O is what the job's storage part does:
   read_latent, read_mask and read_conditioning x4 through s3:// URIs (HEAD + GET each,
   decoded and checked), plus write_object of the output encoded as .latent (one PUT
   with its sha256). Sampling is sample_two_samplers with the tiny golden UNet (euler,
   --steps steps, base cfg 7, mask cfg 4, overlap 10) on the same inputs. io / sampling
   is the share storage adds; the real models are far slower than the tiny one, so with
   them the share only shrinks. At S=128 even the tiny UNet attends over 128*128 tokens,
   so one sampling run takes minutes on a CPU: it is timed --sampling-repeats times
   (default 1, after a 1-step warm-up), against milliseconds of timer noise.
2. What does the model LRU save? cold = a fresh cache dir: ModelStore(...).local_dir
   (list, download, verify, rename into place) + load_unet_denoiser; warm-disk = a new
   ModelStore on the filled cache (a new worker process on the same host) + load; hit =
   LoadedModels.get of a model already loaded (consecutive jobs on one worker).

The store is moto's standalone server on loopback (tests/s3_server.py, as in the tests),
reached only through boto3 with AWS_ENDPOINT_URL, so the figures include real HTTP
round trips but no network latency: a remote store adds its round trips on top. Inputs:
a 1x4xSxS .latent, an 8S x 8S PNG mask, four [1, 77, 32] conditioning files. The other
figures are the median of --repeats runs after one warm-up, on the CPU.

    python bench/storage_io.py [--size 128] [--steps 20] [--repeats 5] [--sampling-repeats 1]
"""
from __future__ import annotations

import argparse
import io
import itertools
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from safetensors.torch import save

from maskfleet.model_cache import LoadedModels
from maskfleet.sampling import AdvancedSampler, sample_two_samplers
from maskfleet.model_dirs import load_unet_denoiser
from maskfleet.storage import (
    encode_latent, read_conditioning, read_latent, read_mask, read_object, reset_s3_client,
    write_object)
from maskfleet.storage.model_store import ModelStore

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from s3_server import S3Server  # the tests' moto server, not a copy
from machine import cpu_model  # bench/machine.py (scripts run with bench/ on sys.path)

TINY_UNET = REPO / "tests" / "data" / "golden" / "tiny_unet"
MODEL = "tiny"
COND_NAMES = ("base_pos", "base_neg", "mask_pos", "mask_neg")
# Anything from the developer's own AWS setup that could point boto3 elsewhere.
FOREIGN_AWS_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN",
                   "AWS_SECURITY_TOKEN", "AWS_DEFAULT_PROFILE")




def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_of(fn, repeats: int) -> tuple[float, list[float]]:
    runs = [timed(fn) for _ in range(repeats)]
    return statistics.median(runs), runs


def shown(runs: list[float]) -> str:
    return ", ".join(f"{s:.4f}" for s in runs)


def mask_png(size: int) -> bytes:
    """A white disc over ~30% of a size x size grayscale PNG (1 = resample)."""
    yy, xx = np.mgrid[:size, :size]
    centre, radius = (size - 1) / 2, math.sqrt(0.3 * size**2 / math.pi)
    disc = ((yy - centre) ** 2 + (xx - centre) ** 2 <= radius**2).astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(disc, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def upload_inputs(bucket: str, size: int) -> dict[str, str]:
    """Put the job's inputs and the tiny model in ``bucket``; return their URIs."""
    g = torch.Generator().manual_seed(1)
    uris = {"latent": f"s3://{bucket}/in/input.latent", "mask": f"s3://{bucket}/in/mask.png",
            **{name: f"s3://{bucket}/cond/{name}.safetensors" for name in COND_NAMES}}
    write_object(uris["latent"], encode_latent(torch.randn(1, 4, size, size, generator=g), ".latent"))
    write_object(uris["mask"], mask_png(8 * size), content_type="image/png")
    for name in COND_NAMES:
        write_object(uris[name], save({"prompt_embeds": torch.randn(1, 77, 32, generator=g)}))
    for path in sorted(TINY_UNET.rglob("*")):
        if path.is_file():
            write_object(f"s3://{bucket}/models/{MODEL}/{path.relative_to(TINY_UNET)}", path.read_bytes())
    return uris


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="latent height = width")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sampling-repeats", type=int, default=1, help="sampling runs timed (minutes each on a CPU)")
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()  # no "install accelerate" notice on every load

    print(f"machine: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix="maskfleet-bench-") as tmp:
        work = Path(tmp)
        server = S3Server.start(work)
        try:
            for name in FOREIGN_AWS_ENV:
                os.environ.pop(name, None)
            os.environ["AWS_CONFIG_FILE"] = str(work / "no-aws-config")
            os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(work / "no-aws-credentials")
            os.environ.update(server.environment())
            reset_s3_client()
            run(args, server.make_bucket(), work)
        finally:
            server.stop()
            reset_s3_client()


def run(args, bucket: str, work: Path) -> None:
    uris = upload_inputs(bucket, args.size)
    models_root, output = f"s3://{bucket}/models", f"s3://{bucket}/out/result.latent"
    caches = (work / f"cache-{i}" for i in itertools.count())  # a fresh cache dir per next()

    # 1. A job's I/O against its sampling.
    denoiser = load_unet_denoiser(ModelStore(models_root, next(caches)).local_dir(MODEL))
    conds = [read_conditioning(uris[name], name) for name in COND_NAMES]
    base = AdvancedSampler(denoiser, 7.0, "euler", "normal", conds[0], conds[1])
    masked = AdvancedSampler(denoiser, 4.0, "euler", "normal", conds[2], conds[3])
    latent, mask = read_latent(uris["latent"]), read_mask(uris["mask"])
    result = {}

    def sampling(steps=args.steps):
        result["out"] = sample_two_samplers(latent, mask, base, masked, seed=0, steps=steps, overlap_factor=10)

    def job_io():
        read_latent(uris["latent"], "latent")
        read_mask(uris["mask"], "mask")
        for name in COND_NAMES:
            read_conditioning(uris[name], name)
        write_object(output, encode_latent(result["out"], ".latent"), "output")

    sampling(steps=1)  # warm-up
    sampling_med, sampling_runs = median_of(sampling, args.sampling_repeats)
    job_io()  # warm-up
    io_med, io_runs = median_of(job_io, args.repeats)
    in_bytes = {key: len(read_object(uri, key)) for key, uri in uris.items()}
    out_bytes = len(read_object(output, "output"))

    print(f"store: moto server on loopback ({os.environ['AWS_ENDPOINT_URL']}), boto3, 1 client")
    print(f"job:   euler, {args.steps} steps, latent 1x4x{args.size}x{args.size}, "
          f"mask {8 * args.size}x{8 * args.size} PNG, conditioning 4 x [1, 77, 32], tiny golden UNet")
    print(f"bytes: latent {in_bytes['latent']}, mask {in_bytes['mask']}, "
          f"conditioning {sum(in_bytes[n] for n in COND_NAMES)} (4 files), output {out_bytes}")
    print(f"io        {io_med:.4f} s   (runs: {shown(io_runs)})")
    print(f"sampling  {sampling_med:.4f} s   (runs: {shown(sampling_runs)})")
    print(f"ratio io/sampling: {io_med / sampling_med:.3g}")

    # 2. Model cold load (download + load) vs a new process on a filled cache vs an LRU hit.
    def cold():
        load_unet_denoiser(ModelStore(models_root, next(caches)).local_dir(MODEL))

    filled = next(caches)
    ModelStore(models_root, filled).local_dir(MODEL)

    def warm_disk():
        load_unet_denoiser(ModelStore(models_root, filled).local_dir(MODEL))

    models = LoadedModels(device="cpu", dtype=torch.float32)
    models.get(MODEL, "model", lambda: load_unet_denoiser(ModelStore(models_root, filled).local_dir(MODEL)))

    def hit():
        models.get(MODEL, "model", lambda: None)

    cold(), warm_disk(), hit()  # warm-ups
    cold_med, cold_runs = median_of(cold, args.repeats)
    disk_med, disk_runs = median_of(warm_disk, args.repeats)
    hit_med, hit_runs = median_of(hit, args.repeats)
    assert models.misses == 1, "every hit must be a hit"
    weights = sum(p.stat().st_size for p in TINY_UNET.rglob("*") if p.is_file())
    print(f"model: tiny golden UNet, {weights} bytes in {sum(1 for p in TINY_UNET.rglob('*') if p.is_file())} objects")
    print(f"cold       {cold_med:.4f} s   (runs: {shown(cold_runs)})")
    print(f"warm-disk  {disk_med:.4f} s   (runs: {shown(disk_runs)})")
    print(f"hit        {hit_med * 1e6:.1f} us   (runs: {', '.join(f'{s * 1e6:.1f}' for s in hit_runs)})")
    print(f"ratio cold/hit: {cold_med / hit_med:.0f}   warm-disk/hit: {disk_med / hit_med:.0f}")


if __name__ == "__main__":
    main()
