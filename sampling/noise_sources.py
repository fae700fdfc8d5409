"""Where the loop's random numbers come from: ComfyUI's draw order, reproduced without torch's global RNG.

ComfyUI reseeds torch's *global* CPU generator for the starting noise (`seed`) and for
ddim's inpaint noise (`seed + 1`), and its ancestral samplers draw `randn_like(x)` from
that same generator, so every draw depends on all draws since the last reseed, across
both samplers. `ComfyRng` is one private generator per job that follows that order.
The SDE samplers instead take increments of a Brownian tree seeded with the job's seed,
built afresh by every call (torchsde's `BrownianTree`, as k-diffusion uses it).
"""
from __future__ import annotations

import warnings

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
