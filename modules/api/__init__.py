"""The HTTP APIs: A1111-compatible `/sdapi/v1` (a1111.py) and native jobs `/api/v1/jobs` (jobs_api.py).

Both translate between HTTP and `GenerationRequest` and submit through `App.submit`, the queue the
page uses too. Nothing here generates anything.

Lists that features outside the core fill (embeddings, hypernetworks, LoRA, scripts, extensions,
upscalers, face restorers) come from `ApiProviders`, which the App owns (`app.api_providers`):
an extension replaces a provider with its own callable, and the routes answer with A1111's empty
shapes until one does. This module stays light (no FastAPI import) so the App can build it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

# A1111's latent upscale modes (`shared.latent_upscale_modes`), listed by /latent-upscale-modes.
LATENT_UPSCALE_MODES = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                        "Latent (nearest)", "Latent (nearest-exact)")


@dataclass(frozen=True)
class ScriptEntry:
    """One script as A1111's `/script-info` lists it (one entry per tab it appears on).

    `name` is the lowercased title that `script_name` and `alwayson_scripts` keys match (any case).
    `args` are dicts with A1111's keys: label, value, minimum, maximum, step, choices.
    """

    name: str
    is_alwayson: bool
    is_img2img: bool
    args: Sequence[Mapping[str, Any]] = ()


def _no_scripts() -> list[ScriptEntry]:
    return []


def _no_embeddings() -> dict[str, Any]:
    return {"loaded": {}, "skipped": {}}


def _empty_list() -> list[dict[str, Any]]:
    return []


def _builtin_upscalers() -> list[dict[str, Any]]:
    # The upscalers A1111 always has (no model files): None, Lanczos, Nearest.
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": scale}
            for name, scale in (("None", 1), ("Lanczos", 4), ("Nearest", 4))]


def _latent_modes() -> list[dict[str, Any]]:
    return [{"name": name} for name in LATENT_UPSCALE_MODES]


def _nothing() -> None:
    return None


@dataclass
class ApiProviders:
    """What the API lists, by feature. Each is a no-argument callable returning A1111's JSON shape."""

    embeddings: Callable[[], Mapping[str, Any]] = _no_embeddings  # {loaded: {name: {...}}, skipped: {...}}
    hypernetworks: Callable[[], Sequence[Mapping[str, Any]]] = _empty_list  # [{name, path}]
    loras: Callable[[], Sequence[Mapping[str, Any]]] = _empty_list  # [{name, alias, path, metadata}]
    scripts: Callable[[], Sequence[ScriptEntry]] = _no_scripts
    extensions: Callable[[], Sequence[Mapping[str, Any]]] = _empty_list  # [{name, remote, branch, ...}]
    upscalers: Callable[[], Sequence[Mapping[str, Any]]] = _builtin_upscalers
    latent_upscale_modes: Callable[[], Sequence[Mapping[str, Any]]] = _latent_modes
    face_restorers: Callable[[], Sequence[Mapping[str, Any]]] = _empty_list  # [{name, cmd_dir}]
    realesrgan_models: Callable[[], Sequence[Mapping[str, Any]]] = _empty_list  # [{name, path, scale}]
    refresh_embeddings: Callable[[], None] = _nothing
    refresh_loras: Callable[[], None] = _nothing
    extra: dict[str, Any] = field(default_factory=dict)  # room for providers added later


def mount_api(server: Any, app: Any) -> None:
    """Add `/sdapi/v1/*` and `/api/v1/jobs*` to `server`. Call before Gradio is mounted at "/"."""
    from modules.api.a1111 import add_a1111_routes
    from modules.api.common import ApiContext, install_error_handlers
    from modules.api.docs import add_docs_route
    from modules.api.jobs_api import add_job_routes

    context = ApiContext.for_app(app)
    install_error_handlers(server)
    add_a1111_routes(server, context)
    add_job_routes(server, context)
    add_docs_route(server)
