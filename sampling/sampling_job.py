"""What is sampled: one frozen value with the tensors, the two samplers and the params.

A `SamplingJob` holds the latent, the mask, the two samplers and the job's
`SamplingParams` (sampling_params.py, the one declaration of the parameters): the loops,
the cross-job batcher and the worker's model lane take it whole, so a new parameter is
added to the params and where it is used, nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .comfy_call import AdvancedSampler
from .sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingJob:
    """One job as the engine samples it: tensors, the two samplers and the params."""

    latent: torch.Tensor  # [B, C, H, W], raw latent space
    mask: torch.Tensor  # [H, W], [1 or B, H, W] or [1 or B, 1, H, W], any resolution
    base: AdvancedSampler  # outside the mask
    mask_sampler: AdvancedSampler  # the mask, grown by overlap_factor
    params: SamplingParams

    @classmethod
    def of(cls, latent: torch.Tensor, mask: torch.Tensor, base: AdvancedSampler, mask_sampler: AdvancedSampler,
           **params: Any) -> "SamplingJob":
        """A job from tensors, samplers and the params as keywords (fields of SamplingParams)."""
        return cls(latent, mask, base, mask_sampler, SamplingParams.checked(**params))
