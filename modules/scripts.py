"""A1111's Script model: dropdown ("selectable") scripts and always-on scripts, with named arguments.

A script is a `Script` subclass found in an extension's `scripts/*.py` (or registered with
`api.register_script`). Its `ui(is_img2img)` declares its arguments as `ScriptArg` specs (label,
default, limits, choices); the web page turns them into components and the API accepts them by
name:

    {"script_name": "Prompt matrix", "script_args": {"margin": 4}}
    {"alwayson_scripts": {"My script": {"args": {"enabled": true, "strength": 0.5}}}}

A1111's positional lists (`"script_args": [true, 0.5]`) are still accepted and mapped to the names
in the order `ui()` declares them. Every method receives the job context `p` and the script's
arguments as keyword arguments: `def process(self, p, enabled=False, strength=1.0, **_)`.

Call order for one job (always-on scripts in registration order):
  setup, before_process, process            once, before the first batch
  before_process_batch(p, batch)            per batch, before extra networks are parsed
  process_batch(p, batch)                   per batch, after extra networks are active
  postprocess_image(p, pp)                  per image, before its infotext and saving
  postprocess(p, processed)                 once, after the last batch
A selectable script's `run(p, **args)` replaces the plain generation: it usually changes
`p.request` and calls `p.process_images()` (possibly several times) and returns a result.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from modules.request import RequestError

_RESERVED_ARG_NAMES = frozenset({"p", "batch", "pp", "processed", "self"})


class _AlwaysVisible:
    def __repr__(self) -> str:
        return "AlwaysVisible"


AlwaysVisible = _AlwaysVisible()
"""Return this from `Script.show()` for a script that runs on every job (A1111's `scripts.AlwaysVisible`)."""


def slug(text: str) -> str:
    """A label as an argument name: "Denoising strength" -> "denoising_strength"."""
    return re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_") or "arg"


@dataclass(frozen=True)
class ScriptArg:
    """One argument of a script: what the page shows and the API accepts.

    `kind` is one of checkbox, slider, number, textbox, dropdown, radio ("" = guessed from
    `value` and `choices`). `name` is the key in named arguments (default: the label as a slug).
    """

    label: str
    value: Any = None
    name: str = ""
    kind: str = ""
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple | None = None

    @property
    def key(self) -> str:
        return self.name or slug(self.label)

    @property
    def component(self) -> str:
        """The component kind the page should build."""
        if self.kind:
            return self.kind
        if self.choices:
            return "dropdown"
        if isinstance(self.value, bool):
            return "checkbox"
        if isinstance(self.value, (int, float)):
            return "slider" if self.minimum is not None and self.maximum is not None else "number"
        return "textbox"

    def api_info(self) -> dict[str, Any]:
        """A1111's `/script-info` argument shape."""
        return {"label": self.label, "value": self.value, "minimum": self.minimum, "maximum": self.maximum,
                "step": self.step, "choices": list(self.choices) if self.choices is not None else None}

    def coerce(self, value: Any) -> Any:
        """Bring an API value to the argument's type, or raise ValueError naming the argument."""
        kind = self.component
        try:
            if kind == "checkbox":
                if isinstance(value, str):
                    if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                        raise ValueError
                    return value.strip().lower() in ("true", "1", "yes", "on")
                return bool(value)
            if kind in ("slider", "number") and value is not None:
                number = float(value)
                if isinstance(self.value, int) and not isinstance(self.value, bool) and number == int(number):
                    return int(number)
                return number
        except (TypeError, ValueError):
            raise ValueError(f"Script argument {self.label!r} expects a {kind} value, got {value!r}") from None
        if kind in ("dropdown", "radio") and self.choices and value not in self.choices:
            raise ValueError(f"Script argument {self.label!r} must be one of {', '.join(map(str, self.choices))};"
                             f" got {value!r}")
        return value


def Checkbox(label: str, value: bool = False, *, name: str = "") -> ScriptArg:  # noqa: N802 - reads like a component
    return ScriptArg(label, bool(value), name=name, kind="checkbox")


def Slider(label: str, minimum: float, maximum: float, value: float | None = None, step: float = 1, *,  # noqa: N802
           name: str = "") -> ScriptArg:
    return ScriptArg(label, minimum if value is None else value, name=name, kind="slider", minimum=minimum,
                     maximum=maximum, step=step)


def Number(label: str, value: float = 0, *, name: str = "", minimum: float | None = None,  # noqa: N802
           maximum: float | None = None) -> ScriptArg:
    return ScriptArg(label, value, name=name, kind="number", minimum=minimum, maximum=maximum)


def Textbox(label: str, value: str = "", *, name: str = "") -> ScriptArg:  # noqa: N802
    return ScriptArg(label, value, name=name, kind="textbox")


def Dropdown(label: str, choices: Iterable[Any], value: Any = None, *, name: str = "") -> ScriptArg:  # noqa: N802
    choices = tuple(choices)
    return ScriptArg(label, choices[0] if value is None and choices else value, name=name, kind="dropdown",
                     choices=choices)


def Radio(label: str, choices: Iterable[Any], value: Any = None, *, name: str = "") -> ScriptArg:  # noqa: N802
    choices = tuple(choices)
    return ScriptArg(label, choices[0] if value is None and choices else value, name=name, kind="radio",
                     choices=choices)


@dataclass
class PostprocessImageArgs:
    """What `postprocess_image` may change: `image` (A1111's `pp.image`)."""

    image: Any
    batch_number: int
    index: int


@dataclass(frozen=True)
class PlannedRequest:
    """One generation a selectable script will run, as `Script.planned_requests` returns it.

    `where` says which one it is ("X=40, Y=1"); `sources` maps a request field to the script argument that set
    it and a phrase for the user, e.g. {"steps": ("x_values", "X axis Steps = 40")}, so that a cell over the
    server's limits is refused with a 422 naming the axis and the value."""

    request: Any  # modules.request.GenerationRequest
    where: str = ""
    sources: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    generates: bool = True  # False: a picture the script assembles (SD upscale's result): only its size is checked


class Script:
    """Base class of scripts. Override `title`, and `show`/`ui` plus the methods you need.

    A selectable script that runs generations of its own (a grid, tiles) should also define
    `planned_requests(request, **args) -> list[PlannedRequest | GenerationRequest]`: the requests its `run`
    will pass to `p.process_images()`. The request gate checks each of them, and their total number of
    images, against the server's limits before the job is queued; a ValueError it raises is the user's
    input error (422). Every request `run` actually processes is checked again when it runs.
    """

    extension: str = "core"  # set when the script is registered

    def title(self) -> str:
        raise NotImplementedError("a Script must define title()")

    def show(self, is_img2img: bool) -> Any:
        """False: hidden on this tab; True: in the script dropdown; AlwaysVisible: runs on every job."""
        return True

    def ui(self, is_img2img: bool) -> list[ScriptArg]:
        return []

    def run(self, p, **args) -> Any:
        raise NotImplementedError(f"selectable script {self.title()!r} must define run()")

    def setup(self, p, **args) -> None:
        pass

    def before_process(self, p, **args) -> None:
        pass

    def process(self, p, **args) -> None:
        pass

    def before_process_batch(self, p, batch, **args) -> None:
        pass

    def process_batch(self, p, batch, **args) -> None:
        pass

    def postprocess_image(self, p, pp: PostprocessImageArgs, **args) -> None:
        pass

    def postprocess(self, p, processed, **args) -> None:
        pass

    @property
    def name(self) -> str:
        """The lowercased title: the name `/sdapi/v1/scripts` lists."""
        return self.title().lower()


@dataclass
class ScriptRun:
    """The scripts one job runs, each with its arguments by name."""

    selectable: tuple[Script, dict[str, Any]] | None = None
    alwayson: list[tuple[Script, dict[str, Any]]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.selectable is None and not self.alwayson


def _visibility(script: Script, is_img2img: bool) -> Any:
    try:
        return script.show(is_img2img)
    except Exception:  # noqa: BLE001 - a broken show() hides the script instead of breaking every job
        return False


class ScriptRegistry:
    """The App's scripts, from every loaded extension."""

    def __init__(self) -> None:
        self._scripts: list[Script] = []
        self._lock = threading.Lock()

    def add(self, script: Script, *, extension: str = "core") -> Script:
        if not isinstance(script, Script):
            raise TypeError("register a Script instance (or subclass)")
        title = script.title()
        if not isinstance(title, str) or not title.strip():
            raise ValueError("a script's title() must be a non-empty string")
        script.extension = extension
        for is_img2img in (False, True):
            if _visibility(script, is_img2img) is not False:
                keys = [arg.key for arg in script.ui(is_img2img)]
                clash = sorted({k for k in keys if keys.count(k) > 1} | (set(keys) & _RESERVED_ARG_NAMES))
                if clash:
                    raise ValueError(f"Script {title!r} has argument names that clash: {', '.join(clash)}; "
                                     "give its ScriptArgs distinct `name`s")
        with self._lock:
            if any(s.title().lower() == title.lower() for s in self._scripts):
                raise ValueError(f"A script titled {title!r} is already registered")
            self._scripts.append(script)
        return script

    def remove_extension(self, extension: str) -> None:
        with self._lock:
            self._scripts = [s for s in self._scripts if s.extension != extension]

    @property
    def scripts(self) -> list[Script]:
        return list(self._scripts)

    def selectable(self, is_img2img: bool) -> list[Script]:
        """The dropdown scripts of a tab (A1111: `selectable_scripts`)."""
        return [s for s in self._scripts if _visibility(s, is_img2img) not in (False, None, AlwaysVisible)]

    def alwayson(self, is_img2img: bool) -> list[Script]:
        return [s for s in self._scripts if _visibility(s, is_img2img) is AlwaysVisible]

    def find(self, title: str, is_img2img: bool) -> Script | None:
        """A script shown on the tab, by title (case-insensitive)."""
        wanted = title.strip().lower()
        for script in self._scripts:
            if script.title().lower() == wanted and _visibility(script, is_img2img) not in (False, None):
                return script
        return None

    # -- arguments ----------------------------------------------------------------------------
    @staticmethod
    def arguments(script: Script, is_img2img: bool, given: Any = None) -> dict[str, Any]:
        """The script's arguments by name: defaults from `ui()`, overridden by `given`.

        `given` is a dict of names (or labels) to values, or A1111's positional list (extra items
        are ignored, as A1111 does); None keeps every default.
        """
        specs = list(script.ui(is_img2img))
        args = {spec.key: spec.value for spec in specs}
        where = "script_args" if _visibility(script, is_img2img) is not AlwaysVisible else \
            ("alwayson_scripts", script.title())
        prefix = (where,) if isinstance(where, str) else where

        def coerce(spec: ScriptArg, value: Any) -> Any:
            try:
                return spec.coerce(value)
            except RequestError:
                raise
            except (ValueError, TypeError) as exc:
                raise RequestError((*prefix, spec.key), f"{script.title()}: {spec.label}: {exc}") from None

        if given is None:
            return args
        if isinstance(given, (list, tuple)):
            for spec, value in zip(specs, given):
                args[spec.key] = coerce(spec, value)
            return args
        if isinstance(given, Mapping):
            by_label = {spec.label: spec for spec in specs}
            by_key = {spec.key: spec for spec in specs}
            for key, value in given.items():
                spec = by_key.get(key) or by_label.get(key)
                if spec is None:
                    known = ", ".join(by_key) or "none"
                    raise RequestError((*prefix, str(key)), f"Script {script.title()!r} has no argument {key!r}; "
                                                            f"its arguments: {known}")
                args[spec.key] = coerce(spec, value)
            return args
        raise RequestError(prefix, f"Arguments of script {script.title()!r} must be a list or an object, "
                                   f"got {type(given).__name__}")

    def resolve(self, request: Any) -> ScriptRun:
        """The scripts a request runs; ValueError (A1111 answers 422) for unknown or misplaced scripts.

        Reads `script_name`, `script_args` and `alwayson_scripts` from the request when it has them.
        Always-on scripts the request does not mention run with their default arguments.
        """
        is_img2img = getattr(request, "kind", "txt2img") == "img2img"
        run = ScriptRun()
        script_name = getattr(request, "script_name", None)
        if script_name:
            script = self.find(script_name, is_img2img)
            if script is None or script not in self.selectable(is_img2img):
                raise RequestError("script_name", f"Script '{script_name}' not found")
            run.selectable = (script, self.arguments(script, is_img2img, getattr(request, "script_args", None) or None))
        requested: dict[str, Any] = {}
        for title, entry in (getattr(request, "alwayson_scripts", None) or {}).items():
            script = self.find(title, is_img2img)
            if script is None:
                raise RequestError(("alwayson_scripts", title), f"always on script {title} not found")
            if _visibility(script, is_img2img) is not AlwaysVisible:
                raise RequestError(("alwayson_scripts", title),
                                   "Cannot have a selectable script in the always on scripts params")
            if isinstance(entry, Mapping):
                given = entry.get("args")
            elif isinstance(entry, (list, tuple)):
                given = entry
            else:
                raise RequestError(("alwayson_scripts", title),
                                   f"alwayson_scripts[{title!r}] must be an object like {{\"args\": ...}}")
            requested[script.title()] = given
        for script in self.alwayson(is_img2img):
            run.alwayson.append((script, self.arguments(script, is_img2img, requested.get(script.title()))))
        return run

    # -- what the API shows -------------------------------------------------------------------
    def scripts_for_api(self) -> dict[str, list[str]]:
        """`GET /sdapi/v1/scripts`: lowercased titles of the scripts on each tab (selectable and always-on)."""
        return {tab: [s.name for s in self._scripts if _visibility(s, tab == "img2img") not in (False, None)]
                for tab in ("txt2img", "img2img")}

    def script_info_for_api(self) -> list[dict[str, Any]]:
        """`GET /sdapi/v1/script-info`: one entry per script and tab, with its arguments."""
        out = []
        for is_img2img in (False, True):
            for script in self._scripts:
                visibility = _visibility(script, is_img2img)
                if visibility in (False, None):
                    continue
                out.append({"name": script.name, "is_alwayson": visibility is AlwaysVisible,
                            "is_img2img": is_img2img, "args": [a.api_info() for a in script.ui(is_img2img)]})
        return out
