"""Typed hook points: the only way extensions (and built-in features) reach into a generation.

Each hook point has a dataclass parameter; a hook receives it and may change the fields the
point documents as mutable. The registry belongs to the App (no global state); each extension
registers through the `HookRegistry` it is handed, under its own name, so an exception inside a
hook fails that one job with a message naming the extension.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

API_VERSION = 1


class ExtensionError(RuntimeError):
    """A hook raised: the job fails alone and the message names the extension."""

    def __init__(self, extension: str, point: str, exc: BaseException):
        super().__init__(f"Extension {extension!r} failed in hook {point!r}: {type(exc).__name__}: {exc}")
        self.extension = extension
        self.point = point
        self.original = exc


@dataclass
class BeforePromptParseParams:
    """May rewrite `prompts` / `negative_prompts` (one per image) before they are parsed."""

    prompts: list[str]
    negative_prompts: list[str]
    request: Any


@dataclass
class CFGDenoiserParams:
    """Before the UNet call of one step. `x` and `image_cond` may be replaced."""

    x: Any
    image_cond: Any
    timestep: Any
    sampling_step: int
    total_sampling_steps: int
    text_cond: list  # per image: list of (context tensor, weight)
    text_uncond: list  # per image: context tensor


@dataclass
class AfterCFGParams:
    """After classifier-free guidance of one step. `x` (the guided model output) may be replaced."""

    x: Any
    sampling_step: int
    total_sampling_steps: int


@dataclass
class BeforeImageSavedParams:
    """May replace `image` or edit `infotext` before the file is written."""

    image: Any
    infotext: str
    seed: int
    kind: str  # "txt2img" | "img2img"


@dataclass
class ImageSavedParams:
    image: Any
    filename: str
    infotext: str


@dataclass
class ModelLoadedParams:
    model: Any
    title: str


HOOK_POINTS: dict[str, type] = {
    "before_prompt_parse": BeforePromptParseParams,
    "cfg_denoiser": CFGDenoiserParams,
    "cfg_after_cfg": AfterCFGParams,
    "before_image_saved": BeforeImageSavedParams,
    "image_saved": ImageSavedParams,
    "model_loaded": ModelLoadedParams,
    "model_unloaded": ModelLoadedParams,
}


@dataclass
class _Registration:
    extension: str
    fn: Callable[[Any], Any]


@dataclass
class HookRegistry:
    _hooks: dict[str, list[_Registration]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, point: str, fn: Callable[[Any], Any], *, extension: str = "core") -> Callable:
        if point not in HOOK_POINTS:
            raise ValueError(f"Unknown hook point {point!r}; known points: {', '.join(sorted(HOOK_POINTS))}")
        with self._lock:
            self._hooks.setdefault(point, []).append(_Registration(extension, fn))
        return fn

    def on(self, point: str, *, extension: str = "core") -> Callable:
        """Decorator form: `@registry.on("cfg_denoiser", extension="mine")`."""
        def wrap(fn):
            return self.register(point, fn, extension=extension)
        return wrap

    def unregister_extension(self, extension: str) -> None:
        with self._lock:
            for point, regs in self._hooks.items():
                self._hooks[point] = [r for r in regs if r.extension != extension]

    def has(self, point: str) -> bool:
        return bool(self._hooks.get(point))

    def run(self, point: str, params: Any) -> Any:
        expected = HOOK_POINTS[point]
        if not isinstance(params, expected):
            raise TypeError(f"hook {point!r} takes {expected.__name__}, got {type(params).__name__}")
        for reg in list(self._hooks.get(point, ())):
            try:
                reg.fn(params)
            except Exception as exc:  # noqa: BLE001 - any extension failure fails this job only
                raise ExtensionError(reg.extension, point, exc) from exc
        return params
