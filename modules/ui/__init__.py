"""The Gradio page. It is a client of the App's job service, never a second generation path.

`build_ui(app)` makes the Blocks; `mount_options(app)` gives what `gr.mount_gradio_app` needs besides auth
(theme, CSS, the page script, extension assets, the outputs folder the gallery serves files from).

The parts:
- `modules/ui/img2img.py`'s `build_img2img_tab(app, shared: UiShared) -> TabHandle` is called inside the top-level
  gr.Tabs and creates its own `gr.Tab("img2img", id="img2img", elem_id="tab_img2img")`; the returned TabHandle
  names its fields (for paste and "send to") and the image inputs that "Send to img2img" / "Send to inpaint"
  fill. The helpers in modules.ui.generation and modules.ui.results build the same controls and results column
  txt2img has.
- Extension tabs come from the `ui_tabs` hook (modules.hooks.UiTabsParams / UiTab), through
  modules/ui/extension_page.py.
- Extension page assets come from `app.ui_assets() -> (css_text, js_text)` when the App has it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gradio as gr

from modules.ui import paste as paste_mod
from modules.ui.common import PRIVATE, TabHandle, UiShared, owner_of, toast, validation_message
from modules.ui.img2img import build_img2img_tab
from modules.ui.extension_page import render_extension_tabs, tabs_for_page
from modules.ui.extensions_tab import build_extensions_tab, connect_extensions
from modules.ui.generation import (connect_generate, connect_paste, connect_seed_buttons, connect_styles, connect_swap,
                                   connect_token_counters)
from modules.ui.pnginfo import build_pnginfo_tab, connect_pnginfo
from modules.ui.results import Shown, wire_results
from modules.ui.settings import (build_quicksettings, build_settings_tab, builtin_notice, checkpoint_choices,
                                 connect_quicksettings, connect_settings, current_checkpoint, current_values,
                                 vae_choices)
from modules.ui.theme import CSS, page_script, ui_theme
from modules.ui.tokens import TokenCounter
from modules.ui.txt2img import build_txt2img_tab

__all__ = ["build_ui", "mount_options", "owner_of", "ui_theme", "CSS", "validation_message", "UiShared", "TabHandle"]

log = logging.getLogger("athanor.ui")

# Every infotext key the page knows how to paste (txt2img's and img2img's); a tab takes the names it has.
ALL_PASTE_FIELDS = paste_mod.TXT2IMG_FIELDS + tuple(
    item for item in paste_mod.IMG2IMG_FIELDS if item[0] not in {n for n, _ in paste_mod.TXT2IMG_FIELDS})


def _image_value(target: Any, path: str) -> Any:
    """The value that puts a saved file into an image input (the inpaint editor takes a background layer)."""
    if isinstance(target, gr.ImageEditor):
        return {"background": path, "layers": [], "composite": path}
    return path


def build_ui(app: Any) -> gr.Blocks:
    """The whole page for this App."""
    shared = UiShared(app=app, styles=app.styles,
                      token_counter=TokenCounter(app.models, app.opts))

    with gr.Blocks(title="Athanor", analytics_enabled=False) as demo:
        qs = build_quicksettings(app)
        shared.checkpoint = qs.checkpoint
        notice = gr.HTML(builtin_notice(app), elem_id="athanor_notice")
        shared.notice = notice

        with gr.Tabs(elem_id="tabs", overflow_behavior="wrap") as tabs:
            shared.tabs = tabs
            with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
                t2i, swap = build_txt2img_tab(app, shared)
            handle = build_img2img_tab(app, shared)
            shared.tab_handles.setdefault(handle.name, handle)
            with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"):
                png = build_pnginfo_tab(("txt2img", "img2img", "inpaint"))
            shared.pnginfo_image = png.image
            render_extension_tabs(tabs_for_page(app))
            with gr.Tab("Settings", id="settings", elem_id="tab_settings"):
                settings_tab = build_settings_tab(app)
            with gr.Tab("Extensions", id="extensions", elem_id="tab_extensions"):
                extensions_tab = build_extensions_tab(app)

        # -- events ------------------------------------------------------------------------------------------
        connect_quicksettings(app, qs, notice)
        connect_generate(app, shared, t2i)
        connect_seed_buttons(t2i)
        connect_swap(swap, t2i.fields)
        connect_token_counters(shared, t2i)
        connect_paste(app, shared, t2i, ALL_PASTE_FIELDS)
        wire_results(app, t2i.panel, shared, outputs_subdir="txt2img-images")
        # Styles and send-to buttons for every generation tab (img2img's too), now that all tabs exist.
        style_dropdowns = [tab.area.styles for tab in shared.generation_tabs.values()]
        for tab in shared.generation_tabs.values():
            connect_styles(shared, tab, lambda: style_dropdowns)
        connect_pnginfo(png)
        _connect_sends(app, shared, png)
        connect_settings(app, settings_tab)
        connect_extensions(app, extensions_tab)

        # Values that change while the server runs are read on each page load, in one request.
        # The tabs' Clip skip starts at the setting's value (the request's clip_skip then overrides it per job).
        clip_skips = [tab.fields["clip_skip"] for tab in shared.generation_tabs.values() if "clip_skip" in tab.fields]
        load_outputs = [qs.checkpoint, qs.vae, notice] + settings_tab.components + style_dropdowns + clip_skips

        def on_load():
            values = [gr.Dropdown(choices=checkpoint_choices(app), value=current_checkpoint(app)),
                      gr.Dropdown(choices=vae_choices(app), value=app.opts.get("sd_vae")), builtin_notice(app)]
            values += current_values(app, settings_tab.keys)
            names = shared.styles.names()
            values += [gr.Dropdown(choices=names) for _ in style_dropdowns]
            values += [app.opts.get("CLIP_stop_at_last_layers") for _ in clip_skips]
            return values

        demo.load(on_load, outputs=load_outputs, api_visibility=PRIVATE, show_progress="hidden")
    return demo


def _paste_into(app: Any, shared: UiShared, handle: TabHandle, text: str, *, from_image: bool) -> list:
    """Updates for every field of `handle` from an infotext (a sent image honours send_seed / send_size)."""
    from modules.ui.generation import paste_updates

    names = list(handle.fields)
    skip = []
    if from_image and not app.opts.get("send_seed"):
        skip += ["seed", "subseed"]
    if from_image and not app.opts.get("send_size"):
        skip += ["width", "height"]
    result = paste_mod.paste_values(text, ALL_PASTE_FIELDS, wanted=names, registry=app.registry,
                                    styles=shared.styles if "styles" in names else None, skip=skip)
    return paste_updates(result.values, names)


def _connect_sends(app: Any, shared: UiShared, png: Any) -> None:
    """"Send to" buttons: PNG Info -> a tab's fields (and image); a result image -> PNG Info, img2img, inpaint."""
    img2img = shared.tab_handles.get("img2img")

    for target, button in png.send_buttons.items():
        handle = shared.tab_handles.get("txt2img" if target == "txt2img" else "img2img")
        if handle is None:
            button.visible = False
            continue
        image_target = handle.image_targets.get(target)
        subtab = handle.subtab_for.get(target)
        outputs = list(handle.fields.values()) + [shared.tabs]
        outputs += [image_target] if image_target is not None else []
        outputs += [subtab[0]] if subtab is not None else []

        def on_send(text, path, _handle=handle, _image=image_target, _subtab=subtab):
            out = _paste_into(app, shared, _handle, text or "", from_image=False) + [gr.Tabs(selected=_handle.tab_id)]
            if _image is not None:
                out.append(_image_value(_image, path) if path else gr.skip())
            if _subtab is not None:
                out.append(gr.Tabs(selected=_subtab[1]))
            return out

        button.click(on_send, inputs=[png.parameters, png.image], outputs=outputs, api_visibility=PRIVATE,
                     show_progress="hidden")

    for tab in shared.generation_tabs.values():
        panel = tab.panel

        def send_to_pnginfo(shown: Shown, selected: int):
            path = shown.path(selected)
            if path is None:
                toast("Generate an image first (only saved images carry their parameters).")
                return gr.skip(), gr.skip()
            return path, gr.Tabs(selected="pnginfo")

        panel.send_buttons["pnginfo"].visible = True
        panel.send_buttons["pnginfo"].click(send_to_pnginfo, inputs=[panel.shown, panel.selected],
                                            outputs=[png.image, shared.tabs], api_visibility=PRIVATE,
                                            show_progress="hidden")

        for target in ("img2img", "inpaint"):
            image_target = img2img.image_targets.get(target) if img2img else None
            if image_target is None:
                continue
            subtab = img2img.subtab_for.get(target)
            outputs = list(img2img.fields.values()) + [shared.tabs, image_target] + ([subtab[0]] if subtab else [])

            def on_send_image(shown: Shown, selected: int, _image=image_target, _subtab=subtab, _n=len(outputs)):
                i = shown.at(selected)
                path = shown.path(selected)
                if i is None or path is None:
                    toast("Generate an image first.")
                    return [gr.skip()] * _n
                out = _paste_into(app, shared, img2img, shown.infotexts[i], from_image=True)
                out += [gr.Tabs(selected=img2img.tab_id), _image_value(_image, path)]
                if _subtab is not None:
                    out.append(gr.Tabs(selected=_subtab[1]))
                return out

            panel.send_buttons[target].visible = True
            panel.send_buttons[target].click(on_send_image, inputs=[panel.shown, panel.selected], outputs=outputs,
                                             api_visibility=PRIVATE, show_progress="hidden")


def extension_assets(app: Any) -> tuple[str, str]:
    """(css, javascript) the extensions add to the page."""
    provider = getattr(app, "ui_assets", None)
    if not callable(provider):
        return "", ""
    try:
        css, js = provider()
    except Exception as exc:  # noqa: BLE001
        log.error("Could not collect the extensions' page assets: %s", exc)
        return "", ""
    return css or "", js or ""


def mount_options(app: Any) -> dict[str, Any]:
    """Keyword arguments for gr.mount_gradio_app (besides blocks, path and auth)."""
    ext_css, ext_js = extension_assets(app)
    head = f"<script>{page_script()}</script>"
    if ext_js:
        # Extension scripts are inlined: no extra route, and nothing to fetch from anywhere else.
        head += f"\n<script>{ext_js}</script>"
    return dict(theme=ui_theme(), css=CSS + ("\n" + ext_css if ext_css else ""), head=head, footer_links=[],
                allowed_paths=[str(Path(app.paths.outputs_dir))])
