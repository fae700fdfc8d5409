"""Loaded models kept in memory: an LRU keyed by (model name, device, dtype).

A worker keeps the last few models it used so that consecutive jobs on the same model
skip the load. Two bounds: a count (`max_models`, default $MASKFLEET_MAX_LOADED_MODELS
or 2) and bytes (`max_bytes`, default $MASKFLEET_MODEL_MEMORY_MB, else half of a CUDA
device's memory, none on the CPU): an SDXL UNet is ~5 GB in fp16, so three of them do
not fit where three SD1.5 ones do. A value's size is its `nbytes` (0 when it has none).
The least recently used model is dropped first (never the one just loaded) and, on
CUDA, the allocator's cached blocks are handed back so the next load has room.

The cache is generic: a value is whatever the loader returns, so this module imports
no model library.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable, Generic, TypeVar

import torch

from .settings import load_settings

T = TypeVar("T")
Key = tuple[str, str, str]


class LoadedModels(Generic[T]):
    """An LRU of loaded models keyed by (name, device, dtype); thread-safe.

    Two threads asking for the same missing model load it once: the second waits for the
    first's load (a per-key lock) and gets the same object. Loads of different models run
    in parallel. Counters: `hits`, `misses`, `evictions`, `loads_seconds` (total time
    spent in loaders).
    """

    def __init__(
        self,
        max_models: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_bytes: int | None = None,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_models = load_settings().max_loaded_models if max_models is None else max_models
        if self.max_models < 1:
            raise ValueError(f"max_models must be at least 1, got {self.max_models}")
        self.max_bytes = default_max_bytes(self.device, load_settings().model_memory_mb) if max_bytes is None else max_bytes
        self.bytes_held = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.loads_seconds = 0.0
        self._models: OrderedDict[Key, T] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[Key, threading.Lock] = {}

    def key(self, name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Key:
        """The cache key of `name` on `device` in `dtype` (the cache's own by default)."""
        device = self.device if device is None else torch.device(device)
        dtype = self.dtype if dtype is None else dtype
        return (name, str(device), str(dtype).removeprefix("torch."))

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return self.key(name) in self._models

    def keys(self) -> list[Key]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._models)

    def get(
        self,
        name: str,
        field: str,
        loader: Callable[[], T],
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> T:
        """The cached model `name` (a hit), else `loader()`'s result, cached (a miss).

        `device` and `dtype` default to the cache's own; the loader must load the model
        on them. A loader that raises caches nothing, counts as a miss and its error
        propagates; `field` (the job field that named the model) is added to errors that
        carry no field of their own.
        """
        key = self.key(name, device, dtype)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                self.hits += 1
                return self._models[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._models:  # another thread loaded it while we waited
                    self._models.move_to_end(key)
                    self.hits += 1
                    return self._models[key]
                self.misses += 1
            started = time.perf_counter()
            try:
                value = loader()
            except Exception as exc:
                if not hasattr(exc, "field"):
                    exc.add_note(f"while loading model {name!r} named by {field}")
                raise
            finally:
                with self._lock:
                    self.loads_seconds += time.perf_counter() - started
            with self._lock:
                self._models[key] = value
                self._models.move_to_end(key)
                self.bytes_held += _nbytes(value)
                evicted = self._evict_over_bound()
                self._loading.pop(key, None)
        if evicted:
            self._release_memory(evicted)
        return value

    def clear(self) -> None:
        """Drop every cached model."""
        with self._lock:
            dropped = list(self._models)
            self.evictions += len(dropped)
            self._models.clear()
            self.bytes_held = 0
        if dropped:
            self._release_memory(dropped)

    def _evict_over_bound(self) -> list[Key]:
        """Drop least recently used models past either bound, never the newest; return their keys
        (not values, so no reference outlives this call)."""
        evicted = []
        while len(self._models) > 1 and (len(self._models) > self.max_models
                                         or (self.max_bytes is not None and self.bytes_held > self.max_bytes)):
            key, value = self._models.popitem(last=False)
            self.bytes_held -= _nbytes(value)
            evicted.append(key)
            self.evictions += 1
        return evicted

    def _release_memory(self, keys: list[Key]) -> None:
        if any(device.startswith("cuda") for _, device, _ in keys) and torch.cuda.is_available():
            torch.cuda.empty_cache()


def default_max_bytes(device: torch.device, memory_mb: int | None) -> int | None:
    """MASKFLEET_MODEL_MEMORY_MB in bytes; unset, half of a CUDA device's memory (the rest for
    activations), no bound on the CPU (the count bounds it there)."""
    if memory_mb is not None:
        return memory_mb * 1024 * 1024
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory // 2
    return None


def _nbytes(value: object) -> int:
    return int(getattr(value, "nbytes", 0) or 0)
