"""Text prompts to prompt embeddings, with the model's own CLIP text encoders.

A model directory in diffusers' layout may carry `text_encoder/` (a transformers
CLIPTextModel) and `tokenizer/` (a CLIPTokenizer). Then a job may give its prompts as
strings: each is tokenized as SD1.5 pipelines do (padded to 77 tokens, truncated) and
encoded to the text model's last hidden state, `[1, 77, D]`, which is what the UNet's
cross-attention takes as `encoder_hidden_states`.

An SDXL directory also carries `text_encoder_2/` (CLIPTextModelWithProjection, OpenCLIP
bigG) and `tokenizer_2/`; then, as SDXL pipelines (and ComfyUI's CLIPTextEncode) do, the
embeddings are both encoders' penultimate hidden states side by side (768 + 1280 wide)
and the pooled embedding is the second encoder's projected text embedding.

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
SECOND_TEXT_ENCODER_DIR = "text_encoder_2"  # SDXL's OpenCLIP bigG, with its projection
SECOND_TOKENIZER_DIR = "tokenizer_2"

Encoding = tuple[torch.Tensor, "torch.Tensor | None"]  # (prompt embeddings [1, 77, D], pooled [1, P] or None)


def has_text_encoder(model_dir: Path) -> bool:
    """Whether `model_dir` carries a text encoder and tokenizer that prompts can use."""
    model_dir = Path(model_dir)
    return (model_dir / TEXT_ENCODER_DIR / "config.json").is_file() and (model_dir / TOKENIZER_DIR).is_dir()


class TextEncoder:
    """A model directory's CLIP tokenizer and text model, and SDXL's second pair when it has one."""

    def __init__(self, model_dir: Path, device: torch.device, dtype: torch.dtype):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        self.device = device
        self.tokenizer, self.model = _load_pair(model_dir, TOKENIZER_DIR, TEXT_ENCODER_DIR, CLIPTextModel, device, dtype)
        self.second = None
        if (model_dir / SECOND_TEXT_ENCODER_DIR / "config.json").is_file():
            self.second = _load_pair(model_dir, SECOND_TOKENIZER_DIR, SECOND_TEXT_ENCODER_DIR, CLIPTextModelWithProjection,
                                     device, dtype)

    @torch.no_grad()
    def encode(self, text: str) -> Encoding:
        """One encoder: (`[1, 77, D]` last hidden state, None). SDXL's two: (`[1, 77, D1 + D2]`
        penultimate hidden states side by side, `[1, P]` the second encoder's projected text embedding)."""
        ids = self._ids(self.tokenizer, text)
        if self.second is None:
            return self.model(ids)[0], None
        tokenizer_2, model_2 = self.second
        first = self.model(ids, output_hidden_states=True).hidden_states[-2]
        second = model_2(self._ids(tokenizer_2, text), output_hidden_states=True)
        return torch.cat([first, second.hidden_states[-2]], dim=-1), second.text_embeds

    def _ids(self, tokenizer, text: str) -> torch.Tensor:
        """The prompt padded to 77 tokens, truncated, as SD pipelines tokenize it."""
        return tokenizer(text, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)


def _load_pair(model_dir: Path, tokenizer_dir: str, encoder_dir: str, model_class, device: torch.device, dtype: torch.dtype):
    """A tokenizer and its text model from the directory, local files and safetensors only."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model_dir / tokenizer_dir, local_files_only=True)
    model = model_class.from_pretrained(model_dir / encoder_dir, dtype=dtype, use_safetensors=True, local_files_only=True)
    model.to(device).eval().requires_grad_(False)
    if model.config.max_position_embeddings < CLIP_MAX_LENGTH:
        raise InvalidInput(
            "prompt",
            f"{model_dir / encoder_dir} takes at most {model.config.max_position_embeddings} "
            f"tokens; prompts are padded to {CLIP_MAX_LENGTH}",
        )
    return tokenizer, model


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
        self._encodings: OrderedDict[tuple[str, str], Encoding] = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, model_dir: Path, text: str, field: str = "prompt") -> torch.Tensor:
        """`[1, 77, D]` prompt embeddings of `text` (see `encode_with_pooled`)."""
        return self.encode_with_pooled(model_dir, text, field)[0]

    def encode_with_pooled(self, model_dir: Path, text: str, field: str = "prompt") -> Encoding:
        """(`[1, 77, D]` prompt embeddings, `[1, P]` pooled embedding for SDXL's two encoders, else None)
        of `text` on this encoder's device and dtype.

        Raises InvalidInput(field, ...) when `text` is not a string or `model_dir` has no
        text encoder and tokenizer. The returned tensors are shared with the cache: do not
        modify them in place.
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
        if model_dir.is_file():
            raise InvalidInput(field, f"model {model_dir.name} is a single-file checkpoint: prompts as text need a diffusers "
                                      f"folder with {TEXT_ENCODER_DIR}/ and {TOKENIZER_DIR}/ (a checkpoint's own text "
                                      "encoders are not loaded yet), so give embedding files")
        if not has_text_encoder(model_dir):
            raise InvalidInput(
                field,
                f"model directory {model_dir} has no {TEXT_ENCODER_DIR}/ and {TOKENIZER_DIR}/, "
                "so prompts must be given as embedding files",
            )
        encoder = self.encoders.get(str(model_dir), field, lambda: TextEncoder(model_dir, self.device, self.dtype))
        encoding = encoder.encode(text)
        if self.max_prompts:
            with self._lock:
                self._encodings[key] = encoding
                self._encodings.move_to_end(key)
                while len(self._encodings) > self.max_prompts:
                    self._encodings.popitem(last=False)
        return encoding
