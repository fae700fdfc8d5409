"""The sampling parameters, declared once: what a job's numbers and names may be.

`SamplingParams` (pydantic) declares every sampling parameter with its type, range,
default and description; the job document (`maskfleet/job.py`) extends it, so a job's
fields, its JSON Schema, its docs and the engine's checks all come from here. Nothing
here imports torch: a producer validates jobs with it alone.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InvalidInput

MODES = ("comfy", "regional", "coherent")
MAX_SEED = 2**64 - 1
MAX_STEPS = 10000  # the most steps a job runs, and the longest schedule `int(steps / denoise)` may ask for
MAX_OVERLAP = 10000
MAX_CROP_MARGIN = 10000  # latent pixels of context around the mask sampler's box (region_crop.py)

Mode = Literal[MODES]  # type: ignore[valid-type]


def check_schedule_length(steps: int, denoise: float) -> None:
    """Refuse a `denoise` whose schedule, `int(steps / denoise)` steps, would exceed MAX_STEPS.

    A tiny denoise would otherwise ask for a schedule of a billion sigmas (memory) or an
    infinite one (1 / 5e-324 is inf); compared as floats, so no int() of an overflow.
    """
    length = steps / denoise
    if not length < MAX_STEPS + 1:
        raise InvalidInput(
            "denoise", f"with steps {steps}, the schedule would have int(steps / denoise) = {length:.6g} steps, "
            f"over the maximum of {MAX_STEPS} (denoise must be at least {steps / MAX_STEPS:g})")


class SamplingParams(BaseModel):
    """The numbers and names that say how a job is sampled (everything but its tensors and samplers)."""

    # strict: JSON types as they are ("20" is not a number of steps, true is not 1).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    seed: int = Field(0, ge=0, le=MAX_SEED, description="Noise seed; the same job and seed give the same latent.")
    steps: int = Field(20, ge=1, le=MAX_STEPS, description="Steps the job runs.")
    denoise: float = Field(1.0, gt=0.0, le=1.0, description=f"Fraction of the schedule to run: the schedule has int(steps / denoise) steps (at most {MAX_STEPS}) and the job runs its last `steps`.")
    overlap_factor: int = Field(10, ge=0, le=MAX_OVERLAP, description="Box size by which the mask sampler's region grows past the mask: in latent pixels, in mode 'regional' in the mask's own pixels (as the node does today).")
    crop_margin: int | None = Field(None, ge=0, le=MAX_CROP_MARGIN, description="Opt-in speed-up, off when left out: the mask sampler runs on its grown region's bounding box plus this many latent pixels of context on each side (sides rounded up to fixed sizes), not the whole latent. Faster for small masks; the result differs slightly from full frame (the model sees less context; ancestral/SDE mask samplers draw other noise).")
    mode: Mode = Field("comfy", description="Sampling mode: 'comfy' reproduces the original node in ComfyUI (Impact Pack up to 2024-07); 'regional' reproduces the node as Impact Pack ships it since 2024-08 (its RegionalSampler with one region; refused: crop_margin); 'coherent' keeps each sampler's state, one sigma schedule and one noise stream across the interleaved steps and blends the two results across the overlap band, so every sampler it accepts gives a clean result (both samplers must use the same scheduler; refused: crop_margin, lcm, and dpmpp_2m_sde/dpmpp_3m_sde on the normal and ddim_uniform schedules).")

    @model_validator(mode="after")
    def _schedule_fits(self) -> "SamplingParams":
        """The schedule `int(steps / denoise)` within MAX_STEPS: a tiny denoise asks for billions of sigmas."""
        check_schedule_length(self.steps, self.denoise)
        return self

    @model_validator(mode="after")
    def _regional_runs_full_frame(self) -> "SamplingParams":
        """Regional mode reproduces the node, whose mask sampler sees the whole latent: no crop."""
        if self.mode == "regional" and self.crop_margin is not None:
            raise InvalidInput("crop_margin", "not supported in regional mode (it reproduces the node, whose mask "
                                              "sampler sees the whole latent); leave it out or use mode 'comfy'")
        return self

    @classmethod
    def checked(cls, **values: Any) -> "SamplingParams":
        """Params from a library caller's keywords; InvalidInput naming the first bad field."""
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise field_error(e) from None

    def plan(self) -> tuple[int, int]:
        """(adv_steps, start): the schedule length and the first step the job runs."""
        return plan_steps(self.steps, self.denoise)


def field_error(error: ValidationError) -> InvalidInput:
    """The first error of a validation as InvalidInput naming its field (a rule across fields names its own)."""
    first = error.errors()[0]
    refused = (first.get("ctx") or {}).get("error")
    if isinstance(refused, InvalidInput):
        return refused
    field = ".".join(str(p) for p in first["loc"]) or "params"
    return InvalidInput(field, first["msg"])


def plan_steps(steps: int, denoise: float) -> tuple[int, int]:
    """(adv_steps, start) for `steps` and `denoise`; InvalidInput when the schedule is too long."""
    check_schedule_length(steps, denoise)
    adv_steps = int(steps / denoise)
    return adv_steps, adv_steps - steps
