"""A diffusers `UNet2DConditionModel` as a `Denoiser`, evaluated the way ComfyUI evaluates it.

The UNet gets `x / sqrt(sigma^2 + 1)` and the *nearest integer* training timestep of
sigma (fractional timesteps move results by about 1e-3 relative); its output is an
epsilon or a v prediction turned into x0 in float32.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import torch

from .errors import InvalidInput
from .noise_schedule import NoiseSchedule

SD15_LATENT_SCALE = 0.18215


class UNetDenoiser:
    """x0 estimates from a diffusers UNet over a ComfyUI-style discrete noise schedule."""

    def __init__(self, unet, schedule: NoiseSchedule, latent_scale: float = SD15_LATENT_SCALE):
        if getattr(unet.config, "addition_embed_type", None):
            raise InvalidInput(
                "model", f"UNets with addition_embed_type {unet.config.addition_embed_type!r} (SDXL-style) are not supported yet"
            )
        self.unet = unet
        self.schedule = schedule
        self.latent_scale = latent_scale
        self.dtype = unet.dtype
        self.device = unet.device
        self._timesteps: dict[float, torch.Tensor] = {}

    def _timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        key = float(sigma)
        t = self._timesteps.get(key)
        if t is None:
            t = self.schedule.timestep(sigma.detach().float().cpu()).float().to(self.device)
            self._timesteps[key] = t
        return t

    @contextmanager
    def timestep_rows(self, rows: int) -> Iterator[None]:
        """Within the block, the timestep embedding layers compute `rows` rows and repeat them.

        Every row of a call has the same timestep (one sigma per call), so the embedding
        and each resnet's projection of it are the same in every row. Their matrix products
        are the only ones whose row count is the batch size, and CPU GEMM kernels round by
        row count; computing them at the row count one job has alone makes a batch of jobs
        (job_batch.py) give each job its own bits.
        """
        layers = [self.unet.time_embedding] + [m.time_emb_proj for m in self.unet.modules()
                                               if getattr(m, "time_emb_proj", None) is not None]
        hooks = [layer.register_forward_hook(partial(_repeat_first_rows, rows)) for layer in layers]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x_in = (x / (sigma**2 + 1.0) ** 0.5).to(self.dtype)
        t = self._timestep(sigma).expand(x.shape[0])
        out = self.unet(x_in, t, encoder_hidden_states=context.to(device=self.device, dtype=self.dtype)).sample.float()
        if self.schedule.prediction_type == "v_prediction":
            return x * (1.0 / (sigma**2 + 1.0)) - out * sigma / (sigma**2 + 1.0) ** 0.5
        return x - out * sigma


def _repeat_first_rows(rows: int, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook: the layer's output over its first `rows` input rows, repeated to the batch."""
    x = inputs[0]
    if x.shape[0] <= rows or x.shape[0] % rows:
        return None
    return module.forward(x[:rows]).repeat(x.shape[0] // rows, *([1] * (output.ndim - 1)))


@dataclass(frozen=True)
class UNetInputs:
    """What a UNet takes: latent channels and the width of its conditioning (None if unknown)."""

    in_channels: int
    context_width: int | None


def _unet_dir(model_dir: Path) -> Path:
    return model_dir / "unet" if (model_dir / "unet" / "config.json").is_file() else model_dir


def unet_inputs(model_dir: Path, field: str = "model") -> UNetInputs:
    """Read the UNet's config.json only (no weights), so a job's tensors are checked before a model loads.

    A mismatch found here would otherwise surface as a shape error deep inside the UNet,
    after the model was loaded, with no field to fix. The conditioning width is
    `encoder_hid_dim` when the UNet projects its context first, else `cross_attention_dim`
    (None when that is a per-block list of different widths).
    """
    config_path = _unet_dir(Path(model_dir)) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidInput(field, f"cannot read {config_path}: {e}") from None
    width = config.get("encoder_hid_dim") if config.get("encoder_hid_dim_type") else config.get("cross_attention_dim", 1280)
    if isinstance(width, (list, tuple)):
        width = width[0] if len(set(width)) == 1 else None
    try:
        return UNetInputs(int(config.get("in_channels", 4)), None if width is None else int(width))
    except (TypeError, ValueError):
        raise InvalidInput(field, f"{config_path}: in_channels or cross_attention_dim is not a number") from None


def load_unet_denoiser(model_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> UNetDenoiser:
    """Load a model directory: a bare diffusers UNet (config.json + weights) or a pipeline layout.

    A pipeline layout has `unet/`, optionally `scheduler/` (noise schedule, prediction type)
    and `vae/` (whose `scaling_factor` sets the latent scale). A bare UNet gets SD1.5's
    schedule and latent scale.
    """
    from diffusers import UNet2DConditionModel

    model_dir = Path(model_dir)
    unet_dir = _unet_dir(model_dir)
    if not (unet_dir / "config.json").is_file():
        raise InvalidInput("model", f"{model_dir} holds no diffusers UNet (config.json missing)")
    scheduler_dir = model_dir / "scheduler" if unet_dir != model_dir else None
    latent_scale = SD15_LATENT_SCALE
    vae_config = model_dir / "vae" / "config.json"
    if unet_dir != model_dir and vae_config.is_file():
        latent_scale = float(json.loads(vae_config.read_text()).get("scaling_factor", SD15_LATENT_SCALE))
    unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=dtype, use_safetensors=True)
    unet.to(device).eval().requires_grad_(False)
    return UNetDenoiser(unet, NoiseSchedule.from_scheduler_dir(scheduler_dir), latent_scale)
