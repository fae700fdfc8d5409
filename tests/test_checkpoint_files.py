"""Single-file checkpoints: the tiny golden UNets written as ComfyUI files load as the folders do.

The same weights, the same job output (bitwise on the CPU); families detected from keys
and shapes, refused by name where not supported; nothing but safetensors read, no
network touched.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from golden_jobs import IN_REPO_GOLDEN, make_models_dir, write_case_job
from ldm_checkpoints import write_checkpoint
from maskfleet.checkpoint_files import read_checkpoint
from maskfleet.model_dirs import load_unet_denoiser, unet_inputs
from maskfleet.sampling.errors import InvalidInput
from maskfleet.storage.errors import InvalidFile
from maskfleet.storage.model_store import available_models, resolve_model

FOLDERS = {"tiny": IN_REPO_GOLDEN / "tiny_unet", "tiny_unet_v": IN_REPO_GOLDEN / "tiny_unet_v",
           "tiny_unet_xl": IN_REPO_GOLDEN / "tiny_unet_xl"}
# What the shapes cannot tell about the v-prediction model: its scheduler says so, a ComfyUI user's sidecar too.
SIDECARS = {"tiny_unet_v": {"prediction": "v_prediction"}}


def unet_dir(folder: Path) -> Path:
    return folder / "unet" if (folder / "unet").is_dir() else folder


def as_checkpoint(name: str, root: Path, prefix: str = "model.diffusion_model.") -> Path:
    return write_checkpoint(unet_dir(FOLDERS[name]), root / f"{name}.safetensors", prefix, SIDECARS.get(name))


@pytest.mark.parametrize("name, family, prediction, scale", [
    ("tiny", "SD1.x", "epsilon", 0.18215),
    ("tiny_unet_v", "SD1.x", "v_prediction", 0.18215),
    ("tiny_unet_xl", "SDXL", "epsilon", 0.13025),
])
@pytest.mark.parametrize("prefix", ["model.diffusion_model.", ""], ids=["checkpoint", "unet-only"])
def test_a_checkpoint_loads_the_folders_weights(tmp_path, name, family, prediction, scale, prefix):
    path = as_checkpoint(name, tmp_path, prefix)
    checkpoint = read_checkpoint(path)
    assert (checkpoint.family, checkpoint.prediction, checkpoint.latent_scale) == (family, prediction, scale)
    from_file, from_folder = load_unet_denoiser(path), load_unet_denoiser(FOLDERS[name])
    ours, theirs = from_file.unet.state_dict(), from_folder.unet.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert from_file.schedule.prediction_type == from_folder.schedule.prediction_type
    assert unet_inputs(path) == unet_inputs(FOLDERS[name])


def test_loading_touches_no_network(tmp_path, monkeypatch):
    path = as_checkpoint("tiny_unet_xl", tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access while loading a checkpoint: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    load_unet_denoiser(path)


def test_the_sidecar_wins(tmp_path):
    path = as_checkpoint("tiny", tmp_path)
    path.with_suffix(".json").write_text(json.dumps({"prediction": "v_prediction", "latent_scale": 0.5,
                                                     "attention_head_dim": 4}))
    checkpoint = read_checkpoint(path)
    assert (checkpoint.prediction, checkpoint.latent_scale, checkpoint.config["attention_head_dim"]) == ("v_prediction", 0.5, 4)


def test_a_v_pred_key_marks_v_prediction(tmp_path):
    weights = load_file(as_checkpoint("tiny", tmp_path))
    save_file({**weights, "v_pred": torch.tensor([])}, tmp_path / "marked.safetensors")
    assert read_checkpoint(tmp_path / "marked.safetensors").prediction == "v_prediction"


def _header_only(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(shape) for k, shape in shapes.items()}, path)
    return path


def ldm(**shapes: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """UNet keys (dots written as `__`) under a full checkpoint's prefix."""
    return {"model.diffusion_model." + k.replace("__", "."): v for k, v in shapes.items()}


UNET_START = dict(input_blocks__0__0__weight=(32, 4, 3, 3), input_blocks__1__0__out_layers__3__weight=(32, 32, 3, 3),
                  out__2__weight=(4, 32, 3, 3))


@pytest.mark.parametrize("shapes, said", [
    (ldm(**{**UNET_START, "input_blocks__0__0__weight": (32, 9, 3, 3)}), "not supported: SD inpainting UNet (9 input channels)"),
    (ldm(**UNET_START, label_emb__0__0__weight=(32, 2560), input_blocks__1__1__transformer_blocks__0__attn2__to_k__weight=(32, 1280)),
     "not supported: SDXL refiner"),
    (ldm(**UNET_START, label_emb__0__0__weight=(32, 1024)), "not supported: a UNet with an added embedding of width 1024"),
    (ldm(double_blocks__0__img_attn__qkv__weight=(3, 3)), "not supported: Flux"),
    ({"joint_blocks.0.x_block.attn.qkv.weight": (3, 3)}, "not supported: SD3"),
    ({"first_stage_model.decoder.conv_in.weight": (3, 3)}, "not supported: no UNet found"),
])
def test_unknown_families_are_refused_by_name(tmp_path, shapes, said):
    path = _header_only(tmp_path / "odd.safetensors", shapes)
    with pytest.raises(InvalidInput) as refused:
        read_checkpoint(path, "base_sampler.model")
    assert refused.value.field == "base_sampler.model"
    assert said in refused.value.reason and "known families: SD1.x, SD2.x, SDXL" in refused.value.reason


def test_a_truncated_checkpoint_is_a_field_error(tmp_path):
    path = as_checkpoint("tiny", tmp_path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(InvalidInput, match="not a readable safetensors checkpoint"):
        read_checkpoint(path, "mask_sampler.model")


def test_the_store_finds_files_by_name_with_or_without_suffix_and_refuses_pickles(tmp_path):
    as_checkpoint("tiny", tmp_path)
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x04pickle")
    assert resolve_model(tmp_path, "tiny") == (tmp_path / "tiny.safetensors").resolve()
    assert resolve_model(tmp_path, "tiny.safetensors") == (tmp_path / "tiny.safetensors").resolve()
    assert "tiny.safetensors" in available_models(tmp_path)
    for name in ("old", "old.ckpt"):
        with pytest.raises(InvalidFile, match="old.ckpt is a pickle-format checkpoint: it is never loaded"):
            resolve_model(tmp_path, name, "base_sampler.model")


def _run(job_path: Path, models: Path) -> torch.Tensor:
    proc = subprocess.run([sys.executable, "-m", "maskfleet.cli", "run", str(job_path), "--models", str(models),
                           "--device", "cpu", "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return load_file(json.loads(proc.stdout)["output"].removeprefix("file://"))["latent_tensor"]


@pytest.mark.parametrize("case", ["p01_vpred_euler_karras_o3", "p04_sdxl_heun_normal_o4"])
def test_a_job_on_the_single_file_gives_the_folders_output_bitwise(tmp_path, case):
    """`maskfleet run` with the model as a ComfyUI checkpoint: the golden case within 1e-4 and bitwise
    the output of the same job on the diffusers folder."""
    job_path, case_json, tensors = write_case_job(IN_REPO_GOLDEN / "cases" / case, tmp_path / "job")
    folders = make_models_dir(tmp_path, every_golden_model=True)
    files = tmp_path / "files"
    files.mkdir()
    model = json.loads(job_path.read_text())["base_sampler"]["model"]
    as_checkpoint(model, files)
    from_folder = _run(job_path, folders)
    from_file = _run(job_path, files)
    assert torch.equal(from_file, from_folder)
    ref = tensors["out_intended"]
    assert ((from_file - ref).norm() / ref.norm()).item() <= 1e-4
    shutil.rmtree(folders)


@pytest.mark.parametrize("sidecar, said", [
    ({"prediction": "x0"}, "tiny.json: prediction must be 'epsilon' or 'v_prediction'"),
    ({"latent_scale": "big"}, "tiny.json: latent_scale must be a positive number"),
    ([1, 2], "tiny.json: expected a JSON object"),
])
def test_a_bad_sidecar_is_a_field_error(tmp_path, sidecar, said):
    path = as_checkpoint("tiny", tmp_path)
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    with pytest.raises(InvalidInput, match=said):
        read_checkpoint(path, "base_sampler.model")


def test_a_sidecar_config_that_is_not_numbers_is_a_field_error(tmp_path):
    """The sidecar's config goes through the same checks as a folder's config.json (it raised ValueError)."""
    path = as_checkpoint("tiny", tmp_path)
    path.with_suffix(".json").write_text(json.dumps({"in_channels": "four"}))
    with pytest.raises(InvalidInput, match="^base_sampler.model: tiny.safetensors: in_channels, cross_attention_dim"):
        unet_inputs(path, "base_sampler.model")
