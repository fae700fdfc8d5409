"""The masked-region crop: its box maths, crop and paste, and the loop with a crop margin."""
from __future__ import annotations

import pytest
import torch

from analytic_denoiser import GaussianDenoiser, conditioning
from golden_jobs import TINY_UNET
from maskfleet.job import JobError, parse_job
from maskfleet.sampling import AdvancedSampler, InvalidInput, sample_two_samplers
from maskfleet.sampling.masks import grow_mask
from maskfleet.sampling.region_crop import CropBox, crop_box, crop_size
from maskfleet.model_dirs import load_unet_denoiser


def rect_mask(h: int, w: int, rows: tuple[int, int], cols: tuple[int, int], batch: int = 1, channels: int = 4) -> torch.Tensor:
    """[B, C, H, W] zeros with ones at rows[0]..rows[1]-1, cols[0]..cols[1]-1."""
    m = torch.zeros(batch, channels, h, w)
    m[..., rows[0] : rows[1], cols[0] : cols[1]] = 1.0
    return m


# -- box maths --------------------------------------------------------------


@pytest.mark.parametrize(
    "needed, size",
    [(1, 16), (16, 16), (17, 24), (41, 48), (64, 64), (65, 80), (97, 112), (128, 128), (129, 160), (300, 320), (1025, 1280)],
)
def test_crop_size_rounds_up_to_the_fixed_sizes(needed, size):
    assert crop_size(needed) == size


def test_the_fixed_sizes_are_few_and_divisible_by_8():
    sizes = sorted({crop_size(n) for n in range(1, 1025)})
    assert sizes[:12] == [16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160]
    assert len(sizes) == 7 + 4 * 4  # 16..64, then four per octave up to 1024
    assert all(s % 8 == 0 and crop_size(s) == s for s in sizes)


def test_box_is_the_bounding_box_plus_margin_rounded_up_and_centred():
    # Rows 20..29 plus 2 each side: 18..31, 14 rows -> 16, the 2 extra split one each side.
    # Columns 30..34 plus 2: 28..36, 9 columns -> 16, 7 extra: 3 before, 4 after.
    assert crop_box(rect_mask(64, 64, (20, 30), (30, 35)), 2) == CropBox(top=17, left=25, height=16, width=16)
    # Margin 0: the bounding box itself, rounded.
    assert crop_box(rect_mask(64, 64, (20, 40), (8, 24)), 0) == CropBox(top=18, left=8, height=24, width=16)


def test_box_is_shifted_to_stay_inside_the_latent():
    # Bottom-right corner: 60..63 plus 4 is 56..63 (8 rows) -> 16, which must end at 64.
    assert crop_box(rect_mask(64, 64, (60, 64), (60, 64)), 4) == CropBox(top=48, left=48, height=16, width=16)
    # Top-left corner: the margin is cut at the edge before rounding.
    assert crop_box(rect_mask(64, 64, (0, 3), (0, 3)), 8) == CropBox(top=0, left=0, height=16, width=16)


def test_an_axis_the_rounded_box_would_fill_is_taken_whole():
    # A full-height stripe: rows are the whole latent, columns are cropped.
    assert crop_box(rect_mask(64, 64, (0, 64), (10, 14)), 2) == CropBox(top=0, left=4, height=64, width=16)
    # 18 of 20 columns round up to 24 > 20: that axis is the latent's 20, not 24.
    assert crop_box(rect_mask(40, 20, (2, 6), (1, 19)), 0) == CropBox(top=0, left=0, height=16, width=20)


def test_no_box_when_the_crop_would_cover_the_latent_or_the_mask_is_empty():
    assert crop_box(torch.zeros(1, 4, 64, 64), 8) is None
    assert crop_box(torch.ones(1, 4, 64, 64), 0) is None
    assert crop_box(rect_mask(64, 64, (30, 34), (30, 34)), 40) is None  # the margin reaches every edge
    assert crop_box(rect_mask(20, 20, (2, 19), (1, 19)), 0) is None  # 17 and 18 round up to 24 > 20


def test_a_box_that_fits_exactly_is_kept():
    assert crop_box(rect_mask(20, 20, (2, 18), (2, 18)), 0) == CropBox(top=2, left=2, height=16, width=16)


def test_the_batch_shares_one_box_covering_every_element():
    m = torch.zeros(2, 1, 64, 64)
    m[0, :, 5:8, 5:8] = 1
    m[1, :, 40:42, 20:22] = 1
    box = crop_box(m, 0)
    assert box is not None
    assert box.top <= 5 and box.top + box.height >= 42
    assert box.left <= 5 and box.left + box.width >= 22


def test_random_boxes_contain_the_region_plus_margin_and_use_the_fixed_sizes():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        h, w = (int(v) for v in torch.randint(8, 130, (2,), generator=g))
        r0, c0 = int(torch.randint(0, h, (1,), generator=g)), int(torch.randint(0, w, (1,), generator=g))
        r1 = r0 + 1 + int(torch.randint(0, h - r0, (1,), generator=g))
        c1 = c0 + 1 + int(torch.randint(0, w - c0, (1,), generator=g))
        margin = int(torch.randint(0, 20, (1,), generator=g))
        box = crop_box(rect_mask(h, w, (r0, r1), (c0, c1), channels=1), margin)
        if box is None:
            assert crop_size(min(r1 + margin, h) - max(r0 - margin, 0)) >= h
            assert crop_size(min(c1 + margin, w) - max(c0 - margin, 0)) >= w
            continue
        assert 0 <= box.top <= max(r0 - margin, 0) and min(r1 + margin, h) <= box.top + box.height <= h
        assert 0 <= box.left <= max(c0 - margin, 0) and min(c1 + margin, w) <= box.left + box.width <= w
        assert box.height == crop_size(box.height) or box.height == h
        assert box.width == crop_size(box.width) or box.width == w
        assert (box.height, box.width) != (h, w)


def test_crop_then_paste_round_trips_and_paste_leaves_its_input_alone():
    x = torch.randn(2, 4, 40, 24, generator=torch.Generator().manual_seed(1))
    box = CropBox(top=8, left=4, height=16, width=16)
    cropped = box.crop(x)
    assert cropped.shape == (2, 4, 16, 16) and cropped.is_contiguous()
    assert torch.equal(cropped, x[:, :, 8:24, 4:20])
    assert torch.equal(box.paste(x, cropped), x)
    before = x.clone()
    pasted = box.paste(x, torch.zeros_like(cropped))
    assert torch.equal(x, before)
    assert torch.equal(pasted[:, :, 8:24, 4:20], torch.zeros(2, 4, 16, 16))
    pasted[:, :, 8:24, 4:20] = x[:, :, 8:24, 4:20]
    assert torch.equal(pasted, x)  # nothing outside the window changed


# -- the loop with a crop margin -------------------------------------------


class ShapeRecordingDenoiser(GaussianDenoiser):
    """GaussianDenoiser that also records the spatial size of every model input."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def denoise(self, x, sigma, context):
        self.sizes.append(tuple(x.shape[-2:]))
        return super().denoise(x, sigma, context)


def corner_mask(size: int = 32) -> torch.Tensor:
    """A [1, size, size] mask: a 6x5 block near the top-left corner."""
    m = torch.zeros(1, size, size)
    m[:, 4:10, 6:11] = 1.0
    return m


def run_gaussian(den, latent, mask, sampler="euler", **kw):
    base = AdvancedSampler(den, 7.0, sampler, "normal", conditioning(1.0), conditioning(0.0))
    inner = AdvancedSampler(den, 4.0, sampler, "normal", conditioning(-1.0), conditioning(0.0))
    return sample_two_samplers(latent, mask, base, inner, **{"seed": 3, "steps": 5, "overlap_factor": 3, **kw})


def latent_32() -> torch.Tensor:
    return torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(2))


def test_the_mask_sampler_sees_the_box_and_the_base_sampler_the_whole_latent():
    den = ShapeRecordingDenoiser()
    run_gaussian(den, latent_32(), corner_mask(), crop_margin=2)
    box = crop_box(grow_mask(corner_mask(), 32, 32, 3), 2)
    assert box == CropBox(top=0, left=1, height=16, width=16)
    assert den.sizes == [(32, 32), (16, 16)] * 5  # euler: one evaluation per call, base then mask


def test_with_a_per_pixel_model_the_crop_changes_nothing():
    # A model without spatial context gives the same values on a window as on the whole
    # latent, and euler's step is deterministic: the cropped job equals the full-frame one.
    full = run_gaussian(GaussianDenoiser(), latent_32(), corner_mask())
    for margin in (0, 2, 8):
        assert torch.equal(run_gaussian(GaussianDenoiser(), latent_32(), corner_mask(), crop_margin=margin), full), margin


def test_crop_margin_none_and_a_margin_reaching_every_edge_are_bitwise_the_default():
    for sampler in ("euler", "euler_ancestral", "dpmpp_2m_sde"):
        default = run_gaussian(GaussianDenoiser(), latent_32(), corner_mask(), sampler=sampler)
        assert torch.equal(run_gaussian(GaussianDenoiser(), latent_32(), corner_mask(), sampler=sampler, crop_margin=None), default)
        assert torch.equal(run_gaussian(GaussianDenoiser(), latent_32(), corner_mask(), sampler=sampler, crop_margin=32), default)


@pytest.fixture(scope="module")
def tiny_unet():
    return load_unet_denoiser(TINY_UNET)


def run_unet(den, steps: int, crop_margin: int | None) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    latent = torch.randn(1, 4, 32, 32, generator=g)
    conds = [torch.randn(1, 8, 32, generator=g) for _ in range(4)]
    base = AdvancedSampler(den, 5.0, "euler", "normal", conds[0], conds[1])
    inner = AdvancedSampler(den, 3.0, "euler", "karras", conds[2], conds[3])
    return sample_two_samplers(latent, corner_mask(), base, inner, seed=9, steps=steps, overlap_factor=3, crop_margin=crop_margin)


def test_tiny_unet_one_step_crop_equals_full_frame_outside_the_grown_mask(tiny_unet):
    # One step is a full-frame base call (identical) then the mask call; with euler the
    # mask call keeps its input outside the grown mask, cropped or not.
    full, cropped = run_unet(tiny_unet, 1, None), run_unet(tiny_unet, 1, 4)
    outside = grow_mask(corner_mask(), 32, 32, 3)[0, 0] == 0
    assert torch.equal(full[..., outside], cropped[..., outside])
    assert not torch.equal(full, cropped)  # inside, the model saw less context


def test_tiny_unet_cropped_job_is_close_to_full_frame(tiny_unet):
    # From the second step on, the mask region's differences reach the base sampler's
    # input (the UNet sees the whole latent), so nothing is exact any more; with 8 pixels
    # of context (a 24x24 box of the 32x32 latent) all stays close.
    full, cropped = run_unet(tiny_unet, 2, None), run_unet(tiny_unet, 2, 8)
    scale = full.std()
    grown = grow_mask(corner_mask(), 32, 32, 3)[0, 0] == 1
    diff = full - cropped
    assert 0 < diff[..., grown].pow(2).mean().sqrt() < 0.2 * scale
    assert 0 < diff[..., ~grown].abs().max() < 0.01 * scale


# -- validation ------------------------------------------------------------


@pytest.mark.parametrize("margin", [-1, 10001, 2.5, True])
def test_engine_refuses_a_bad_crop_margin(margin):
    with pytest.raises(InvalidInput) as err:
        run_gaussian(GaussianDenoiser(), latent_32(), corner_mask(), crop_margin=margin)
    assert err.value.field == "crop_margin"


@pytest.mark.parametrize("margin", [-1, 10001, "8", 1.5, True])
def test_parse_job_refuses_a_bad_crop_margin_naming_it(margin):
    job = {"latent": "in.latent", "mask": "m.png", "output": "out.latent",
           "base_sampler": {"model": "m", "sampler_name": "euler", "scheduler": "normal", "positive": "p", "negative": "n"},
           "mask_sampler": {"model": "m", "sampler_name": "euler", "scheduler": "normal", "positive": "p", "negative": "n"}}
    assert parse_job(job).crop_margin is None
    assert parse_job({**job, "crop_margin": 8}).crop_margin == 8
    with pytest.raises(JobError, match=r"^crop_margin: "):
        parse_job({**job, "crop_margin": margin})
