"""The txt2img tab, laid out as A1111 lays it out: prompt row on top, parameters left, results right."""
from __future__ import annotations

import typing
from typing import Any

import gradio as gr

from modules import samplers
from modules.request import GenerationRequest
from modules.ui.common import TabHandle, UiShared
from modules.ui.generation import (GenerationTab, build_cfg, build_clip_skip, build_prompt_area, build_sampler_controls,
                                   build_seed_panel, build_size_and_batch, field_default)
from modules.ui.results import build_results

# A1111's hires upscalers that need no model file; used when the request model does not list its own.
DEFAULT_HR_UPSCALERS = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                        "Latent (nearest)", "Latent (nearest-exact)", "Lanczos", "Nearest")
USE_SAME_SAMPLER, USE_SAME_SCHEDULER = "Use same sampler", "Use same scheduler"


def _literal_choices(name: str) -> tuple[str, ...] | None:
    info = GenerationRequest.model_fields.get(name)
    if info is None:
        return None
    args = [a for a in typing.get_args(info.annotation) if a is not type(None)]
    literal = [a for a in args if typing.get_origin(a) is typing.Literal]
    if typing.get_origin(info.annotation) is typing.Literal:
        return tuple(typing.get_args(info.annotation))
    if literal:
        return tuple(typing.get_args(literal[0]))
    return None


def hr_upscaler_choices(app: Any) -> list[str]:
    """Upscalers the backend offers: an App method when there is one, the request's Literal, else A1111's built-ins."""
    listing = getattr(app, "hr_upscalers", None)
    if callable(listing):
        try:
            return list(listing())
        except Exception:  # noqa: BLE001 - fall back to the built-in list
            pass
    return list(_literal_choices("hr_upscaler") or DEFAULT_HR_UPSCALERS)


def build_hires_panel(app: Any, tabname: str, fields: dict[str, Any]) -> None:
    """The Hires. fix accordion (A1111's controls and element ids)."""
    with gr.Accordion("Hires. fix", open=False, elem_id=f"{tabname}_hr"):
        fields["enable_hr"] = gr.Checkbox(False, label="Enable hires. fix", elem_id=f"{tabname}_enable_hr")
        with gr.Row(elem_id=f"{tabname}_hires_fix_row1"):
            choices = hr_upscaler_choices(app)
            fields["hr_upscaler"] = gr.Dropdown(choices, value=field_default("hr_upscaler", choices[0]),
                                                label="Upscaler", elem_id=f"{tabname}_hr_upscaler")
            fields["hr_second_pass_steps"] = gr.Slider(0, 150, value=field_default("hr_second_pass_steps", 0),
                                                       step=1, label="Hires steps", elem_id=f"{tabname}_hires_steps")
            fields["denoising_strength"] = gr.Slider(0, 1, value=field_default("denoising_strength", 0.7) or 0.7,
                                                     step=0.01, label="Denoising strength",
                                                     elem_id=f"{tabname}_denoising_strength")
        with gr.Row(elem_id=f"{tabname}_hires_fix_row2"):
            fields["hr_scale"] = gr.Slider(1, 4, value=field_default("hr_scale", 2.0), step=0.05,
                                           label="Upscale by", elem_id=f"{tabname}_hr_scale")
            fields["hr_resize_x"] = gr.Slider(0, 2048, value=field_default("hr_resize_x", 0), step=8,
                                              label="Resize width to", elem_id=f"{tabname}_hr_resize_x")
            fields["hr_resize_y"] = gr.Slider(0, 2048, value=field_default("hr_resize_y", 0), step=8,
                                              label="Resize height to", elem_id=f"{tabname}_hr_resize_y")
        with gr.Row(elem_id=f"{tabname}_hires_fix_row3"):
            fields["hr_sampler_name"] = gr.Dropdown([USE_SAME_SAMPLER] + [s.name for s in samplers.SAMPLERS],
                                                    value=USE_SAME_SAMPLER, label="Hires sampling method",
                                                    elem_id="hr_sampler")
            fields["hr_scheduler"] = gr.Dropdown([USE_SAME_SCHEDULER] + [s.label for s in samplers.SCHEDULE_TYPES],
                                                 value=USE_SAME_SCHEDULER, label="Hires schedule type",
                                                 elem_id="hr_scheduler")
        with gr.Row(elem_id=f"{tabname}_hires_fix_row4"):
            fields["hr_prompt"] = gr.Textbox(label="Hires prompt", lines=2, elem_id="hires_prompt",
                                             placeholder="Leave empty to use the same prompt as in the first pass.")
            fields["hr_negative_prompt"] = gr.Textbox(label="Hires negative prompt", lines=2,
                                                      elem_id="hires_neg_prompt",
                                                      placeholder="Leave empty to use the same negative prompt.")


def build_txt2img_tab(app: Any, shared: UiShared) -> tuple[GenerationTab, Any]:
    """Lay out the txt2img tab's contents (inside its gr.Tab). Returns the tab record and the W/H swap button."""
    fields: dict[str, Any] = {}
    ui_fields: dict[str, Any] = {}
    area = build_prompt_area("txt2img", paste_id="paste", style_names=shared.styles.names())
    fields["prompt"], fields["negative_prompt"] = area.prompt, area.negative
    with gr.Row(elem_id="txt2img_extra_tabs", equal_height=False):
        with gr.Column(scale=1, min_width=320, elem_id="txt2img_settings"):
            build_sampler_controls("txt2img", fields)
            build_hires_panel(app, "txt2img", fields)
            swap = build_size_and_batch("txt2img", fields)
            build_cfg("txt2img", fields)
            seed = build_seed_panel("txt2img", fields, ui_fields)
            build_clip_skip("txt2img", fields)
        with gr.Column(scale=1, min_width=320, elem_id="txt2img_results"):
            panel = build_results("txt2img")
    tab = GenerationTab("txt2img", "txt2img", area, seed, panel, fields, ui_fields)
    shared.tab_handles["txt2img"] = TabHandle("txt2img", "txt2img", fields={**fields, **ui_fields,
                                                                               "styles": area.styles,
                                                                               "checkpoint": shared.checkpoint})
    return tab, swap
