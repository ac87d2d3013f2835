"""The img2img tab: sub-tabs img2img, Sketch, Inpaint (a brush mask drawn on the page) and Inpaint upload
(a separate mask image), A1111's controls for resizing, denoising and inpainting, and the same results column
txt2img has. Like every tab it only builds a GenerationRequest (kind "img2img") and submits it as a job.

`build_img2img_tab(app, shared)` is the seam `modules.ui.build_ui` calls; it wires its own events.
"""
from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image

from modules import masking
from modules.ui.common import PRIVATE, TabHandle, UiShared
from modules.ui.generation import (GenerationTab, build_cfg, build_clip_skip, build_prompt_area, build_sampler_controls,
                                   build_seed_panel, build_size_and_batch, connect_generate, connect_paste,
                                   connect_seed_buttons, connect_swap, connect_token_counters, field_default)
from modules.ui.paste import IMG2IMG_FIELDS
from modules.ui.results import build_results, wire_results

# (label, sub-tab id) in A1111's order; the ids are A1111's elem_ids
SUBTABS = (("img2img", "img2img_img2img_tab"), ("Sketch", "img2img_img2img_sketch_tab"),
           ("Inpaint", "img2img_inpaint_tab"), ("Inpaint upload", "img2img_inpaint_upload_tab"))
INPAINT_AREAS = ("Whole picture", "Only masked")
MASK_MODES = ("Inpaint masked", "Inpaint not masked")


def editor_layers_mask(value: Any) -> Image.Image | None:
    """The brush strokes of an ImageEditor value as one RGBA layer (its alpha is the mask); None if nothing
    was drawn."""
    layers = [layer for layer in (value or {}).get("layers") or [] if isinstance(layer, Image.Image)]
    if not layers:
        return None
    merged = Image.new("RGBA", layers[0].size)
    for layer in layers:
        merged.alpha_composite(layer.convert("RGBA").resize(merged.size) if layer.size != merged.size
                               else layer.convert("RGBA"))
    return merged if merged.getchannel("A").getbbox() else None


def init_and_mask(mode: str, image: Any, sketch: Any, inpaint: Any, upload_image: Any,
                  upload_mask: Any) -> tuple[Image.Image, Image.Image | None]:
    """(init image, mask) for the selected sub-tab; ValueError with a sentence when something is missing."""
    if mode == "img2img_img2img_tab":
        if image is None:
            raise ValueError("Put an image into the img2img box first.")
        return image, None
    if mode == "img2img_img2img_sketch_tab":
        drawn = (sketch or {}).get("composite") or (sketch or {}).get("background")
        if drawn is None:
            raise ValueError("Put an image into the Sketch box first.")
        return drawn, None
    if mode == "img2img_inpaint_tab":
        background = (inpaint or {}).get("background")
        if background is None:
            raise ValueError("Put an image into the Inpaint box first.")
        mask = editor_layers_mask(inpaint)
        if mask is None:
            raise ValueError("Draw a mask over the part of the image to repaint.")
        return background, mask
    if upload_image is None or upload_mask is None:
        raise ValueError("Inpaint upload needs both an image and a mask.")
    return upload_image, upload_mask


def _image_input(label: str, elem_id: str) -> gr.Image:
    return gr.Image(label=label, elem_id=elem_id, type="pil", image_mode="RGBA", format="png", height=480,
                    sources=["upload", "clipboard"])


def _editor(label: str, elem_id: str, *, inpaint: bool) -> gr.ImageEditor:
    brush = gr.Brush(colors=["#ffffff"], color_mode="fixed") if inpaint else gr.Brush()
    # PNG, not the default WEBP: unmasked pixels must reach the server exactly as uploaded
    return gr.ImageEditor(label=label, elem_id=elem_id, type="pil", image_mode="RGBA", format="png", height=480,
                          sources=["upload", "clipboard"], brush=brush, layers=False)


def build_img2img_tab(app: Any, shared: UiShared) -> TabHandle:
    """Build the img2img tab (its own gr.Tab, inside the page's top-level Tabs) and wire its events."""
    fields: dict[str, Any] = {}
    ui_fields: dict[str, Any] = {}
    with gr.Tab("img2img", id="img2img", elem_id="tab_img2img"):
        area = build_prompt_area("img2img", paste_id="img2img_paste", style_names=shared.styles.names())
        fields["prompt"], fields["negative_prompt"] = area.prompt, area.negative
        with gr.Row(elem_id="img2img_extra_tabs", equal_height=False):
            with gr.Column(scale=1, min_width=320, elem_id="img2img_settings"):
                mode = gr.State(SUBTABS[0][1])
                with gr.Tabs(elem_id="mode_img2img") as subtabs:
                    with gr.Tab(SUBTABS[0][0], id=SUBTABS[0][1], elem_id=SUBTABS[0][1]) as tab_img:
                        init_image = _image_input("Image for img2img", "img2img_image")
                    with gr.Tab(SUBTABS[1][0], id=SUBTABS[1][1], elem_id=SUBTABS[1][1]) as tab_sketch:
                        sketch = _editor("Image for img2img", "img2img_sketch", inpaint=False)
                    with gr.Tab(SUBTABS[2][0], id=SUBTABS[2][1], elem_id=SUBTABS[2][1]) as tab_inpaint:
                        inpaint = _editor("Image for inpainting with mask", "img2maskimg", inpaint=True)
                    with gr.Tab(SUBTABS[3][0], id=SUBTABS[3][1], elem_id=SUBTABS[3][1]) as tab_upload:
                        upload_image = _image_input("Image", "img_inpaint_base")
                        upload_mask = _image_input("Mask (white = repaint)", "img_inpaint_mask")
                # The mode is the sub-tab last clicked, or last given an image (a "send to" selects its sub-tab
                # from the server, which fires no select event)
                for tab, inputs, (_label, tab_id) in zip((tab_img, tab_sketch, tab_inpaint, tab_upload),
                                                         ((init_image,), (sketch,), (inpaint,),
                                                          (upload_image, upload_mask)), SUBTABS):
                    for event in (tab.select, *(component.change for component in inputs)):
                        event(lambda _id=tab_id: _id, outputs=[mode], api_visibility=PRIVATE, queue=False,
                              show_progress="hidden")

                fields["resize_mode"] = gr.Radio(
                    [(label, index) for index, label in enumerate(masking.RESIZE_MODES)],
                    value=field_default("resize_mode", 0), label="Resize mode", elem_id="resize_mode")
                with gr.Accordion("Inpainting", open=True, elem_id="img2img_inpaint_controls"):
                    fields["mask_blur"] = gr.Slider(0, 64, value=4, step=1, label="Mask blur",
                                                    elem_id="img2img_mask_blur")
                    fields["inpainting_mask_invert"] = gr.Radio(
                        [(label, index) for index, label in enumerate(MASK_MODES)],
                        value=field_default("inpainting_mask_invert", 0), label="Mask mode",
                        elem_id="img2img_mask_mode")
                    fields["inpainting_fill"] = gr.Radio(
                        [(label, index) for index, label in enumerate(masking.MASKED_CONTENT)],
                        value=field_default("inpainting_fill", 1), label="Masked content",
                        elem_id="img2img_inpainting_fill")
                    with gr.Row():
                        fields["inpaint_full_res"] = gr.Radio(
                            [(label, index == 1) for index, label in enumerate(INPAINT_AREAS)],
                            value=bool(field_default("inpaint_full_res", False)), label="Inpaint area",
                            elem_id="img2img_inpaint_full_res")
                        fields["inpaint_full_res_padding"] = gr.Slider(
                            0, 256, value=field_default("inpaint_full_res_padding", 32), step=4,
                            label="Only masked padding, pixels", elem_id="img2img_inpaint_full_res_padding")
                build_sampler_controls("img2img", fields)
                swap = build_size_and_batch("img2img", fields)
                build_cfg("img2img", fields)
                fields["denoising_strength"] = gr.Slider(0, 1, value=field_default("denoising_strength", 0.75),
                                                         step=0.01, label="Denoising strength",
                                                         elem_id="img2img_denoising_strength")
                seed = build_seed_panel("img2img", fields, ui_fields)
                build_clip_skip("img2img", fields)
            with gr.Column(scale=1, min_width=320, elem_id="img2img_results"):
                panel = build_results("img2img", ())

    tab = GenerationTab("img2img", "img2img", area, seed, panel, fields, ui_fields)

    def adjust(values: dict[str, Any], extra: list[Any]) -> dict[str, Any]:
        init, mask = init_and_mask(*extra)
        return dict(values, init_images=[init], mask=mask)

    connect_generate(app, shared, tab, extra_inputs=[mode, init_image, sketch, inpaint, upload_image, upload_mask],
                     adjust=adjust)
    connect_seed_buttons(tab)
    connect_swap(swap, fields)
    connect_token_counters(shared, tab)
    connect_paste(app, shared, tab, IMG2IMG_FIELDS)
    wire_results(app, panel, shared, outputs_subdir="img2img-images")

    handle = TabHandle("img2img", "img2img", fields={**fields, **ui_fields, "styles": area.styles,
                                                     "checkpoint": shared.checkpoint},
                       image_targets={"img2img": init_image, "inpaint": inpaint},
                       subtab_for={"img2img": (subtabs, SUBTABS[0][1]), "inpaint": (subtabs, SUBTABS[2][1])})
    return handle
