"""The PNG Info tab: drop an image, read its generation parameters (A1111 and NovelAI formats) and other
metadata, and send them to a generation tab."""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr
from PIL import Image, UnidentifiedImageError

from modules import infotext


def pnginfo_html(geninfo: str | None, items: dict) -> str:
    """A1111's PNG Info listing: `parameters` first, then every other metadata item."""
    rows = {"parameters": geninfo, **items} if geninfo is not None else dict(items)
    if not rows:
        return "<div class='athanor-pnginfo'><p>Nothing found in the image.</p></div>"
    parts = ["<div class='athanor-pnginfo'>"]
    for key, value in rows.items():
        text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
        parts.append(f"<div><p><b>{html.escape(str(key))}</b></p><pre>{html.escape(text)}</pre></div>")
    parts.append("</div>")
    return "".join(parts)


def read_image_file(path: str | None) -> tuple[str, str]:
    """(parameters text, HTML listing) for an image file; ("", message) when it is not a readable image."""
    if not path:
        return "", ""
    try:
        with Image.open(path) as image:
            image.load()
            geninfo, items = infotext.read_info_from_image(image)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        return "", f"<div class='athanor-notice athanor-error'>Could not read this image: {html.escape(str(exc))}</div>"
    return geninfo or "", pnginfo_html(geninfo, items)


@dataclass
class PngInfoTab:
    image: Any
    parameters: Any
    listing: Any
    send_buttons: dict[str, Any]


def build_pnginfo_tab(send_targets: tuple[str, ...]) -> PngInfoTab:
    """Lay out the tab's contents (inside its gr.Tab)."""
    with gr.Row(equal_height=False, elem_id="pnginfo_row"):
        with gr.Column(scale=1, min_width=300):
            image = gr.Image(label="Source", sources=["upload", "clipboard"], type="filepath", image_mode=None,
                             elem_id="pnginfo_image", height=480, interactive=True)
        with gr.Column(scale=1, min_width=300):
            parameters = gr.Textbox(label="Parameters", lines=6, interactive=False, elem_id="pnginfo_generation_info",
                                    buttons=["copy"])
            with gr.Row(elem_id="pnginfo_send_buttons"):
                send = {}
                for target in send_targets:
                    label = {"txt2img": "Send to txt2img", "img2img": "Send to img2img",
                             "inpaint": "Send to inpaint"}.get(target, f"Send to {target}")
                    send[target] = gr.Button(label, elem_id=f"pnginfo_send_to_{target}", min_width=80, size="sm")
            listing = gr.HTML("", elem_id="pnginfo_html")
    return PngInfoTab(image, parameters, listing, send)


def connect_pnginfo(tab: PngInfoTab) -> None:
    # `change` also fires when another tab sends an image here.
    tab.image.change(read_image_file, inputs=[tab.image], outputs=[tab.parameters, tab.listing],
                     api_visibility="private", show_progress="hidden", concurrency_limit=None)
