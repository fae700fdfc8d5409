"""Random numbers: ComfyRng must reproduce torch's global CPU generator order; BrownianNoise increments."""
from __future__ import annotations

import math

import pytest
import torch

from maskfleet.sampling.noise_sources import BrownianNoise, ComfyRng

SHAPE = (1, 4, 8, 8)


@pytest.fixture
def restore_global_rng():
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


@pytest.mark.parametrize("seed", [0, 1, 42, 7, 1234, 2**31 - 1, 2**32 + 5, 2**63, 2**64 - 1])
def test_seeded_randn_equals_global_generator(seed, restore_global_rng):
    rng = ComfyRng()
    got = rng.seeded_randn(seed, SHAPE)
    torch.manual_seed(seed)
    ref = torch.randn(SHAPE)
    assert got.dtype == torch.float32 and got.shape == SHAPE
    assert torch.equal(got, ref)
    # continues like the global generator (what ancestral draws after the noise see)
    for shape in [SHAPE, (3, 5), SHAPE]:
        assert torch.equal(rng.randn(shape), torch.randn(shape))


def test_reseeding_restarts_the_sequence(restore_global_rng):
    rng = ComfyRng()
    a = rng.seeded_randn(42, SHAPE)
    rng.randn(SHAPE)
    b = rng.seeded_randn(42, SHAPE)
    assert torch.equal(a, b)
    c = rng.seeded_randn(43, SHAPE)  # ddim's seed + 1
    torch.manual_seed(43)
    assert torch.equal(c, torch.randn(SHAPE))
    assert not torch.equal(a, c)


def test_batch_noise_is_one_draw():
    rng = ComfyRng()
    single = rng.seeded_randn(42, (1, 4, 8, 8))
    batch = rng.seeded_randn(42, (3, 4, 8, 8))
    assert torch.equal(batch[0:1], single)
    assert not torch.equal(batch[1:2], single)


def test_does_not_touch_global_generator():
    before = torch.get_rng_state()
    rng = ComfyRng()
    rng.seeded_randn(42, SHAPE)
    rng.randn((100,))
    rng.reseed(7)
    after = torch.get_rng_state()
    assert torch.equal(before, after)


def test_independent_instances():
    a, b = ComfyRng(), ComfyRng()
    a.reseed(5)
    b.reseed(5)
    x = a.randn((10,))
    b.randn((3,))  # draws on b do not advance a
    y = a.randn((10,))
    a.reseed(5)
    a.randn((10,))
    assert torch.equal(a.randn((10,)), y)
    assert not torch.equal(x, y)


def test_seed_out_of_range_wraps_modulo_2_64():
    rng = ComfyRng()
    assert torch.equal(rng.seeded_randn(2**64 + 3, SHAPE), rng.seeded_randn(3, SHAPE))


# ---------------------------------------------------------------- BrownianNoise

SIG_MIN, SIG_MAX = torch.tensor(0.0292), torch.tensor(14.6146)


def brownian(seed: int, like=None) -> BrownianNoise:
    like = torch.zeros(SHAPE) if like is None else like
    return BrownianNoise(like, SIG_MIN, SIG_MAX, seed)


def test_brownian_same_seed_same_increments():
    a, b = brownian(42), brownian(42)
    for s, sn in [(14.6146, 6.08), (6.08, 2.23), (0.69, 0.17)]:
        x = a(torch.tensor(s), torch.tensor(sn))
        y = b(torch.tensor(s), torch.tensor(sn))
        assert x.shape == SHAPE and x.dtype == torch.float32
        assert torch.equal(x, y)
    # query order does not matter for a Brownian tree
    c = brownian(42)
    later = c(torch.tensor(0.69), torch.tensor(0.17))
    assert torch.equal(later, a(torch.tensor(0.69), torch.tensor(0.17)))


def test_brownian_different_seeds_differ():
    a, b = brownian(42), brownian(43)
    x = a(torch.tensor(6.0), torch.tensor(2.0))
    y = b(torch.tensor(6.0), torch.tensor(2.0))
    assert (x - y).abs().max() > 0.1


def test_brownian_large_seed_accepted():
    x = brownian(2**64 - 1)(torch.tensor(3.0), torch.tensor(1.0))
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("s,sn", [(14.6146, 6.08), (2.0, 1.9), (0.2, 0.0292)])
def test_brownian_increments_are_unit_normal(s, sn):
    like = torch.zeros(1, 4, 64, 64)
    w = brownian(7, like)(torch.tensor(s), torch.tensor(sn))
    assert w.shape == like.shape
    assert abs(float(w.std()) - 1.0) < 0.05
    assert abs(float(w.mean())) < 0.05


def test_brownian_sign_flips_when_swapped():
    n = brownian(42)
    fwd = n(torch.tensor(6.0), torch.tensor(2.0))
    back = n(torch.tensor(2.0), torch.tensor(6.0))
    torch.testing.assert_close(back, -fwd, rtol=0, atol=0)


def test_brownian_increments_add_up():
    """W(a, c) = W(a, b) + W(b, c): normalised increments times sqrt of their lengths must add."""
    n = brownian(3)
    a, b, c = 10.0, 4.0, 1.0
    w = lambda s, t: n(torch.tensor(s), torch.tensor(t)) * math.sqrt(abs(s - t))  # noqa: E731
    torch.testing.assert_close(w(a, c), w(a, b) + w(b, c), rtol=1e-4, atol=1e-4)


def test_brownian_bounds_order_irrelevant():
    a = BrownianNoise(torch.zeros(SHAPE), SIG_MIN, SIG_MAX, 11)
    b = BrownianNoise(torch.zeros(SHAPE), SIG_MAX, SIG_MIN, 11)
    x = a(torch.tensor(5.0), torch.tensor(2.0))
    y = b(torch.tensor(5.0), torch.tensor(2.0))
    # swapping the tree's bounds flips its orientation, so the increments are negated
    torch.testing.assert_close(y, -x, rtol=0, atol=0)


def test_brownian_does_not_touch_global_generator():
    before = torch.get_rng_state()
    n = brownian(5)
    n(torch.tensor(3.0), torch.tensor(1.0))
    assert torch.equal(before, torch.get_rng_state())
