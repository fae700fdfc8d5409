"""Write a diffusers UNet as a ComfyUI-layout single-file checkpoint (the original LDM key names).

The inverse of the renaming diffusers' `convert_ldm_unet_checkpoint` does (ComfyUI's
`unet_to_diffusers` lists the same pairs): tests turn the tiny golden folders into the
files ComfyUI users have, and check that loading them gives back the same weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
BASIC = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
         "conv_norm_out": "out.0", "conv_out": "out.2"}


def ldm_key(key: str, config: dict) -> str:
    """The LDM (ComfyUI) name of a diffusers UNet state-dict key."""
    layers = config["layers_per_block"]
    for diffusers, ldm in BASIC.items():
        if key.startswith(diffusers + "."):
            return ldm + key[len(diffusers):]
    parts = key.split(".")
    if parts[0] == "mid_block":
        block = {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}[f"{parts[1]}.{parts[2]}"]
        return f"middle_block.{block}." + _inner(parts[1], parts[3:])
    x, kind = int(parts[1]), parts[2]
    if parts[0] == "down_blocks":
        if kind == "downsamplers":  # down_blocks.x.downsamplers.0.conv.weight
            return f"input_blocks.{1 + (layers + 1) * x + layers}.0.op.{parts[-1]}"
        n = 1 + (layers + 1) * x + int(parts[3])
        return f"input_blocks.{n}.{0 if kind == 'resnets' else 1}." + _inner(kind, parts[4:])
    if kind == "upsamplers":  # up_blocks.x.upsamplers.0.conv.weight
        after = 2 if config["up_block_types"][x].startswith("CrossAttn") else 1
        return f"output_blocks.{(layers + 1) * x + layers}.{after}.conv.{parts[-1]}"
    n = (layers + 1) * x + int(parts[3])
    return f"output_blocks.{n}.{0 if kind == 'resnets' else 1}." + _inner(kind, parts[4:])


def _inner(kind: str, rest: list[str]) -> str:
    if kind == "resnets":
        return f"{RESNET[rest[0]]}.{'.'.join(rest[1:])}"
    return ".".join(rest)  # attention internals keep their names


def write_checkpoint(unet_dir: Path, path: Path, prefix: str = "model.diffusion_model.", sidecar: dict | None = None,
                     extra: dict[str, torch.Tensor] | None = None) -> Path:
    """The diffusers UNet in `unet_dir` (config.json + safetensors) as a single file at `path`; a
    sidecar NAME.json when given; `extra` tensors beside the UNet (a VAE's, say)."""
    from safetensors.torch import load_file

    config = json.loads((unet_dir / "config.json").read_text())
    weights = load_file(unet_dir / "diffusion_pytorch_model.safetensors")
    tensors = {prefix + ldm_key(key, config): value.contiguous() for key, value in weights.items()}
    tensors.update(extra or {})
    save_file(tensors, path)
    if sidecar is not None:
        path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_vae_key(key: str, levels: int) -> str:
    """The LDM (ComfyUI) name of a diffusers AutoencoderKL key (attention weights are 1x1 convs there)."""
    for ours, theirs in (("encoder.conv_norm_out", "encoder.norm_out"), ("decoder.conv_norm_out", "decoder.norm_out")):
        if key.startswith(ours + "."):
            return theirs + key[len(ours):]
    parts = key.split(".")
    if len(parts) < 3 or parts[1] not in ("down_blocks", "up_blocks", "mid_block"):
        return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
    coder = parts[0]
    if parts[1] == "mid_block":
        if parts[2] == "resnets":
            return f"{coder}.mid.block_{int(parts[3]) + 1}." + _vae_inner(parts[4:])
        inner = ".".join(parts[4:-1])  # attentions.0.<layer>.weight
        return f"{coder}.mid.attn_1.{VAE_ATTENTION[inner]}.{parts[-1]}"
    i = int(parts[2])
    level, name = (i, "down") if parts[1] == "down_blocks" else (levels - 1 - i, "up")
    if parts[3] in ("downsamplers", "upsamplers"):
        return f"{coder}.{name}.{level}.{parts[3][:-2]}.conv.{parts[-1]}"  # downsample / upsample
    return f"{coder}.{name}.{level}.block.{parts[4]}." + _vae_inner(parts[5:])


def _vae_inner(rest: list[str]) -> str:
    return ".".join([VAE_RESNET.get(rest[0], rest[0])] + rest[1:])


def ldm_vae_tensors(vae, prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's weights under their LDM names (attention as 1x1 convs)."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        name = ldm_vae_key(key, levels)
        if ".attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[prefix + name] = value.contiguous()
    return out
