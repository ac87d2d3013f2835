"""The loaded checkpoint: choosing, switching and freeing models, and the VAE override.

Only one checkpoint is in memory at a time. A switch checks the new file first (header, family),
frees the old model, loads the new one, and if that load fails after all, loads the previous
one back, so a broken file never leaves the server without a model.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from modules import model_families, model_loader, tiny_models
from modules.devices import DeviceConfig, torch_gc
from modules.hooks import HookRegistry, ModelLoadedParams
from modules.model_registry import CheckpointInfo, ModelRegistry

log = logging.getLogger("athanor.models")

BUILTIN_TITLE = "Built-in tiny model (random weights)"
BUILTIN_NOTICE = ("No checkpoint found: running the built-in tiny model with random weights, for trying the "
                  "interface only (its images are noise). Put a Stable Diffusion checkpoint (.safetensors) "
                  "in {folder} and refresh or restart.")
VAE_AUTOMATIC, VAE_NONE = "Automatic", "None"


@dataclass(frozen=True)
class ModelRef:
    """What a generation needs to know about the loaded checkpoint for its infotext."""

    name: str  # A1111's model_name (file stem)
    shorthash: str | None  # 10 hex chars, or None when hashing is off / built-in model
    sha256: str | None = None


@dataclass(frozen=True)
class ActiveModel:
    model: object  # model_loader.LoadedModel
    title: str
    ref: ModelRef
    info: CheckpointInfo | None  # None for the built-in model
    vae_name: str  # "Automatic", "None" or a VAE file name


class ModelManager:
    def __init__(self, registry: ModelRegistry, device: DeviceConfig, *, hooks: HookRegistry | None = None,
                 on_notice: Callable[[str], None] = log.warning):
        self.registry = registry
        self.device = device
        self.hooks = hooks
        self.on_notice = on_notice
        self._lock = threading.RLock()  # held while a job uses the model and while switching
        self._active: ActiveModel | None = None

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    @property
    def active(self) -> ActiveModel | None:
        return self._active

    @property
    def is_builtin(self) -> bool:
        return self._active is not None and self._active.info is None

    # -- selection ------------------------------------------------------------------------
    def resolve(self, query: str | None) -> CheckpointInfo | None:
        """The checkpoint a title/name/hash names; None means the built-in model (no files at all)."""
        if query:
            info = self.registry.find_checkpoint(query)
            if info is None:
                raise ValueError(f"Checkpoint {query!r} not found; available: "
                                 + (", ".join(c.title for c in self.registry.checkpoints) or "none"))
            return info
        return self.registry.checkpoints[0] if self.registry.checkpoints else None

    def ensure(self, query: str | None = None, vae: str = VAE_AUTOMATIC) -> ActiveModel:
        """Make sure the asked-for checkpoint and VAE are loaded (no-op when they are)."""
        with self._lock:
            active = self._active
            if query:
                target = self.resolve(query)
            elif active is not None:
                target = active.info  # keep what is loaded
            else:
                target = self.resolve(None)
            if active is not None and active.info == target:
                return active if vae == active.vae_name else self._switch_vae(vae)
            return self._load(target, vae)

    def load_builtin(self) -> ActiveModel:
        """The built-in tiny model, whatever the checkpoints folder holds (when none of them loads)."""
        with self._lock:
            return self._load(None, VAE_AUTOMATIC)

    def _load(self, info: CheckpointInfo | None, vae: str) -> ActiveModel:
        previous = self._active
        vae_path = self._vae_path(vae, info)
        if info is not None and not info.is_diffusers_folder:
            # Header and family first: a broken file fails here, before the loaded model is freed.
            shapes, metadata = model_loader.read_checkpoint_header(info.filename)
            model_families.detect_family(shapes, metadata=metadata)
        self._free()
        try:
            active = self._load_now(info, vae, vae_path)
        except Exception:
            if previous is not None:
                log.warning("Loading %s failed; loading %s again", info.title if info else BUILTIN_TITLE,
                            previous.title)
                self._active = self._load_now(previous.info, previous.vae_name, self._vae_path(previous.vae_name, previous.info))
            raise
        self._active = active
        if self.hooks is not None and self.hooks.has("model_loaded"):
            self.hooks.run("model_loaded", ModelLoadedParams(active.model, active.title))
        return active

    def _load_now(self, info: CheckpointInfo | None, vae: str, vae_path: str | None) -> ActiveModel:
        dev = self.device
        if info is None:
            components = tiny_models.build_tiny_components("sd1", seed=0)
            model = model_loader.load_from_components("sd1", components)
            model.pipeline.to(device=dev.device, dtype=dev.dtype)
            self.on_notice(BUILTIN_NOTICE.format(folder=self.registry.ckpt_dir))
            return ActiveModel(model, BUILTIN_TITLE, ModelRef("builtin-tiny-random", None), None, VAE_AUTOMATIC)
        log.info("Loading %s", info.title)
        model = model_loader.load_checkpoint(info.filename, device=dev.device, dtype=dev.dtype, vae_path=vae_path)
        log.info("Loaded %s (%s, %s)", info.title, model.family.label, model.prediction_type)
        name = Path(info.name).stem if not info.is_diffusers_folder else info.name
        return ActiveModel(model, info.title, ModelRef(name, info.shorthash, info.sha256), info, vae)

    def _vae_path(self, vae: str, info: CheckpointInfo | None) -> str | None:
        """The VAE file to use; None means the checkpoint's own VAE.

        "Automatic" (A1111): a VAE named after the checkpoint (`name.vae.safetensors`, `name.vae.pt`, ...)
        in the VAE folder or beside the checkpoint, else the checkpoint's own.
        """
        if vae == VAE_AUTOMATIC and info is not None:
            stem = Path(info.filename).stem
            for candidate in self.registry.vaes:
                name = Path(candidate.filename).name
                if name.split(".vae.")[0] == stem or Path(name).stem == stem:
                    return candidate.filename
            return None
        if vae in (VAE_AUTOMATIC, VAE_NONE, "", None):
            return None
        found = self.registry.find_vae(vae)
        if found is None:
            raise ValueError(f"VAE {vae!r} not found in {self.registry.vae_dir}")
        return found.filename

    def _switch_vae(self, vae: str) -> ActiveModel:
        active = self._active
        path = self._vae_path(vae, active.info)
        if path == active.model.vae_path:
            model = active.model  # e.g. "Automatic" and "None" both mean the checkpoint's own VAE here
        elif path is None:
            model = model_loader.with_vae(active.model, None)
        else:
            module = model_loader.load_vae(path, family=active.model.family, dtype=self.device.dtype,
                                           device=self.device.device)
            model = model_loader.with_vae(active.model, module, path)
        self._active = ActiveModel(model, active.title, active.ref, active.info, vae)
        return self._active

    def _free(self) -> None:
        active, self._active = self._active, None
        if active is None:
            return
        if self.hooks is not None and self.hooks.has("model_unloaded"):
            self.hooks.run("model_unloaded", ModelLoadedParams(active.model, active.title))
        release(active.model)
        del active
        torch_gc(self.device.device)

    def unload(self) -> None:
        with self._lock:
            self._free()


def release(model) -> None:
    """Drop every reference a LoadedModel holds, so its tensors can be freed right away."""
    for name in ("pipeline", "unet", "vae", "checkpoint_vae"):
        setattr(model, name, None)
    model.text_encoders.clear()
    model.tokenizers.clear()
