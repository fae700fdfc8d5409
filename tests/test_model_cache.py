"""The LRU of loaded models (maskfleet/model_cache.py), with real objects and counting loaders."""

import gc
import threading
import time
import weakref

import pytest
import torch

from maskfleet.model_cache import LoadedModels


class Model:
    """A stand-in for a loaded denoiser: a real object with a real tensor inside."""

    def __init__(self, name):
        self.name = name
        self.weight = torch.zeros(4)


class CountingLoader:
    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, name):
        def load():
            self.calls.append(name)
            return Model(name)

        return load


def test_hit_returns_the_same_object_without_loading_again():
    cache = LoadedModels(max_models=2)
    loads = CountingLoader()
    first = cache.get("sd15", "base_sampler.model", loads("sd15"))
    second = cache.get("sd15", "mask_sampler.model", loads("sd15"))
    assert second is first
    assert loads.calls == ["sd15"]
    assert (cache.hits, cache.misses, cache.evictions) == (1, 1, 0)
    assert cache.loads_seconds > 0


def test_evicts_least_recently_used_first():
    cache = LoadedModels(max_models=2)
    loads = CountingLoader()
    a = cache.get("a", "model", loads("a"))
    cache.get("b", "model", loads("b"))
    assert cache.get("a", "model", loads("a")) is a  # a is now the most recently used
    cache.get("c", "model", loads("c"))  # evicts b, not a
    assert [k[0] for k in cache.keys()] == ["a", "c"]
    assert "b" not in cache and "a" in cache
    assert cache.evictions == 1
    cache.get("b", "model", loads("b"))  # b is loaded again; a is the oldest now
    assert loads.calls == ["a", "b", "c", "b"]
    assert [k[0] for k in cache.keys()] == ["c", "b"]
    assert (cache.hits, cache.misses, cache.evictions) == (1, 4, 2)


def test_evicted_model_is_no_longer_referenced():
    cache = LoadedModels(max_models=1)
    loads = CountingLoader()
    ref = weakref.ref(cache.get("a", "model", loads("a")))
    cache.get("b", "model", loads("b"))
    gc.collect()
    assert ref() is None


def test_key_includes_device_and_dtype():
    cache = LoadedModels(max_models=4)
    loads = CountingLoader()
    f32 = cache.get("sd15", "model", loads("sd15"))
    f16 = cache.get("sd15", "model", loads("sd15"), dtype=torch.float16)
    meta = cache.get("sd15", "model", loads("sd15"), device="meta")
    assert f32 is not f16 and f16 is not meta
    assert loads.calls == ["sd15"] * 3
    assert set(cache.keys()) == {
        ("sd15", "cpu", "float32"),
        ("sd15", "cpu", "float16"),
        ("sd15", "meta", "float32"),
    }
    assert cache.get("sd15", "model", loads("sd15"), dtype=torch.float16) is f16
    assert cache.hits == 1


def test_cache_default_dtype_and_device_are_part_of_the_key():
    half = LoadedModels(max_models=2, dtype=torch.bfloat16)
    assert half.key("x") == ("x", "cpu", "bfloat16")


def test_bound_from_environment(monkeypatch):
    monkeypatch.setenv("MASKFLEET_MAX_LOADED_MODELS", "3")
    assert LoadedModels().max_models == 3
    monkeypatch.delenv("MASKFLEET_MAX_LOADED_MODELS")
    assert LoadedModels().max_models == 2
    assert LoadedModels(max_models=5).max_models == 5
    monkeypatch.setenv("MASKFLEET_MAX_LOADED_MODELS", "lots")
    with pytest.raises(ValueError, match="MASKFLEET_MAX_LOADED_MODELS=.lots.: expected a whole number"):
        LoadedModels()
    with pytest.raises(ValueError, match="at least 1"):
        LoadedModels(max_models=0)


def test_failed_load_caches_nothing_and_names_the_field():
    cache = LoadedModels(max_models=2)

    def broken():
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire") as info:
        cache.get("a", "base_sampler.model", broken)
    assert "named by base_sampler.model" in "".join(info.value.__notes__)
    assert len(cache) == 0 and cache.misses == 1
    loads = CountingLoader()
    cache.get("a", "model", loads("a"))  # a later good load works
    assert loads.calls == ["a"]


def test_two_threads_asking_for_the_same_missing_model_load_it_once():
    cache = LoadedModels(max_models=2)
    barrier = threading.Barrier(2)
    calls = []

    def slow_load():
        calls.append(threading.get_ident())
        time.sleep(0.2)  # long enough that the other thread arrives during the load
        return Model("sd15")

    results = [None, None]

    def worker(i):
        barrier.wait()
        results[i] = cache.get("sd15", "model", slow_load)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(calls) == 1
    assert results[0] is results[1] is not None
    assert (cache.hits, cache.misses) == (1, 1)


def test_different_models_load_in_parallel():
    cache = LoadedModels(max_models=2)
    barrier = threading.Barrier(2)
    inside = threading.Barrier(2, timeout=5)  # both loaders must be running at once

    def load(name):
        def loader():
            inside.wait()
            return Model(name)

        return loader

    errors = []

    def worker(name):
        barrier.wait()
        try:
            cache.get(name, "model", load(name))
        except Exception as exc:  # a BrokenBarrierError would mean loads were serialised
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert errors == []
    assert sorted(k[0] for k in cache.keys()) == ["a", "b"]


def test_clear_drops_everything():
    cache = LoadedModels(max_models=2)
    loads = CountingLoader()
    cache.get("a", "model", loads("a"))
    cache.get("b", "model", loads("b"))
    cache.clear()
    assert len(cache) == 0 and cache.evictions == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eviction_on_cuda_returns_memory():
    cache = LoadedModels(max_models=1, device="cuda")

    def big():
        return torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda")

    cache.get("a", "model", big)
    reserved = torch.cuda.memory_reserved()
    cache.get("b", "model", lambda: torch.empty(1, device="cuda"))
    assert torch.cuda.memory_reserved() < reserved


class Sized:
    """A loaded model that says how many bytes it holds."""

    def __init__(self, name: str, nbytes: int):
        self.name, self.nbytes = name, nbytes


def test_the_byte_budget_evicts_least_recently_used_first():
    """Budgeted in bytes, not in models: one big model takes the place of two small ones."""
    cache = LoadedModels(max_models=10, max_bytes=100)
    cache.get("sd15-a", "model", lambda: Sized("a", 40))
    cache.get("sd15-b", "model", lambda: Sized("b", 40))
    assert (len(cache), cache.bytes_held) == (2, 80)
    cache.get("sdxl", "model", lambda: Sized("xl", 50))
    assert [k[0] for k in cache.keys()] == ["sd15-b", "sdxl"] and cache.bytes_held == 90
    cache.get("huge", "model", lambda: Sized("huge", 500))  # over the budget alone: kept, the others go
    assert [k[0] for k in cache.keys()] == ["huge"] and cache.bytes_held == 500
    cache.clear()
    assert cache.bytes_held == 0


def test_the_byte_budget_comes_from_the_setting(monkeypatch):
    monkeypatch.setenv("MASKFLEET_MODEL_MEMORY_MB", "3")
    assert LoadedModels().max_bytes == 3 * 1024 * 1024
    monkeypatch.delenv("MASKFLEET_MODEL_MEMORY_MB")
    assert LoadedModels(device="cpu").max_bytes is None  # the CPU: the count bounds it


def test_a_unet_denoiser_reports_its_weight_bytes():
    from golden_jobs import TINY_UNET
    from maskfleet.model_dirs import load_unet_denoiser

    den = load_unet_denoiser(TINY_UNET)
    params = sum(p.numel() for p in den.unet.parameters())
    assert den.nbytes >= params * 4 and den.nbytes < params * 4 + 1_000_000
