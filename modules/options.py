"""Settings: A1111's option names and defaults, persisted in `<data-dir>/config.json`.

A job never reads the live settings: it takes an immutable `snapshot()` (with the request's
`override_settings` applied) when it is submitted, so a settings change or another user's
override never reaches a job that is already queued or running.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping


@dataclass(frozen=True)
class OptionInfo:
    default: Any
    label: str
    section: str = "Stable Diffusion"
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    restrict_api: bool = False  # paths and code switches: never settable over the network
    infotext: str | None = None  # infotext key that maps back to this option when pasting
    comment: str = ""


_PATHS = "Saving images"
OPTIONS: Mapping[str, OptionInfo] = MappingProxyType({
    # Model
    "sd_model_checkpoint": OptionInfo("", "Stable Diffusion checkpoint", infotext="Model hash"),
    "sd_vae": OptionInfo("Automatic", "SD VAE", comment="Automatic, None, or a file from models/VAE"),
    "sd_checkpoint_hash": OptionInfo("", "SHA256 of the loaded checkpoint (read-only)"),
    "auto_vae_precision": OptionInfo(True, "Retry a VAE decode that gives NaNs in float32"),
    # Sampling
    "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip", minimum=1, maximum=12, infotext="Clip skip"),
    "eta_noise_seed_delta": OptionInfo(0, "Eta noise seed delta (ENSD)", minimum=0, infotext="ENSD"),
    "randn_source": OptionInfo("GPU", "Random number generator source", choices=("GPU", "CPU"), infotext="RNG"),
    "emphasis": OptionInfo("Original", "Emphasis mode", choices=("Original", "No norm", "Ignore", "None"),
                           infotext="Emphasis"),
    "comma_padding_backtrack": OptionInfo(20, "Prompt word wrap length limit", minimum=0, maximum=74),
    "use_old_scheduling": OptionInfo(False, "Old prompt editing timelines", infotext="Old prompt editing timelines"),
    "pad_cond_uncond": OptionInfo(False, "Pad prompt/negative prompt to the same length"),
    "eta_ancestral": OptionInfo(1.0, "Eta for ancestral samplers", minimum=0, maximum=1),
    "eta_ddim": OptionInfo(0.0, "Eta for DDIM", minimum=0, maximum=1),
    "img2img_fix_steps": OptionInfo(False, "With img2img, do exactly the amount of steps the slider specifies"),
    "initial_noise_multiplier": OptionInfo(1.0, "Noise multiplier for img2img", minimum=0.0, maximum=1.5),
    "inpainting_mask_weight": OptionInfo(1.0, "Inpainting conditioning mask strength", minimum=0, maximum=1,
                                         infotext="Conditional mask weight"),
    # Output
    "samples_save": OptionInfo(True, "Always save all generated images", _PATHS),
    "samples_format": OptionInfo("png", "File format for images", _PATHS, choices=("png", "jpg", "webp")),
    "grid_save": OptionInfo(True, "Always save all generated image grids", _PATHS),
    "return_grid": OptionInfo(True, "Show grid in gallery", _PATHS),
    "enable_pnginfo": OptionInfo(True, "Save text information about generation parameters as chunks to png files", _PATHS),
    "add_model_hash_to_info": OptionInfo(True, "Add model hash to infotext", _PATHS),
    "add_model_name_to_info": OptionInfo(True, "Add model name to infotext", _PATHS),
    "add_version_to_infotext": OptionInfo(True, "Add program version to infotext", _PATHS),
    "outdir_samples": OptionInfo("", "Output directory for images; if empty, defaults to three directories below",
                                 _PATHS, restrict_api=True),
    "outdir_txt2img_samples": OptionInfo("outputs/txt2img-images", "Output directory for txt2img images", _PATHS,
                                         restrict_api=True),
    "outdir_img2img_samples": OptionInfo("outputs/img2img-images", "Output directory for img2img images", _PATHS,
                                         restrict_api=True),
    "outdir_txt2img_grids": OptionInfo("outputs/txt2img-grids", "Output directory for txt2img grids", _PATHS,
                                       restrict_api=True),
    "outdir_img2img_grids": OptionInfo("outputs/img2img-grids", "Output directory for img2img grids", _PATHS,
                                       restrict_api=True),
    # Live previews
    "live_previews_enable": OptionInfo(True, "Show live previews of the created image", "Live previews"),
    "show_progress_every_n_steps": OptionInfo(5, "Live preview display period (steps)", "Live previews",
                                              minimum=1, maximum=32),
    "show_progress_type": OptionInfo("Approx cheap", "Live preview method", "Live previews",
                                     choices=("Approx cheap", "Full")),
    # UI behaviour used by clients (webuiapi's tests flip this one)
    "send_seed": OptionInfo(True, "Send seed when sending prompt or image to other interface", "User interface"),
    "send_size": OptionInfo(True, "Send size when sending prompt or image to another interface", "User interface"),
})


def _coerce(key: str, info: OptionInfo, value: Any) -> Any:
    """Turn `value` into the option's type, or raise ValueError naming the option."""
    default = info.default
    if isinstance(default, (list, tuple)):  # list settings (e.g. disabled_extensions): strings, or "a, b"
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"Setting {key!r} expects a list of names, got {value!r}")
        return list(value)
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if isinstance(default, int):
            out = int(float(value)) if isinstance(value, str) else int(value)
            if isinstance(value, float) and value != int(value):
                raise ValueError
        elif isinstance(default, float):
            out = float(value)
            if out != out or out in (float("inf"), float("-inf")):
                raise ValueError
        else:
            out = str(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
        raise ValueError(f"Setting {key!r} expects a {type(default).__name__}, got {value!r}") from None
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        if (info.minimum is not None and out < info.minimum) or (info.maximum is not None and out > info.maximum):
            raise ValueError(f"Setting {key!r} must be between {info.minimum} and {info.maximum}, got {out}")
    if info.choices and out not in info.choices:
        raise ValueError(f"Setting {key!r} must be one of {', '.join(map(str, info.choices))}; got {out!r}")
    return out


@dataclass
class Options:
    """The live settings of one App. Thread-safe; persisted on every change."""

    path: Path | None = None
    extra: dict[str, OptionInfo] = field(default_factory=dict)  # options added by extensions
    _values: dict[str, Any] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self):
        if self.path is not None and Path(self.path).exists():
            try:
                stored = json.loads(Path(self.path).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ValueError(f"Settings file {self.path} is not valid JSON ({exc}); fix or delete it") from exc
            for key, value in stored.items():
                info = self.info(key)
                if info is None:
                    self._values[key] = value  # keep unknown keys (extensions not loaded yet)
                    continue
                try:
                    self._values[key] = _coerce(key, info, value)
                except ValueError:
                    pass  # an invalid stored value falls back to the default

    def info(self, key: str) -> OptionInfo | None:
        return OPTIONS.get(key) or self.extra.get(key)

    def add_option(self, key: str, info: OptionInfo) -> None:
        with self._lock:
            self.extra[key] = info

    def get(self, key: str) -> Any:
        with self._lock:
            if key in self._values:
                return self._values[key]
            info = self.info(key)
            if info is None:
                raise KeyError(f"Unknown setting {key!r}")
            return info.default

    def __getattr__(self, key: str) -> Any:  # opts.CLIP_stop_at_last_layers, as A1111 extensions write it
        if key.startswith("_") or key in ("path", "extra"):
            raise AttributeError(key)
        try:
            return self.get(key)
        except KeyError:
            raise AttributeError(key) from None

    def validate(self, updates: Mapping[str, Any], *, is_api: bool = False) -> dict[str, Any]:
        """Check a batch of changes without applying it; returns the coerced values."""
        out = {}
        for key, value in updates.items():
            info = self.info(key)
            if info is None:
                raise ValueError(f"Unknown setting {key!r}")
            if is_api and info.restrict_api:
                raise PermissionError(f"Setting {key!r} changes a path and cannot be set over the API")
            out[key] = _coerce(key, info, value)
        return out

    def set_many(self, updates: Mapping[str, Any], *, is_api: bool = False) -> None:
        values = self.validate(updates, is_api=is_api)
        with self._lock:
            self._values.update(values)
            self.save()

    def set(self, key: str, value: Any, *, is_api: bool = False) -> None:
        self.set_many({key: value}, is_api=is_api)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            keys = list(OPTIONS) + list(self.extra)
            return {key: self.get(key) for key in keys}

    def snapshot(self, overrides: Mapping[str, Any] | None = None, *, is_api: bool = False) -> Mapping[str, Any]:
        """An immutable view for one job, with per-request overrides applied (not persisted)."""
        values = self.as_dict()
        if overrides:
            values.update(self.validate(overrides, is_api=is_api))
        return MappingProxyType(values)

    def save(self) -> None:
        if self.path is None:
            return
        with self._lock:
            path = Path(self.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self._values, fh, indent=4, ensure_ascii=False)
            os.replace(tmp, path)
