"""UniPC as a real multistep sampler (Zhao et al. 2023), for loops that keep a sampler's state.

`samplers.uni_pc_single` is what ComfyUI's uni_pc does when given only two sigmas (the
original node's one-step calls): order 0, no denoising at all without Impact Pack's
recovery pass. A loop that keeps each sampler's `history` across steps (coherent mode)
can run the sampler as written: data prediction, order up to 3 (ComfyUI's setting),
variant bh1 (`uni_pc`) or bh2 (`uni_pc_bh2`), with the UniC corrector.

In the paper's loop the model is evaluated at the predicted x_i, the corrector moves x_i
using that evaluation, and the next prediction starts from the corrected x_i without a
new evaluation. We split it at the evaluation: step i evaluates the model at its input
x_i, adds the previous step's correction (the corrector minus the predictor, which
depends only on model outputs, so it applies to whatever x_i the step is given, e.g. a
blend of two samplers), then predicts x_{i+1} and leaves its own correction in the
history for step i+1. Run alone this is UniPC step for step; the step to sigma 0 is
first order and returns the model's x0 estimate (lower order at the end, as UniPC's
`lower_order_final`, which also lowers the step before the last to order 2; we do not,
since a step does not know how many steps are left).

The variable names follow the paper and ComfyUI's uni_pc.py (read, not copied). In the
variance-exploding form used here (x = x0 + sigma * eps, lambda = -log sigma) the VP
scale factors alpha_t cancel out of every update.
"""
from __future__ import annotations

import math

import torch

from .samplers import StepContext

Tensor = torch.Tensor

MAX_ORDER = 3


def _coefficients(rks: list[float], hh: float, variant: str) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(B_h, R, b) of UniPC's linear systems for the step's order = len(rks)."""
    b_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    rows, rhs = [], []
    ratios = torch.tensor(rks, dtype=torch.float64)
    for k in range(1, len(rks) + 1):
        rows.append(ratios ** (k - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return b_h, torch.stack(rows), torch.tensor(rhs, dtype=torch.float64)


def _weighted(weights: list[float], tensors: list[Tensor]) -> Tensor | float:
    total: Tensor | float = 0.0
    for weight, tensor in zip(weights, tensors):
        total = total + weight * tensor
    return total


def unipc_step(ctx: StepContext, x: Tensor, sigma: Tensor, sigma_next: Tensor, variant: str = "bh1"):
    """One UniPC step from sigma to sigma_next; state (model outputs, pending correction) in ctx.history."""
    hist = ctx.history
    denoised = ctx.model(x, sigma)
    correction = hist.pop("correction", None)
    if correction is not None:
        x = x + correction(denoised)
    lam = -math.log(float(sigma))
    models = hist.setdefault("models", [])  # oldest first
    lambdas = hist.setdefault("lambdas", [])
    models.append(denoised)
    lambdas.append(lam)
    del models[:-MAX_ORDER], lambdas[:-MAX_ORDER]
    if sigma_next == 0:
        return denoised, denoised
    order = len(models)
    h = -math.log(float(sigma_next)) - lam
    rks, d1s = [], []
    for j in range(1, order):
        rk = (lambdas[-1 - j] - lam) / h
        rks.append(rk)
        d1s.append((models[-1 - j] - denoised) / rk)
    rks.append(1.0)
    hh = -h
    b_h, r_mat, b_vec = _coefficients(rks, hh, variant)
    x_base = (sigma_next / sigma) * x - math.expm1(hh) * denoised
    if order == 1:
        pred_res: Tensor | float = 0.0
    else:
        rhos_p = [0.5] if order == 2 else torch.linalg.solve(r_mat[:-1, :-1], b_vec[:-1]).tolist()
        pred_res = _weighted(rhos_p, d1s)
    rhos_c = [0.5] if order == 1 else torch.linalg.solve(r_mat, b_vec).tolist()
    corr_res = _weighted(rhos_c[:-1], d1s)

    def correct(model_next: Tensor) -> Tensor:
        """UniC's corrected x_{i+1} minus the predicted one, given the model at the predicted x_{i+1}."""
        return b_h * (pred_res - corr_res - rhos_c[-1] * (model_next - denoised))

    hist["correction"] = correct
    return x_base - b_h * pred_res, denoised


def unipc_bh2_step(ctx: StepContext, x: Tensor, sigma: Tensor, sigma_next: Tensor):
    """UniPC with B(h) = e^h - 1 (ComfyUI's `uni_pc_bh2`)."""
    return unipc_step(ctx, x, sigma, sigma_next, variant="bh2")
