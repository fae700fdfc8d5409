"""What coherent mode refuses, by name: so a job document is checked before any model or tensor is loaded.

Measured with the Gaussian harness (tests/gaussian_regions.py): these samplers and
sampler/schedule pairs give a wrong result even run alone, whatever the loop does, so
coherent mode refuses them rather than run them (coherent_loop.py explains the mode).
Nothing here imports torch.
"""
from __future__ import annotations

# Samplers that give a wrong result even run alone, whatever the loop does (the reason is the error message).
REFUSED_SAMPLERS = {
    "lcm": "it replaces the latent by the model's x0 estimate at every step and re-noises it, which samples "
    "correctly only with a consistency (LCM-distilled) model: with any other model the result loses the data's "
    "spread (measured 0.32 for data of spread 0.5). Use mode 'comfy' for LCM models",
}
# (sampler, scheduler) pairs refused: the multistep SDE samplers on the schedules whose last step before 0
# falls to the model's sigma_min (0.03 on SD1.5), 6-8x down in sigma after steps of 1.1-1.3x: the multistep
# correction divides by the ratio of the last two log-sigma steps and amplifies the injected noise (measured
# spread 0.58-1.78 for data of spread 0.5, the sampler run alone as much as in the loop).
REFUSED_SCHEDULES = {
    (sampler, scheduler): f"{sampler} on the {scheduler!r} schedule leaves noise amplified by its multistep "
    "correction: that schedule's last step falls to the model's sigma_min, many times longer in log sigma than "
    "the step before it (use karras, exponential, sgm_uniform, simple or beta)"
    for sampler in ("dpmpp_2m_sde", "dpmpp_3m_sde")
    for scheduler in ("normal", "ddim_uniform")
}


def coherent_refusal(base_sampler: str, base_scheduler: str, mask_sampler: str, mask_scheduler: str,
                     crop_margin: int | None) -> tuple[str, str] | None:
    """(field, reason) for the first thing coherent mode cannot honour in these settings, or None.

    Names only, so a job document can be checked before any model or tensor is loaded; the
    names are known ones (the job model and the engine check them first), and coherent mode
    implements every one (coherent_loop.COHERENT_STEPS is checked against sampling/names.py).
    """
    if crop_margin is not None:
        return "crop_margin", "not supported in coherent mode (the mask sampler must see the whole latent)"
    if mask_scheduler != base_scheduler:
        return ("mask_sampler.scheduler",
                f"coherent mode runs both samplers on one sigma schedule: use base_sampler.scheduler "
                f"{base_scheduler!r} (got {mask_scheduler!r})")
    for field, name in (("base_sampler", base_sampler), ("mask_sampler", mask_sampler)):
        if name in REFUSED_SAMPLERS:
            return f"{field}.sampler_name", f"{name!r} is refused in coherent mode: {REFUSED_SAMPLERS[name]}"
    for field, name in (("base_sampler", base_sampler), ("mask_sampler", mask_sampler)):
        if (name, base_scheduler) in REFUSED_SCHEDULES:
            return f"{field}.scheduler", f"refused in coherent mode: {REFUSED_SCHEDULES[name, base_scheduler]}"
    return None
