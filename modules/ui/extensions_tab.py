"""The Extensions tab: installed extensions with their enabled state, version and load errors.

It reads whatever the extension loader puts on the App (`app.extensions`: a list or dict of records with
name / enabled / version / path / error attributes, or an object with `.all()`); when there is none, it lists
the folders under the built-in and the data dir's `extensions/`. The page can only *disable* extensions
(through the loader's `set_enabled(name, False)`, after a restart): enabling one decides which code runs,
so it is a console step (`python app.py --enable-extension NAME`, which also runs its install.py).
Installing from an https:// git URL is offered only when the server does not listen on the network and
the App has the loader (`modules.extension_commands.install_from_url`); what it installs arrives disabled.
"""
from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import gradio as gr

from modules.extension_commands import install_from_url
from modules.extensions import ExtensionManager
from modules.ui.common import PRIVATE, notice_html

log = logging.getLogger("athanor.ui")


@dataclass(frozen=True)
class ExtensionRow:
    name: str
    enabled: bool
    version: str
    path: str
    error: str = ""
    builtin: bool = False
    status: str = ""


def _records(source: Any) -> Iterable[Any]:
    if source is None:
        return []
    for method in ("all", "list", "installed"):
        fn = getattr(source, method, None)
        if callable(fn):
            return list(fn())
    if isinstance(source, dict):
        return list(source.values())
    try:
        return list(source)
    except TypeError:
        return []


def _row(record: Any) -> ExtensionRow:
    get = (lambda key, default=None: record.get(key, default)) if isinstance(record, dict) else \
        (lambda key, default=None: getattr(record, key, default))
    version = get("version") or ""
    return ExtensionRow(name=str(get("name", "?")), enabled=bool(get("enabled", True)), version=str(version),
                        path=str(get("path", "") or ""), error=str(get("error", "") or ""),
                        builtin=bool(get("builtin", get("is_builtin", False))), status=str(get("status", "") or ""))


def folder_rows(folders: Iterable[Path]) -> list[ExtensionRow]:
    """One row per extension folder (used when no loader is present)."""
    rows: dict[str, ExtensionRow] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for child in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
            if child.is_dir() and not child.name.startswith((".", "_")) and child.name not in rows:
                rows[child.name] = ExtensionRow(child.name, True, "", str(child))
    return list(rows.values())


def installed_extensions(app: Any) -> tuple[list[ExtensionRow], bool]:
    """(rows, from the loader?)."""
    source = getattr(app, "extensions", None)
    if source is not None:
        return [_row(r) for r in _records(source)], True
    repo_root = Path(__file__).resolve().parents[2]
    folders = [repo_root / "extensions", Path(app.paths.data_dir) / "extensions"]
    return folder_rows(folders), False


def extensions_table(rows: list[ExtensionRow], from_loader: bool) -> str:
    if not rows:
        return "<p>No extensions installed. Put one in the <code>extensions/</code> folder.</p>"
    head = "<tr><th>Extension</th><th>Enabled</th><th>Version</th><th>Folder</th><th>Status</th></tr>"
    body = []
    for row in rows:
        if row.error:
            status = f"<span class='athanor-error-text'>{html.escape(row.error)}</span>"
        elif row.status:
            status = html.escape(row.status)
        else:
            status = "" if from_loader else "not loaded yet"
        body.append(f"<tr data-extension='{html.escape(row.name)}'><td>{html.escape(row.name)}"
                    f"{' <small>(built-in)</small>' if row.builtin else ''}</td>"
                    f"<td>{'yes' if row.enabled else 'no'}</td><td>{html.escape(row.version or '-')}</td>"
                    f"<td><code>{html.escape(row.path)}</code></td><td>{status}</td></tr>")
    note = "" if from_loader else ("<p class='athanor-muted'>Listed from the extensions folders; the extension "
                                   "loader is not available in this build.</p>")
    return f"{note}<table class='athanor-table' id='extensions_table'>{head}{''.join(body)}</table>"


@dataclass
class ExtensionsTab:
    table: Any
    enabled: Any
    apply: Any
    result: Any
    install_url: Any
    install: Any


def build_extensions_tab(app: Any) -> ExtensionsTab:
    listening = bool(getattr(app.args, "listen", False))
    rows, from_loader = installed_extensions(app)
    loader = getattr(app, "extensions", None)
    # Which code runs at the next start is not for anyone on the network to decide.
    can_toggle = callable(getattr(loader, "set_enabled", None)) and not listening
    with gr.Tabs(elem_id="tabs_extensions"):
        with gr.Tab("Installed", id="extensions_installed", elem_id="extensions_installed_top"):
            table = gr.HTML(extensions_table(rows, from_loader), elem_id="extensions_installed_html")
            enabled = gr.CheckboxGroup([r.name for r in rows], value=[r.name for r in rows if r.enabled],
                                       label="Enabled extensions (untick to disable at the next start; enable "
                                             "from the console: python app.py --enable-extension NAME)",
                                       elem_id="extensions_enabled", interactive=can_toggle, visible=bool(rows))
            with gr.Row():
                apply = gr.Button("Apply", elem_id="extensions_apply", variant="primary", scale=0, min_width=120,
                                  interactive=can_toggle, visible=bool(rows))
                result = gr.HTML("", elem_id="extensions_result")
        with gr.Tab("Install from URL", id="extensions_install", elem_id="extensions_install_top"):
            admins_only = page_install_needs_admin(app)
            can_install = not listening and isinstance(loader, ExtensionManager) and not admins_only
            if admins_only and not listening:
                # without logins the page cannot tell its user from a page on another site driving the browser
                gr.HTML(notice_html("Installing from the page needs an admin login (--auth with --admin-users). "
                                    "Install on the server's console instead: "
                                    "python app.py --install-extension https://...", "info"),
                        elem_id="extensions_install_console")
                can_install = False
            if listening:
                gr.HTML(notice_html("Installing extensions is disabled while the server listens on the network: "
                                    "an extension is code that runs on this machine. Install it on the server's "
                                    "console instead.", "warning"), elem_id="extensions_install_disabled")
            elif not can_install:
                gr.HTML(notice_html("Installing from a URL is not available in this build: copy the extension's "
                                    "folder into extensions/ and restart.", "info"))
            install_url = gr.Textbox(label="https:// URL of the extension's git repository", elem_id="install_url",
                                     interactive=can_install, visible=not listening)
            install = gr.Button("Install", elem_id="install_button", interactive=can_install, visible=not listening)
    return ExtensionsTab(table, enabled, apply, result, install_url, install)


def page_install_needs_admin(app: Any) -> bool:
    """True unless the page has admin logins: installing is for an authenticated admin, or the console."""
    from modules.auth import auth_config_from_args

    auth = auth_config_from_args(app.args, getattr(app, "logins", {}) or {})
    return not (auth.enabled and auth.admins)


def page_may_install(app: Any, username: str | None) -> bool:
    from modules.auth import auth_config_from_args

    auth = auth_config_from_args(app.args, getattr(app, "logins", {}) or {})
    return auth.enabled and bool(auth.admins) and auth.is_admin(username)


def apply_enabled(app: Any, names: Iterable[str] | None, *, listening: bool) -> tuple[str, Any]:
    """The Extensions tab's Apply: (notice html, new table html or gr.skip()). Unticked extensions are disabled
    at the next start; ticking a disabled one is refused, since enabling code is a console step."""
    if listening:
        return notice_html("Extensions cannot be switched on or off while the server listens on the network.",
                           "error"), gr.skip()
    loader = getattr(app, "extensions", None)
    rows, from_loader = installed_extensions(app)
    wanted = set(names or [])
    newly_enabled = [row.name for row in rows if row.name in wanted and not row.enabled]
    if newly_enabled:
        # an extension is code: which code runs is decided on the server's console, never by a web page
        commands = " ".join(f"--enable-extension {n}" for n in newly_enabled)
        return notice_html(f"Extensions are enabled from the console, not the page: stop Athanor and run "
                           f"python app.py {commands}. Nothing was changed.", "error"), gr.skip()
    try:
        for row in rows:
            if row.enabled and row.name not in wanted:
                loader.set_enabled(row.name, False)
    except Exception as exc:  # noqa: BLE001 - the loader's own message is the useful one
        return notice_html(f"Could not change the extensions: {exc}", "error"), gr.skip()
    rows, from_loader = installed_extensions(app)
    return (notice_html("Saved. Restart Athanor to unload the extensions you disabled.", "info"),
            extensions_table(rows, from_loader))


def connect_extensions(app: Any, tab: ExtensionsTab) -> None:
    listening = bool(getattr(app.args, "listen", False))

    def on_apply(names):
        return apply_enabled(app, names, listening=listening)

    tab.apply.click(on_apply, inputs=[tab.enabled], outputs=[tab.result, tab.table], api_visibility=PRIVATE)

    def on_install(request: gr.Request, url):  # Gradio passes the request by position: it must come first
        if listening:  # checked again here: the button is hidden, but a crafted request could still arrive
            return notice_html("Installing extensions is disabled while the server listens on the network.",
                               "error"), gr.skip()
        if not page_may_install(app, getattr(request, "username", None)):
            return notice_html("Installing from the page needs an admin login; on the server's console run "
                               "python app.py --install-extension URL.", "error"), gr.skip()
        loader = getattr(app, "extensions", None)
        if not isinstance(loader, ExtensionManager):
            return notice_html("Installing from a URL is not available in this build.", "error"), gr.skip()
        try:
            name = install_from_url(loader, (url or "").strip(), listening=listening)
        except Exception as exc:  # noqa: BLE001
            return notice_html(f"Could not install: {exc}", "error"), gr.skip()
        rows, from_loader = installed_extensions(app)
        return (notice_html(f"Installed {name} (disabled). To run its installer and enable it, stop Athanor and run "
                            f"python app.py --enable-extension {name}, then start it again.", "info"),
                extensions_table(rows, from_loader))

    tab.install.click(on_install, inputs=[tab.install_url], outputs=[tab.result, tab.table], api_visibility=PRIVATE)
