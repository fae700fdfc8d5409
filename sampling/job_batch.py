"""Several jobs sampled as one batch: what makes them batchable, and running them together.

Jobs that share models, samplers, schedules and shapes (everything in `BatchKey`) can
run as one latent batch: their latents, masks and conditionings are concatenated along
dim 0, the two-sampler loop runs once, and the output is split back per job. Each job
keeps its own randomness (`JobBatchRandomness`: its seed, generator stream and Brownian
tree over its own rows), so the only thing that can differ from running it alone is the
model's arithmetic on a larger batch:

- `forward="fused"` evaluates all jobs' rows in one model forward (the point of batching).
  Kernels may round a row differently at another batch size: on CPU, MKL's sgemm picks
  its kernel by the number of rows (1, 2-3, 4+ behave differently) and oneDNN's
  convolution treats a batch of 1 differently from larger ones. In a UNet the only
  products whose row count is the batch are the timestep embedding's, identical in every
  row; on the CPU, when every job has the same latent batch, `SharedTimestepRows`
  computes them at the row count of one job alone (UNetDenoiser.timestep_rows), and the
  outputs are bitwise the unbatched runs whenever a job alone already runs the UNet on 2 or
  more rows (cfg other than 1, or a latent batch above 1). Otherwise rows differ by float
  rounding (about 1e-6 relative per evaluation). A model whose rows do not depend on the
  batch gives bitwise equal outputs.
- `forward="per_job"` evaluates each job's rows in their own forward, laid out exactly as
  the job alone lays them out (cond and uncond of that job in one call): bitwise equal to
  unbatched runs on any device, but the model work is not fused.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from pydantic import BaseModel

from .comfy_call import AdvancedSampler
from .errors import InvalidInput
from .guidance import Denoiser, _batch
from .masks import check_mask_fits, normalize_mask
from .noise_sources import JobBatchRandomness
from .hooks import ProgressHook, StopHook
from .sampling_job import SamplingJob
from .sampling_params import SamplingParams
from .two_sampler_loop import sample_job

FORWARDS = ("fused", "per_job")


@dataclass(frozen=True)
class ConditioningKey:
    """A conditioning's shape past its batch dimension ([T, D]), dtype and device."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, cond: torch.Tensor) -> "ConditioningKey":
        return cls(tuple(cond.shape[1:]), cond.dtype, cond.device)


@dataclass(frozen=True)
class SamplerKey:
    """What must be equal in one sampler of two jobs; the denoiser is compared by identity."""

    denoiser: Denoiser  # the same loaded model object (as a model cache hands out)
    sampler_name: str
    scheduler: str
    cfg: float
    positive: ConditioningKey
    negative: ConditioningKey

    @classmethod
    def of(cls, sampler: AdvancedSampler) -> "SamplerKey":
        return cls(sampler.denoiser, sampler.sampler_name, sampler.scheduler, float(sampler.cfg),
                   ConditioningKey.of(sampler.positive), ConditioningKey.of(sampler.negative))


@dataclass(frozen=True)
class BatchKey:
    """Jobs with equal keys run as one batch; seeds, latent and mask values, latent batch
    sizes and conditioning values may differ."""

    base: SamplerKey
    mask_sampler: SamplerKey
    params: SamplingParams  # the job's params but its seed (a new param must be equal to batch, by default)
    latent_shape: tuple[int, ...]  # [C, H, W]
    latent_dtype: torch.dtype
    device: torch.device
    mask_shape: tuple[int, int]  # the mask's [h, w] (any resolution, but the same for all)


def batch_key(job: SamplingJob, field: str = "job") -> BatchKey | None:
    """The key under which `job` batches, None when it runs alone (a cropped mask sampler works
    on the job's own box, which a batch cannot share); InvalidInput (naming `field`) for a malformed job."""
    if job.params.crop_margin is not None:
        return None
    if job.latent.ndim != 4:
        raise InvalidInput(f"{field}.latent", f"expected shape [B, C, H, W], got {list(job.latent.shape)}")
    if job.mask.ndim not in (2, 3, 4):
        raise InvalidInput(f"{field}.mask", f"expected shape [H, W] or [B, H, W], got {list(job.mask.shape)}")
    return BatchKey(
        base=SamplerKey.of(job.base),
        mask_sampler=SamplerKey.of(job.mask_sampler),
        params=job.params.model_copy(update={"seed": 0}),
        latent_shape=tuple(job.latent.shape[1:]),
        latent_dtype=job.latent.dtype,
        device=job.latent.device,
        mask_shape=(int(job.mask.shape[-2]), int(job.mask.shape[-1])),
    )


def _fields(value) -> list[tuple[str, object, bool]]:
    """(name, value, whether it is named under its parent) of a key's parts; params' fields stand alone."""
    if isinstance(value, BaseModel):
        return [(name, getattr(value, name), False) for name in type(value).model_fields]
    return [(f.name, getattr(value, f.name), not isinstance(getattr(value, f.name), BaseModel))
            for f in dataclasses.fields(value)]


def _first_difference(a, b, prefix: str = "") -> str:
    for (name, x, _), (_, y, named) in zip(_fields(a), _fields(b)):
        if dataclasses.is_dataclass(x) or isinstance(x, BaseModel):
            found = _first_difference(x, y, f"{prefix}{name}." if named else prefix)
            if found:
                return found
        elif x != y:
            shown = (f"{type(x).__name__} object {id(x):#x}", f"{type(y).__name__} object {id(y):#x}") \
                if name == "denoiser" else (repr(x), repr(y))
            return f"{prefix}{name} is {shown[1]}, not {shown[0]} as in items[0]"
    return ""


def check_batchable(items: Sequence[SamplingJob]) -> BatchKey:
    """The items' common key; InvalidInput naming the first item and field that differ."""
    if not items:
        raise InvalidInput("items", "a batch needs at least one job")
    keys = [batch_key(item, f"items[{i}]") for i, item in enumerate(items)]
    for i, key in enumerate(keys):
        if key is None:
            raise InvalidInput(f"items[{i}].crop_margin", "a job with a crop margin runs alone, not in a batch")
        if key != keys[0]:
            raise InvalidInput(f"items[{i}]", f"cannot be batched with items[0]: {_first_difference(keys[0], key)}")
    return keys[0]  # type: ignore[return-value]


class PerJobForward:
    """A denoiser that evaluates each job's rows in a forward of their own.

    The batched loop hands the model k blocks of all jobs' rows (`guidance.guided_denoise_many`'s
    layout: k = 1 for cfg 1, 2 for cond and uncond, up to 4 when coherent mode asks for
    both samplers at once); each job gets its own rows of the k blocks, in block order,
    exactly what it gets alone, so its rows are computed by the same kernels as in an
    unbatched run.
    """

    def __init__(self, inner: Denoiser, rows: Sequence[int]):
        self.inner = inner
        self.schedule = inner.schedule
        self.latent_scale = inner.latent_scale
        self.rows = list(rows)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        total = sum(self.rows)
        if x.shape[0] % total:
            raise ValueError(f"expected a multiple of {total} rows, got {x.shape[0]}")
        k = x.shape[0] // total
        x_jobs = [block.split(self.rows) for block in x.split(total)]  # [block][job]
        c_jobs = [block.split(self.rows) for block in context.split(total)]
        outs = [self.inner.denoise(torch.cat([xb[j] for xb in x_jobs]), sigma, torch.cat([cb[j] for cb in c_jobs]))
                for j in range(len(self.rows))]
        per_block = [out.split(r) for out, r in zip(outs, self.rows)]  # [job][block]
        return torch.cat([per_block[j][b] for b in range(k) for j in range(len(self.rows))])


class SharedTimestepRows:
    """A fused forward whose timestep embedding is computed at one job's row count.

    Used when every job of the batch has as many rows as the others (the same latent
    batch): the model sees all rows at once, and its timestep embedding layers see the
    count one job alone gives them (see the module docstring).
    """

    def __init__(self, inner: Denoiser, jobs: int):
        self.inner = inner
        self.schedule = inner.schedule
        self.latent_scale = inner.latent_scale
        self.jobs = jobs

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        with self.inner.timestep_rows(x.shape[0] // self.jobs):  # type: ignore[attr-defined]
            return self.inner.denoise(x, sigma, context)


def _fused(denoiser: Denoiser, rows: list[int]) -> Denoiser:
    """The fused batch's denoiser: on the CPU, with the timestep rows of one job when the
    jobs' rows agree (bitwise outputs); elsewhere the model as it is (a GPU's contract is
    fp16 tolerance, and hooks coming and going would recompile a torch.compile'd UNet)."""
    on_cpu = getattr(getattr(denoiser, "device", None), "type", "cpu") == "cpu"
    if on_cpu and len(set(rows)) == 1 and len(rows) > 1 and hasattr(denoiser, "timestep_rows"):
        return SharedTimestepRows(denoiser, len(rows))
    return denoiser


def _batched_sampler(samplers: list[AdvancedSampler], rows: list[int], forward: str,
                     wrappers: dict[int, Denoiser]) -> AdvancedSampler:
    """One sampler over all rows: each job's conditioning repeated to its own latent batch
    (as `guidance._batch` does for it alone), then concatenated. `wrappers` holds the batch's
    denoiser per model, so two samplers of one model get one object (as they have alone:
    coherent mode recognises a shared model by identity)."""
    first = samplers[0]
    positive = torch.cat([_batch(s.positive, r) for s, r in zip(samplers, rows)])
    negative = torch.cat([_batch(s.negative, r) for s, r in zip(samplers, rows)])
    inner = first.denoiser
    if id(inner) not in wrappers:
        wrappers[id(inner)] = PerJobForward(inner, rows) if forward == "per_job" else _fused(inner, rows)
    return AdvancedSampler(wrappers[id(inner)], first.cfg, first.sampler_name, first.scheduler, positive, negative)


def sample_job_batch(
    items: Sequence[SamplingJob],
    *,
    forward: Literal["fused", "per_job"] = "fused",
    on_progress: ProgressHook | None = None,
    should_stop: StopHook | None = None,
) -> list[torch.Tensor]:
    """Sample `items` as one batch; returns one clean latent per item, in order, each of its
    item's shape and dtype.

    All items must share one `BatchKey` (InvalidInput naming `items[i]` and the field
    otherwise). The hooks see the batch as one job: `on_progress(done, total, which)` after
    each of the 2 * steps sampler calls, `should_stop()` before each (SamplingStopped stops
    every job of the batch).
    """
    if forward not in FORWARDS:
        raise InvalidInput("forward", f"unknown forward {forward!r}; valid: {', '.join(FORWARDS)}")
    key = check_batchable(items)
    rows, masks = [], []
    for i, item in enumerate(items):
        b = item.latent.shape[0]
        field = f"items[{i}]"
        if not torch.is_floating_point(item.latent) or not torch.isfinite(item.latent).all():
            raise InvalidInput(f"{field}.latent", "must be floating point with finite values")
        try:
            mask = normalize_mask(item.mask, b)
            check_mask_fits(mask, item.latent.shape)
        except InvalidInput as e:
            raise InvalidInput(f"{field}.{e.field}", e.reason) from None
        rows.append(b)
        masks.append(mask.expand(b, -1, -1))
    wrappers: dict[int, Denoiser] = {}
    batch = SamplingJob(
        torch.cat([item.latent for item in items]),
        torch.cat(masks).to(key.device),
        _batched_sampler([item.base for item in items], rows, forward, wrappers),
        _batched_sampler([item.mask_sampler for item in items], rows, forward, wrappers),
        key.params,  # its seed is unused: the draws come from `randomness`, one seed per job
    )
    out = sample_job(batch, on_progress=on_progress, should_stop=should_stop,
                     randomness=JobBatchRandomness.of([item.params.seed for item in items], rows))
    return [part.clone() for part in out.split(rows)]
