"""Pieces every tab uses: who owns a job, error messages, small buttons, the shared-components record."""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any, Callable

import gradio as gr
from pydantic import ValidationError

# Symbol buttons. They are characters every desktop font (DejaVu included) has, so they never show as boxes.
RANDOM_SYMBOL = "\u2684"  # die face
REUSE_SYMBOL = "\u267b"  # recycling
PASTE_SYMBOL = "\u2199"  # south-west arrow, A1111's "read generation parameters"
CLEAR_SYMBOL = "\u2715"  # multiplication x
REFRESH_SYMBOL = "\u27f3"  # clockwise arrow
SWAP_SYMBOL = "\u21c5"  # up-down arrows

# Events the page calls but API clients should not: the A1111 API is the programmatic interface.
PRIVATE = "private"


def owner_of(request: gr.Request | None) -> str:
    """Whose job this is: the logged-in user, or this browser session."""
    if request is None:
        return "local"
    if getattr(request, "username", None):
        return f"user:{request.username}"
    return f"session:{request.session_hash}"


def validation_message(exc: ValidationError) -> str:
    """A pydantic error as one sentence per field: `steps: Input should be less than or equal to 1000`."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        name = ".".join(loc) or "request"
        parts.append(f"{name}: {err.get('msg', '')}".replace("Value error, ", ""))
    return "; ".join(parts)


def symbol_button(symbol: str, elem_id: str, **kwargs) -> gr.Button:
    """A small square tool button (A1111's ToolButton); the page script gives it a tooltip (theme.TOOLTIPS)."""
    return gr.Button(symbol, elem_id=elem_id, elem_classes=["tool"], min_width=40, scale=0, size="sm", **kwargs)


def notice_html(text: str, kind: str = "info") -> str:
    """A coloured box for messages that must stay on screen (errors, warnings)."""
    if not text:
        return ""
    return f"<div class='athanor-notice athanor-{kind}'>{html.escape(text)}</div>"


def toast(message: str) -> None:
    """A short-lived message for events with no place of their own to show it.

    Errors that have a place on the page (the progress line, the notice under the quicksettings) go there instead:
    Gradio's toasts sit in the top right corner, over the Generate button, for as long as they last.
    """
    gr.Warning(message, duration=4)


@dataclass
class TabHandle:
    """What a generation tab (txt2img, img2img, an extension's) offers the rest of the page.

    `fields` maps paste/field names (GenerationRequest field names, plus "checkpoint") to components, so infotext can
    be pasted into the tab; `image_targets` maps a send-to name ("img2img", "inpaint", ...) to the image component that
    receives a sent image, and `tab_id` says which top-level tab to select after sending.
    """

    name: str
    tab_id: str
    fields: dict[str, Any] = field(default_factory=dict)
    image_targets: dict[str, Any] = field(default_factory=dict)
    # Which sub-tab to select for each image target: (Tabs component, id) pairs; optional.
    subtab_for: dict[str, tuple[Any, str]] = field(default_factory=dict)


@dataclass
class UiShared:
    """Components and services that several tabs need. Built once per page by `build_ui`.

    - `tabs`: the top-level gr.Tabs (select a tab with `gr.Tabs(selected=tab_id)`).
    - `checkpoint`: the quicksettings checkpoint dropdown; its value goes with each request.
    - `tab_handles`: generation tabs by name, for "send to" and paste.
    - `pnginfo_image`: the PNG Info tab's image input (filled by "send to PNG Info").
    - `styles`: the styles database (modules.styles.StyleDatabase).
    - `token_counter`: callable(text, steps, styles, is_positive) -> "count/75k" text.
    - `generation_tabs`: every GenerationTab whose Generate is connected (connect_generate registers it), so
      build_ui can wire styles and send-to buttons for all of them at the end.
    """

    app: Any
    tabs: Any = None
    checkpoint: Any = None
    notice: Any = None
    tab_handles: dict[str, TabHandle] = field(default_factory=dict)
    pnginfo_image: Any = None
    styles: Any = None
    token_counter: Callable[..., str] | None = None
    generation_tabs: dict[str, Any] = field(default_factory=dict)
