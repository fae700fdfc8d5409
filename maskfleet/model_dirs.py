"""Model directories on disk: what their UNet takes, and loading them as denoisers.

The model store (storage/model_store.py) finds a model's directory and the loaded-model
cache (model_cache.py) keeps what was loaded; this module reads the directory between
the two: the UNet's config.json alone, to check a job's tensors before any weights load,
and the whole model through diffusers. `sampling/` gets the loaded UNet and its noise
schedule and never opens a file. New layouts (single-file checkpoints) belong here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .sampling.errors import InvalidInput
from .sampling.noise_schedule import NoiseSchedule
from .sampling.unet_denoiser import SD15_LATENT_SCALE, UNetDenoiser, pooled_width


@dataclass(frozen=True)
class UNetInputs:
    """What a UNet takes: latent channels, the width of its conditioning (None if unknown) and,
    for an SDXL-style UNet, the width of its pooled embedding (None: it takes none)."""

    in_channels: int
    context_width: int | None
    pooled_width: int | None = None
    latent_scale: float = SD15_LATENT_SCALE  # the latent space it samples in (vae/config.json's scaling_factor)


def unet_folder(model_dir: Path) -> Path:
    """Where the UNet's config and weights are: `unet/` of a pipeline layout, else the directory itself."""
    return model_dir / "unet" if (model_dir / "unet" / "config.json").is_file() else model_dir


def unet_inputs(model_dir: Path, field: str = "model") -> UNetInputs:
    """`unet_inputs_of_dir`, or for a single-file checkpoint what its header says (checkpoint_files.py)."""
    if Path(model_dir).is_file():
        from .checkpoint_files import read_checkpoint

        checkpoint = read_checkpoint(Path(model_dir), field)
        return unet_inputs_of_config(checkpoint.config, checkpoint.latent_scale, checkpoint.path.name, field)
    return unet_inputs_of_dir(model_dir, field)


def unet_inputs_of_dir(model_dir: Path, field: str = "model") -> UNetInputs:
    """Read the UNet's config.json only (no weights), so a job's tensors are checked before a model loads.

    A mismatch found here would otherwise surface as a shape error deep inside the UNet,
    after the model was loaded, with no field to fix.
    """
    config_path = unet_folder(Path(model_dir)) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidInput(field, f"cannot read {config_path}: {e}") from None
    return unet_inputs_of_config(config, latent_scale_of(Path(model_dir), field), str(config_path), field)


def unet_inputs_of_config(config: dict, latent_scale: float, where: str, field: str) -> UNetInputs:
    """What a diffusers UNet config says the UNet takes (`where` names the config in errors).

    The conditioning width is `encoder_hid_dim` when the UNet projects its context first,
    else `cross_attention_dim` (None when that is a per-block list of different widths).
    """
    width = config.get("encoder_hid_dim") if config.get("encoder_hid_dim_type") else config.get("cross_attention_dim", 1280)
    if isinstance(width, (list, tuple)):
        width = width[0] if len(set(width)) == 1 else None
    try:
        pooled = pooled_width(config)
        return UNetInputs(int(config.get("in_channels", 4)), None if width is None else int(width), pooled, latent_scale)
    except InvalidInput as e:
        raise InvalidInput(field, f"{where}: {e.reason}") from None
    except (TypeError, ValueError):
        raise InvalidInput(field, f"{where}: in_channels, cross_attention_dim or the added embedding's "
                                  "widths are not numbers") from None


def load_unet_denoiser(model_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> UNetDenoiser:
    """Load a model directory: a bare diffusers UNet (config.json + weights) or a pipeline layout;
    or a single-file checkpoint (checkpoint_files.py).

    A pipeline layout has `unet/`, optionally `scheduler/` (noise schedule, prediction type)
    and `vae/` (whose `scaling_factor` sets the latent scale). A bare UNet gets SD1.5's
    schedule and latent scale.
    """
    from diffusers import UNet2DConditionModel

    model_dir = Path(model_dir)
    if model_dir.is_file():
        from .checkpoint_files import load_checkpoint_denoiser, read_checkpoint

        return load_checkpoint_denoiser(read_checkpoint(model_dir), device, dtype)
    unet_dir = unet_folder(model_dir)
    if not (unet_dir / "config.json").is_file():
        raise InvalidInput("model", f"{model_dir} holds no diffusers UNet (config.json missing)")
    scheduler_dir = model_dir / "scheduler" if unet_dir != model_dir else None
    unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=dtype, **diffusers_load_options())
    unet.to(device).eval().requires_grad_(False)
    return UNetDenoiser(unet, noise_schedule_of(scheduler_dir), latent_scale_of(model_dir))


def diffusers_load_options() -> dict:
    """How we call diffusers' from_pretrained: safetensors only, and low_cpu_mem_usage only where accelerate is
    installed (its default, minus the warning diffusers prints at every load when it is not)."""
    import importlib.util

    return {"use_safetensors": True, "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}


def latent_scale_of(model_dir: Path, field: str = "model") -> float:
    """The latent scale of a pipeline layout's `vae/config.json` (`scaling_factor`), SD1.5's without one."""
    vae_config = model_dir / "vae" / "config.json"
    if unet_folder(model_dir) == model_dir or not vae_config.is_file():
        return SD15_LATENT_SCALE
    try:
        return float(json.loads(vae_config.read_text()).get("scaling_factor", SD15_LATENT_SCALE))
    except (OSError, ValueError, TypeError) as e:
        raise InvalidInput(field, f"cannot read the latent scale in {vae_config}: {e}") from None


def noise_schedule_of(scheduler_dir: Path | None) -> NoiseSchedule:
    """The schedule in a diffusers `scheduler/` folder's `scheduler_config.json`, SD1.5's when absent."""
    if scheduler_dir is None or not (scheduler_dir / "scheduler_config.json").is_file():
        return NoiseSchedule.from_config({})
    return NoiseSchedule.from_config(json.loads((scheduler_dir / "scheduler_config.json").read_text()))
