"""Tiny models for tests, written to disk in the single-file layout and loaded like a user's file."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from modules import model_loader, tiny_models

_FOLDER = Path(tempfile.mkdtemp(prefix="athanor-tiny-"))


@functools.lru_cache(maxsize=None)
def tiny_checkpoint_path(family: str, seed: int = 0) -> Path:
    """A tiny checkpoint file of `family` (cached per test session)."""
    path = _FOLDER / f"tiny-{family}-{seed}.safetensors"
    tiny_models.write_tiny_checkpoint(family, path, seed=seed)
    return path


def tiny_loaded_model(family: str, seed: int = 0):
    """A fresh LoadedModel read from the tiny checkpoint file through the normal loader."""
    return model_loader.load_checkpoint(tiny_checkpoint_path(family, seed))
