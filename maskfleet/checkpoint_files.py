"""Single-file checkpoints (ComfyUI's `models/checkpoints` and `models/unet`): family, config and weights.

A checkpoint is one safetensors file: a full one holds the UNet under
`model.diffusion_model.` (and the VAE and text encoders beside it), a UNet-only file
holds the UNet's keys bare or with that prefix. Only the header is read to tell what the
file is (key names and tensor shapes, as ComfyUI's model detection reads them):

- the UNet's shape: model channels and input channels (`input_blocks.0.0`), per level
  the channels, resnets and transformer depth (`input_blocks.N`; `op` marks a
  downsample), the context width (`attn2.to_k`), linear or convolutional projections
  (`proj_in`), the added-embedding width (`label_emb.0.0`);
- the family from those: SDXL (a `label_emb` of pooled width + 6 x 256 size ids), SD2.x
  (linear projections, context 1024), SD1.x (the rest); refused by name: inpainting
  UNets (9 input channels), the SDXL refiner (context 1280, added width 2560), other
  added embeddings (unCLIP), transformer models (Flux, SD3) and files with no UNet;
- the diffusers config from the shapes, with the family's defaults for what shapes do
  not tell (attention heads: 8 for SD1.x, one per 64 channels for SD2.x and SDXL); a
  sidecar `NAME.json` (a diffusers UNet config, whole or partial, plus `prediction` and
  `latent_scale`) wins over what is derived.

The prediction type: the sidecar's `prediction`; else `v_prediction` when the file has a
`v_pred` key (ComfyUI's marker); else, for SD2.x, ComfyUI's test of 768-v checkpoints
(the last output block's `norm1.bias` has a standard deviation above 0.09); else epsilon.
The weights are renamed by diffusers' own converter (`convert_ldm_unet_checkpoint`) and
loaded strictly: no network, no pickle, nothing but the UNet's tensors read.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .sampling.errors import InvalidInput
from .sampling.noise_schedule import NoiseSchedule
from .sampling.sdxl_conditioning import SIZE_IDS
from .sampling.unet_denoiser import SD15_LATENT_SCALE, SDXL_LATENT_SCALE, UNetDenoiser

LDM_PREFIX = "model.diffusion_model."
SIZE_ID_WIDTH = 256  # each size id's embedding (SDXL's addition_time_embed_dim)
V_PRED_MARKER = "v_pred"
SD2_V_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_STD = 0.09
KNOWN_FAMILIES = ("SD1.x", "SD2.x", "SDXL")


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint file holds, from its header (and sidecar): enough to check jobs and to load it."""

    path: Path
    family: str  # one of KNOWN_FAMILIES
    prefix: str  # the UNet keys' prefix in the file ("" for a bare UNet file)
    config: dict  # the diffusers UNet config
    prediction: str  # "epsilon" or "v_prediction"
    latent_scale: float


def read_checkpoint(path: Path, field: str = "model") -> Checkpoint:
    """Read `path`'s header (and its sidecar `NAME.json`): family, UNet config, prediction, latent scale."""
    from safetensors import safe_open

    name = path.name
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            prefix = _unet_prefix(shapes, name, field)
            unet = {key[len(prefix):]: shape for key, shape in shapes.items() if key.startswith(prefix)}
            shape = _unet_shape(unet)
            family = _family(shape, name, field)
            sidecar = _sidecar(path, field)
            prediction = sidecar.pop("prediction", None) or _prediction(f, shapes, prefix, family)
    except InvalidInput:
        raise
    except Exception as e:  # safetensors' own errors (truncated, not safetensors, bad header), or shapes no UNet has
        raise InvalidInput(field, f"{name} is not a readable safetensors checkpoint: {e}") from None
    if prediction not in ("epsilon", "v_prediction"):
        raise InvalidInput(field, f"{path.stem}.json: prediction must be 'epsilon' or 'v_prediction', got {prediction!r}")
    latent_scale = sidecar.pop("latent_scale", SDXL_LATENT_SCALE if family == "SDXL" else SD15_LATENT_SCALE)
    if isinstance(latent_scale, bool) or not isinstance(latent_scale, (int, float)) or not latent_scale > 0:
        raise InvalidInput(field, f"{path.stem}.json: latent_scale must be a positive number, got {latent_scale!r}")
    config = {**_diffusers_config(shape, family), **sidecar}
    return Checkpoint(path, family, prefix, config, prediction, float(latent_scale))


def load_checkpoint_denoiser(checkpoint: Checkpoint, device: str | torch.device = "cpu",
                             dtype: torch.dtype = torch.float32, field: str = "model") -> UNetDenoiser:
    """The checkpoint's UNet as a denoiser: weights renamed by diffusers' converter, loaded strictly."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors import safe_open

    with safe_open(str(checkpoint.path), framework="pt") as f:
        ldm = {LDM_PREFIX + key[len(checkpoint.prefix):]: f.get_tensor(key)
               for key in f.keys() if key.startswith(checkpoint.prefix) and _is_unet_key(key[len(checkpoint.prefix):])}
    weights = convert_ldm_unet_checkpoint(ldm, checkpoint.config)
    with torch.device("meta"):  # no random initialisation: every weight comes from the file, assigned as read
        unet = UNet2DConditionModel.from_config(checkpoint.config)
    missing, unexpected = unet.load_state_dict(weights, strict=False, assign=True)
    if missing or unexpected:
        shown = ", ".join((missing or unexpected)[:3])
        raise InvalidInput(field, f"{checkpoint.path.name}: its {checkpoint.family} UNet weights do not fit the config "
                                  f"derived from them ({len(missing)} missing, {len(unexpected)} unexpected: {shown}); "
                                  f"a sidecar {checkpoint.path.stem}.json can give the config")
    left = [name for name, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    if left:
        raise InvalidInput(field, f"{checkpoint.path.name}: no weights for {', '.join(left[:3])}")
    unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    schedule = NoiseSchedule.from_config({"prediction_type": checkpoint.prediction})
    return UNetDenoiser(unet, schedule, checkpoint.latent_scale)


@dataclass(frozen=True)
class UNetShape:
    """What the key names and shapes say about a UNet (ComfyUI's `detect_unet_config`, in diffusers terms)."""

    in_channels: int
    out_channels: int
    level_channels: tuple[int, ...]
    level_resnets: tuple[int, ...]
    level_depths: tuple[int, ...]  # transformer blocks per attention, 0 for a level without attention
    middle_depth: int
    context_width: int | None
    linear_projection: bool
    added_width: int | None  # label_emb's input width (SDXL: pooled + size ids)


def _is_unet_key(key: str) -> bool:
    return key.split(".", 1)[0] in ("input_blocks", "middle_block", "output_blocks", "out", "time_embed", "label_emb")


def _unet_prefix(shapes: dict[str, tuple], name: str, field: str) -> str:
    for prefix in (LDM_PREFIX, ""):
        if f"{prefix}input_blocks.0.0.weight" in shapes:
            return prefix
    if any(re.match(r"(model\.diffusion_model\.)?double_blocks\.", k) for k in shapes):
        raise _refused(name, "Flux (a transformer, not a UNet)", field)
    if any(re.match(r"(model\.diffusion_model\.)?joint_blocks\.", k) for k in shapes):
        raise _refused(name, "SD3 (a transformer, not a UNet)", field)
    raise _refused(name, "no UNet found (no input_blocks.0.0.weight, bare or under model.diffusion_model.)", field)


def _unet_shape(unet: dict[str, tuple]) -> UNetShape:
    model_channels, in_channels = unet["input_blocks.0.0.weight"][:2]
    channels, resnets, depths = [], [], []
    level_channels, level_resnets, level_depth = None, 0, 0
    i = 1
    while any(k.startswith(f"input_blocks.{i}.") for k in unet):
        if f"input_blocks.{i}.0.op.weight" in unet:  # a downsample ends the level
            channels.append(level_channels), resnets.append(level_resnets), depths.append(level_depth)
            level_resnets, level_depth = 0, 0
        else:
            level_channels = unet[f"input_blocks.{i}.0.out_layers.3.weight"][0]
            level_resnets += 1
            level_depth = max(level_depth, _depth(unet, f"input_blocks.{i}.1."))
        i += 1
    channels.append(level_channels), resnets.append(level_resnets), depths.append(level_depth)
    context = next((shape[1] for key, shape in unet.items() if key.endswith("attn2.to_k.weight")), None)
    proj_in = next((shape for key, shape in unet.items() if key.endswith(".proj_in.weight")), None)
    added = unet.get("label_emb.0.0.weight")
    return UNetShape(in_channels, unet["out.2.weight"][0], tuple(channels), tuple(resnets), tuple(depths),
                     _depth(unet, "middle_block.1."), context, proj_in is not None and len(proj_in) == 2,
                     None if added is None else added[1])


def _depth(unet: dict[str, tuple], block: str) -> int:
    """Transformer blocks in the spatial transformer at `block` (0: none there)."""
    pattern = re.compile(re.escape(block) + r"transformer_blocks\.(\d+)\.")
    found = {int(m.group(1)) for key in unet if (m := pattern.match(key))}
    return max(found) + 1 if found else 0


def _family(shape: UNetShape, name: str, field: str) -> str:
    if shape.in_channels == 9:
        raise _refused(name, "SD inpainting UNet (9 input channels)", field)
    if shape.in_channels != 4:
        raise _refused(name, f"a UNet with {shape.in_channels} input channels", field)
    if shape.added_width is not None:
        if shape.context_width == 1280 and shape.added_width == 2560:
            raise _refused(name, "SDXL refiner", field)
        if shape.added_width <= SIZE_IDS * SIZE_ID_WIDTH:
            raise _refused(name, f"a UNet with an added embedding of width {shape.added_width} (unCLIP or another "
                                 "class-conditioned model)", field)
        return "SDXL"
    return "SD2.x" if shape.linear_projection or shape.context_width == 1024 else "SD1.x"


def _refused(name: str, what: str, field: str) -> InvalidInput:
    return InvalidInput(field, f"{name}: not supported: {what}; known families: {', '.join(KNOWN_FAMILIES)}")


def _sidecar(path: Path, field: str) -> dict:
    """`NAME.json` beside the checkpoint: a diffusers UNet config (whole or partial), `prediction`, `latent_scale`."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return {}
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError) as e:
        raise InvalidInput(field, f"{sidecar.name}: not a readable JSON object: {e}") from None
    if not isinstance(data, dict):
        raise InvalidInput(field, f"{sidecar.name}: expected a JSON object (a diffusers UNet config, prediction, latent_scale)")
    return data


def _prediction(f, shapes: dict[str, tuple], prefix: str, family: str) -> str:
    if V_PRED_MARKER in shapes:
        return "v_prediction"
    if family == "SD2.x" and prefix + SD2_V_KEY in shapes and f.get_tensor(prefix + SD2_V_KEY).float().std() > SD2_V_STD:
        return "v_prediction"
    return "epsilon"


def _diffusers_config(shape: UNetShape, family: str) -> dict:
    attention = [depth > 0 for depth in shape.level_depths]
    if family == "SD1.x":
        heads: int | list[int] = 8
    else:
        heads = [max(1, channels // 64) for channels in shape.level_channels]
    config = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": shape.in_channels,
        "out_channels": shape.out_channels,
        "block_out_channels": list(shape.level_channels),
        "layers_per_block": shape.level_resnets[0] if len(set(shape.level_resnets)) == 1 else list(shape.level_resnets),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "transformer_layers_per_block": [max(1, depth) for depth in shape.level_depths],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if shape.middle_depth else "UNetMidBlock2D",
        "cross_attention_dim": shape.context_width,
        "attention_head_dim": heads,
        "use_linear_projection": shape.linear_projection,
        "norm_num_groups": 32,
    }
    if family == "SDXL":
        config.update(addition_embed_type="text_time", addition_time_embed_dim=SIZE_ID_WIDTH,
                      projection_class_embeddings_input_dim=shape.added_width)
    return config
