"""Pictures to latents and back with a model's VAE, as ComfyUI's VAEEncode and VAEDecode do.

Encode: the picture ([B, H, W, 3] in [0, 1]) cropped to a multiple of 8 around its centre
(ComfyUI's `vae_encode_crop_pixels`: the odd rows and columns split between the two
sides, the extra one at the end), scaled to [-1, 1], encoded; the latent is the
posterior's mean (deterministic: the same picture gives the same latent), in raw latent
space (the sampler applies the latent scale). Decode: the raw latent decoded, then
clamp((x + 1) / 2, 0, 1). The VAE runs in float32 (fp16 VAEs overflow, and a VAE is small).

Large pictures: `tiled` encodes and decodes in overlapping tiles blended at the seams
(diffusers' tiling, with ComfyUI's fallback tile: 512 px = 64 latent, a quarter of it
overlapping, whatever the VAE's config says), and a call that runs out of memory whole is
retried in tiles, as ComfyUI falls back to tiled decoding. A random-weight VAE's tiles differ
from the whole by their own GroupNorm statistics (a few % of the signal); the seams add
nothing visible (tests/test_image_jobs.py). One lock per codec: the job threads of a
pipelined worker share the loaded VAE, and tiling is a switch on it.

The VAE comes from a diffusers folder's `vae/` (config.json + safetensors weights), a
single-file checkpoint's `first_stage_model.` keys, a VAE of its own in the model store
(a diffusers AutoencoderKL folder, or a bare LDM VAE file as ComfyUI's VAELoader takes
it; a sampler's `vae` names it). Single files are renamed by diffusers' converter, their
config from the tensor shapes.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

from .model_dirs import diffusers_load_options
from .sampling.errors import InvalidInput

DOWNSCALE = 8
TILE_PIXELS = 512  # ComfyUI's tiled fallback: 64-latent tiles overlapping by 16
TILE_OVERLAP = 0.25
LDM_VAE_PREFIX = "first_stage_model."
VAE_PARTS = ("encoder", "decoder", "quant_conv", "post_quant_conv")


def crop_to_multiple(pixels: torch.Tensor, multiple: int = DOWNSCALE) -> torch.Tensor:
    """[B, H, W, C] cropped to sides that are multiples of `multiple`, around the centre (ComfyUI's rule)."""
    _, h, w, _ = pixels.shape
    new_h, new_w = h // multiple * multiple, w // multiple * multiple
    top, left = (h % multiple) // 2, (w % multiple) // 2
    return pixels[:, top:top + new_h, left:left + new_w, :]


class VAECodec:
    """A loaded diffusers AutoencoderKL: pictures to raw latents and back."""

    def __init__(self, vae, device: torch.device):
        self.vae = vae
        self.device = device
        self.latent_channels = int(vae.config.latent_channels)
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.vae.parameters()) + list(self.vae.buffers()))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """[B, H, W, 3] in [0, 1] (sides multiples of 8) -> raw latent [B, C, H / 8, W / 8] float32 on the CPU."""
        x = (pixels.permute(0, 3, 1, 2).float() * 2.0 - 1.0).to(self.device)
        return self._run(lambda: self.vae.encode(x).latent_dist.mode(), tiled).float().cpu().contiguous()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Raw latent [B, C, h, w] -> [B, 8h, 8w, 3] in [0, 1], float32 on the CPU."""
        z = latent.float().to(self.device)
        x = self._run(lambda: self.vae.decode(z).sample, tiled)
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).cpu()

    def _run(self, call, tiled: bool) -> torch.Tensor:
        with self._lock:
            if not tiled:
                try:
                    return call()
                except (torch.OutOfMemoryError, MemoryError):
                    pass  # retried in tiles below, with what the whole call held given back
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.vae.enable_tiling()
            self.vae.tile_sample_min_size, self.vae.tile_latent_min_size = TILE_PIXELS, TILE_PIXELS // DOWNSCALE
            self.vae.tile_overlap_factor = TILE_OVERLAP
            try:
                return call()
            finally:
                self.vae.disable_tiling()


def vae_latent_channels(model_path: Path, field: str) -> int:
    """The latent channels of the VAE at `model_path` (see `load_vae`), from its config or header alone
    (no weights read); InvalidInput when there is none."""
    model_path = Path(model_path)
    if model_path.is_file():
        return int(_checkpoint_vae_config(model_path, field)["latent_channels"])
    folder = _vae_folder(model_path)
    if folder is None:
        raise InvalidInput(field, f"model {model_path.name!r} has no VAE (a vae/ folder with config.json and safetensors "
                                  "weights), so it cannot encode or decode pictures")
    return int(json.loads((folder / "config.json").read_text()).get("latent_channels", 4))


def load_vae(model_path: Path, device: torch.device, field: str = "model") -> VAECodec:
    """The VAE at `model_path` on `device` in float32: a model folder's `vae/`, a diffusers AutoencoderKL
    folder, or a single file (a checkpoint's `first_stage_model.` keys, or a bare VAE file as ComfyUI's
    models/vae holds them)."""
    from diffusers import AutoencoderKL

    model_path = Path(model_path)
    if model_path.is_file():
        vae = _checkpoint_vae(model_path, field)
    else:
        vae_latent_channels(model_path, field)  # the refusal when there is none
        vae = AutoencoderKL.from_pretrained(_vae_folder(model_path), torch_dtype=torch.float32, **diffusers_load_options())
    vae.to(device).eval().requires_grad_(False)
    return VAECodec(vae, device)


def _vae_folder(model_dir: Path) -> Path | None:
    """The folder holding the VAE's config and weights: `vae/` of a pipeline, or the folder itself when it is one."""
    for folder in (model_dir / "vae", model_dir):
        config = folder / "config.json"
        if config.is_file() and any(folder.glob("*.safetensors")):
            if folder != model_dir or json.loads(config.read_text()).get("_class_name") == "AutoencoderKL":
                return folder
    return None


def _vae_prefix(keys) -> str | None:
    for prefix in (LDM_VAE_PREFIX, ""):
        if f"{prefix}encoder.conv_in.weight" in keys:
            return prefix
    return None


def _checkpoint_vae_config(path: Path, field: str) -> dict:
    """A diffusers AutoencoderKL config from the LDM VAE's shapes in a single file (its scaling factor is
    not used: the sampler applies the model's latent scale)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            prefix = _vae_prefix(set(f.keys()))
            if prefix is None:
                raise InvalidInput(field, f"{path.name} holds no VAE (no encoder.conv_in, bare or under {LDM_VAE_PREFIX}), "
                                          "so it cannot encode or decode pictures")
            shapes = {k[len(prefix):]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(prefix)}
    except InvalidInput:
        raise
    except Exception as e:  # safetensors' own errors
        raise InvalidInput(field, f"{path.name} is not a readable safetensors file: {e}") from None
    levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down.")})
    channels = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels]
    layers = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")})
    return {"in_channels": shapes["encoder.conv_in.weight"][1], "out_channels": shapes["decoder.conv_out.weight"][0],
            "down_block_types": ["DownEncoderBlock2D"] * len(levels), "up_block_types": ["UpDecoderBlock2D"] * len(levels),
            "block_out_channels": channels, "layers_per_block": layers,
            "latent_channels": shapes["encoder.conv_out.weight"][0] // 2, "sample_size": 512}


def _checkpoint_vae(path: Path, field: str):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors import safe_open

    config = _checkpoint_vae_config(path, field)
    with safe_open(str(path), framework="pt") as f:
        prefix = _vae_prefix(set(f.keys()))
        weights = {LDM_VAE_PREFIX + k[len(prefix):]: f.get_tensor(k) for k in f.keys()
                   if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0] in VAE_PARTS}
    vae = AutoencoderKL(**config)
    missing, unexpected = vae.load_state_dict(convert_ldm_vae_checkpoint(weights, config), strict=False)
    if missing or unexpected:
        raise InvalidInput(field, f"{path.name}: its VAE weights do not fit the config derived from them "
                                  f"({len(missing)} missing, {len(unexpected)} unexpected)")
    return vae.float()
