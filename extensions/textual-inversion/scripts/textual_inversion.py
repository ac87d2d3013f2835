"""Textual inversion: write an embedding's file name in the prompt and its vectors replace those words.

Uses only the public hook API: `embedding_lookup` (the lookup the prompt encoder calls while it
tokenizes), `model_loaded` / `model_unloaded` (which model the embeddings must fit), a setting,
and the `embeddings` / `refresh-embeddings` providers for `/sdapi/v1/embeddings`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from modules.hooks import EmbeddingLookupParams, ModelLoadedParams
from modules.options import OptionInfo

from .. import ti_embeddings

HASH_OPTION = "textual_inversion_add_hashes_to_infotext"


class TextualInversion:
    def __init__(self, api):
        self.api = api
        folders = [Path(api.paths.embeddings_dir)] if api.paths is not None else []
        self.db = ti_embeddings.EmbeddingDatabase(folders)
        self.model: Any = None  # the loaded model, for listing embeddings outside a job

    def shorthash(self, embedding: ti_embeddings.Embedding) -> str | None:
        if embedding.sha256 is None:
            embedding.sha256 = self.api.file_sha256(embedding.path, "textual_inversion")
        return embedding.sha256[:12] if embedding.sha256 else None

    def on_model_loaded(self, params: ModelLoadedParams) -> None:
        self.model = params.model

    def on_model_unloaded(self, params: ModelLoadedParams) -> None:
        if self.model is params.model:
            self.model = None

    def on_embedding_lookup(self, params: EmbeddingLookupParams) -> None:
        index = self.db.refresh(params.model)
        if not index.loaded:
            return
        job = params.job
        used: dict[str, ti_embeddings.Embedding] = {}
        add_hashes = bool(job.opts.get(HASH_OPTION, True))

        def lookup(slot_index, tokens, position):
            embedding, n_tokens = index.find(tokens, position)
            if embedding is None:
                return None, 0
            if add_hashes and embedding.name not in used:
                used[embedding.name] = embedding
                text = ti_embeddings.ti_hashes_text(list(used.values()), self.shorthash)
                if text:
                    job.extra_generation_params["TI hashes"] = text
            return embedding.for_encoder(), n_tokens

        params.lookups.append(lookup)

    def embeddings(self) -> dict:
        return self.db.api_data(self.model)

    def refresh(self) -> None:
        self.db.refresh(self.model, force=True)


def setup(api) -> None:
    ti = TextualInversion(api)
    api.add_option(HASH_OPTION, OptionInfo(True, "Add Textual Inversion hashes to infotext", section="Extra Networks"))
    api.register("model_loaded", ti.on_model_loaded)
    api.register("model_unloaded", ti.on_model_unloaded)
    api.register("embedding_lookup", ti.on_embedding_lookup)
    api.provide("embeddings", ti.embeddings)
    api.provide("refresh-embeddings", ti.refresh)
    api.provide("textual-inversion", lambda: ti)  # the extension object, for tests and other extensions
