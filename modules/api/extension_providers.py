"""The API's lists that extensions fill: embeddings, hypernetworks, LoRA, scripts and the extensions themselves.

`fill_api_providers` points the App's `ApiProviders` at the loader's registries once the extensions are
loaded; each list is read when a route asks, so what an extension refreshes shows at once. Light, like
`modules.api` itself (no FastAPI import), because the App builds it also without --api.
"""
from __future__ import annotations

from typing import Any, Callable

from modules.api import ApiProviders, ScriptEntry
from modules.extensions import ExtensionManager


def fill_api_providers(providers: ApiProviders, extensions: ExtensionManager) -> None:
    """Point the API's lists (modules.api.ApiProviders) at the extensions and scripts."""

    def data(name: str, empty: Callable[[], Any]) -> Callable[[], Any]:
        def get() -> Any:
            value = extensions.provide(name)
            return empty() if value is None else value  # A1111's empty shape until an extension provides one
        return get

    providers.embeddings = data("embeddings", lambda: {"loaded": {}, "skipped": {}})
    providers.hypernetworks = data("hypernetworks", list)
    providers.loras = data("loras", list)
    providers.refresh_embeddings = lambda: extensions.provide("refresh-embeddings")
    providers.refresh_loras = lambda: extensions.provide("refresh-loras")
    providers.scripts = lambda: [ScriptEntry(**entry) for entry in extensions.scripts.script_info_for_api()]
    providers.extensions = lambda: extensions_for_api(extensions)


def extensions_for_api(extensions: ExtensionManager) -> list[dict[str, Any]]:
    """A1111's `GET /sdapi/v1/extensions` items."""
    return [{"name": i.name, "remote": i.remote or "", "branch": i.branch or "", "commit_hash": i.commit_hash or "",
             "commit_date": None, "version": i.version or (i.commit_hash or "")[:8], "enabled": i.enabled}
            for i in extensions.infos]
