"""The results column of a generation tab: progress, live preview, gallery, infotext and the buttons under it.

`build_results(tabname)` lays it out; `generate_stream(...)` submits a request and streams that job into it;
`wire_results(...)` connects the buttons once every tab exists (send to img2img / inpaint / PNG Info).
"""
from __future__ import annotations

import base64
import html
import io
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from modules.ui.common import PRIVATE, UiShared, notice_html, owner_of
from modules.ui.progress import follow_job

log = logging.getLogger("athanor.ui")


@dataclass
class Shown:
    """What the gallery shows, index by index (a grid first when there is one)."""

    items: list[str | Any] = field(default_factory=list)  # file paths, or PIL images that were not saved
    infotexts: list[str] = field(default_factory=list)
    seeds: list[int | None] = field(default_factory=list)
    subseeds: list[int | None] = field(default_factory=list)

    def at(self, index: int | None) -> int | None:
        if not self.items:
            return None
        if index is None or not 0 <= index < len(self.items):
            return 0
        return index

    def path(self, index: int | None) -> str | None:
        i = self.at(index)
        if i is None:
            return None
        item = self.items[i]
        return item if isinstance(item, str) else None


def shown_from_result(result: Any) -> Shown:
    """A GenerationResult as gallery items: a grid first (with the first image's infotext and seed), then the images."""
    shown = Shown()
    if result is None:
        return shown
    if result.grid is not None:
        shown.items.append(result.grid_path or result.grid)
        shown.infotexts.append(result.infotexts[0] if result.infotexts else "")
        shown.seeds.append(result.seeds[0] if result.seeds else None)
        shown.subseeds.append(result.subseeds[0] if result.subseeds else None)
    for i, image in enumerate(result.images):
        path = result.paths[i] if i < len(result.paths) else None
        shown.items.append(path or image)
        shown.infotexts.append(result.infotexts[i] if i < len(result.infotexts) else "")
        shown.seeds.append(result.seeds[i] if i < len(result.seeds) else None)
        shown.subseeds.append(result.subseeds[i] if i < len(result.subseeds) else None)
    return shown


def info_html(shown: Shown, index: int | None) -> str:
    """The selected image's infotext, seed and file, as A1111's generation info box shows them."""
    i = shown.at(index)
    if i is None:
        return ""
    seed = shown.seeds[i]
    path = shown.path(i)
    parts = ["<div class='athanor-info'>"]
    if seed is not None:
        parts.append(f"<div class='athanor-seed'>Seed: <b>{seed}</b></div>")
    parts.append(f"<pre class='athanor-infotext'>{html.escape(shown.infotexts[i])}</pre>")
    if path:
        parts.append(f"<div class='athanor-path'>{html.escape(path)}</div>")
    parts.append("</div>")
    return "".join(parts)


def preview_html(image: Any) -> str:
    """The live preview frame: the image inline as a JPEG data URI (small and quick to encode), or empty."""
    if image is None:
        return "<div class='athanor-preview-frame'></div>"
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=85)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f"<div class='athanor-preview-frame'><img alt='Live preview' src='data:image/jpeg;base64,{data}'>"
            "</div>")


@dataclass
class ResultsPanel:
    tabname: str
    progress: Any
    preview: Any
    gallery: Any
    info: Any
    download: Any
    open_folder: Any
    folder_note: Any
    send_buttons: dict[str, Any]
    job_id: Any  # gr.State: the running job's id
    shown: Any  # gr.State: Shown
    selected: Any  # gr.State: gallery index


SEND_TARGETS = (("img2img", "Send to img2img"), ("inpaint", "Send to inpaint"), ("pnginfo", "Send to PNG Info"))


def build_results(tabname: str, send_targets: tuple[str, ...] = ()) -> ResultsPanel:
    """Lay out the results column (call inside a gr.Column). The send-to buttons start hidden; build_ui shows and
    wires those whose target exists (`send_targets` shows some from the start)."""
    progress = gr.HTML("", elem_id=f"{tabname}_progress", elem_classes=["athanor-progress-box"])
    # The live preview is an inline data: image in HTML: no file in Gradio's cache, no second request per frame.
    preview = gr.HTML("", elem_id=f"{tabname}_preview", visible=False, elem_classes=["athanor-preview"])
    gallery = gr.Gallery(label="Output", show_label=False, elem_id=f"{tabname}_gallery", columns=4,
                         height=420, format="png", interactive=False, preview=False, object_fit="contain",
                         buttons=["download", "fullscreen"])
    with gr.Row(elem_id=f"image_buttons_{tabname}", elem_classes=["athanor-image-buttons"]):
        open_folder = gr.Button("Open folder", elem_id=f"{tabname}_open_folder", size="sm", min_width=60)
        download = gr.DownloadButton("Download", value=None, elem_id=f"{tabname}_download", size="sm",
                                     min_width=60, interactive=False)
        send_buttons = {}
        for target, label in SEND_TARGETS:
            send_buttons[target] = gr.Button(label, elem_id=f"{tabname}_send_to_{target}", size="sm", min_width=60,
                                             visible=target in send_targets)
    folder_note = gr.HTML("", elem_id=f"{tabname}_folder_note")
    info = gr.HTML("", elem_id=f"html_info_{tabname}", elem_classes=["athanor-info-box"])
    return ResultsPanel(tabname, progress, preview, gallery, info, download, open_folder, folder_note, send_buttons,
                        gr.State(None), gr.State(Shown()), gr.State(0))


def _gallery_value(shown: Shown) -> list:
    return list(shown.items)


def generate_stream(app: Any, panel: ResultsPanel, request: Any, owner: str) -> Iterator[dict]:
    """Submit `request` for `owner` and stream its progress and results into `panel`."""
    try:
        job = app.submit(request, owner)
    except Exception as exc:  # noqa: BLE001 - queue full, server shutting down: tell the user
        yield {panel.progress: notice_html(str(exc), "error")}
        return
    previews = bool(app.opts.get("live_previews_enable"))
    first = True
    for update in follow_job(app.queue, job, previews=previews):
        if not update.done:
            out = {panel.progress: update.html, panel.job_id: job.id}
            if first and previews:
                # The live preview takes the gallery's place while the job runs, as in A1111.
                out[panel.gallery] = gr.Gallery(visible=False)
                out[panel.preview] = gr.HTML(preview_html(None), visible=True)
                first = False
            if update.preview is not None:
                out[panel.preview] = gr.HTML(preview_html(update.preview), visible=True)
            yield out
            continue
        shown = shown_from_result(job.result)
        out = {panel.progress: update.html, panel.job_id: None, panel.preview: gr.HTML("", visible=False),
               panel.gallery: gr.Gallery(visible=True)}
        if shown.items:
            out.update({panel.gallery: gr.Gallery(value=_gallery_value(shown), visible=True), panel.shown: shown,
                        panel.selected: 0,
                        panel.info: info_html(shown, 0),
                        panel.download: gr.update(value=shown.path(0), interactive=shown.path(0) is not None)})
        yield out  # a failure's message is in the progress line
        return


def own_job(app: Any, job_id: str | None, request: gr.Request | None):
    """The job with this id if it belongs to the caller; None otherwise."""
    if not job_id:
        return None
    try:
        job = app.queue.get(job_id)
    except KeyError:
        return None
    return job if job.owner == owner_of(request) else None


def open_folder(path: str) -> None:
    """Open a folder in the desktop's file manager (only ever called when the server is not listening)."""
    if sys.platform == "win32":
        os.startfile(path)  # noqa: S606 - a folder we wrote, on the user's own machine
    elif sys.platform == "darwin":
        subprocess.Popen(["open", path])  # noqa: S603,S607
    else:
        subprocess.Popen(["xdg-open", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603,S607


def wire_results(app: Any, panel: ResultsPanel, shared: UiShared, *, outputs_subdir: str) -> None:
    """Connect the panel's own events: selection (infotext, download), open folder.

    Interrupt and Skip are wired with Generate (generation.connect_generate); the send-to buttons by build_ui once
    every tab exists."""

    def on_select(shown: Shown, evt: gr.SelectData):
        index = evt.index if isinstance(evt.index, int) else 0
        path = shown.path(index)
        return index, info_html(shown, index), gr.update(value=path, interactive=path is not None)

    panel.gallery.select(on_select, inputs=[panel.shown], outputs=[panel.selected, panel.info, panel.download],
                         api_visibility=PRIVATE, show_progress="hidden", queue=False)

    listening = bool(getattr(app.args, "listen", False))

    def on_open_folder(shown: Shown, selected: int):
        path = shown.path(selected)
        folder = Path(path).parent if path else Path(app.paths.outputs_dir) / outputs_subdir
        if listening:
            # The browser may be on another machine: opening a window on the server would help no one.
            return f"<div class='athanor-path'>Images are saved on the server in {html.escape(str(folder))}</div>"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            open_folder(str(folder))
        except OSError as exc:
            return notice_html(f"Could not open {folder}: {exc}", "error")
        return f"<div class='athanor-path'>{html.escape(str(folder))}</div>"

    panel.open_folder.click(on_open_folder, inputs=[panel.shown, panel.selected], outputs=[panel.folder_note],
                            api_visibility=PRIVATE, show_progress="hidden")
