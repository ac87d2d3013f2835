"""The extension loader: finds, orders, loads and reports extensions; the App owns one `ExtensionManager`.

An extension is a folder (built-ins ship in the repository's `extensions/`; users add theirs to
`<data-dir>/extensions/`):

    my-extension/
      extension.toml      optional: name, version, api_version, requires = [...], load_order
      metadata.ini        optional, A1111's: [Extension] Name=..., Requires=a, b
      scripts/*.py        loaded as modules; each may define `setup(api: ExtensionAPI)` and `Script` subclasses
      javascript/*.js     added to the page
      style.css           added to the page
      install.py          run only by `python app.py --enable-extension NAME`, never by the server

A broken extension (import error, exception in `setup`, unsupported API version, missing
requirement) is logged, listed with status "error" and its message, and the app runs without it:
everything it registered before failing is removed again.

Enable/disable is stored in the `disabled_extensions` setting of config.json, as in A1111.

This module only finds, orders and loads extensions and keeps their state and registries. What the loaded
extensions then do lives with the layer that uses it, so that the loader imports none of them:
- the page's tabs and JavaScript/CSS: modules/ui/extension_page.py
- the API's lists: modules/api/extension_providers.py
- the `app_started` hook and a job's extension session: modules/extension_runtime.py
- console commands and installing from a git URL: modules/extension_commands.py
"""
from __future__ import annotations

import configparser
import importlib.util
import logging
import re
import sys
import tomllib
import traceback
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from modules.hooks import (
    API_VERSION,
    MIN_API_VERSION,
    ExtensionError,
    ExtraNetwork,
    HookRegistry,
    UiSettingsParams,
    guarded,
)
from modules.options import OptionInfo
from modules.scripts import Script, ScriptRegistry

log = logging.getLogger("athanor.extensions")

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "extensions"
BUILTIN_EXTENSIONS = ("textual-inversion", "hypernetworks", "lora", "sd-upscale", "xyz-grid")
PACKAGE_ROOT = "athanor_extensions"  # extension modules live under this name in sys.modules
DISABLED_OPTION = "disabled_extensions"

LOADED, DISABLED, FAILED, NOT_LOADED = "loaded", "disabled", "error", "not loaded"


@dataclass
class ExtensionInfo:
    """One extension folder and what became of it."""

    name: str
    path: Path
    builtin: bool
    version: str = ""
    api_version: int = API_VERSION
    requires: tuple[str, ...] = ()
    load_order: int = 0
    description: str = ""
    enabled: bool = True
    status: str = NOT_LOADED
    error: str | None = None
    scripts: list[str] = field(default_factory=list)
    javascript: list[str] = field(default_factory=list)
    css: list[str] = field(default_factory=list)
    has_install: bool = False
    remote: str | None = None
    branch: str | None = None
    commit_hash: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["requires"] = list(self.requires)
        return out


@dataclass
class ExtensionAPI:
    """What an extension's `setup(api)` receives: registration calls bound to the extension's name.

    Paths (`api.paths.embeddings_dir`, `lora_dir`, `hypernetwork_dir`, `data_dir`, `outputs_dir`,
    `cache_dir`), the live settings (`api.opts`, read with `api.opts.get(key)`), a logger, and the
    registration methods below. Keep state on objects you create in `setup`, not in module globals:
    one process may run several Apps (tests do).
    """

    name: str
    path: Path
    hooks: HookRegistry
    scripts: ScriptRegistry
    opts: Any  # modules.options.Options
    paths: Any  # app.Paths
    hash_cache: Any = None  # modules.model_registry.HashCache, shared with the checkpoint list
    hashing: bool = True
    api_version: int = API_VERSION

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"athanor.ext.{self.name}")

    def on(self, point: str) -> Callable:
        """Decorator: `@api.on("cfg_denoiser") def hook(params): ...`."""
        return self.hooks.on(point, extension=self.name)

    def register(self, point: str, fn: Callable) -> Callable:
        return self.hooks.register(point, fn, extension=self.name)

    def register_extra_network(self, handler: ExtraNetwork) -> ExtraNetwork:
        """Handle `<handler.name:...>` prompt tags."""
        return self.hooks.register_extra_network(handler, extension=self.name)

    def register_script(self, script: Script) -> Script:
        """Add a Script instance (classes defined in scripts/*.py are found without this)."""
        return self.scripts.add(script, extension=self.name)

    def provide(self, name: str, fn: Callable) -> Callable:
        """Serve data for the API, e.g. `api.provide("loras", list_loras)`."""
        return self.hooks.register_provider(name, fn, extension=self.name)

    def add_option(self, key: str, info: OptionInfo) -> None:
        """A setting of this extension (stored in config.json, overridable per request)."""
        self.opts.add_option(key, info)

    def file_sha256(self, path: str | Path, kind: str, compute: Callable[[str], str] | None = None) -> str | None:
        """sha256 of a file (cached by path, mtime and size), or None when hashing is off (--no-hashing)."""
        if not self.hashing:
            return None
        if self.hash_cache is None:
            from modules.model_registry import calculate_sha256
            return (compute or calculate_sha256)(str(path))
        return self.hash_cache.sha256(kind, path, compute)


# -- reading an extension folder ------------------------------------------------------------------
def _read_git(folder: Path) -> tuple[str | None, str | None, str | None]:
    """(remote url, branch, commit) from a git checkout's files, without running git."""
    git = folder / ".git"
    if not git.is_dir():
        return None, None, None
    remote = branch = commit = None
    try:
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        if head.startswith("ref:"):
            ref = head[4:].strip()
            branch = ref.rsplit("/", 1)[-1]
            ref_file = git / ref
            if ref_file.is_file():
                commit = ref_file.read_text(encoding="utf-8").strip()
            elif (git / "packed-refs").is_file():
                for line in (git / "packed-refs").read_text(encoding="utf-8").splitlines():
                    if line.endswith(" " + ref):
                        commit = line.split(" ", 1)[0]
        else:
            commit = head
        config = configparser.ConfigParser()
        config.read(git / "config", encoding="utf-8")
        if config.has_section('remote "origin"'):
            remote = config.get('remote "origin"', "url", fallback=None)
    except (OSError, configparser.Error, UnicodeDecodeError):
        pass
    return remote, branch, commit


def read_extension(folder: Path, builtin: bool) -> ExtensionInfo:
    """Describe one extension folder (its metadata files, scripts and page assets)."""
    info = ExtensionInfo(name=folder.name, path=folder, builtin=builtin)
    problems = []
    ini = folder / "metadata.ini"
    if ini.is_file():
        parser = configparser.ConfigParser()
        try:
            parser.read(ini, encoding="utf-8")
            info.name = parser.get("Extension", "Name", fallback=info.name).strip() or info.name
            requires = parser.get("Extension", "Requires", fallback="")
            info.requires = tuple(r.strip() for r in requires.split(",") if r.strip())
        except (configparser.Error, UnicodeDecodeError) as exc:
            problems.append(f"metadata.ini is not valid: {exc}")
    toml_file = folder / "extension.toml"
    if toml_file.is_file():
        try:
            data = tomllib.loads(toml_file.read_text(encoding="utf-8"))
            meta = data.get("extension", data)
            info.name = str(meta.get("name", info.name)).strip() or info.name
            info.version = str(meta.get("version", info.version))
            info.description = str(meta.get("description", ""))
            info.api_version = int(meta.get("api_version", API_VERSION))
            info.load_order = int(meta.get("load_order", 0))
            requires = meta.get("requires", list(info.requires))
            info.requires = tuple([requires] if isinstance(requires, str) else [str(r) for r in requires])
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, TypeError, ValueError) as exc:
            problems.append(f"extension.toml is not valid: {exc}")
    scripts_dir = folder / "scripts"
    if scripts_dir.is_dir():
        info.scripts = sorted(p.name for p in scripts_dir.glob("*.py") if not p.name.startswith("_"))
    js_dir = folder / "javascript"
    if js_dir.is_dir():
        info.javascript = sorted(p.name for p in js_dir.glob("*.js"))
    if (folder / "style.css").is_file():
        info.css = ["style.css"]
    info.has_install = (folder / "install.py").is_file()
    info.remote, info.branch, info.commit_hash = _read_git(folder)
    if problems:
        info.status, info.error = FAILED, "; ".join(problems)
    return info


def _package_name(name: str) -> str:
    return f"{PACKAGE_ROOT}.{re.sub(r'[^0-9a-zA-Z_]', '_', name) or 'ext'}"


def _namespace(name: str, path: Path | None) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)] if path is not None else []
    module.__package__ = name
    sys.modules[name] = module
    return module


def import_extension_module(folder: Path, relative: str, *, name: str | None = None) -> types.ModuleType:
    """Import `<folder>/<relative>.py` (e.g. "scripts/lora" or "lora_model") under the extension's package.

    Modules of one extension may import each other relatively (`from .. import lora_model` in
    `scripts/x.py`), and by bare name (`import lora_model`), as A1111 allows.
    """
    package = _package_name(name or folder.name)
    if PACKAGE_ROOT not in sys.modules:
        _namespace(PACKAGE_ROOT, None)
    if sys.modules.get(package) is None or getattr(sys.modules[package], "__path__", [None])[0] != str(folder):
        _namespace(package, folder)
        _namespace(f"{package}.scripts", folder / "scripts")
    module_name = f"{package}.{relative.replace('/', '.')}"
    path = folder / f"{relative}.py"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    added = str(folder) not in sys.path
    if added:
        sys.path.insert(0, str(folder))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    finally:
        if added:
            try:
                sys.path.remove(str(folder))
            except ValueError:
                pass
    return module


def _load_order(infos: list[ExtensionInfo]) -> list[ExtensionInfo]:
    """Requirements first; otherwise by load_order, built-ins before others, then name."""
    by_name = {i.name: i for i in infos}
    ordered: list[ExtensionInfo] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(info: ExtensionInfo, chain: tuple[str, ...]) -> None:
        if state.get(info.name) == 2:
            return
        if state.get(info.name) == 1:
            info.status, info.error = FAILED, f"requirement cycle: {' -> '.join(chain + (info.name,))}"
            return
        state[info.name] = 1
        for req in info.requires:
            if req in by_name:
                visit(by_name[req], chain + (info.name,))
        state[info.name] = 2
        ordered.append(info)

    for info in sorted(infos, key=lambda i: (i.load_order, not i.builtin, i.name.lower())):
        visit(info, ())
    return ordered


# -- the manager --------------------------------------------------------------------------------
class ExtensionManager:
    """Discovers and loads extensions into the App's hook and script registries."""

    def __init__(self, *, hooks: HookRegistry, scripts: ScriptRegistry, opts: Any, paths: Any,
                 builtin_dir: Path = BUILTIN_DIR, user_dir: Path | None = None, hash_cache: Any = None,
                 hashing: bool = True, disable_all: bool = False, disable_extra: bool = False):
        self.hooks = hooks
        self.scripts = scripts
        self.opts = opts
        self.paths = paths
        self.builtin_dir = Path(builtin_dir).resolve()
        self.user_dir = Path(user_dir).resolve() if user_dir is not None else None
        self.hash_cache = hash_cache
        self.hashing = hashing
        self.disable_all = disable_all
        self.disable_extra = disable_extra
        self.infos: list[ExtensionInfo] = []
        self.modules: dict[str, list[types.ModuleType]] = {}
        self.apis: dict[str, ExtensionAPI] = {}
        if opts.info(DISABLED_OPTION) is None:
            opts.add_option(DISABLED_OPTION, OptionInfo([], "Disabled extensions", section="Extensions",
                                                         restrict_api=True))

    # -- discovery ----------------------------------------------------------------------------
    def roots(self) -> list[tuple[Path, bool]]:
        roots = [(self.builtin_dir, True)]
        if self.user_dir is not None and self.user_dir != self.builtin_dir:
            roots.append((self.user_dir, False))
        return roots

    def disabled_names(self) -> list[str]:
        value = self.opts.get(DISABLED_OPTION)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return [str(v) for v in (value or [])]

    def discover(self) -> list[ExtensionInfo]:
        """Every extension folder, with its enabled state (nothing is imported)."""
        disabled = set(self.disabled_names())
        infos: list[ExtensionInfo] = []
        seen: dict[str, ExtensionInfo] = {}
        for root, is_builtin_root in self.roots():
            if not root.is_dir():
                continue
            for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
                info = read_extension(folder, is_builtin_root and folder.name in BUILTIN_EXTENSIONS)
                info.enabled = info.name not in disabled and not self.disable_all and not (
                    self.disable_extra and not info.builtin)
                if info.name in seen:
                    info.status = FAILED
                    info.error = f"another extension named {info.name!r} is at {seen[info.name].path}"
                else:
                    seen[info.name] = info
                infos.append(info)
        return infos

    def get(self, name: str) -> ExtensionInfo | None:
        for info in self.infos:
            if info.name == name:
                return info
        return None

    # -- loading -------------------------------------------------------------------------------
    def load_all(self) -> list[ExtensionInfo]:
        """Load every enabled extension in order; returns the list with statuses."""
        self.infos = self.discover()
        status: dict[str, str] = {}
        for info in _load_order(self.infos):
            if info.status == FAILED:
                log.error("Extension %s not loaded: %s", info.name, info.error)
            elif not info.enabled:
                info.status = DISABLED
            else:
                missing = [r for r in info.requires if status.get(r) != LOADED]
                if missing:
                    info.status = FAILED
                    info.error = ("requires " + ", ".join(missing)
                                  + " (not installed, disabled or failed to load)")
                    log.error("Extension %s not loaded: %s", info.name, info.error)
                else:
                    self._load(info)
            status[info.name] = info.status
        self._run_ui_settings()
        loaded = [i.name for i in self.infos if i.status == LOADED]
        log.info("Extensions loaded: %s", ", ".join(loaded) or "none")
        return self.infos

    def _load(self, info: ExtensionInfo) -> None:
        if not MIN_API_VERSION <= info.api_version <= API_VERSION:
            info.status = FAILED
            info.error = (f"written for extension API version {info.api_version}; this Athanor supports "
                          f"versions {MIN_API_VERSION} to {API_VERSION}")
            log.error("Extension %s not loaded: %s", info.name, info.error)
            return
        api = ExtensionAPI(name=info.name, path=info.path, hooks=self.hooks, scripts=self.scripts, opts=self.opts,
                           paths=self.paths, hash_cache=self.hash_cache, hashing=self.hashing)
        modules = []
        try:
            for script_file in info.scripts:
                module = import_extension_module(info.path, f"scripts/{Path(script_file).stem}", name=info.name)
                modules.append(module)
                setup = getattr(module, "setup", None)
                if callable(setup):
                    setup(api)
                for value in list(vars(module).values()):
                    if (isinstance(value, type) and issubclass(value, Script) and value is not Script
                            and value.__module__ == module.__name__ and not getattr(value, "__abstract__", False)):
                        self.scripts.add(value(), extension=info.name)
        except Exception as exc:  # noqa: BLE001 - a broken extension is reported, the app runs without it
            self.hooks.unregister_extension(info.name)
            self.scripts.remove_extension(info.name)
            info.status = FAILED
            info.error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, ImportError) and info.has_install:
                info.error += (f" (if it needs packages, run: python app.py --enable-extension {info.name}"
                               " to run its install.py)")
            log.error("Extension %s failed to load: %s\n%s", info.name, info.error, traceback.format_exc())
            return
        self.modules[info.name] = modules
        self.apis[info.name] = api
        info.status, info.error = LOADED, None

    def mark_failed(self, extension: str, message: str) -> None:
        """Report an extension as failed (a hook of it raised after loading); the Extensions tab shows it."""
        info = self.get(extension)
        if info is not None:
            info.status, info.error = FAILED, message
        log.error("Extension %s: %s", extension, message)

    def _run_ui_settings(self) -> None:
        # Part of loading, not of the page: `ui_settings` hooks add options, which config.json, the API and
        # the settings page all read, also with --nowebui.
        for extension, fn in self.hooks.registrations("ui_settings"):
            try:
                guarded(extension, "hook 'ui_settings'", fn, UiSettingsParams(self.opts))
            except ExtensionError as exc:
                self.mark_failed(extension, str(exc))

    # -- what the loaded extensions registered -------------------------------------------------
    def provide(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Data an extension provides for the API ("embeddings", "hypernetworks", "loras", ...), or None."""
        return self.hooks.provide(name, *args, **kwargs)

    def all(self) -> list[ExtensionInfo]:
        """Every extension found, loaded or not (the Extensions tab lists these)."""
        return list(self.infos)

    # -- enabled / disabled (the page disables, the console enables and disables) ------------------
    def set_enabled(self, name: str, enabled: bool) -> ExtensionInfo:
        """Enable or disable an extension (persisted; takes effect at the next start)."""
        info = next((i for i in (self.infos or self.discover()) if i.name == name or i.path.name == name), None)
        if info is None:
            known = ", ".join(i.name for i in (self.infos or self.discover())) or "none"
            raise ValueError(f"No extension named {name!r}; installed: {known}")
        self.store_enabled(info.name, enabled)
        info.enabled = enabled
        return info

    def store_enabled(self, name: str, enabled: bool) -> None:
        """Write one extension's state to `disabled_extensions`, also for a folder not discovered yet (an install)."""
        disabled = [n for n in self.disabled_names() if n != name]
        self.opts.set(DISABLED_OPTION, disabled if enabled else disabled + [name])
