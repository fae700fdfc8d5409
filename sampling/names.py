"""The sampler and scheduler names a job may ask for (ComfyUI's), without their implementations.

The job document validates names against these tuples and imports nothing heavy for it,
so a producer can check jobs without torch; `samplers.SAMPLERS` and
`schedulers.SCHEDULERS` implement exactly these names (checked when they are imported).
"""
from __future__ import annotations

SAMPLER_NAMES = ("euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral",
                 "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "ddim", "uni_pc", "uni_pc_bh2", "lcm")
SCHEDULER_NAMES = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta")


def check_implemented(table: dict, names: tuple[str, ...], what: str) -> None:
    """Refuse to import an engine whose table and declared names disagree (a programming error)."""
    if tuple(table) != names:
        raise ImportError(f"{what} implements {tuple(table)}, but sampling/names.py declares {names}")
