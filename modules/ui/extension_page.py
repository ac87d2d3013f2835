"""What extensions add to the page: their tabs (the `ui_tabs` hook) and their JavaScript and CSS.

Everything here reads the loader's state (modules.extensions.ExtensionManager) and never changes which
extensions are loaded; a failing `ui_tabs` hook is reported through the loader (`mark_failed`), so the
Extensions tab shows it.
"""
from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from modules.extensions import LOADED, ExtensionManager
from modules.hooks import ExtensionError, UiTab, UiTabsParams, guarded
from modules.ui.common import notice_html

log = logging.getLogger("athanor.ui")


# -- tabs ------------------------------------------------------------------------------------------------
def _as_tab(tab: Any) -> UiTab:
    if isinstance(tab, tuple):  # A1111's (gr.Blocks, title, elem_id)
        blocks, title, elem_id = (list(tab) + [""])[:3]
        return UiTab(title=title, blocks=blocks, elem_id=elem_id)
    return tab


def extension_tabs(extensions: ExtensionManager) -> list[UiTab]:
    """The tabs extensions add to the page (a failing hook is reported and adds none)."""
    tabs: list[UiTab] = []
    for extension, fn in extensions.hooks.registrations("ui_tabs"):
        params = UiTabsParams([])
        try:
            guarded(extension, "hook 'ui_tabs'", fn, params)
        except ExtensionError as exc:
            extensions.mark_failed(extension, str(exc))
            continue
        tabs += [_as_tab(tab) for tab in params.tabs]
    return tabs


def tabs_for_page(app: Any) -> list:
    """The extension tabs of this App: from its loader, or straight from its hooks when it has none."""
    manager = getattr(app, "extensions", None)
    if isinstance(manager, ExtensionManager):
        return extension_tabs(manager)  # reports a failing extension itself
    hooks = getattr(app, "hooks", None)
    if hooks is None or not hooks.has("ui_tabs"):
        return []
    try:
        return list(hooks.run("ui_tabs", UiTabsParams()).tabs)
    except Exception as exc:  # noqa: BLE001 - a broken extension must not take the page down
        log.error("An extension failed to add its tab: %s", exc)
        return []


def render_extension_tabs(tabs: list) -> None:
    """Build the extension tabs; call inside the page's top-level `gr.Tabs()` block."""
    for index, ext_tab in enumerate(tabs):
        ext_tab = _as_tab(ext_tab)
        elem_id = ext_tab.elem_id or "tab_" + (re.sub(r"[^0-9a-z]+", "_", ext_tab.title.lower()).strip("_")
                                               or str(index))
        with gr.Tab(ext_tab.title, id=elem_id, elem_id=elem_id):
            try:
                if ext_tab.build is not None:
                    ext_tab.build()
                elif ext_tab.blocks is not None:
                    ext_tab.blocks.render()
            except Exception as exc:  # noqa: BLE001 - one broken tab must not take the page down
                log.error("Extension tab %r failed to build: %s", ext_tab.title, exc)
                gr.HTML(notice_html(f"This extension's tab failed to build: {exc}", "error"))


# -- JavaScript and CSS ----------------------------------------------------------------------------------
@dataclass
class PageAssets:
    """The JavaScript and CSS extensions add to the page: (file name, text) pairs in load order."""

    javascript: list[tuple[str, str]] = field(default_factory=list)
    css: list[tuple[str, str]] = field(default_factory=list)

    def head_html(self) -> str:
        """`<script>`/`<style>` elements with the files inlined (nothing is fetched)."""
        parts = []
        for name, text in self.javascript:
            parts.append(f'<script data-extension-file="{html.escape(name)}">\n{_escape_end(text, "script")}\n'
                         "</script>")
        for name, text in self.css:
            parts.append(f'<style data-extension-file="{html.escape(name)}">\n{_escape_end(text, "style")}\n</style>')
        return "\n".join(parts)


def _escape_end(text: str, tag: str) -> str:
    # A literal "</script" would end the inline element early; "<\/script" means the same in JavaScript.
    return re.sub(rf"</({tag})", r"<\\/\1", text, flags=re.IGNORECASE)


def page_assets(extensions: ExtensionManager) -> PageAssets:
    """JavaScript and CSS of the loaded extensions, in load order."""
    assets = PageAssets()
    for info in extensions.infos:
        if info.status != LOADED:
            continue
        for name in info.javascript:
            assets.javascript.append((f"{info.name}/javascript/{name}",
                                      (info.path / "javascript" / name).read_text(encoding="utf-8")))
        for name in info.css:
            assets.css.append((f"{info.name}/{name}", (info.path / name).read_text(encoding="utf-8")))
    return assets


def ui_assets(extensions: ExtensionManager) -> tuple[str, str]:
    """(css, javascript) of the loaded extensions as text, for the page (App.ui_assets)."""
    assets = page_assets(extensions)
    css = "\n".join(f"/* {name} */\n{text}" for name, text in assets.css)
    js = "\n".join(f"// {name}\n{text}" for name, text in assets.javascript)
    return _escape_end(css, "style"), _escape_end(js, "script")


def page_head(extensions: ExtensionManager) -> str:
    """The `<script>`/`<style>` HTML to put in the page head (Gradio's `head=`)."""
    return page_assets(extensions).head_html()
