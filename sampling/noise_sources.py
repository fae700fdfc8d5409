"""Where the loop's random numbers come from: ComfyUI's draw order, reproduced without torch's global RNG.

ComfyUI reseeds torch's *global* CPU generator for the starting noise (`seed`) and for
ddim's inpaint noise (`seed + 1`), and its ancestral samplers draw `randn_like(x)` from
that same generator, so every draw depends on all draws since the last reseed, across
both samplers. `ComfyRng` is one private generator per job that follows that order.
The SDE samplers instead take increments of a Brownian tree seeded with the job's seed,
built afresh by every call (torchsde's `BrownianTree`, as k-diffusion uses it).

A sampler call takes all four kinds of draw from one `Randomness`: `JobRandomness` is one
job's (its seed, its generator, its tree); `JobBatchRandomness` serves several jobs whose
latents are concatenated along the batch dimension, drawing each job's rows from that
job's own `JobRandomness` so that every job sees exactly the numbers it would see alone.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

SEED_MODULUS = 2**64


class ComfyRng:
    """A job's stand-in for torch's global CPU generator, drawn from in ComfyUI's order."""

    def __init__(self) -> None:
        self.generator = torch.Generator(device="cpu")

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed % SEED_MODULUS)

    def randn(self, shape: torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
        """Standard normal float32 values drawn on the CPU (as ComfyUI does), then moved."""
        return torch.randn(shape, generator=self.generator, dtype=torch.float32).to(device)

    def seeded_randn(self, seed: int, shape: torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
        self.reseed(seed)
        return self.randn(shape, device)


class BrownianNoise:
    """Normalised Brownian increments between two sigmas, `W(s, s_next) / sqrt|s_next - s|`.

    The tree spans [sigma_min, sigma_max] of the sampler's full schedule (positive sigmas
    only) and is seeded with the job seed, so the same step gets the same increment in
    every call that builds the tree with the same bounds.
    """

    def __init__(self, like: torch.Tensor, sigma_min: torch.Tensor, sigma_max: torch.Tensor, seed: int):
        import torchsde

        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self.sign = 1 if t0 < t1 else -1
        t0, t1 = (t0, t1) if t0 < t1 else (t1, t0)
        w0 = torch.zeros_like(like, dtype=torch.float32, device="cpu")
        self.tree = torchsde.BrownianTree(t0.cpu(), w0, t1.cpu(), entropy=seed % SEED_MODULUS)
        self.device = like.device

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        sign = 1 if t0 < t1 else -1
        lo, hi = (t0, t1) if t0 < t1 else (t1, t0)
        with warnings.catch_warnings():
            # torchsde warns when a query touches the tree's float32-rounded ends; harmless.
            warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
            w = self.tree(lo.cpu().float(), hi.cpu().float()).to(self.device) * (self.sign * sign)
        return w / (t1 - t0).abs().sqrt().to(self.device)


NoiseSource = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # noise(sigma, sigma_next), shaped like x


class Randomness(Protocol):
    """The draws one sampler call makes, in the order it makes them."""

    def start_noise(self, shape: torch.Size, device: torch.device | str) -> torch.Tensor:
        """The starting noise (ComfyUI: global generator reseeded with `seed`)."""
        ...

    def inpaint_noise(self, shape: torch.Size, device: torch.device | str) -> torch.Tensor:
        """ddim's outside-mask model-input noise (reseeded with `seed + 1`)."""
        ...

    def ancestral_noise(self, shape: torch.Size, device: torch.device | str) -> torch.Tensor:
        """A fresh Gaussian draw continuing the generator (ancestral samplers, lcm)."""
        ...

    def brownian(self, like: torch.Tensor, sigma_min: torch.Tensor, sigma_max: torch.Tensor) -> NoiseSource:
        """A Brownian-tree noise source over [sigma_min, sigma_max] shaped like `like` (SDE samplers)."""
        ...


@dataclass
class JobRandomness:
    """One job's seed and its ComfyUI-ordered generator, shared by every call of the job."""

    seed: int
    rng: ComfyRng = field(default_factory=ComfyRng)

    def start_noise(self, shape: torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.rng.seeded_randn(self.seed, shape, device)

    def inpaint_noise(self, shape: torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.rng.seeded_randn(self.seed + 1, shape, device)

    def ancestral_noise(self, shape: torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.rng.randn(shape, device)

    def brownian(self, like: torch.Tensor, sigma_min: torch.Tensor, sigma_max: torch.Tensor) -> NoiseSource:
        return BrownianNoise(like, sigma_min, sigma_max, self.seed)


class JobBatchRandomness:
    """The draws of several jobs batched along dim 0: job i owns `rows[i]` consecutive rows.

    Every draw is split into the jobs' row blocks, each block drawn by that job's own
    `JobRandomness` (own seed, own generator stream, own Brownian tree over its own rows),
    and the blocks concatenated: row for row what each job draws when it runs alone.
    """

    def __init__(self, jobs: Sequence[JobRandomness], rows: Sequence[int]):
        if len(jobs) != len(rows) or not jobs or min(rows) < 1:
            raise ValueError(f"need one positive row count per job, got {len(jobs)} jobs and rows {list(rows)}")
        self.jobs = list(jobs)
        self.rows = [int(r) for r in rows]

    @classmethod
    def of(cls, seeds: Sequence[int], rows: Sequence[int]) -> "JobBatchRandomness":
        return cls([JobRandomness(seed) for seed in seeds], rows)

    def _block_shapes(self, shape: torch.Size) -> list[torch.Size]:
        if shape[0] != sum(self.rows):
            raise ValueError(f"a draw of batch {shape[0]} does not match the jobs' {sum(self.rows)} rows {self.rows}")
        return [torch.Size((r, *shape[1:])) for r in self.rows]

    def start_noise(self, shape: torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.cat([job.start_noise(s, device) for job, s in zip(self.jobs, self._block_shapes(shape))])

    def inpaint_noise(self, shape: torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.cat([job.inpaint_noise(s, device) for job, s in zip(self.jobs, self._block_shapes(shape))])

    def ancestral_noise(self, shape: torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.cat([job.ancestral_noise(s, device) for job, s in zip(self.jobs, self._block_shapes(shape))])

    def brownian(self, like: torch.Tensor, sigma_min: torch.Tensor, sigma_max: torch.Tensor) -> NoiseSource:
        self._block_shapes(like.shape)
        sources = [job.brownian(block, sigma_min, sigma_max) for job, block in zip(self.jobs, like.split(self.rows))]
        return lambda sigma, sigma_next: torch.cat([source(sigma, sigma_next) for source in sources])
