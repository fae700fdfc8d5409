"""maskfleet's sampling engine: the two-sampler masked loop as a plain tensor library.

No Celery, Redis or storage here: give it tensors and denoisers, get a latent back.

The names below are imported on first use (PEP 562), so the torch-free parts (the
parameters, the names, coherent mode's rules, the errors) can be imported by a producer
that validates jobs without torch installed.
"""
from __future__ import annotations

from ..lazy_exports import lazy_exports

_EXPORTS = {
    "AdvancedSampler": "comfy_call",
    "Denoiser": "guidance",
    "InvalidInput": "errors",
    "MODES": "sampling_params",
    "NoiseSchedule": "noise_schedule",
    "ProgressHook": "hooks",
    "SAMPLERS": "samplers",
    "SCHEDULERS": "schedulers",
    "SamplingError": "errors",
    "SamplingJob": "sampling_job",
    "SamplingParams": "sampling_params",
    "SamplingStopped": "errors",
    "StopHook": "hooks",
    "plan_steps": "sampling_params",
    "sample_job": "two_sampler_loop",
    "sample_two_samplers": "two_sampler_loop",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
