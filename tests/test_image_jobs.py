"""Pictures in and out: VAE encode and decode as ComfyUI does, paste-back, tiles.

A tiny random-weight AutoencoderKL (diffusers', made on the spot) beside the tiny golden
UNet: our encode and decode equal diffusers' own calls, a job given a picture equals the
same job given the latent it encodes to, and the output picture keeps the input's pixels
bit for bit outside the grown mask.
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from golden_jobs import TINY_UNET
from maskfleet.job import parse_job
from maskfleet.job_pipeline import RunOptions, run_job
from maskfleet.sampling.masks import grow_mask
from maskfleet.storage.image_files import decode_image, to_uint8
from maskfleet.vae_codec import VAECodec, crop_to_multiple, load_vae

HEIGHT, WIDTH = 100, 76  # not multiples of 8: cropped to 96 x 72 around the centre
OVERLAP = 3


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32, latent_channels=4,
                         sample_size=64, down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A model store with `tiny-img` (the golden UNet + a tiny VAE) and `tiny` (no VAE); a picture, a mask, prompts."""
    root = tmp_path_factory.mktemp("images")
    models = root / "models"
    shutil.copytree(TINY_UNET, models / "tiny-img" / "unet")
    tiny_vae().save_pretrained(models / "tiny-img" / "vae")
    shutil.copytree(TINY_UNET, models / "tiny")
    g = torch.Generator().manual_seed(3)
    pixels = (torch.rand(HEIGHT, WIDTH, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(root / "in.png")
    mask = torch.zeros(1, 96, 72)
    mask[:, 30:70, 20:50] = 1.0
    save_file({"mask": mask}, root / "mask.safetensors")
    for name in ("pos", "neg"):
        save_file({"prompt_embeds": torch.randn(1, 8, 32, generator=g)}, root / f"{name}.safetensors")
    return root


def job(files: Path, name: str, **changes) -> dict:
    def sampler(cfg):
        return {"model": "tiny-img", "sampler_name": "euler", "scheduler": "karras", "cfg": cfg,
                "positive": (files / "pos.safetensors").as_uri(), "negative": (files / "neg.safetensors").as_uri()}

    doc = {"seed": 5, "steps": 3, "overlap_factor": OVERLAP, "image": (files / "in.png").as_uri(),
           "mask": (files / "mask.safetensors").as_uri(), "base_sampler": sampler(5.0), "mask_sampler": sampler(3.0),
           "output": (files / f"{name}.latent").as_uri(), "output_image": (files / f"{name}.png").as_uri()}
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


def run(files: Path, doc: dict) -> dict:
    return run_job(parse_job(doc), RunOptions(models_root=str(files / "models"), device="cpu"))


def read_png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy())


def test_the_crop_is_comfyuis_around_the_centre():
    pixels = torch.arange(HEIGHT * WIDTH, dtype=torch.float32).reshape(1, HEIGHT, WIDTH, 1)
    cropped = crop_to_multiple(pixels)
    assert cropped.shape == (1, 96, 72, 1)
    assert cropped[0, 0, 0, 0] == pixels[0, 2, 2, 0]  # 100 % 8 = 4 rows: 2 above, 2 below; likewise columns


def test_encode_and_decode_are_diffusers_own_calls(files):
    codec = load_vae(files / "models" / "tiny-img", torch.device("cpu"))
    pixels = crop_to_multiple(decode_image((files / "in.png").read_bytes(), "image"))
    latent = codec.encode(pixels)
    with torch.no_grad():
        want = codec.vae.encode(pixels.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()
        decoded_want = ((codec.vae.decode(latent).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    assert latent.shape == (1, 4, 12, 9) and torch.equal(latent, want)
    assert torch.equal(codec.decode(latent), decoded_want)


def test_a_picture_job_is_the_job_on_the_latent_it_encodes_to(files):
    pictured = run(files, job(files, "pictured"))
    codec = load_vae(files / "models" / "tiny-img", torch.device("cpu"))
    latent = codec.encode(crop_to_multiple(decode_image((files / "in.png").read_bytes(), "image")))
    save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])}, files / "encoded.latent")
    run(files, job(files, "from-latent", image=None, latent=(files / "encoded.latent").as_uri(), output_image=None))
    out = load_file(files / "pictured.latent")["latent_tensor"]
    assert torch.equal(out, load_file(files / "from-latent.latent")["latent_tensor"])
    assert pictured["output_image"].endswith("pictured.png") and len(pictured["output_image_sha256"]) == 64


def test_paste_back_keeps_the_input_pixels_outside_the_grown_mask(files):
    run(files, job(files, "pasted"))
    run(files, job(files, "unpasted", paste_back=False))
    pasted, unpasted = read_png(files / "pasted.png"), read_png(files / "unpasted.png")
    original = read_png(files / "in.png")[2:98, 2:74]
    assert pasted.shape == unpasted.shape == original.shape == (96, 72, 3)
    region = grow_mask(load_file(files / "mask.safetensors")["mask"], 12, 9, OVERLAP)
    outside = torch.nn.functional.interpolate(region, size=(96, 72))[0, 0] == 0
    inside = torch.zeros(96, 72, dtype=torch.bool)
    inside[40:60, 28:42] = True  # well inside the mask (rows 30:70, columns 20:50), where the blend weight is 1
    assert outside.any() and inside.any()
    assert torch.equal(pasted[outside], original[outside])  # bit for bit
    assert not torch.equal(unpasted[outside], original[outside])  # what the VAE round trip alone gives
    decoded = to_uint8(load_vae(files / "models" / "tiny-img", torch.device("cpu")).decode(
        load_file(files / "pasted.latent")["latent_tensor"]))[0]
    assert torch.equal(unpasted, decoded)
    assert (pasted[inside].int() - decoded[inside].int()).abs().max() <= 1  # the decoded pixels on the mask


# A latent over one 64-latent tile in both directions (2 x 2 tiles), with values as a
# stationary texture so every tile sees the statistics of the whole.
TILED_LATENT = (1, 4, 72, 88)


def test_tiles_encode_and_decode_in_pieces(files):
    """`tiled`: ComfyUI's 512 px tiles, whatever the VAE's config says (this one's sample_size is 64)."""
    codec = load_vae(files / "models" / "tiny-img", torch.device("cpu"))
    calls = []
    hook = codec.vae.decoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        latent = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(0))
        assert torch.equal(codec.decode(latent, tiled=True), codec.decode(latent))  # under one tile: one call
        assert len(calls) == 2
        calls.clear()
        codec.decode(torch.randn(TILED_LATENT, generator=torch.Generator().manual_seed(0)), tiled=True)
    finally:
        hook.remove()
    assert len(calls) == 4
    assert not codec.vae.use_tiling  # switched off again
    run(files, job(files, "tiled", tiled=True))
    assert read_png(files / "tiled.png").shape == (96, 72, 3)


def test_tiled_matches_whole_within_the_vaes_own_difference_and_seams_do_not_show():
    """Tiles differ from the whole only by what each tile's own GroupNorm statistics give (a few %
    of the signal for this random VAE, spread evenly); the seam bands, where the second tile (from
    latent 48 = 384 px) is blended over the first's last 128 px, are no worse than the rest.
    Hard seams or small tiles fail this."""
    codec = VAECodec(tiny_vae(), torch.device("cpu"))
    latent = torch.randn(TILED_LATENT, generator=torch.Generator().manual_seed(1))
    whole, tiled = codec.decode(latent), codec.decode(latent, tiled=True)
    diff = (whole - tiled).abs()[0].mean(dim=-1)  # [H, W]
    assert 0 < float(diff.mean()) < 0.1 * float(whole.std())
    for profile in (diff.mean(dim=0), diff.mean(dim=1)):  # by column, by row
        seam = profile[384:512]
        assert float(seam.mean()) < 1.5 * float(profile.mean()), (float(seam.mean()), float(profile.mean()))
    encoded_whole, encoded_tiled = codec.encode(whole), codec.encode(whole, tiled=True)
    assert 0 < float((encoded_whole - encoded_tiled).abs().mean()) < 0.1 * float(encoded_whole.std())


def test_out_of_memory_whole_falls_back_to_tiles():
    vae = tiny_vae()
    codec = VAECodec(vae, torch.device("cpu"))
    latent = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    want = codec.decode(latent, tiled=True)
    real = vae.decode

    def whole_does_not_fit(z, *args, **kwargs):
        if not vae.use_tiling:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(z, *args, **kwargs)

    vae.decode = whole_does_not_fit
    assert torch.equal(codec.decode(latent), want)


def _no_vae(doc: dict) -> dict:
    doc["base_sampler"]["model"] = doc["mask_sampler"]["model"] = "tiny"
    return doc


def _picture(files: Path, name: str, data: bytes) -> str:
    (files / name).write_bytes(data)
    return (files / name).as_uri()


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _zeros_latent(files: Path) -> str:
    save_file({"latent_tensor": torch.zeros(1, 4, 12, 9), "latent_format_version_0": torch.tensor([])}, files / "zeros.latent")
    return (files / "zeros.latent").as_uri()


@pytest.mark.parametrize("make, field, said", [
    (lambda f, d: _no_vae(d), "image", "has no VAE"),
    (lambda f, d: _no_vae({**d, "image": None, "latent": _zeros_latent(f)}), "output_image", "has no VAE"),
    (lambda f, d: {**d, "image": _picture(f, "small.png", _png(30, 4))}, "image", "at least 8"),
    (lambda f, d: {**d, "image": _picture(f, "garbage.png", b"not a picture at all")}, "image", "not an image"),
    (lambda f, d: {**d, "output_image": (f / "refused.jpg").as_uri()}, "output_image", "must name a .png object"),
])
def test_refusals_name_the_field_and_write_nothing(files, make, field, said):
    from maskfleet.sampling.errors import InvalidInput
    from maskfleet.storage.errors import InvalidFile

    doc = {k: v for k, v in make(files, job(files, "refused")).items() if v is not None}
    with pytest.raises((InvalidInput, InvalidFile)) as refused:
        run(files, doc)
    assert str(refused.value).startswith(f"{field}: ") and said in str(refused.value), str(refused.value)
    assert not (files / "refused.latent").exists() and not (files / "refused.png").exists()


def test_a_checkpoints_own_vae_is_the_folders(files, tmp_path):
    """A full checkpoint (UNet under model.diffusion_model., VAE under first_stage_model.): its VAE loads
    with the folder's weights, and a picture job on the single file gives the folder's outputs bitwise."""
    from ldm_checkpoints import ldm_vae_tensors, write_checkpoint

    folder_vae = load_vae(files / "models" / "tiny-img", torch.device("cpu"))
    models = tmp_path / "models"
    models.mkdir()
    write_checkpoint(TINY_UNET, models / "tiny-img.safetensors", extra=ldm_vae_tensors(folder_vae.vae))
    file_vae = load_vae(models / "tiny-img.safetensors", torch.device("cpu"))
    ours, theirs = file_vae.vae.state_dict(), folder_vae.vae.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    doc = job(files, "from-folder")
    run(files, doc)
    run_job(parse_job({**doc, "output": (tmp_path / "file.latent").as_uri(), "output_image": (tmp_path / "file.png").as_uri()}),
            RunOptions(models_root=str(models), device="cpu"))
    assert torch.equal(load_file(tmp_path / "file.latent")["latent_tensor"], load_file(files / "from-folder.latent")["latent_tensor"])
    assert torch.equal(read_png(tmp_path / "file.png"), read_png(files / "from-folder.png"))


def test_a_vae_of_its_own_from_the_store(files, tmp_path):
    """A sampler's `vae` names a VAE in the store (ComfyUI's VAELoader): a bare LDM VAE file, or a diffusers
    AutoencoderKL folder; the job's outputs are those of the model's own VAE with the same weights."""
    from ldm_checkpoints import ldm_vae_tensors

    models = tmp_path / "models"
    shutil.copytree(TINY_UNET, models / "no-vae")
    own = load_vae(files / "models" / "tiny-img", torch.device("cpu"))
    save_file(ldm_vae_tensors(own.vae, prefix=""), models / "my-vae.safetensors")
    shutil.copytree(files / "models" / "tiny-img" / "vae", models / "vae-folder")
    run(files, job(files, "own-vae"))
    for vae in ("my-vae", "vae-folder"):
        doc = job(files, vae, output=(tmp_path / f"{vae}.latent").as_uri(), output_image=(tmp_path / f"{vae}.png").as_uri())
        doc["base_sampler"] = {**doc["base_sampler"], "model": "no-vae", "vae": vae}
        doc["mask_sampler"] = {**doc["mask_sampler"], "model": "no-vae"}
        run_job(parse_job(doc), RunOptions(models_root=str(models), device="cpu"))
        assert torch.equal(read_png(tmp_path / f"{vae}.png"), read_png(files / "own-vae.png")), vae


def test_the_mask_sampler_may_not_name_another_vae(files):
    from maskfleet.job import JobError

    doc = job(files, "x")
    doc["mask_sampler"] = {**doc["mask_sampler"], "vae": "other"}
    with pytest.raises(JobError, match="^mask_sampler.vae: "):
        parse_job(doc)


def test_a_picture_instead_of_a_latent_out(files):
    """`output` left out: the picture is the job's one output (and its commit point)."""
    result = run(files, job(files, "picture-only", output=None))
    assert result["output"] is None and result["sha256"] is None
    assert not (files / "picture-only.latent").exists()
    assert read_png(files / "picture-only.png").shape == (96, 72, 3)
    from maskfleet.job import JobError

    with pytest.raises(JobError, match="^output: required"):
        parse_job(job(files, "none", output=None, output_image=None))


def test_a_vae_of_other_latent_channels_is_refused(files, tmp_path):
    from diffusers import AutoencoderKL

    from maskfleet.sampling.errors import InvalidInput

    models = tmp_path / "models"
    shutil.copytree(TINY_UNET, models / "no-vae")
    AutoencoderKL(block_out_channels=(32,), layers_per_block=1, latent_channels=16,
                  down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"]).save_pretrained(models / "wide-vae")
    doc = job(files, "wide")
    doc["base_sampler"] = {**doc["base_sampler"], "model": "no-vae", "vae": "wide-vae"}
    doc["mask_sampler"] = {**doc["mask_sampler"], "model": "no-vae"}
    with pytest.raises(InvalidInput, match="^base_sampler.vae: the VAE .wide-vae. makes 16-channel latents; "
                                           "base_sampler.model 'no-vae' takes 4"):
        run_job(parse_job(doc), RunOptions(models_root=str(models), device="cpu"))
