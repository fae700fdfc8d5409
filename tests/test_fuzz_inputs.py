"""Property-based fuzzing of everything a producer sends: the job document and each file reader.

The property, for every generated input: a clear field error (JobError, or InvalidFile /
InvalidInput naming the field the input came in) or a valid result, never another
exception, and never more than a bounded memory (`memory_cap`: the address space is
capped while the reader runs) and time (hypothesis' deadline). Inputs are generated
documents and byte strings, valid files mutated (bit flips, truncation, insertions),
safetensors headers declaring arbitrary shapes, dtypes and offsets, and PNGs built chunk
by chunk with valid CRCs (so the decoder, not the CRC check, meets them).

The normal suite runs a small example budget ("suite" profile, tests/conftest.py); a long
run: `pytest tests/test_fuzz_inputs.py --hypothesis-profile=fuzz`. What a long run finds
becomes a row of the bad-input table (tests/test_bad_input.py).
"""
from __future__ import annotations

import io
import itertools
import json
import struct
import zlib
from functools import lru_cache

import pytest
import torch
from hypothesis import assume, given, note
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save

from fuzz_limits import memory_cap
from maskfleet.checkpoint_files import read_checkpoint
from maskfleet.job import Job, JobError, parse_job
from maskfleet.job_checks import check_job_uris
from maskfleet.sampling import SAMPLERS, SCHEDULERS
from maskfleet.sampling.coherent_rules import coherent_refusal
from maskfleet.sampling.errors import InvalidInput
from maskfleet.sampling.sampling_params import MAX_STEPS, plan_steps
from maskfleet.storage.conditioning_files import decode_conditioning_with_pooled
from maskfleet.storage.errors import InvalidFile
from maskfleet.storage.latent_files import decode_latent
from maskfleet.storage.image_files import decode_image
from maskfleet.storage.mask_files import decode_mask

READER_MEMORY = 2 << 30  # bytes a reader may map beyond what the process holds: a 64 Mpx RGBA mask fits
JOB_FIELDS = frozenset(Job.model_fields) | {"job"}


def valid_job() -> dict:
    def sampler(scheduler: str) -> dict:
        return {"model": "tiny", "sampler_name": "euler", "scheduler": scheduler, "cfg": 5.0,
                "positive": "/data/in/pos.safetensors", "negative": {"prompt": "blurry"}}

    return {"job_id": "fuzz-1", "seed": 7, "steps": 4, "denoise": 1.0, "overlap_factor": 2,
            "latent": "/data/in/x.latent", "mask": "s3://bucket/in/mask.png",
            "base_sampler": sampler("normal"), "mask_sampler": sampler("karras"),
            "output": "/data/out/x.latent", "preview": "file:///data/out/x.png"}


# -- the job document --

# Dict keys without "; " or ":" so that an error message splits into its parts unambiguously.
keys = st.text(st.characters(blacklist_characters=";:", blacklist_categories=("Cs",)), max_size=12)
scalars = (st.none() | st.booleans() | st.integers() | st.integers(-3, 20001)
           | st.floats() | st.floats(0, 1) | st.sampled_from([5e-324, 1e-300, 1e-9, 1e-4, 2.0**-1074])
           | st.text(max_size=40) | st.sampled_from(["euler", "karras", "coherent", "comfy", "s3://b/k", "file:///x", ""]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                           max_leaves=12)


def paths(doc: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in doc.items():
        out.append(prefix + (key,))
        if isinstance(value, dict):
            out.extend(paths(value, prefix + (key,)))
    return out


@st.composite
def mutated_jobs(draw) -> tuple[dict, str]:
    """A valid job with one or two fields replaced by any JSON value, or deleted; and what was done."""
    doc = valid_job()
    done = []
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(paths(doc)))
        node = doc
        for p in path[:-1]:
            node = node[p]
        if draw(st.booleans()):
            node[path[-1]] = draw(json_values)
            done.append(f"set {'.'.join(path)}")
        else:
            del node[path[-1]]
            done.append(f"deleted {'.'.join(path)}")
        if not isinstance(node, dict) or path[0] not in doc:
            break
    return doc, "; ".join(done)


def check_job_outcome(data) -> Job | None:
    """Parse `data`; a refusal must be a JobError whose every part names a field (or 'job')."""
    try:
        job = parse_job(data)
    except JobError as e:
        message = str(e)
        assert message, "empty error message"
        for part in message.split("; "):  # a known field, or an unknown one named as sent
            named = part.split(".")[0].split(":")[0] in JOB_FIELDS
            assert named or part.endswith(": Extra inputs are not permitted"), (part, message)
        return None
    adv_steps, start = plan_steps(job.steps, job.denoise)  # a valid job always has a schedule that fits
    assert 1 <= adv_steps <= MAX_STEPS and 0 <= start < adv_steps
    return job


@given(mutated_jobs())
def test_mutated_job_documents_are_refused_by_field_or_valid(mutated):
    doc, done = mutated
    note(done)
    job = check_job_outcome(doc)
    check_job_outcome(json.dumps(doc))  # the same document as JSON text, as the CLI reads it
    if job is not None:
        try:
            check_job_uris(job)
        except (InvalidInput, InvalidFile) as e:
            assert e.field in {"latent", "mask", "output", "preview", "base_sampler.positive",
                               "base_sampler.negative", "mask_sampler.positive", "mask_sampler.negative"}, e


@given(st.binary(max_size=2048) | st.text(max_size=2048) | json_values.map(json.dumps))
def test_any_bytes_as_a_job_document_are_refused_by_field(data):
    check_job_outcome(data)


@given(st.integers(1, MAX_STEPS), st.floats(min_value=0.0, max_value=1.0) | st.sampled_from([5e-324, 1e-300, 1e-9]))
def test_steps_and_denoise_are_valid_exactly_when_the_schedule_fits(steps, denoise):
    doc = dict(valid_job(), steps=steps, denoise=denoise)
    fits = denoise > 0 and steps / denoise < MAX_STEPS + 1
    if fits:
        assert parse_job(doc).denoise == denoise
    else:
        with pytest.raises(JobError, match=r"^denoise: "):
            parse_job(doc)


def test_coherent_refusals_are_one_part_of_a_message():
    """A rule's reason never holds "; ", the separator between a message's parts (found by the
    long run: the lcm and SDE-schedule reasons split into parts that named no field). Every
    combination of names, so no example budget is needed."""
    for base, base_schedule, mask, mask_schedule in itertools.product(SAMPLERS, SCHEDULERS, SAMPLERS, SCHEDULERS):
        for crop_margin in (None, 4):
            refusal = coherent_refusal(base, base_schedule, mask, mask_schedule, crop_margin)
            assert refusal is None or "; " not in refusal[1], refusal


uri_parts = st.text(st.characters(blacklist_categories=()), max_size=30) | st.sampled_from(
    ["..", ".", "", "%00", "%2F", "a" * 255, "b" * 256, "\ud800", "\x00", "?q", "#f", "é" * 128])


@given(st.sampled_from(["latent", "mask", "output", "preview"]),
       st.sampled_from(["", "file://", "file:///", "file://host/", "s3://", "s3://bucket/", "s3://Bad_Bucket/",
                        "http://", "/", "./", "~/", "C:\\"]),
       st.lists(uri_parts, max_size=4), st.sampled_from(["", ".latent", ".png", ".safetensors", "/"]))
def test_hostile_uris_are_refused_naming_their_field_or_accepted(field, scheme, parts, suffix):
    uri = scheme + "/".join(parts) + suffix
    assume(uri)
    doc = dict(valid_job(), **{field: uri})
    job = check_job_outcome(doc)
    if job is None:
        return
    try:
        check_job_uris(job)
    except (InvalidInput, InvalidFile) as e:
        assert e.field == field, (e.field, field, str(e))


# -- the file readers --

# The smallest SD1.x-shaped UNet header: what family detection reads (zeros: only shapes matter).
UNET_KEYS = {"input_blocks.0.0.weight": (8, 4, 3, 3), "input_blocks.1.0.out_layers.3.weight": (8, 8, 3, 3),
             "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 16), "input_blocks.1.1.proj_in.weight": (8, 8, 1, 1),
             "out.2.weight": (4, 8, 3, 3)}


def _st(tensors: dict) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()})


def _image(mode: str, fmt: str, size=(12, 8), **save_args) -> bytes:
    image = Image.new(mode, size)
    image.putdata([(i * 37) % 256 if mode in ("L", "P") else tuple((i * k) % 256 for k in (37, 11, 5, 3)[:len(mode)])
                   if mode in ("RGB", "RGBA") else (i * 997) % 65536 for i in range(size[0] * size[1])])
    buf = io.BytesIO()
    image.save(buf, fmt, **save_args)
    return buf.getvalue()


@lru_cache(maxsize=None)
def seed_files() -> dict[str, list[bytes]]:
    """Valid files of each reader, the starting points of mutation."""
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 8, 8, generator=g)
    masks = [_st({"mask": torch.rand(1, 16, 16, generator=g)}), _st({"mask": torch.rand(16, 16, generator=g) > 0.5}),
             _st({"m": torch.rand(2, 1, 8, 8, generator=g).half()}),
             _image("L", "PNG"), _image("RGBA", "PNG"), _image("I;16", "PNG"), _image("L", "PNG", transparency=0),
             _image("P", "PNG"), _image("RGB", "JPEG"), _image("L", "GIF"), _image("RGB", "BMP"),
             _image("L", "TIFF"), _image("RGBA", "WEBP")]
    return {
        "latent": [_st({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])}),
                   _st({"latent_tensor": latent.half()}), _st({"samples": latent.double()})],
        "mask": masks,
        "conditioning": [_st({"prompt_embeds": torch.randn(1, 6, 32, generator=g)}),
                         _st({"prompt_embeds": torch.randn(6, 32, generator=g).bfloat16(),
                              "pooled_prompt_embeds": torch.randn(32, generator=g),
                              "add_time_ids": torch.tensor([256.0, 256.0, 0.0, 0.0, 256.0, 256.0])})],
        "image": [_image("RGB", "PNG"), _image("RGBA", "PNG"), _image("L", "JPEG"), _image("P", "GIF"), _image("RGB", "WEBP")],
        "checkpoint": [_st({f"model.diffusion_model.{k}": torch.zeros(shape) for k, shape in UNET_KEYS.items()}),
                       _st({k: torch.zeros(shape) for k, shape in {**UNET_KEYS, "label_emb.0.0.weight": (4, 1540)}.items()})],
    }


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at:at + len(chunk)] = chunk
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        else:
            del data[at:]
    return bytes(data)


DTYPES = ["F16", "BF16", "F32", "F64", "BOOL", "I8", "U8", "I16", "I32", "I64", "F8_E4M3", "F8_E5M2", "C64", "X9", ""]


@st.composite
def safetensors_headers(draw) -> bytes:
    """A safetensors file whose header says anything: names, dtypes, shapes (huge, negative, odd), offsets."""
    buffer = draw(st.binary(max_size=512))
    entries = {}
    for name in draw(st.lists(st.sampled_from(["latent_tensor", "latent_format_version_0", "prompt_embeds",
                                               "pooled_prompt_embeds", "mask", "x", "__metadata__"]),
                              max_size=3, unique=True)):
        if name == "__metadata__":
            entries[name] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5) | st.integers(), max_size=2))
            continue
        shape = draw(st.lists(st.integers(-2, 4) | st.integers(0, 2**62) | st.sampled_from([9000, 2**31, 2**32 + 1]),
                              max_size=5))
        start = draw(st.integers(0, len(buffer)) | st.integers(-1, 2**64))
        end = draw(st.integers(0, len(buffer)) | st.integers(-1, 2**64))
        entry = {"dtype": draw(st.sampled_from(DTYPES)), "shape": shape, "data_offsets": [start, end]}
        if draw(st.integers(0, 9)) == 0:  # now and then a field of the wrong type or missing
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_values)
        entries[name] = entry
    header = json.dumps(entries).encode()
    header += b" " * draw(st.integers(0, 8))
    declared = len(header) + draw(st.sampled_from([0, 0, 0, 1, -1, 2**40]))
    return struct.pack("<Q", max(0, declared) % 2**64) + header + buffer


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@st.composite
def png_chunks(draw) -> bytes:
    """A PNG built chunk by chunk with correct CRCs: any header, any ancillary chunks, pixel data that may not fit."""
    width = draw(st.integers(1, 64) | st.integers(1, 2**31 - 1))
    height = draw(st.integers(1, 64) | st.integers(1, 2**31 - 1))
    depth, colour = draw(st.sampled_from([(1, 0), (8, 0), (16, 0), (8, 2), (16, 2), (8, 3), (8, 4), (8, 6), (16, 6),
                                          (4, 3), (7, 0), (8, 5)]))
    chunks = [_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, draw(st.integers(0, 1))))]
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from([b"PLTE", b"tRNS", b"eXIf", b"zTXt", b"tEXt", b"iTXt", b"iCCP", b"gAMA", b"pHYs",
                                     b"acTL", b"fcTL", b"sRGB", b"cHRM", b"bKGD"]))
        body = draw(st.binary(max_size=64))
        if kind in (b"zTXt", b"iCCP") and draw(st.booleans()):
            body = b"k\0\0" + zlib.compress(draw(st.binary(max_size=64)) * draw(st.integers(1, 2000)))
        chunks.append(_chunk(kind, body))
    rows = min(height, 64) * (1 + min(width, 64) * 8)
    pixels = draw(st.binary(max_size=256)) if draw(st.booleans()) else bytes(rows)
    chunks.append(_chunk(b"IDAT", zlib.compress(pixels) if draw(st.booleans()) else pixels))
    if draw(st.booleans()):
        chunks.append(_chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def check_latent(out) -> None:
    assert out.dtype == torch.float32 and out.ndim == 4 and out.numel() and torch.isfinite(out).all()


def check_mask(out) -> None:
    assert out.dtype == torch.float32 and out.ndim == 3 and out.numel()
    assert torch.isfinite(out).all() and float(out.min()) >= 0 and float(out.max()) <= 1


def check_conditioning(out) -> None:
    embeds, pooled = out
    assert embeds.dtype == torch.float32 and embeds.ndim == 3 and embeds.numel() and torch.isfinite(embeds).all()
    assert pooled is None or (pooled.ndim == 2 and pooled.shape[0] == embeds.shape[0] and torch.isfinite(pooled).all())


READERS = {
    "latent": ("latent", lambda data: decode_latent(data, "latent", "in.latent"), check_latent),
    "mask": ("mask", lambda data: decode_mask(data, "mask", "mask.png"), check_mask),
    "conditioning": ("mask_sampler.negative",
                     lambda data: decode_conditioning_with_pooled(data, "mask_sampler.negative", "n.safetensors"),
                     check_conditioning),
}


def check_image(out) -> None:
    assert out.dtype == torch.float32 and out.ndim == 4 and out.shape[0] == 1 and out.shape[3] == 3
    assert min(out.shape[1:3]) >= 8 and float(out.min()) >= 0 and float(out.max()) <= 1


def check_checkpoint(out) -> None:
    assert out.family in ("SD1.x", "SD2.x", "SDXL") and out.config["in_channels"] == 4
    assert out.prediction in ("epsilon", "v_prediction") and out.latent_scale > 0


def read_checkpoint_bytes(data: bytes):
    """read_checkpoint on `data` as a file (it reads headers from disk, as the model store hands them)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzzed.safetensors"
        path.write_bytes(data)
        return read_checkpoint(path, "base_sampler.model")


READERS["image"] = ("image", lambda data: decode_image(data, "image"), check_image)
READERS["checkpoint"] = ("base_sampler.model", read_checkpoint_bytes, check_checkpoint)


def check_reader(kind: str, data: bytes) -> None:
    """The reader's property on `data`: a valid result or an error naming its field, within the memory cap."""
    field, read, check = READERS[kind]
    with memory_cap(READER_MEMORY):
        try:
            out = read(data)
        except (InvalidFile, InvalidInput) as e:
            assert e.field == field and e.reason, e
            return
    check(out)


def file_inputs(kind: str):
    return (st.binary(max_size=1024) | mutated(seed_files()[kind]) | safetensors_headers()
            | (png_chunks() if kind in ("mask", "image") else st.nothing()))


@pytest.mark.parametrize("kind", list(READERS))
def test_seed_files_are_valid_for_their_reader(kind):
    """The mutation starting points decode: the fuzzer starts from real files, not noise."""
    field, read, check = READERS[kind]
    for data in seed_files()[kind]:
        check(read(data))


@given(file_inputs("latent"))
def test_latent_reader_gives_a_latent_or_a_latent_error(data):
    check_reader("latent", data)


@given(file_inputs("mask"))
def test_mask_reader_gives_a_mask_or_a_mask_error(data):
    check_reader("mask", data)


@given(file_inputs("conditioning"))
def test_conditioning_reader_gives_embeddings_or_a_field_error(data):
    check_reader("conditioning", data)


@given(file_inputs("image"))
def test_image_reader_gives_a_picture_or_an_image_error(data):
    check_reader("image", data)


@given(file_inputs("checkpoint"))
def test_checkpoint_reader_gives_a_known_family_or_a_model_error(data):
    check_reader("checkpoint", data)


def test_the_memory_cap_bites():
    """The bound is real: inside the cap, allocating past it fails (so a reader that tried would be caught)."""
    with pytest.raises((MemoryError, RuntimeError)):
        with memory_cap(256 << 20):
            torch.empty(1 << 30, dtype=torch.uint8).fill_(1)

