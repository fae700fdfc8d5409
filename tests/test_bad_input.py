"""Bad input, table-driven: every case through `maskfleet submit` and through the Python client.

Each case names the field its error message must start with ("steps:", "mask:", ...)
and where it is refused:

- client: the producer refuses it before sending (pydantic validation, the callback
  policy, `time_limit`). `maskfleet submit` exits 2 naming the field and the client's
  `submit` raises JobError naming it; both are pointed at a queue nobody consumes, which
  must stay empty: nothing was sent. The same document is then sent raw with
  `send_task`, as a foreign producer would, and the worker must end it FAILURE with
  InvalidJob naming the same field, so no check lives only in the client.
- worker: only the worker can judge it (files, objects, models, tensors). `maskfleet
  submit --wait` exits 2 and `JobHandle.wait` raises JobFailed; both jobs end FAILURE
  with InvalidJob naming the field.
- valid: an empty and a full mask are jobs like any other and SUCCEED; what each does is
  checked against the sampling code (see test_* at the end and docs/jobs.md).

Whatever a refused case's outcome, nothing is written: its output and preview do not
exist afterwards, no file appears in the output folder, and no input changes. One real
worker (celery prefork, model `tiny`) serves the module on a Redis DB of its own, set up
as a deployment would be: MASKFLEET_ALLOWED_ROOTS, a callback allowlist and a
MASKFLEET_MAX_JOB_SECONDS; the S3 cases use the session's moto server over HTTP.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
import time
import zlib
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Callable

import pytest
import redis
import torch
from PIL import Image
from safetensors.torch import load_file, save, save_file

from fleet_workers import Worker, claim_db_url, flush, require_redis
from golden_jobs import TINY_UNET, make_models_dir
from ldm_checkpoints import write_checkpoint
from maskfleet.cli import main
from maskfleet.client import JobFailed, JobHandle, _app, submit
from maskfleet.job import MAX_JOB_BYTES, JobError
from maskfleet.sampling import AdvancedSampler
from maskfleet.sampling.comfy_call import CallSpan, JobRandomness, OneCall, RegionMask, ScheduleCache
from maskfleet.model_dirs import load_unet_denoiser
from maskfleet.storage.file_uris import DEFAULT_MAX_INPUT_BYTES
from maskfleet.storage.mask_files import decode_mask
from maskfleet.tasks.redis_keys import submitted_key
from maskfleet.tasks.settings import TASK_NAME, model_queue

require_redis()

TINY = model_queue("tiny")
NOWHERE = "maskfleet.test.nobody-consumes"  # client-refused jobs are aimed here: it must stay empty
ALLOWLIST = "localhost:8999"  # the only internal callback receiver this "deployment" allows
MAX_JOB_SECONDS = 600
WAIT_S = 120.0
DELETE = object()  # a change that removes the field
LATENT_SHAPE = (1, 4, 16, 16)
WIDTH = 32  # the tiny UNet's cross_attention_dim
XL = "tiny_unet_xl"  # the SDXL-style golden model (context 32, pooled 48)
XL_POOLED = 48


class Inputs:
    """The module's files and a fresh valid job per call; cases break one thing each."""

    def __init__(self, root: Path, models: Path, bucket: str):
        self.root, self.models, self.bucket = root, models, bucket
        self.allowed = root / "allowed"  # the worker's MASKFLEET_ALLOWED_ROOTS
        self.inp, self.out, self.outside = self.allowed / "in", self.allowed / "out", root / "outside"
        for d in (self.inp, self.out, self.outside):
            d.mkdir(parents=True)
        self._ids = count()
        gen = torch.Generator().manual_seed(0)
        self.latent = torch.randn(LATENT_SHAPE, generator=gen)
        self.write_latent("in.latent", self.latent)
        square = torch.zeros(1, 64, 64)
        square[:, 16:40, 20:48] = 1.0
        self.tensor_file("mask.safetensors", mask=square)
        self.cond = {k: torch.randn(1, 8, WIDTH, generator=gen) for k in ("pos_base", "neg_base", "pos_mask", "neg_mask")}
        for key, value in self.cond.items():
            self.tensor_file(f"{key}.safetensors", prompt_embeds=value)
        for key, value in self.cond.items():  # the same prompts with the pooled embedding SDXL-style models take
            self.tensor_file(f"xl_{key}.safetensors", prompt_embeds=value,
                             pooled_prompt_embeds=torch.randn(1, XL_POOLED, generator=gen))
        save_file({"latent_tensor": self.latent, "latent_format_version_0": torch.tensor([])}, self.outside / "in.latent")

    def uri(self, name: str) -> str:
        return (self.inp / name).as_uri()

    def write_latent(self, name: str, tensor: torch.Tensor) -> str:
        save_file({"latent_tensor": tensor.contiguous(), "latent_format_version_0": torch.tensor([])}, self.inp / name)
        return self.uri(name)

    def tensor_file(self, name: str, **tensors: torch.Tensor) -> str:
        save_file({k: v.contiguous() for k, v in tensors.items()}, self.inp / name)
        return self.uri(name)

    def raw_file(self, name: str, data: bytes) -> str:
        (self.inp / name).write_bytes(data)
        return self.uri(name)

    def job(self, changes: dict | None = None) -> dict:
        """A valid 2-step job on the 1x4x16x16 latent with its own job_id, output and preview."""
        n = next(self._ids)

        def sampler(which: str, scheduler: str, cfg: float) -> dict:
            return {"model": "tiny", "sampler_name": "euler", "scheduler": scheduler, "cfg": cfg,
                    "positive": self.uri(f"pos_{which}.safetensors"), "negative": self.uri(f"neg_{which}.safetensors")}

        job = {"job_id": f"bad-{n}-{time.time_ns()}", "seed": 7, "steps": 2, "denoise": 1.0, "overlap_factor": 2,
               "latent": self.uri("in.latent"), "mask": self.uri("mask.safetensors"),
               "base_sampler": sampler("base", "normal", 5.0), "mask_sampler": sampler("mask", "karras", 3.0),
               "output": (self.out / f"{n}.latent").as_uri(), "preview": (self.out / f"{n}.png").as_uri()}
        for path, value in (changes or {}).items():
            *parents, last = path.split(".")
            node = job
            for p in parents:
                node = node[p]
            if value is DELETE:
                del node[last]
            else:
                node[last] = value
        return job


@dataclass(frozen=True)
class Case:
    name: str
    field: str | None  # what the error message starts with, before ":"; None for a valid job
    where: str  # "client", "worker" or "valid"
    make: Callable[[Inputs], dict | str | Path]  # called once per path: a dict, raw JSON text, or a job file as is
    fleet_only: bool = False  # a fleet setting refuses it (callback policy, MASKFLEET_MAX_JOB_SECONDS): `maskfleet run` ignores it


def change(**changes) -> Callable[[Inputs], dict]:
    """A case that changes fields of the valid job (dotted names as keywords: use `__` for `.`)."""
    return lambda i: i.job({k.replace("__", "."): v for k, v in changes.items()})


def _sdxl(**changes) -> Callable[[Inputs], dict]:
    """Both samplers on the SDXL-style model with pooled conditionings, then `changes` (a value may be
    a function of the inputs)."""
    def make(i: Inputs) -> dict:
        xl = {}
        for field, which in (("base_sampler", "base"), ("mask_sampler", "mask")):
            xl[f"{field}.model"] = XL
            for kind in ("pos", "neg"):
                xl[f"{field}.{'positive' if kind == 'pos' else 'negative'}"] = i.uri(f"xl_{kind}_{which}.safetensors")
        for key, value in changes.items():
            xl[key.replace("__", ".")] = value(i) if callable(value) else value
        return i.job(xl)
    return make


def _model_file(name: str, data: Callable[[Inputs], bytes], field: str) -> Callable[[Inputs], dict]:
    """A file `name` put in the model store, named by the job's `field` (without its suffix)."""
    def make(i: Inputs) -> dict:
        (i.models / name).write_bytes(data(i))
        return i.job({field: Path(name).stem})
    return make


def _flux_header(i: Inputs) -> bytes:
    return save(  # a transformer's keys, as a Flux checkpoint names them
        {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 3)})


def _truncated_checkpoint(i: Inputs) -> bytes:
    path = write_checkpoint(TINY_UNET, i.root / "whole.safetensors")
    return path.read_bytes()[:4096]


def with_latent(tensor_or_bytes) -> Callable[[Inputs], dict]:
    def make(i: Inputs) -> dict:
        if isinstance(tensor_or_bytes, bytes):
            return i.job({"latent": i.raw_file("case.latent", tensor_or_bytes)})
        return i.job({"latent": i.write_latent("case.latent", tensor_or_bytes)})
    return make


def with_mask(tensor: torch.Tensor) -> Callable[[Inputs], dict]:
    return lambda i: i.job({"mask": i.tensor_file("case-mask.safetensors", mask=tensor)})


def with_cond(field: str, tensor: torch.Tensor) -> Callable[[Inputs], dict]:
    return lambda i: i.job({field: i.tensor_file(f"case-{field}.safetensors", prompt_embeds=tensor)})


def _with_nan(shape, value=float("nan")) -> torch.Tensor:
    t = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    t.view(-1)[3] = value
    return t


def _truncated_latent(i: Inputs) -> dict:
    data = (i.inp / "in.latent").read_bytes()
    return i.job({"latent": i.raw_file("truncated.latent", data[: len(data) // 2])})


class _RunsCode:
    """Unpickling this creates a marker file: what a pickle sent as a latent could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickle_as_latent(suffix: str) -> Callable[[Inputs], dict]:
    def make(i: Inputs) -> dict:
        data = pickle.dumps({"latent_tensor": _RunsCode(i.root / "pickle-ran"), "shape": list(LATENT_SHAPE)})
        return i.job({"latent": i.raw_file(f"evil{suffix}", data)})
    return make


def _over_the_cap(i: Inputs) -> dict:
    path = i.inp / "huge-mask.safetensors"
    with open(path, "wb") as f:  # sparse: one byte over the cap costs no disk
        f.truncate(DEFAULT_MAX_INPUT_BYTES + 1)
    return i.job({"mask": path.as_uri()})


def _symlink_out_of_roots(i: Inputs) -> dict:
    link = i.inp / "link.latent"
    if not link.is_symlink():
        link.symlink_to(i.outside / "in.latent")
    return i.job({"latent": link.as_uri()})


def _model_symlinked_outside(i: Inputs) -> dict:
    link = i.models / "escape"
    if not link.is_symlink():
        link.symlink_to(i.outside, target_is_directory=True)
    return i.job({"base_sampler.model": "escape"})


def _preview_over_png_mask(i: Inputs) -> dict:
    Image.new("L", (64, 64), 0).save(i.inp / "mask.png")
    return i.job({"mask": i.uri("mask.png"), "preview": i.uri("mask.png")})


def _missing_s3_object(i: Inputs) -> dict:
    return i.job({"latent": f"s3://{i.bucket}/nothing-here.latent"})


def _callback(url: str) -> Callable[[Inputs], dict]:
    return change(callback={"url": url})


def _job_file_to_dev_zero(i: Inputs) -> Path:
    link = i.root / "jobs" / "zero.json"
    link.parent.mkdir(exist_ok=True)
    if not link.is_symlink():
        link.symlink_to("/dev/zero")
    return link


def _padded_over_a_mebibyte(i: Inputs) -> str:
    return json.dumps(i.job()) + " " * MAX_JOB_BYTES  # valid JSON, valid job: only its size is refused


def _png(width: int, height: int, *chunks: tuple[bytes, bytes]) -> bytes:
    """A gray PNG (a filled rectangle) with extra chunks (type, data) before its pixels."""
    buf = io.BytesIO()
    image = Image.new("L", (width, height), 0)
    image.paste(255, (width // 4, height // 4, width // 2, height // 2))
    image.save(buf, "PNG")
    data = buf.getvalue()
    extra = b"".join(struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d)) for t, d in chunks)
    ihdr_end = 8 + 8 + 13 + 4
    return data[:ihdr_end] + extra + data[ihdr_end:]


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels: refused by the size it declares, before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def _ztxt_bomb(i: Inputs) -> dict:
    """A zTXt chunk of about 200 KB that inflates to 200 MB of text."""
    squeeze, parts = zlib.compressobj(9), []
    block = b"\0" * (1 << 20)
    for _ in range(200):
        parts.append(squeeze.compress(block))
    parts.append(squeeze.flush())
    return i.job({"mask": i.raw_file("ztxt-bomb.png", _png(64, 64, (b"zTXt", b"comment\0\0" + b"".join(parts))))})


def _sparse_safetensors(i: Inputs, name: str, dtype: str, shape: list[int], itemsize: int) -> str:
    """A safetensors file of zeros with that header, sparse: no disk for the data."""
    path = i.inp / name
    if not path.exists():
        nbytes = itemsize * math.prod(shape)
        header = json.dumps({"mask": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}).encode()
        header += b" " * (-len(header) % 8)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            f.truncate(8 + len(header) + nbytes)
    return path.as_uri()


def _huge_mask(dtype: str, itemsize: int) -> Callable[[Inputs], dict]:
    return lambda i: i.job({"mask": _sparse_safetensors(i, f"mask-9000-{dtype}.safetensors", dtype, [1, 9000, 9000], itemsize)})


def _name_of(length: int) -> Callable[[Inputs], dict]:
    """An output whose file name is `length` bytes long."""
    return lambda i: i.job({"output": (i.out / ("n" * (length - len(".latent")) + ".latent")).as_uri()})


FULL, EMPTY = torch.ones(1, 64, 64), torch.zeros(1, 64, 64)

CASES = [
    # -- refused by the client before sending (and by the worker when sent raw) --
    Case("malformed JSON", "job", "client", lambda i: '{"seed": 7, "steps": '),
    Case("JSON that is not an object", "job", "client", lambda i: "[1, 2, 3]"),
    Case("unknown field", "colour", "client", change(colour="red")),
    Case("unknown sampler field", "base_sampler.strength", "client", change(base_sampler__strength=0.5)),
    Case("missing field", "latent", "client", change(latent=DELETE)),
    Case("missing sampler field", "mask_sampler.scheduler", "client", change(mask_sampler__scheduler=DELETE)),
    Case("wrong type: steps as text", "steps", "client", change(steps="twenty")),
    Case("wrong type: fractional seed", "seed", "client", change(seed=1.5)),
    Case("wrong type: steps as a numeric string", "steps", "client", change(steps="20")),
    Case("wrong type: steps as a boolean", "steps", "client", change(steps=True)),
    Case("wrong type: cfg as a string", "mask_sampler.cfg", "client", change(mask_sampler__cfg="7")),
    Case("wrong type: latent as a number", "latent", "client", change(latent=5)),
    Case("wrong type: sampler as a list", "base_sampler", "client", change(base_sampler=["tiny", "euler"])),
    Case("steps 0", "steps", "client", change(steps=0)),
    Case("steps above the maximum", "steps", "client", change(steps=10001)),
    Case("denoise 0", "denoise", "client", change(denoise=0)),
    Case("denoise above 1", "denoise", "client", change(denoise=1.5)),
    Case("denoise 1e-9 with steps 1 (a billion-step schedule)", "denoise", "client", change(steps=1, denoise=1e-9)),
    Case("denoise 1e-300 with steps 1", "denoise", "client", change(steps=1, denoise=1e-300)),
    Case("denoise 5e-324 with steps 1 (steps / denoise is inf)", "denoise", "client", change(steps=1, denoise=5e-324)),
    Case("schedule of 10001 steps", "denoise", "client", change(steps=10000, denoise=0.9999)),
    Case("job file that is a symlink to /dev/zero", "job", "client", _job_file_to_dev_zero),
    Case("job document over 1 MiB", "job", "client", _padded_over_a_mebibyte),
    Case("negative overlap", "overlap_factor", "client", change(overlap_factor=-1)),
    Case("negative crop_margin", "crop_margin", "client", change(crop_margin=-1)),
    Case("unknown sampler", "base_sampler.sampler_name", "client", change(base_sampler__sampler_name="euler_turbo")),
    Case("unknown scheduler", "mask_sampler.scheduler", "client", change(mask_sampler__scheduler="cosine")),
    Case("model name with path traversal", "base_sampler.model", "client", change(base_sampler__model="../tiny")),
    Case("model name as an absolute path", "mask_sampler.model", "client", change(mask_sampler__model="/etc/passwd")),
    Case("seed below 0", "seed", "client", change(seed=-1)),
    Case("seed above 2**64 - 1", "seed", "client", change(seed=2**64)),
    Case("negative cfg", "base_sampler.cfg", "client", change(base_sampler__cfg=-1.0)),
    Case("unknown mode", "mode", "client", change(mode="exact")),
    Case("coherent mode with lcm", "mask_sampler.sampler_name", "client", change(mode="coherent", base_sampler__scheduler="karras", mask_sampler__sampler_name="lcm")),
    Case("coherent mode with two schedulers", "mask_sampler.scheduler", "client",
         change(mode="coherent", base_sampler__scheduler="karras", mask_sampler__scheduler="normal")),
    Case("coherent mode with crop_margin", "crop_margin", "client", change(mode="coherent", crop_margin=4)),
    Case("regional mode with crop_margin", "crop_margin", "client", change(mode="regional", crop_margin=4)),
    Case("job_id with a slash and a space", "job_id", "client", change(job_id="../x y")),
    Case("both latent and image", "latent", "client", change(image="file:///data/in.png")),
    Case("paste_back without image", "paste_back", "client", change(paste_back=True)),
    Case("empty latent URI", "latent", "client", change(latent="")),
    Case("prompt with an unknown key", "base_sampler.positive.weight", "client",
         change(base_sampler__positive={"prompt": "a house", "weight": 2})),
    Case("callback to 169.254.169.254", "callback.url", "client", _callback("http://169.254.169.254/latest/meta-data/"), fleet_only=True),
    Case("callback to localhost", "callback.url", "client", _callback("http://localhost/hook"), fleet_only=True),
    Case("callback to an allowlisted host on another port", "callback.url", "client", _callback("http://localhost:9000/hook"), fleet_only=True),
    Case("callback to a private host outside the allowlist", "callback.url", "client", _callback("http://10.20.30.40:8080/hook"), fleet_only=True),
    Case("callback that is not http(s)", "callback.url", "client", _callback("file:///etc/passwd")),
    Case("callback with user:password@", "callback.url", "client", _callback("https://user:secret@hooks.example.com/x"), fleet_only=True),
    Case("time_limit above MASKFLEET_MAX_JOB_SECONDS", "time_limit", "client", change(time_limit=MAX_JOB_SECONDS + 1), fleet_only=True),
    Case("time_limit 0", "time_limit", "client", change(time_limit=0)),
    # -- only the worker can judge these: files, objects, models and tensors --
    Case("unknown model", "base_sampler.model", "worker", change(base_sampler__model="nosuchmodel")),
    Case("model name with '..' inside", "mask_sampler.model", "worker", change(mask_sampler__model="tiny..x")),
    Case("model linked to a folder that holds no model", "base_sampler.model", "worker", _model_symlinked_outside),
    Case("latent of rank 3", "latent", "worker", with_latent(torch.zeros(4, 16, 16))),
    Case("latent with 3 channels (the model takes 4)", "latent", "worker", with_latent(torch.zeros(1, 3, 16, 16))),
    Case("latent of integer dtype", "latent", "worker", with_latent(torch.zeros(LATENT_SHAPE, dtype=torch.int64))),
    Case("empty latent tensor", "latent", "worker", with_latent(torch.zeros(1, 4, 0, 16))),
    Case("NaN in the latent", "latent", "worker", with_latent(_with_nan(LATENT_SHAPE))),
    Case("Inf in the latent", "latent", "worker", with_latent(_with_nan(LATENT_SHAPE, float("inf")))),
    Case("NaN in conditioning", "mask_sampler.negative", "worker", with_cond("mask_sampler.negative", _with_nan((1, 8, WIDTH)))),
    Case("Inf in conditioning", "base_sampler.positive", "worker",
         with_cond("base_sampler.positive", _with_nan((1, 8, WIDTH), float("-inf")))),
    Case("conditioning of the wrong width", "base_sampler.positive", "worker", with_cond("base_sampler.positive", torch.zeros(1, 8, 16))),
    Case("conditioning of rank 4", "mask_sampler.positive", "worker", with_cond("mask_sampler.positive", torch.zeros(1, 1, 8, WIDTH))),
    Case("mask of another aspect ratio", "mask", "worker", with_mask(torch.zeros(1, 64, 128))),
    Case("mask batch 3 for a latent batch of 1", "mask", "worker", with_mask(torch.zeros(3, 64, 64))),
    Case("mask with values above 1", "mask", "worker", with_mask(torch.full((1, 64, 64), 255.0))),
    Case("mask with negative values", "mask", "worker", with_mask(torch.full((1, 64, 64), -0.25))),
    Case("NaN in the mask", "mask", "worker", with_mask(_with_nan((1, 64, 64)))),
    Case("mask that is neither image nor safetensors", "mask", "worker",
         lambda i: i.job({"mask": i.raw_file("garbage.png", b"GIF89a? not really")})),
    Case("PNG mask whose zTXt chunk inflates to 200 MB", "mask", "worker", _ztxt_bomb),
    Case("safetensors mask 1 x 9000 x 9000 float32 (81 Mpx, over the byte cap)", "mask", "worker", _huge_mask("F32", 4)),
    Case("safetensors mask 1 x 9000 x 9000 bool (81 Mpx, under the byte cap)", "mask", "worker", _huge_mask("BOOL", 1)),
    Case("output file name of 256 bytes", "output", "worker", _name_of(256)),
    Case("overlap larger than the latent", "overlap_factor", "worker", change(overlap_factor=17)),
    Case("overlap larger than the mask in regional mode (mask pixels)", "overlap_factor", "worker",
         change(mode="regional", overlap_factor=65)),
    Case("missing latent file", "latent", "worker", lambda i: i.job({"latent": i.uri("no-such.latent")})),
    Case("missing conditioning file", "mask_sampler.negative", "worker",
         lambda i: i.job({"mask_sampler.negative": i.uri("no-such.safetensors")})),
    Case("missing S3 object", "latent", "worker", _missing_s3_object),
    Case("missing S3 bucket", "mask", "worker", change(mask="s3://mf-no-such-bucket-7f3a/mask.safetensors")),
    Case("S3 URI with an invalid bucket name", "mask", "worker", change(mask="s3://Not_A_Bucket!/mask.safetensors")),
    Case("truncated safetensors", "latent", "worker", _truncated_latent),
    Case("pickle disguised as .latent", "latent", "worker", _pickle_as_latent(".latent")),
    Case("pickle named .pt", "latent", "worker", _pickle_as_latent(".pt")),
    Case("file over the size cap", "mask", "worker", _over_the_cap),
    Case("file:// outside the allowed roots", "latent", "worker", lambda i: i.job({"latent": (i.outside / "in.latent").as_uri()})),
    Case("symlink out of the allowed roots", "latent", "worker", _symlink_out_of_roots),
    Case("output outside the allowed roots", "output", "worker",
         lambda i: i.job({"output": (i.outside / f"out-{time.time_ns()}.latent").as_uri(), "preview": DELETE})),
    Case("http:// input URI", "latent", "worker", change(latent="http://example.com/in.latent")),
    Case("file:// URI naming another host", "mask", "worker", change(mask="file://fileserver/share/mask.png")),
    Case("output equal to an input", "output", "worker", lambda i: i.job({"output": i.uri("in.latent")})),
    Case("preview equal to an input", "preview", "worker", _preview_over_png_mask),
    Case("output with an unsupported suffix", "output", "worker", lambda i: i.job({"output": (i.out / "x.png").as_uri()})),
    Case("preview that is not .png", "preview", "worker", lambda i: i.job({"preview": (i.out / "x.jpg").as_uri()})),
    Case("SDXL-style model without pooled embeddings", "base_sampler.positive", "worker",
         _sdxl(base_sampler__positive=lambda i: i.uri("pos_base.safetensors"))),
    Case("SDXL-style pooled embedding of the wrong width", "mask_sampler.negative", "worker",
         _sdxl(mask_sampler__negative=lambda i: i.tensor_file("xl-narrow.safetensors", prompt_embeds=i.cond["neg_mask"],
                                                               pooled_prompt_embeds=torch.zeros(1, XL_POOLED - 1)))),
    Case("SD1.5 base with an SDXL-style mask sampler (two latent spaces)", "mask_sampler.model", "worker",
         _sdxl(base_sampler__model="tiny")),
    Case("SDXL-style model without text encoders, with a prompt as text", "base_sampler.positive", "worker",
         _sdxl(base_sampler__positive={"prompt": "a house"})),
    Case("image that does not decode", "image", "worker",
         lambda i: i.job({"latent": DELETE, "image": i.raw_file("not-a-picture.png", b"GIF89a? not really")})),
    Case("image of 9000 x 9000 pixels (81 Mpx, over the cap)", "image", "worker",
         lambda i: i.job({"latent": DELETE, "image": i.raw_file("huge.png", _png_header(9000, 9000))})),
    Case("image smaller than 8 pixels", "image", "worker",
         lambda i: i.job({"latent": DELETE, "image": i.raw_file("sliver.png", _png(64, 4))})),
    Case("image with a model that has no VAE", "image", "worker",
         lambda i: i.job({"latent": DELETE, "image": i.raw_file("picture.png", _png(128, 128))})),
    Case("output_image with a model that has no VAE", "output_image", "worker",
         lambda i: i.job({"output_image": (i.out / f"pic-{time.time_ns()}.png").as_uri()})),
    Case("output_image that is not .png", "output_image", "worker",
         lambda i: i.job({"output_image": (i.out / f"pic-{time.time_ns()}.jpg").as_uri()})),
    Case("pickle-format checkpoint named as a model", "base_sampler.model", "worker",
         _model_file("old-model.ckpt", lambda i: b"\x80\x04\x95pickle", "base_sampler.model")),
    Case("single-file checkpoint of an unknown family (Flux)", "mask_sampler.model", "worker",
         _model_file("flux-model.safetensors", _flux_header, "mask_sampler.model")),
    Case("truncated single-file checkpoint", "base_sampler.model", "worker",
         _model_file("cut-model.safetensors", _truncated_checkpoint, "base_sampler.model")),
    # -- valid: one sampler does all the work --
    Case("empty mask", None, "valid", with_mask(EMPTY)),
    Case("full mask", None, "valid", with_mask(FULL)),
    Case("regional mode, overlap past the latent but within the mask", None, "valid", change(mode="regional", overlap_factor=17)),
]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, s3_server):
    root = tmp_path_factory.mktemp("bad-input")
    url = claim_db_url()
    flush(url)
    env = pytest.MonkeyPatch()
    settings = {"MASKFLEET_CALLBACK_ALLOWLIST": ALLOWLIST, "MASKFLEET_MAX_JOB_SECONDS": str(MAX_JOB_SECONDS)}
    for name, value in settings.items():  # the client reads both when it submits
        env.setenv(name, value)
    inputs = Inputs(root, make_models_dir(root, every_golden_model=True), s3_server.make_bucket())
    worker = Worker("bad-input", [TINY], url, inputs.models, root / "worker.log",
                    extra_env={**settings, "MASKFLEET_ALLOWED_ROOTS": str(inputs.allowed), "MASKFLEET_TORCH_THREADS": "1"})
    app = _app(url)
    try:
        worker.wait_ready(app)
        yield {"url": url, "app": app, "inputs": inputs, "worker": worker, "redis": redis.Redis.from_url(url)}
    finally:
        worker.stop()
        env.undo()
        flush(url)


def _write_job(fleet, doc: dict | str | Path, name: str) -> Path:
    if isinstance(doc, Path):
        return doc
    path = fleet["inputs"].root / "jobs" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _cli(fleet, capsys, doc: dict | str, name: str, queue: str, wait: bool) -> tuple[int, str, str]:
    argv = ["submit", str(_write_job(fleet, doc, name)), "--broker", fleet["url"], "--queue", queue]
    if wait:
        argv += ["--wait", "--timeout", str(WAIT_S)]
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _run_cli(fleet, capsys, doc: dict | str | Path, name: str) -> tuple[int, str, str]:
    """`maskfleet run` in this process, confined to the worker's allowed roots."""
    inputs: Inputs = fleet["inputs"]
    argv = ["run", str(_write_job(fleet, doc, name)), "--models", str(inputs.models), "--device", "cpu", "--quiet"]
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MASKFLEET_ALLOWED_ROOTS", str(inputs.allowed))
        code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _run_refusal(fleet, capsys, doc, case: Case, slug: str) -> str:
    """`maskfleet run` refuses the job: exit 2, one line naming the field; the message."""
    code, out, err = _run_cli(fleet, capsys, doc, f"{slug}-cli")  # the file `maskfleet submit` reads next
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith(f"maskfleet: invalid job: {case.field}:") and err.count("\n") == 1, err
    return err.removeprefix("maskfleet: invalid job: ").rstrip("\n")


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}


def _written(doc: dict | str) -> list[Path]:
    """The local files a job document would write."""
    if not isinstance(doc, dict):
        return []
    uris = [doc.get("output"), doc.get("preview")]
    return [Path(u[len("file://"):]) for u in uris if isinstance(u, str) and u.startswith("file://")]


def _assert_worker_refused(handle: JobHandle, field: str, fleet) -> None:
    try:
        handle.wait(WAIT_S, poll=0.05)
    except JobFailed as failed:
        assert failed.state == "FAILURE", failed
        assert failed.message.startswith(f"{field}:"), failed.message
    else:
        raise AssertionError(f"{handle.task_id} succeeded; expected a FAILURE naming {field}")
    meta = handle.status()["meta"]
    assert meta["error"] == "InvalidJob", (meta, fleet["worker"].log.read_text()[-3000:])
    assert meta["message"].startswith(f"{field}:"), meta


def _run_refused(fleet, capsys, case: Case, slug: str) -> None:
    inputs: Inputs = fleet["inputs"]
    docs = {"cli": case.make(inputs), "client": case.make(inputs)}
    before_out, before_in = _files(inputs.out), _files(inputs.inp)
    targets = {path: os.path.exists(path) for doc in docs.values() for path in _written(doc)}  # inputs, for the overwrite cases
    r = fleet["redis"]
    # `maskfleet run` first, on the document the CLI then submits: the same message both ways.
    ran = None if case.fleet_only else _run_refusal(fleet, capsys, docs["cli"], case, slug)
    if case.where == "client":
        code, out, err = _cli(fleet, capsys, docs["cli"], f"{slug}-cli", NOWHERE, wait=False)
        assert code == 2 and out == "", (code, out, err)
        assert err.startswith(f"maskfleet: invalid job: {case.field}:"), err
        assert ran is None or err == f"maskfleet: invalid job: {ran}\n", (err, ran)
    if case.where == "client" and not isinstance(docs["client"], Path):  # a job file as is has no client path
        with pytest.raises(JobError) as refused:
            submit(docs["client"], broker_url=fleet["url"], queue=NOWHERE)
        assert str(refused.value).startswith(f"{case.field}:"), str(refused.value)
        assert r.llen(NOWHERE) == 0 and not r.keys(f"{NOWHERE}*"), "a refused job reached the broker"
        for doc in docs.values():
            if isinstance(doc, dict) and isinstance(doc.get("job_id"), str):
                assert not r.exists(submitted_key(doc["job_id"]))
        # A foreign producer skips the client: the worker refuses the same document itself.
        sent = fleet["app"].send_task(TASK_NAME, args=[docs["client"]], task_id=f"raw-{slug}-{time.time_ns()}", queue=TINY)
        _assert_worker_refused(JobHandle(sent.id, fleet["app"]), case.field, fleet)
    elif case.where == "worker":
        code, out, err = _cli(fleet, capsys, docs["cli"], f"{slug}-cli", TINY, wait=True)
        assert code == 2 and out == "", (code, out, err)
        job_id = docs["cli"]["job_id"]
        assert f"maskfleet: job {job_id} FAILURE: {case.field}:" in err, err
        assert ran is None or err.endswith(f"FAILURE: {ran}\n"), (err, ran)
        _assert_worker_refused(JobHandle(job_id, fleet["app"]), case.field, fleet)
        _assert_worker_refused(submit(docs["client"], broker_url=fleet["url"], queue=TINY), case.field, fleet)
    for path, existed in targets.items():
        assert os.path.exists(path) == existed, f"{path} written by a refused job"  # False, not OSError, for a name too long
    assert _files(inputs.out) == before_out, "a refused job left a file in the output folder"
    assert _files(inputs.inp) == before_in, "a refused job changed an input"
    assert not (inputs.root / "pickle-ran").exists(), "a pickle was loaded"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


@pytest.mark.parametrize("case", [c for c in CASES if c.where != "valid"], ids=lambda c: _slug(c.name))
def test_bad_input_is_refused_naming_the_field_and_writes_nothing(fleet, capsys, case):
    _run_refused(fleet, capsys, case, _slug(case.name))


HOSTILE_BUT_VALID = {
    # ComfyUI applies EXIF orientation when it can; a broken EXIF block is ignored, the pixels are used.
    "PNG mask with a garbage eXIf chunk": lambda i: i.job({"mask": i.raw_file("bad-exif.png", _png(64, 64, (b"eXIf", b"garbage, not TIFF")))}),
    # The temporary file of the atomic write must fit within the name limit the output fits in.
    "output file name of 250 bytes": _name_of(250),
}


@pytest.mark.parametrize("name", list(HOSTILE_BUT_VALID), ids=_slug)
def test_hostile_but_valid_input_runs_through_run_and_the_fleet(fleet, capsys, name):
    inputs: Inputs = fleet["inputs"]
    docs = {via: HOSTILE_BUT_VALID[name](inputs) for via in ("run", "fleet")}
    code, out, err = _run_cli(fleet, capsys, docs["run"], f"{_slug(name)}-run")
    assert code == 0, err
    results = {"run": json.loads(out)}
    results["fleet"] = submit(docs["fleet"], broker_url=fleet["url"], queue=TINY).wait(WAIT_S, poll=0.05)
    for via, result in results.items():
        path = Path(result["output"][len("file://"):])
        assert path.is_file() and result["shape"] == list(LATENT_SHAPE), result
        assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


def test_a_broken_exif_block_leaves_the_mask_as_stored():
    """The eXIf case above reads the same mask as the PNG without the chunk."""
    plain, broken = _png(64, 48), _png(64, 48, (b"eXIf", b"garbage, not TIFF"))
    mask = decode_mask(broken, "mask", "m.png")
    assert torch.equal(mask, decode_mask(plain, "mask", "m.png")) and mask.shape == (1, 48, 64)
    assert mask.sum() == 16 * 12  # the rectangle, not rotated


def test_the_table_covers_the_issue_and_more_than_40_cases():
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.where for c in CASES} == {"client", "worker", "valid"}


def test_a_job_sent_to_the_unconsumed_queue_would_be_seen(fleet):
    """The 'nothing was sent' check can fail: a valid job aimed at NOWHERE does land there."""
    handle = submit(fleet["inputs"].job(), broker_url=fleet["url"], queue=NOWHERE)
    r = fleet["redis"]
    try:
        assert r.llen(NOWHERE) == 1
    finally:
        r.delete(NOWHERE)
        fleet["app"].backend.forget(handle.task_id)


def _run_valid(fleet, capsys, docs: dict[str, dict]) -> dict[str, dict]:
    """Both paths on a valid job; the results and the outputs read back."""
    code, out, err = _cli(fleet, capsys, docs["cli"], f"valid-{docs['cli']['job_id']}", TINY, wait=True)
    assert code == 0, (err, fleet["worker"].log.read_text()[-3000:])
    results = {"cli": json.loads(out)}
    results["client"] = submit(docs["client"], broker_url=fleet["url"], queue=TINY).wait(WAIT_S, poll=0.05)
    for via, result in results.items():
        path = Path(result["output"][len("file://"):])
        assert path.is_file() and Path(docs[via]["preview"][len("file://"):]).is_file()
        result["latent"] = load_file(path)["latent_tensor"]
        assert result["shape"] == list(LATENT_SHAPE) and torch.isfinite(result["latent"]).all()
    return results


def _plain_run(inputs: Inputs, which: str, cfg: float, scheduler: str) -> torch.Tensor:
    """One sampler alone over the whole latent: one KSamplerAdvanced call over the job's 2 steps."""
    den = load_unet_denoiser(inputs.models / "tiny")
    sampler = AdvancedSampler(den, cfg, "euler", scheduler, inputs.cond[f"pos_{which}"], inputs.cond[f"neg_{which}"])
    x = inputs.latent * den.latent_scale
    whole = RegionMask.of(torch.ones_like(x))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (MASKFLEET_TORCH_THREADS=1): the same kernels, the same rounding
    try:
        span = CallSpan(steps=2, start=0, end=2, add_noise=True, leftover=False)
        return OneCall(sampler, whole, span, JobRandomness(7), ScheduleCache()).run(x) / den.latent_scale
    finally:
        torch.set_num_threads(threads)


def test_empty_mask_the_base_sampler_does_everything(fleet, capsys):
    """Empty mask (all 0): the base region is the whole latent and the mask sampler's is empty.

    The mask sampler's model is never consulted (its calls see an all-zero region), and
    with a deterministic step rule (euler here) its calls return their input unchanged:
    the output is bitwise a plain run of the base sampler, whatever the mask sampler's
    cfg or conditioning.
    """
    inputs: Inputs = fleet["inputs"]
    make = with_mask(EMPTY)
    docs = {"cli": make(inputs), "client": make(inputs)}
    docs["client"]["mask_sampler"].update(cfg=1.5, positive=docs["client"]["base_sampler"]["positive"])
    results = _run_valid(fleet, capsys, docs)
    assert results["cli"]["sha256"] == results["client"]["sha256"]
    assert torch.equal(results["cli"]["latent"], _plain_run(inputs, "base", 5.0, "normal"))


def test_full_mask_the_mask_sampler_does_all_the_denoising(fleet, capsys):
    """Full mask (all 1): the base region is empty, the mask sampler's is the whole latent.

    The base sampler's model, cfg and conditioning are never consulted: its first call
    only adds the seeded noise (stepped one step down by its step rule, as inside the
    mask of every job), and the mask sampler denoises everything. So the output does
    not change with the base's cfg or conditioning, and it is not the input.
    """
    inputs: Inputs = fleet["inputs"]
    make = with_mask(FULL)
    docs = {"cli": make(inputs), "client": make(inputs)}
    docs["client"]["base_sampler"].update(cfg=1.5, positive=docs["client"]["mask_sampler"]["positive"],
                                          negative=docs["client"]["mask_sampler"]["positive"])
    results = _run_valid(fleet, capsys, docs)
    assert results["cli"]["sha256"] == results["client"]["sha256"]
    assert not torch.allclose(results["cli"]["latent"], inputs.latent)
    # The mask sampler's settings do matter: another cfg there gives another latent.
    other = make(inputs)
    other["mask_sampler"]["cfg"] = 1.5
    assert submit(other, broker_url=fleet["url"], queue=TINY).wait(WAIT_S, poll=0.05)["sha256"] != results["cli"]["sha256"]


def test_bad_input_is_one_info_line_in_the_worker_log(fleet):
    """The producer's fault, not the worker's: one INFO line with the job id and the field, no traceback."""
    inputs: Inputs = fleet["inputs"]
    handle = submit(inputs.job({"latent": inputs.uri("no-such-file.latent")}), broker_url=fleet["url"], queue=TINY)
    _assert_worker_refused(handle, "latent", fleet)
    log = fleet["worker"].log.read_text()
    lines = [line for line in log.splitlines() if handle.task_id in line and "InvalidJob" in line]
    assert len(lines) == 1 and "INFO" in lines[0] and "raised expected" in lines[0] and "latent:" in lines[0], lines
    assert "raised unexpected: InvalidJob" not in log


def test_worker_still_serves_good_jobs_after_the_table(fleet):
    """After every refusal above, the same worker runs a valid job (it never got stuck or died)."""
    result = submit(fleet["inputs"].job(), broker_url=fleet["url"], queue=TINY).wait(WAIT_S, poll=0.05)
    assert result["shape"] == list(LATENT_SHAPE)
    assert fleet["worker"].proc.poll() is None
    assert os.path.exists(result["output"][len("file://"):])
