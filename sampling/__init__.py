"""maskfleet's sampling engine: the two-sampler masked loop as a plain tensor library.

No Celery, Redis or storage here: give it tensors and denoisers, get a latent back.
"""
from .comfy_call import AdvancedSampler
from .errors import InvalidInput, SamplingError, SamplingStopped
from .guidance import Denoiser
from .noise_schedule import NoiseSchedule
from .samplers import SAMPLERS
from .schedulers import SCHEDULERS
from .sampling_job import MODES, ProgressHook, SamplingJob, SamplingParams, StopHook, plan_steps
from .two_sampler_loop import sample_job, sample_two_samplers

__all__ = [
    "AdvancedSampler",
    "Denoiser",
    "InvalidInput",
    "MODES",
    "NoiseSchedule",
    "ProgressHook",
    "SAMPLERS",
    "SCHEDULERS",
    "SamplingError",
    "SamplingJob",
    "SamplingParams",
    "SamplingStopped",
    "StopHook",
    "plan_steps",
    "sample_job",
    "sample_two_samplers",
]
