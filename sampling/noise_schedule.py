"""The model's discrete noise schedule in k-diffusion form (sigmas), as ComfyUI builds it.

ComfyUI computes the betas in float64, derives `sigma_k = sqrt((1 - abar_k) / abar_k)`
and stores the 1000 sigmas (and their logs) in float32. The UNet is evaluated at the
nearest *integer* index in log-sigma space; schedulers such as `normal` look sigmas up
at fractional indices by interpolating log-sigma. Matching these details is what keeps
our latents within 1e-4 of ComfyUI's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# SD1.5's schedule: what ComfyUI assumes for an SD15 model and what a UNet directory
# without a scheduler config gets.
SD15_SCHEDULE_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class NoiseSchedule:
    """Discrete sigmas of a diffusion model plus its prediction type."""

    sigmas: torch.Tensor  # float32, ascending, one per training timestep
    log_sigmas: torch.Tensor
    prediction_type: str = "epsilon"

    @classmethod
    def from_betas(cls, betas: torch.Tensor, prediction_type: str = "epsilon") -> "NoiseSchedule":
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type: {prediction_type!r} is not supported (valid: {', '.join(PREDICTION_TYPES)})"
            )
        alphas_cumprod = torch.cumprod(1.0 - betas.double(), dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return cls(sigmas=sigmas.float(), log_sigmas=sigmas.log().float(), prediction_type=prediction_type)

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        """Build from a diffusers scheduler config (missing keys take SD1.5's values)."""
        cfg = {**SD15_SCHEDULE_CONFIG, **{k: v for k, v in config.items() if v is not None}}
        n = int(cfg["num_train_timesteps"])
        kind = cfg["beta_schedule"]
        if cfg.get("trained_betas") is not None:
            betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64)
        elif kind == "scaled_linear":
            # diffusers' "scaled_linear" is ComfyUI's "linear": linspace of sqrt(beta), squared
            betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
        elif kind == "linear":
            betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=torch.float64)
        else:
            # Any other schedule: let diffusers compute the betas it defines.
            from diffusers import DDPMScheduler

            betas = DDPMScheduler.from_config(cfg).betas.double()
        return cls.from_betas(betas, cfg["prediction_type"])

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Nearest integer training timestep of `sigma` in log space (what the UNet is given)."""
        log_sigma = sigma.log()
        dists = log_sigma.to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Sigma at a possibly fractional timestep, interpolating log-sigma linearly."""
        t = torch.clamp(timestep.float(), min=0, max=len(self.sigmas) - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()
