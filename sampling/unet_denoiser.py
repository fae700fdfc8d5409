"""A diffusers `UNet2DConditionModel` as a `Denoiser`, evaluated the way ComfyUI evaluates it.

The UNet gets `x / sqrt(sigma^2 + 1)` and the *nearest integer* training timestep of
sigma (fractional timesteps move results by about 1e-3 relative); its output is an
epsilon or a v prediction turned into x0 in float32. An SDXL-style UNet (`addition_embed_type`
"text_time") gets its pooled embedding and size ids from the conditioning's extra rows
(sdxl_conditioning.py). Loading one from a model directory is maskfleet/model_dirs.py's
job: this module opens no files.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator

import torch

from .errors import InvalidInput
from .noise_schedule import NoiseSchedule
from .sdxl_conditioning import SIZE_IDS, unpack

SD15_LATENT_SCALE = 0.18215
SDXL_LATENT_SCALE = 0.13025


class UNetDenoiser:
    """x0 estimates from a diffusers UNet over a ComfyUI-style discrete noise schedule."""

    def __init__(self, unet, schedule: NoiseSchedule, latent_scale: float = SD15_LATENT_SCALE):
        self.pooled_width = pooled_width(unet.config)
        self.unet = unet
        self.schedule = schedule
        self.latent_scale = latent_scale
        self.dtype = unet.dtype
        self.device = unet.device
        self._timesteps: dict[float, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of the UNet's weights and buffers (what the loaded-model cache budgets)."""
        tensors = list(self.unet.parameters()) + list(self.unet.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

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
        layers = [self.unet.time_embedding]
        if self.pooled_width is None:  # SDXL adds each row's own pooled/size embedding before the resnets' projections
            layers += [m.time_emb_proj for m in self.unet.modules() if getattr(m, "time_emb_proj", None) is not None]
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
        added = {}
        if self.pooled_width is not None:
            context, pooled, size_ids = unpack(context, self.pooled_width)
            added["added_cond_kwargs"] = {"text_embeds": pooled.to(device=self.device, dtype=self.dtype),
                                          "time_ids": size_ids.to(self.device)}
        context = context.to(device=self.device, dtype=self.dtype)
        out = self.unet(x_in, t, encoder_hidden_states=context, **added).sample.float()
        if self.schedule.prediction_type == "v_prediction":
            return x * (1.0 / (sigma**2 + 1.0)) - out * sigma / (sigma**2 + 1.0) ** 0.5
        return x - out * sigma


def pooled_width(config) -> int | None:
    """The pooled embedding's width an SDXL-style UNet config takes (None: no added conditioning).

    `projection_class_embeddings_input_dim` is the pooled width plus six size ids of
    `addition_time_embed_dim` each; other added-conditioning kinds are refused by name.
    """
    kind = _get(config, "addition_embed_type")
    if kind is None:
        return None
    if kind != "text_time":
        raise InvalidInput("model", f"UNets with addition_embed_type {kind!r} are not supported (only SDXL's 'text_time')")
    width = int(_get(config, "projection_class_embeddings_input_dim")) - SIZE_IDS * int(_get(config, "addition_time_embed_dim"))
    if width <= 0:
        raise InvalidInput("model", "projection_class_embeddings_input_dim leaves no room for a pooled embedding")
    return width


def _get(config, key: str):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _repeat_first_rows(rows: int, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook: the layer's output over its first `rows` input rows, repeated to the batch."""
    x = inputs[0]
    if x.shape[0] <= rows or x.shape[0] % rows:
        return None
    return module.forward(x[:rows]).repeat(x.shape[0] // rows, *([1] * (output.ndim - 1)))
