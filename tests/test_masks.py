"""The two regions: inverse_mask, grow_mask (the legacy `mask_erosion` without its h/w swap), to_latent, normalize_mask."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from golden_jobs import golden_case_dirs
from maskfleet.sampling import InvalidInput
from maskfleet.sampling.masks import check_mask_fits, check_overlap, grow_mask, inverse_mask, normalize_mask, to_latent



GOLDEN_DIRS = golden_case_dirs()  # in-repo cases plus $MASKFLEET_GOLDEN_DIR's


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions and pools: with several threads on a busy CPU each op can wait ~20 ms for the pool."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reference_grow(mask: torch.Tensor, H: int, W: int, k: int) -> torch.Tensor:
    """Impact Pack's mask_erosion with the resize in the right orientation: conv with a ones kernel."""
    m = F.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]), size=(H, W), mode="bilinear")
    if k == 0:
        out = m
    else:
        kernel = torch.ones((1, 1, k, k))
        pad = math.ceil((k - 1) / 2)
        out = torch.clamp(F.conv2d(m.round(), kernel, padding=pad), 0, 1)
    return out[:, :, :H, :W].round()


def random_masks(gen: torch.Generator, b: int, h: int, w: int):
    """A few kinds: sparse binary, soft uniform, smooth blobs, hard rectangle."""
    yield (torch.rand(b, h, w, generator=gen) > 0.93).float()
    yield torch.rand(b, h, w, generator=gen)
    low = torch.rand(b, 1, max(h // 6, 2), max(w // 6, 2), generator=gen)
    yield F.interpolate(low, size=(h, w), mode="bilinear")[:, 0]
    m = torch.zeros(b, h, w)
    r0, c0 = int(torch.randint(0, h - 1, (1,), generator=gen)), int(torch.randint(0, w - 1, (1,), generator=gen))
    m[:, r0 : r0 + max(h // 4, 1), c0 : c0 + max(w // 3, 1)] = 1.0
    yield m


# (mask h, mask w, latent H, latent W)
SHAPES = [(8, 8, 8, 8), (64, 64, 8, 8), (48, 80, 6, 10), (80, 48, 10, 6), (7, 13, 7, 13), (56, 40, 9, 5), (12, 20, 12, 20)]


@pytest.mark.parametrize("h,w,H,W", SHAPES)
def test_grow_mask_matches_conv_reference(h, w, H, W):
    gen = torch.Generator().manual_seed(h * 1000 + w)
    for mask in random_masks(gen, 2, h, w):
        for k in range(0, 13):
            got = grow_mask(mask, H, W, k)
            ref = reference_grow(mask, H, W, k)
            assert got.shape == (2, 1, H, W)
            assert torch.equal(got, ref), (h, w, H, W, k)
            assert set(got.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("k", [0, 1])
def test_overlap_0_and_1_only_round(k):
    mask = torch.tensor([[0.2, 0.5, 0.51], [0.49, 0.9, 0.0], [1.0, 0.6, 0.3]])
    got = grow_mask(mask, 3, 3, k)
    assert torch.equal(got[0, 0], torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]))


def single_pixel(H, W, r, c):
    m = torch.zeros(1, H, W)
    m[0, r, c] = 1.0
    return m


@pytest.mark.parametrize("k", range(0, 12))
def test_growth_per_side(k):
    H, W, r, c = 16, 20, 7, 9
    got = grow_mask(single_pixel(H, W, r, c), H, W, k)[0, 0]
    if k <= 1:
        up = down = 0
    elif k % 2:
        up = down = (k - 1) // 2
    else:
        up, down = k // 2 - 1, k // 2
    expected = torch.zeros(H, W)
    expected[r - up : r + down + 1, c - up : c + down + 1] = 1.0
    assert torch.equal(got, expected), k


def test_even_k_asymmetry_at_the_borders():
    H, W = 6, 7
    got = grow_mask(single_pixel(H, W, 0, 0), H, W, 4)[0, 0]  # 1 up/left, 2 down/right
    expected = torch.zeros(H, W)
    expected[0:3, 0:3] = 1
    assert torch.equal(got, expected)
    got = grow_mask(single_pixel(H, W, H - 1, W - 1), H, W, 4)[0, 0]
    expected = torch.zeros(H, W)
    expected[H - 2 :, W - 2 :] = 1
    assert torch.equal(got, expected)


def test_non_square_orientation():
    """A block in the top-left of a wide mask stays in the top-left of a wide latent (no h/w swap)."""
    mask = torch.zeros(1, 48, 80)
    mask[0, 0:16, 0:8] = 1.0  # latent rows 0..1, column 0
    got = grow_mask(mask, 6, 10, 3)[0, 0]
    assert got.shape == (6, 10)
    expected = torch.zeros(6, 10)
    expected[0:3, 0:2] = 1.0
    assert torch.equal(got, expected)
    assert torch.equal(grow_mask(mask, 6, 10, 3), reference_grow(mask, 6, 10, 3))


@pytest.mark.parametrize("H,W", [(8, 8), (6, 10), (11, 4)])
def test_huge_overlap(H, W):
    gen = torch.Generator().manual_seed(H * W)
    mask = torch.zeros(2, H * 4, W * 4)
    mask[0, 3, 5] = 1.0
    mask[1] = (torch.rand(H * 4, W * 4, generator=gen) > 0.98).float()
    for k in (10000, 10001, 2 * max(H, W) + 2, 2 * max(H, W) + 3, 2 * max(H, W) + 10):
        got = grow_mask(mask, H, W, k)
        resized = F.interpolate(mask[:, None], size=(H, W), mode="bilinear").round()
        for b in range(2):
            if resized[b].max() > 0:
                assert torch.all(got[b] == 1.0), (k, b)
    m = 2 * max(H, W)
    assert torch.equal(grow_mask(mask, H, W, 10000), reference_grow(mask, H, W, m + 2))
    assert torch.equal(grow_mask(mask, H, W, 10001), reference_grow(mask, H, W, m + 3))
    assert torch.equal(grow_mask(mask, H, W, m + 2), reference_grow(mask, H, W, m + 2))
    assert torch.equal(grow_mask(mask, H, W, m + 3), reference_grow(mask, H, W, m + 3))
    empty = torch.full((1, H, W), 0.4)  # rounds to 0 everywhere
    assert torch.equal(grow_mask(empty, H, W, 10000), torch.zeros(1, 1, H, W))


def test_grow_mask_keeps_batch():
    mask = torch.zeros(3, 16, 16)
    mask[1, 4:8, 4:8] = 1
    got = grow_mask(mask, 8, 8, 3)
    assert got.shape == (3, 1, 8, 8) and got.dtype == torch.float32
    assert got[0].sum() == 0 and got[2].sum() == 0 and got[1].sum() > 4


# ---------------------------------------------------------------- inverse / to_latent


def test_inverse_mask():
    mask = torch.tensor([[[1.0, 0.999, 0.0], [0.5, 1.0, 1e-7]]])
    assert torch.equal(inverse_mask(mask), torch.tensor([[[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]]))
    assert inverse_mask(mask).dtype == torch.float32


def test_to_latent_shape_and_values():
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(1, 40, 24, generator=gen)
    out = to_latent(mask, torch.Size([3, 4, 10, 6]))
    assert out.shape == (3, 4, 10, 6)
    assert out.is_contiguous()
    ref = F.interpolate(mask[:, None], size=(10, 6), mode="bilinear")[0, 0]
    for b in range(3):
        for c in range(4):
            assert torch.equal(out[b, c], ref)


def test_to_latent_batch_and_orientation():
    mask = torch.zeros(2, 16, 40)
    mask[0, :, :20] = 1.0  # left half
    mask[1, :8, :] = 1.0  # top half
    out = to_latent(mask, torch.Size([2, 4, 4, 10]))
    assert out.shape == (2, 4, 4, 10)
    assert torch.all(out[0, :, :, :5] == 1) and torch.all(out[0, :, :, 5:] == 0)
    assert torch.all(out[1, :, :2, :] == 1) and torch.all(out[1, :, 2:, :] == 0)


# ---------------------------------------------------------------- normalize_mask


@pytest.mark.parametrize(
    "shape,batch,expected",
    [
        ((8, 6), 1, (1, 8, 6)),
        ((8, 6), 3, (1, 8, 6)),
        ((1, 8, 6), 2, (1, 8, 6)),
        ((2, 8, 6), 2, (2, 8, 6)),
        ((2, 1, 8, 6), 2, (2, 8, 6)),
        ((1, 1, 8, 6), 4, (1, 8, 6)),
    ],
)
def test_normalize_mask_shapes(shape, batch, expected):
    gen = torch.Generator().manual_seed(0)
    m = torch.rand(shape, generator=gen, dtype=torch.float64)
    out = normalize_mask(m, batch)
    assert out.shape == expected and out.dtype == torch.float32
    assert torch.equal(out.reshape(-1), m.float().reshape(-1))


@pytest.mark.parametrize("bad", [-0.5, 1.7, 1.0001])
def test_normalize_mask_refuses_values_outside_0_1(bad):
    m = torch.tensor([[0.0, 0.3], [bad, 1.0]])
    with pytest.raises(InvalidInput, match=r"^mask: values must lie in \[0, 1\]"):
        normalize_mask(m, 1)
    assert torch.equal(normalize_mask(torch.tensor([[0.0, 0.3], [1.0, 1.0]]), 1), torch.tensor([[[0.0, 0.3], [1.0, 1.0]]]))


@pytest.mark.parametrize(
    "mask,batch",
    [
        (torch.zeros(3, 8, 8), 2),
        (torch.zeros(2, 1, 8, 8), 3),
        (torch.zeros(1, 2, 8, 8), 1),
        (torch.zeros(1, 1, 1, 8, 8), 1),
        (torch.zeros(8), 1),
    ],
    ids=["batch3_vs_2", "b1hw_batch2_vs_3", "two_channels", "5d", "1d"],
)
def test_normalize_mask_rejects_shape(mask, batch):
    with pytest.raises(InvalidInput) as info:
        normalize_mask(mask, batch)
    assert info.value.field == "mask"
    assert str(info.value).startswith("mask")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_normalize_mask_rejects_non_finite(bad):
    m = torch.rand(1, 4, 4)
    m[0, 2, 1] = bad
    with pytest.raises(InvalidInput) as info:
        normalize_mask(m, 1)
    assert info.value.field == "mask"
    assert "mask" in str(info.value)


# ---------------------------------------------------------------- golden masks


@pytest.mark.parametrize("case_dir", GOLDEN_DIRS, ids=lambda p: p.name)
def test_golden_masks(case_dir):
    case = json.loads((case_dir / "case.json").read_text())
    t = load_file(case_dir / "data.safetensors")
    shape = torch.Size(case["latent_shape"])
    _, _, H, W = shape
    mask = normalize_mask(t["mask"], shape[0])
    if "noise_mask_base" in t:  # not kept in the in-repo copy: it is the pixel-level inverse mask
        assert torch.equal(inverse_mask(mask), t["noise_mask_base"])
    base = to_latent(inverse_mask(mask), shape)
    torch.testing.assert_close(base[:, :1], t["latent_mask_base"], rtol=0, atol=1e-6)
    grown = grow_mask(mask, H, W, case["overlap_factor"])
    if H == W:  # the legacy h/w swap does not matter
        assert torch.equal(grown, t["noise_mask_mask"])
        assert torch.equal(to_latent(grown[:, 0], shape)[:, :1], t["latent_mask_mask"])
    elif "noise_mask_mask_hw_fixed" in t:  # non-square: only the corrected reference applies
        assert torch.equal(grown, t["noise_mask_mask_hw_fixed"])


@pytest.mark.parametrize("mask_hw, latent_hw", [((512, 512), (64, 64)), ((516, 512), (64, 64)), ((768, 512), (96, 64)),
                                               ((16, 16), (16, 16)), ((1, 1), (8, 8))])
def test_masks_of_the_latents_aspect_ratio_fit_at_any_resolution(mask_hw, latent_hw):
    check_mask_fits(torch.zeros(1, *mask_hw), (2, 4, *latent_hw))


@pytest.mark.parametrize("mask_shape, latent_hw, words", [
    ((1, 512, 1024), (64, 64), "aspect ratio"),
    ((1, 16, 32), (16, 16), "aspect ratio"),
    ((1, 96, 64), (64, 96), "aspect ratio"),  # height and width swapped
    ((3, 64, 64), (64, 64), "batch 3"),
])
def test_masks_of_another_shape_are_refused(mask_shape, latent_hw, words):
    with pytest.raises(InvalidInput, match=r"^mask: .*" + words):
        check_mask_fits(torch.zeros(mask_shape), (2, 4, *latent_hw))


def test_overlap_up_to_the_latents_longer_side_is_allowed():
    check_overlap(24, 8, 24)
    check_overlap(0, 8, 8)
    with pytest.raises(InvalidInput, match=r"^overlap_factor: 25 is larger than the 8x24 latent"):
        check_overlap(25, 8, 24)
