"""What changes the installed extensions: the console flags and installing from a git URL.

    python app.py --list-extensions | --enable-extension NAME | --disable-extension NAME

Which code runs is decided on the server's console, never by a web page: `install.py` runs only from
`--enable-extension`, and what the page's Extensions tab installs (`install_from_url`) arrives disabled.
The loader (modules.extensions) keeps the enabled state; this module only acts on it.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from modules.extensions import ExtensionInfo, ExtensionManager, read_extension
from modules.hooks import HookRegistry
from modules.scripts import ScriptRegistry

log = logging.getLogger("athanor.extensions")


def check_extension_url(url: Any) -> str:
    """The URL of an extension's git repository, if it is a plain `https://host/path` one; ValueError otherwise."""
    text = url.strip() if isinstance(url, str) else ""
    if not text:
        raise ValueError("Give the https:// URL of the extension's git repository")
    if any(c.isspace() or ord(c) < 32 or c == "\x7f" for c in text) or text.startswith("-"):
        raise ValueError("The URL contains spaces or control characters")
    parts = urlsplit(text)
    if parts.scheme.lower() != "https" or "::" in text.split("/")[0]:
        raise ValueError(f"Only https:// git URLs are installed (got {text[:80]!r}); copy other extensions into "
                         "the extensions/ folder by hand")
    try:
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        host = None
    if not host or not parts.path.strip("/"):
        raise ValueError(f"{text[:80]!r} does not name a repository (https://host/owner/name)")
    return text


def install_from_url(manager: ExtensionManager, url: str, *, listening: bool = False, timeout: float = 300) -> str:
    """`git clone` an extension from an `https://` URL into the user extensions folder; returns its folder name.

    Never while the server listens on the network. Only `https://host/path` URLs: no `file://`, `ext::`,
    `ssh`, local paths or anything git would read as an option. The new extension starts disabled and
    stays so until the user enables it from the console (`--enable-extension NAME`, which also runs its
    install.py): the page can install code but never make it run.
    """
    if listening:
        raise PermissionError("Installing extensions is disabled while the server listens on the network")
    url = check_extension_url(url)
    name = re.sub(r"\.git$", "", urlsplit(url).path.rstrip("/").split("/")[-1])
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or ""):
        raise ValueError(f"Cannot tell an extension name from {url!r}")
    root = manager.user_dir or manager.builtin_dir
    target = root / name
    if target.exists():
        raise ValueError(f"An extension folder named {name!r} already exists in {root}")
    root.mkdir(parents=True, exist_ok=True)
    _git_clone(url, target, timeout)
    info = read_extension(target, False)
    manager.store_enabled(info.name, False)
    log.info("Installed extension %s from %s (disabled until enabled from the console)", info.name, url)
    return info.name


def _git_clone(url: str, target: Path, timeout: float) -> None:
    """Clone `url` (already checked) into `target`; on failure nothing is left behind and ValueError says why."""
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    try:
        # no submodules (their URLs are not checked here), no templates with hooks, and `--` before the URL
        done = subprocess.run(["git", "-c", "protocol.ext.allow=never", "clone", "--depth", "1",
                               "--no-recurse-submodules", "--template=", "--", url, str(target)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise ValueError(f"git clone failed: {exc}") from None
    if done.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        raise ValueError(f"git clone failed: {done.stderr.strip() or done.returncode}")


def run_install(info: ExtensionInfo, timeout: float = 1800) -> int:
    """Run the extension's install.py with this Python, in its folder; returns its exit code."""
    script = info.path / "install.py"
    if not script.is_file():
        return 0
    log.info("Running %s", script)
    return subprocess.run([sys.executable, str(script)], cwd=info.path, timeout=timeout).returncode


def handle_extension_commands(args: Any, opts: Any, user_dir: Path | None) -> int | None:
    """`--list-extensions`, `--install-extension URL`, `--enable-extension NAME`, `--disable-extension NAME`: do
    it and return an exit code.

    Returns None when no such flag was given (the server then starts). install.py runs here,
    from the console, and never while the server is listening.
    """
    listing = getattr(args, "list_extensions", False)
    enable = getattr(args, "enable_extension", None)
    disable = getattr(args, "disable_extension", None)
    install = getattr(args, "install_extension", None)
    if not (listing or enable or disable or install):
        return None
    manager = ExtensionManager(hooks=HookRegistry(), scripts=ScriptRegistry(), opts=opts, paths=None,
                               user_dir=user_dir)
    manager.infos = manager.discover()
    try:
        for url in install or []:
            name = install_from_url(manager, url)
            print(f"Installed {name} (disabled): python app.py --enable-extension {name} runs its installer and "
                  "enables it")
        manager.infos = manager.discover()
        code = _switch(manager, enable or [], disable or [])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if code != 0:
        return code
    if listing:
        _print_listing(manager.infos)
    return 0


def _switch(manager: ExtensionManager, enable: list[str], disable: list[str]) -> int:
    """Disable, then enable (running each enabled one's install.py); the first failing install.py's exit code."""
    for name in disable:
        info = manager.set_enabled(name, False)
        print(f"Disabled {info.name}")
    for name in enable:
        info = manager.set_enabled(name, True)
        print(f"Enabled {info.name}")
        if info.has_install:
            code = run_install(info)
            if code != 0:
                print(f"error: {info.path / 'install.py'} exited with code {code}", file=sys.stderr)
                return code
    return 0


def _print_listing(infos: list[ExtensionInfo]) -> None:
    for info in infos:
        state = "enabled" if info.enabled else "disabled"
        kind = "built-in" if info.builtin else "user"
        print(f"{info.name:30} {state:9} {kind:8} {info.version:10} {info.path}")
