"""Textual-inversion embeddings: reading the files A1111 reads, and finding their names in token streams.

Accepted layouts (A1111's `EmbeddingDatabase.load_from_file`):
  - A1111 / original textual inversion: {"string_to_token": {"*": 265}, "string_to_param": {"*": [n, width]},
    "name", "step", "sd_checkpoint", "sd_checkpoint_name"}: exactly one term;
  - SDXL: {"clip_l": [n, 768], "clip_g": [n, 1280]};
  - any dict with exactly one tensor: diffusers concepts {"<token>": [width]}, kohya {"emb_params": [n, width]}.
Files: `.pt` / `.bin` (read with `torch.load(weights_only=True)`) and `.safetensors`, found recursively.
An embedding's name is its file name without the extension; the prompt uses it as a word.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from modules.conditioning import EmbeddingVectors

log = logging.getLogger("athanor.ext.textual-inversion")

SUFFIXES = (".pt", ".bin", ".safetensors", ".png")
PNG_CHUNK = "sd-ti-embedding"  # A1111 stores an embedding in a PNG as base64 JSON in this text chunk


class NotAnEmbedding(Exception):
    """An image in the embeddings folder that carries no embedding (a preview picture): skipped quietly."""


@dataclass
class Embedding:
    """One embedding file."""

    name: str
    path: Path
    vectors: Any  # torch.Tensor [n, width], or {"clip_l": [n, w1], "clip_g": [n, w2]} for SDXL
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    sha256: str | None = None
    _as_vectors: EmbeddingVectors | None = field(default=None, repr=False)

    @property
    def n_vectors(self) -> int:
        vec = self.vectors["clip_g"] if isinstance(self.vectors, dict) else self.vectors
        return int(vec.shape[0])

    @property
    def shape(self) -> int:
        """A1111's `shape`: the vector width (the sum of both widths for SDXL)."""
        if isinstance(self.vectors, dict):
            return int(self.vectors["clip_g"].shape[-1] + self.vectors["clip_l"].shape[-1])
        return int(self.vectors.shape[-1])

    def for_encoder(self) -> EmbeddingVectors:
        if self._as_vectors is None:
            self._as_vectors = EmbeddingVectors(self.name, self.vectors)
        return self._as_vectors

    def fits(self, widths: Sequence[int]) -> bool:
        """Whether the embedding suits text encoders of these widths (one per encoder)."""
        if isinstance(self.vectors, dict):
            return (len(widths) == 2 and int(self.vectors["clip_l"].shape[-1]) == widths[0]
                    and int(self.vectors["clip_g"].shape[-1]) == widths[1])
        return len(widths) == 1 and self.shape == widths[0]

    def api_info(self) -> dict[str, Any]:
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint, "sd_checkpoint_name": self.sd_checkpoint_name,
                "shape": self.shape, "vectors": self.n_vectors}


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # noqa: BLE001
        # Files from the original textual_inversion code keep the vectors in an nn.ParameterDict.
        try:
            with torch.serialization.safe_globals([torch.nn.ParameterDict, torch.nn.Parameter]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001
            raise ValueError(f"{path.name} cannot be read safely (only tensors and plain data are loaded): "
                             f"{first}") from first


def read_embedding_data(path: Path) -> Mapping[str, Any]:
    """The raw dict stored in an embedding file."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    data = _torch_load(path)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path.name} does not hold a dict of tensors")
    return data


def _as_matrix(value: Any, path: Path) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{path.name}: the embedding is not a tensor")
    tensor = value.detach().to(torch.float32)
    return tensor.unsqueeze(0) if tensor.ndim == 1 else tensor


def parse_embedding(data: Mapping[str, Any], name: str, path: Path) -> Embedding:
    """An Embedding from the stored dict, in any of the accepted layouts."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # an nn.ParameterDict keeps its tensors here
        if len(params) != 1:
            raise ValueError(f"{path.name}: embedding file has multiple terms in it")
        vectors = _as_matrix(next(iter(params.values())), path)
    elif "clip_g" in data and "clip_l" in data:  # SDXL
        vectors = {key: _as_matrix(data[key], path) for key in ("clip_l", "clip_g")}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise ValueError(f"{path.name}: clip_l and clip_g have different numbers of vectors")
    elif data and isinstance(next(iter(data.values())), torch.Tensor):
        if len(data) != 1:
            raise ValueError(f"{path.name}: embedding file has multiple terms in it")
        vectors = _as_matrix(next(iter(data.values())), path)
    else:
        raise ValueError(f"Couldn't identify {path.name} as neither textual inversion embedding nor diffuser concept.")
    step = data.get("step")
    return Embedding(name=name, path=path, vectors=vectors,
                     step=int(step) if isinstance(step, (int, float)) else None,
                     sd_checkpoint=_text(data.get("sd_checkpoint")),
                     sd_checkpoint_name=_text(data.get("sd_checkpoint_name")))


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _decode_tensors(obj: dict) -> Any:
    if "TORCHTENSOR" in obj:
        return torch.tensor(obj["TORCHTENSOR"], dtype=torch.float32)
    return obj


def read_png_embedding(path: Path) -> Mapping[str, Any]:
    """The embedding dict A1111 wrote into a PNG's `sd-ti-embedding` chunk (tensors as {"TORCHTENSOR": [...]})."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get(PNG_CHUNK)
    if not text:
        raise NotAnEmbedding(path.name)
    try:
        data = json.loads(base64.b64decode(text), object_hook=_decode_tensors)
    except ValueError as exc:
        raise ValueError(f"{path.name}: its {PNG_CHUNK} chunk is not valid embedding data ({exc})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path.name}: its {PNG_CHUNK} chunk does not hold a dict")
    return data


def embedding_to_png_chunk(data: Mapping[str, Any]) -> str:
    """The `sd-ti-embedding` chunk text for an embedding dict (A1111's writer, for round trips and tests)."""
    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {"TORCHTENSOR": value.detach().cpu().tolist()}
        if isinstance(value, Mapping):
            return {k: encode(v) for k, v in value.items()}
        return value
    return base64.b64encode(json.dumps(encode(data)).encode()).decode()


def load_embedding(path: Path) -> Embedding:
    if path.suffix.lower() == ".png":
        data = read_png_embedding(path)
        name = data.get("name") if isinstance(data.get("name"), str) else path.stem
        return parse_embedding(data, name, path)
    return parse_embedding(read_embedding_data(path), path.stem, path)


def embedding_files(folders: Sequence[Path]) -> list[Path]:
    """Every embedding file under the folders (recursive; empty and hidden files are skipped)."""
    found = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for root, dirs, files in os.walk(folder, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for file in sorted(files):
                path = Path(root) / file
                if (file.startswith(".") or path.suffix.lower() not in SUFFIXES
                        or file.lower().endswith(".preview.png")):
                    continue
                try:
                    if path.stat().st_size == 0:
                        continue
                except OSError:
                    continue
                found.append(path)
    return found


def encoder_widths(model: Any) -> tuple[int, ...]:
    """Token-embedding width of each text encoder (768 SD1, 1024 SD2, (768, 1280) SDXL)."""
    return tuple(int(te.get_input_embeddings().embedding_dim) for te in model.text_encoders)


@dataclass(frozen=True)
class _Index:
    """Embeddings usable with one model, by the first token id of their names (longest names first)."""

    loaded: dict[str, Embedding]
    skipped: dict[str, Embedding]
    by_first_id: dict[int, list[tuple[list[int], Embedding]]]

    def find(self, tokens: Sequence[int], position: int) -> tuple[Embedding | None, int]:
        candidates = self.by_first_id.get(tokens[position])
        if candidates:
            for ids, embedding in candidates:
                if list(tokens[position:position + len(ids)]) == ids:
                    return embedding, len(ids)
        return None, 0


class EmbeddingDatabase:
    """The embeddings folder(s), re-read when a file changes, indexed for the loaded model."""

    def __init__(self, folders: Sequence[Path]):
        self.folders = [Path(f) for f in folders]
        self._lock = threading.Lock()
        self._files: dict[Path, tuple[int, int, Embedding]] = {}  # path -> (mtime_ns, size, embedding)
        self._errors: dict[str, str] = {}
        self._index: _Index | None = None
        self._index_key: tuple | None = None

    def _read_files(self) -> tuple:
        """Re-read changed files; returns a signature of the folder contents."""
        current = {}
        for path in embedding_files(self.folders):
            try:
                stat = path.stat()
            except OSError:
                continue
            current[path] = (stat.st_mtime_ns, stat.st_size)
        for path in list(self._files):
            if path not in current:
                del self._files[path]
        for path, (mtime, size) in current.items():
            known = self._files.get(path)
            if known is not None and known[:2] == (mtime, size):
                continue
            try:
                self._files[path] = (mtime, size, load_embedding(path))
                self._errors.pop(str(path), None)
            except NotAnEmbedding:
                self._files.pop(path, None)
            except Exception as exc:  # noqa: BLE001 - one bad file must not hide the others
                self._files.pop(path, None)
                if self._errors.get(str(path)) != str(exc):
                    log.error("Error loading embedding %s: %s", path, exc)
                self._errors[str(path)] = str(exc)
        return tuple(sorted((str(p), m, s) for p, (m, s) in current.items()))

    def refresh(self, model: Any = None, tokenizer: Any = None, *, force: bool = False) -> _Index:
        """The index for `model` (its tokenizer and widths); re-reads files that changed."""
        with self._lock:
            if force:
                self._files.clear()
            signature = self._read_files()
            widths = encoder_widths(model) if model is not None else None
            if tokenizer is None and model is not None:
                tokenizer = model.tokenizers[0]
            key = (signature, widths, id(tokenizer))
            if self._index is not None and key == self._index_key:
                return self._index
            embeddings: dict[str, Embedding] = {}
            for _, _, embedding in sorted(self._files.values(), key=lambda item: str(item[2].path)):
                embeddings[embedding.name] = embedding  # a later file of the same name wins, as in A1111
            loaded, skipped = {}, {}
            for name in sorted(embeddings, key=str.lower):
                embedding = embeddings[name]
                if widths is None or embedding.fits(widths):
                    loaded[name] = embedding
                else:
                    skipped[name] = embedding
            by_first_id: dict[int, list[tuple[list[int], Embedding]]] = {}
            if tokenizer is not None:
                for name, embedding in loaded.items():
                    ids = tokenizer([name], add_special_tokens=False)["input_ids"][0]
                    if ids:
                        by_first_id.setdefault(ids[0], []).append((list(ids), embedding))
                for entries in by_first_id.values():
                    entries.sort(key=lambda item: len(item[0]), reverse=True)
            self._index = _Index(loaded, skipped, by_first_id)
            self._index_key = key
            if loaded or skipped:
                log.info("Textual inversion embeddings loaded(%d): %s", len(loaded), ", ".join(loaded))
                if skipped:
                    log.info("Textual inversion embeddings skipped(%d): %s", len(skipped), ", ".join(skipped))
            return self._index

    def api_data(self, model: Any = None) -> dict[str, dict[str, dict[str, Any]]]:
        """`GET /sdapi/v1/embeddings`: {loaded: {name: {...}}, skipped: {...}}."""
        index = self.refresh(model)
        return {"loaded": {n: e.api_info() for n, e in index.loaded.items()},
                "skipped": {n: e.api_info() for n, e in index.skipped.items()}}


def ti_hashes_text(used: Sequence[Embedding], shorthash: Callable[[Embedding], str | None]) -> str:
    """A1111's `TI hashes` value: "name: hash12, ..." (":" and "," removed from names)."""
    parts = []
    for embedding in used:
        short = shorthash(embedding)
        if short:
            parts.append(f"{embedding.name.replace(':', '').replace(',', '')}: {short}")
    return ", ".join(parts)
