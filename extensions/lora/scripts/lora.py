"""LoRA: `<lora:name:weight>` (also `<lora:name:te:unet[:dyn]>` and named `te=`, `unet=`, `dyn=`).

Uses only the public hook API: an extra network type for the tag, the `weights_patch` hook point
(deltas added to the UNet and text-encoder weights while the job runs, removed bit-exactly after),
settings, and the `loras` / `refresh-loras` providers for `/sdapi/v1/loras`.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from modules.hooks import ExtraNetwork, ModelLoadedParams, WeightDelta, WeightsPatchParams
from modules.model_registry import addnet_hash_safetensors
from modules.options import OptionInfo

from .. import lora_model

log = logging.getLogger("athanor.ext.lora")
STATE_KEY = "lora"
HASH_OPTION = "lora_add_hashes_to_infotext"


class Loras(ExtraNetwork):
    def __init__(self, api):
        super().__init__("lora")
        self.api = api
        self.folder = Path(api.paths.lora_dir) if api.paths is not None else None
        self._lock = threading.Lock()
        self._listing: dict[str, lora_model.LoraOnDisk] = {}
        self._cache: dict[Path, lora_model.LoraNetwork] = {}
        self._key_maps: dict[int, dict[str, lora_model.Target]] = {}
        self._warned: set[tuple[str, int]] = set()
        self._hashes: dict[Path, tuple[int, str | None]] = {}

    # -- files --------------------------------------------------------------------------------
    def refresh(self) -> dict[str, lora_model.LoraOnDisk]:
        listing = lora_model.list_loras(self.folder) if self.folder is not None else {}
        with self._lock:
            self._listing = listing
        return listing

    def available(self) -> dict[str, lora_model.LoraOnDisk]:
        return self._listing or self.refresh()

    def find(self, name: str) -> lora_model.LoraOnDisk | None:
        found = lora_model.find_lora(self.available(), name)
        if found is None or not found.path.exists():
            found = lora_model.find_lora(self.refresh(), name)  # the file may be new (A1111 re-lists too)
        return found

    def load(self, on_disk: lora_model.LoraOnDisk) -> lora_model.LoraNetwork:
        mtime = on_disk.path.stat().st_mtime_ns
        with self._lock:
            cached = self._cache.get(on_disk.path)
            if cached is not None and cached.mtime_ns == mtime:
                return cached
        network = lora_model.load_lora(on_disk)
        with self._lock:
            self._cache[on_disk.path] = network
        return network

    def shorthash(self, on_disk: lora_model.LoraOnDisk) -> str | None:
        """12 hex chars: the file's `sshs_model_hash`, else the addnet hash (sha256 of a non-safetensors file)."""
        from_metadata = on_disk.metadata.get("sshs_model_hash")
        if isinstance(from_metadata, str) and from_metadata:
            return from_metadata[:12]
        compute = addnet_hash_safetensors if on_disk.is_safetensors else None
        value = self.api.file_sha256(on_disk.path, "addnet" if on_disk.is_safetensors else "lora", compute)
        return value[:12] if value else None

    # -- model --------------------------------------------------------------------------------
    def key_map(self, model) -> dict[str, lora_model.Target]:
        with self._lock:
            found = self._key_maps.get(id(model))
            if found is None:
                found = self._key_maps[id(model)] = lora_model.lora_key_map(model)
            return found

    def forget_model(self, params: ModelLoadedParams) -> None:
        with self._lock:
            self._key_maps.pop(id(params.model), None)

    # -- the extra network ----------------------------------------------------------------------
    def activate(self, job, params_list) -> None:
        uses = [lora_model.parse_lora_params(p) for p in params_list if p.items]
        active, missing = [], []
        for use in uses:
            on_disk = self.find(use.name)
            if on_disk is None:
                missing.append(use.name)
                continue
            active.append((use, on_disk, self.load(on_disk)))
        if missing:
            job.warn("Failed to find networks: " + ", ".join(missing))
        job.state[STATE_KEY] = active
        if active and job.opts.get(HASH_OPTION, True):
            hashes = []
            for use, on_disk, _ in active:
                short = self.shorthash(on_disk)
                alias = use.name.replace(":", "").replace(",", "")
                if short and alias:
                    hashes.append(f"{alias}: {short}")
            if hashes:
                job.extra_generation_params["Lora hashes"] = ", ".join(hashes)

    def deactivate(self, job) -> None:
        job.state.pop(STATE_KEY, None)

    def on_weights_patch(self, params: WeightsPatchParams) -> None:
        active = params.job.state.get(STATE_KEY) or []
        if not active:
            return
        key_map = self.key_map(params.model)
        for use, on_disk, network in active:
            matched, missing = network.matched(key_map)
            if missing and (network.name, id(params.model)) not in self._warned:
                self._warned.add((network.name, id(params.model)))
                log.warning("LoRA %s: %d of %d layers do not exist in this model (e.g. %s)", network.name,
                            len(missing), len(network.layers), missing[0])
            if not matched:
                params.job.warn(f"LoRA {use.name} does not fit this model: none of its layers matched")
                continue
            for layer, target in matched:
                multiplier = use.te if target.kind == "te" else use.unet
                if multiplier == 0:
                    continue
                weight = target.module.weight

                def compute(layer=layer, shape=weight.shape, device=weight.device, multiplier=multiplier,
                            dyn=use.dyn):
                    return layer.delta(shape, multiplier, dyn, device)

                params.deltas.append(WeightDelta(target.module, "weight", compute,
                                                 key=(str(on_disk.path), network.mtime_ns, layer.key, multiplier,
                                                      use.dyn)))

    def api_list(self) -> list[dict]:
        return [lora.api_info() for lora in self.refresh().values()]


def setup(api) -> None:
    loras = Loras(api)
    api.add_option(HASH_OPTION, OptionInfo(True, "Add Lora hashes to infotext", section="Extra Networks"))
    api.register_extra_network(loras)
    api.register("weights_patch", loras.on_weights_patch)
    api.register("model_unloaded", loras.forget_model)
    api.provide("loras", loras.api_list)
    api.provide("refresh-loras", lambda: (loras.refresh(), None)[1])
    api.provide("lora-loader", lambda: loras)  # the extension object, for tests and other extensions
