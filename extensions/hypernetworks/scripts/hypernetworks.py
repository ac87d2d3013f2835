"""Hypernetworks: `<hypernet:name:multiplier>` in the prompt (multiplier 1.0 when left out; several stack).

Uses only the public hook API: an extra network type for the tag, the `attention` hook point to
change the context that each attention's to_k / to_v see (never to_q), and the `hypernetworks`
provider for `/sdapi/v1/hypernetworks`.
"""
from __future__ import annotations

import threading
from pathlib import Path

from modules.hooks import AttentionParams, AttentionSite, ExtraNetwork

from .. import hn_model

STATE_KEY = "hypernetworks"


class Hypernetworks(ExtraNetwork):
    def __init__(self, api):
        super().__init__("hypernet")
        self.api = api
        self.folder = Path(api.paths.hypernetwork_dir) if api.paths is not None else None
        self._cache: dict[Path, hn_model.Hypernetwork] = {}
        self._lock = threading.Lock()

    def available(self) -> dict[str, Path]:
        return hn_model.list_hypernetworks(self.folder) if self.folder is not None else {}

    def load(self, path: Path) -> hn_model.Hypernetwork:
        """A hypernetwork from disk, kept until its file changes."""
        with self._lock:
            cached = self._cache.get(path)
            if cached is not None and cached.mtime_ns == path.stat().st_mtime_ns:
                return cached
            network = hn_model.load_hypernetwork(path)
            self._cache[path] = network
            return network

    # -- the extra network ------------------------------------------------------------------
    def activate(self, job, params_list) -> None:
        active = []
        available = self.available() if params_list else {}
        for params in params_list:
            if not params.items:
                continue
            name = str(params.items[0])
            try:
                multiplier = float(params.items[1]) if len(params.items) > 1 else 1.0
            except ValueError:
                raise ValueError(f"<hypernet:{name}:...>: the multiplier must be a number, "
                                 f"got {params.items[1]!r}") from None
            path = available.get(name)
            if path is None:
                job.warn(f"Hypernetwork not found: {name}")
                continue
            active.append((self.load(path), multiplier))
        job.state[STATE_KEY] = active

    def deactivate(self, job) -> None:
        job.state.pop(STATE_KEY, None)

    # -- the attention hook -----------------------------------------------------------------
    def on_attention(self, params: AttentionParams) -> None:
        active = list(params.job.state.get(STATE_KEY) or [])
        if not active:
            return

        def transform(site: AttentionSite, context_k, context_v):
            for network, multiplier in active:
                context_k, context_v = network.apply(context_k, context_v, multiplier)
            return context_k, context_v

        params.transforms.append(transform)

    def api_list(self) -> list[dict]:
        return [{"name": name, "path": str(path)} for name, path in self.available().items()]


def setup(api) -> None:
    networks = Hypernetworks(api)
    api.register_extra_network(networks)
    api.register("attention", networks.on_attention)
    api.provide("hypernetworks", networks.api_list)
    api.provide("hypernetwork-loader", lambda: networks)  # the extension object, for tests and other extensions
