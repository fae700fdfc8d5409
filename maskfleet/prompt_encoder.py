"""Text prompts to prompt embeddings, with the model's own CLIP text encoder.

A model directory in diffusers' layout may carry `text_encoder/` (a transformers
CLIPTextModel) and `tokenizer/` (a CLIPTokenizer). Then a job may give its prompts as
strings: each is tokenized as SD1.5 pipelines do (padded to 77 tokens, truncated) and
encoded to the text model's last hidden state, `[1, 77, D]`, which is what the UNet's
cross-attention takes as `encoder_hidden_states`.

Text encoders are loaded once per (model directory, device, dtype), safetensors only, and
kept in a small LRU (`LoadedModels`); encodings are kept in an LRU keyed by (model
directory, text) so a prompt used by job after job is encoded once.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch

from .model_cache import LoadedModels
from .sampling.errors import InvalidInput
from .settings import load_settings

CLIP_MAX_LENGTH = 77
TEXT_ENCODER_DIR = "text_encoder"
TOKENIZER_DIR = "tokenizer"


def has_text_encoder(model_dir: Path) -> bool:
    """Whether `model_dir` carries a text encoder and tokenizer that prompts can use."""
    model_dir = Path(model_dir)
    return (model_dir / TEXT_ENCODER_DIR / "config.json").is_file() and (model_dir / TOKENIZER_DIR).is_dir()


class TextEncoder:
    """A CLIP tokenizer and text model loaded from one model directory."""

    def __init__(self, model_dir: Path, device: torch.device, dtype: torch.dtype):
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(model_dir / TOKENIZER_DIR, local_files_only=True)
        self.model = CLIPTextModel.from_pretrained(
            model_dir / TEXT_ENCODER_DIR, dtype=dtype, use_safetensors=True, local_files_only=True
        )
        self.model.to(device).eval().requires_grad_(False)
        self.device = device
        if self.model.config.max_position_embeddings < CLIP_MAX_LENGTH:
            raise InvalidInput(
                "prompt",
                f"{model_dir / TEXT_ENCODER_DIR} takes at most {self.model.config.max_position_embeddings} "
                f"tokens; prompts are padded to {CLIP_MAX_LENGTH}",
            )

    @torch.no_grad()
    def encode(self, text: str) -> torch.Tensor:
        """`[1, 77, D]`: the last hidden state of the padded, truncated prompt."""
        ids = self.tokenizer(
            text, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        return self.model(ids.to(self.device))[0]


class PromptEncoder:
    """Encodes prompt strings with a model directory's text encoder; caches both.

    `max_prompts` bounds the encodings kept (default $MASKFLEET_PROMPT_CACHE_SIZE or 256;
    0 keeps none); `max_encoders` bounds the text encoders kept loaded (default
    $MASKFLEET_MAX_LOADED_MODELS or 2). Counters: `hits` and `misses` of the encodings,
    `encoders.hits`/`misses`/`evictions` of the loaded text encoders.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_prompts: int | None = None,
        max_encoders: int | None = None,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_prompts = load_settings().prompt_cache_size if max_prompts is None else max_prompts
        if self.max_prompts < 0:
            raise ValueError(f"max_prompts must not be negative, got {self.max_prompts}")
        self.encoders: LoadedModels[TextEncoder] = LoadedModels(max_encoders, self.device, dtype)
        self.hits = 0
        self.misses = 0
        self._encodings: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, model_dir: Path, text: str, field: str = "prompt") -> torch.Tensor:
        """`[1, 77, D]` prompt embeddings of `text` on this encoder's device and dtype.

        Raises InvalidInput(field, ...) when `text` is not a string or `model_dir` has no
        text encoder and tokenizer. The returned tensor is shared with the cache: do not
        modify it in place.
        """
        if not isinstance(text, str):
            raise InvalidInput(field, f"a prompt must be a string, got {type(text).__name__}")
        model_dir = Path(model_dir).resolve()
        key = (str(model_dir), text)
        with self._lock:
            cached = self._encodings.get(key)
            if cached is not None:
                self._encodings.move_to_end(key)
                self.hits += 1
                return cached
            self.misses += 1
        if not has_text_encoder(model_dir):
            raise InvalidInput(
                field,
                f"model directory {model_dir} has no {TEXT_ENCODER_DIR}/ and {TOKENIZER_DIR}/, "
                "so prompts must be given as embedding files",
            )
        encoder = self.encoders.get(str(model_dir), field, lambda: TextEncoder(model_dir, self.device, self.dtype))
        embeds = encoder.encode(text)
        if self.max_prompts:
            with self._lock:
                self._encodings[key] = embeds
                self._encodings.move_to_end(key)
                while len(self._encodings) > self.max_prompts:
                    self._encodings.popitem(last=False)
        return embeds
