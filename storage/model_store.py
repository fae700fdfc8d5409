"""The local model store: finding a diffusers model directory by the name a job gives.

Jobs name models ("sd15"), never paths, so a job cannot point a worker at an arbitrary
directory. This module maps a name to a directory under the models root and refuses
anything that could escape it (path separators, "..", hidden names, symlinks leading
outside the root).
"""

import os
import re
from pathlib import Path

from .errors import InvalidFile

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MODELS_ENV = "MASKFLEET_MODELS"


def models_root_from(cli_value: str | None) -> Path:
    """Return the models root: ``cli_value`` if given, else $MASKFLEET_MODELS."""
    value = cli_value or os.environ.get(MODELS_ENV)
    if not value:
        raise InvalidFile("models", f"no model directory: pass --models DIR or set {MODELS_ENV}")
    return Path(value)


def available_models(models_root: Path) -> list[str]:
    """Names of the directories under ``models_root`` that are valid model names."""
    try:
        entries = list(models_root.iterdir())
    except OSError:
        return []
    return sorted(p.name for p in entries if MODEL_NAME.fullmatch(p.name) and p.is_dir())


def resolve_model_dir(models_root: Path, name: str, field: str = "model") -> Path:
    """Return the resolved diffusers directory for model ``name`` under ``models_root``.

    The name must match ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}`` without "..", the directory
    must stay inside the root once symlinks are resolved, and it must contain
    ``config.json`` (a pipeline or single model) or ``unet/config.json``.
    """
    if not MODEL_NAME.fullmatch(name) or ".." in name:
        raise InvalidFile(
            field, f"invalid model name {name!r}: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 128 characters, no '..'")
    root = models_root.resolve()
    if not root.is_dir():
        raise InvalidFile(field, f"model directory {models_root} does not exist")
    model_dir = (root / name).resolve()
    if not model_dir.is_relative_to(root) or model_dir == root:
        raise InvalidFile(field, f"model {name!r} resolves outside the model directory {root}")
    if not model_dir.is_dir():
        names = available_models(root)
        shown = ", ".join(names[:50]) + (", ..." if len(names) > 50 else "")
        raise InvalidFile(
            field, f"no model named {name!r} in {root}; available: {shown or '(none)'}")
    if not ((model_dir / "config.json").is_file() or (model_dir / "unet" / "config.json").is_file()):
        raise InvalidFile(
            field, f"{model_dir} is not a diffusers model directory "
            "(no config.json or unet/config.json)")
    return model_dir
