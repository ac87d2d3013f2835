"""Building blocks shared by the generation tabs (txt2img, img2img): the prompt row with its tools, the
sampler / size / batch / CFG / seed controls, and the Generate / Interrupt / Skip wiring.

Every control that maps to a GenerationRequest field is registered under that field's name in
`GenerationTab.fields`, so one function builds the request, and paste / send-to fill the same names.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any, Callable

import gradio as gr
from pydantic import ValidationError

from modules import samplers
from modules.request import GenerationRequest
from modules.ui import paste as paste_mod
from modules.ui.common import (CLEAR_SYMBOL, PASTE_SYMBOL, PRIVATE, RANDOM_SYMBOL, REUSE_SYMBOL, SWAP_SYMBOL,
                               UiShared, notice_html, owner_of, symbol_button, toast, validation_message)
from modules.ui.results import ResultsPanel, Shown, generate_stream, own_job
from modules.styles import PromptStyle, apply_styles

APPLY_STYLE_SYMBOL = "\u21b5"  # return arrow: "apply the styles into the prompt"
EDIT_STYLE_SYMBOL = "\u270e"  # pencil

REQUEST_FIELDS = frozenset(GenerationRequest.model_fields)


def field_default(name: str, fallback: Any = None) -> Any:
    info = GenerationRequest.model_fields.get(name)
    if info is None or info.default is None or info.is_required():
        return fallback
    return info.default


@dataclass
class PromptArea:
    prompt: Any
    negative: Any
    token_counter: Any
    negative_token_counter: Any
    generate: Any
    interrupt: Any
    skip: Any
    paste: Any
    clear: Any
    styles: Any
    apply_styles: Any
    edit_style: Any
    style_editor: Any
    style_name: Any
    style_prompt: Any
    style_negative: Any
    style_save: Any
    style_delete: Any
    style_close: Any
    style_note: Any


@dataclass
class SeedPanel:
    seed: Any
    random_seed: Any
    reuse_seed: Any
    extras: Any
    subseed: Any
    random_subseed: Any
    reuse_subseed: Any
    subseed_strength: Any
    resize_w: Any
    resize_h: Any


@dataclass
class GenerationTab:
    """One generation tab: its controls by request field name, the prompt row, the seed panel and results."""

    name: str
    kind: str
    area: PromptArea
    seed: SeedPanel
    panel: ResultsPanel
    fields: dict[str, Any] = field(default_factory=dict)  # GenerationRequest field -> component
    ui_fields: dict[str, Any] = field(default_factory=dict)  # other pasteable things: show_extras, styles


def build_prompt_area(tabname: str, *, paste_id: str | None = None, style_names: list[str] | None = None) -> PromptArea:
    """The prompt row: prompt and negative prompt with token counters, Generate/Interrupt/Skip, tools, styles."""
    with gr.Row(elem_id=f"{tabname}_toprow", elem_classes=["athanor-toprow"], equal_height=False):
        with gr.Column(scale=6, min_width=300, elem_id=f"{tabname}_prompt_container"):
            with gr.Group(elem_classes=["athanor-prompt-wrap"]):
                prompt = gr.Textbox(label="Prompt", show_label=False, lines=3, max_lines=20,
                                    elem_id=f"{tabname}_prompt", elem_classes=["athanor-prompt"],
                                    placeholder="Prompt (Ctrl+Enter to generate; paste an infotext and press "
                                                f"{PASTE_SYMBOL} to fill every field)")
                token_counter = gr.HTML("<span>0/75</span>", elem_id=f"{tabname}_token_counter",
                                        elem_classes=["athanor-token-counter"])
            with gr.Group(elem_classes=["athanor-prompt-wrap"]):
                negative = gr.Textbox(label="Negative prompt", show_label=False, lines=2, max_lines=20,
                                      elem_id=f"{tabname}_neg_prompt", elem_classes=["athanor-prompt"],
                                      placeholder="Negative prompt")
                negative_token_counter = gr.HTML("<span>0/75</span>", elem_id=f"{tabname}_negative_token_counter",
                                                 elem_classes=["athanor-token-counter"])
        with gr.Column(scale=1, min_width=220, elem_id=f"{tabname}_actions_column"):
            generate = gr.Button("Generate", variant="primary", elem_id=f"{tabname}_generate", size="lg")
            with gr.Row(elem_id=f"{tabname}_generate_controls", elem_classes=["athanor-compact-row"]):
                interrupt = gr.Button("Interrupt", elem_id=f"{tabname}_interrupt", size="sm", variant="stop",
                                      min_width=60)
                skip = gr.Button("Skip", elem_id=f"{tabname}_skip", size="sm", min_width=60)
            with gr.Row(elem_id=f"{tabname}_tools", elem_classes=["athanor-compact-row", "athanor-tools"]):
                paste = symbol_button(PASTE_SYMBOL, paste_id or f"{tabname}_paste")
                clear = symbol_button(CLEAR_SYMBOL, f"{tabname}_clear_prompt")
                apply_styles = symbol_button(APPLY_STYLE_SYMBOL, f"{tabname}_style_apply")
                edit_style = symbol_button(EDIT_STYLE_SYMBOL, f"{tabname}_style_create")
            styles = gr.Dropdown(style_names or [], value=[], multiselect=True, label="Styles",
                                 elem_id=f"{tabname}_styles", allow_custom_value=False)
    # The style editor opens under the prompts when the pencil is pressed (A1111 shows a dialog).
    with gr.Column(visible=False, elem_id=f"{tabname}_style_editor", elem_classes=["athanor-style-editor"]) \
            as style_editor:
        with gr.Row(equal_height=True):
            style_name = gr.Textbox(label="Style name", elem_id=f"{tabname}_edit_style_name", scale=2, min_width=160)
            style_save = gr.Button("Save style", elem_id=f"{tabname}_edit_style_save", scale=0, min_width=100,
                                   variant="primary")
            style_delete = gr.Button("Delete style", elem_id=f"{tabname}_edit_style_delete", scale=0,
                                     min_width=100, variant="stop")
            style_close = gr.Button("Close", elem_id=f"{tabname}_edit_style_close", scale=0, min_width=80)
        with gr.Row():
            style_prompt = gr.Textbox(label="Style prompt ({prompt} marks where the prompt goes)", lines=2,
                                      elem_id=f"{tabname}_edit_style_prompt")
            style_negative = gr.Textbox(label="Style negative prompt", lines=2,
                                        elem_id=f"{tabname}_edit_style_neg_prompt")
        style_note = gr.HTML("", elem_id=f"{tabname}_edit_style_note")
    return PromptArea(prompt, negative, token_counter, negative_token_counter, generate, interrupt, skip, paste, clear,
                      styles, apply_styles, edit_style, style_editor, style_name, style_prompt, style_negative,
                      style_save, style_delete, style_close, style_note)


def build_sampler_controls(tabname: str, fields: dict[str, Any]) -> None:
    """Sampling method, schedule type, steps (A1111's first group)."""
    with gr.Row(elem_id=f"{tabname}_sampler_row"):
        fields["sampler_name"] = gr.Dropdown([s.name for s in samplers.SAMPLERS],
                                             value=field_default("sampler_name", "DPM++ 2M"),
                                             label="Sampling method", elem_id=f"{tabname}_sampling", min_width=150)
        fields["scheduler"] = gr.Dropdown([s.label for s in samplers.SCHEDULE_TYPES],
                                          value=field_default("scheduler", "Automatic"), label="Schedule type",
                                          elem_id=f"{tabname}_scheduler", min_width=150)
    fields["steps"] = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id=f"{tabname}_steps")


def build_size_and_batch(tabname: str, fields: dict[str, Any]) -> Any:
    """Width / height with the swap button, batch count / size. Returns the swap button."""
    with gr.Row(elem_id=f"{tabname}_dimensions_row", equal_height=True):
        with gr.Column(scale=4, min_width=200, elem_id=f"{tabname}_column_size"):
            fields["width"] = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id=f"{tabname}_width")
            fields["height"] = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id=f"{tabname}_height")
        swap = symbol_button(SWAP_SYMBOL, f"{tabname}_res_switch_btn")
        with gr.Column(scale=3, min_width=160, elem_id=f"{tabname}_column_batch"):
            fields["n_iter"] = gr.Slider(1, 100, value=1, step=1, label="Batch count",
                                         elem_id=f"{tabname}_batch_count")
            fields["batch_size"] = gr.Slider(1, 8, value=1, step=1, label="Batch size",
                                             elem_id=f"{tabname}_batch_size")
    return swap


def build_cfg(tabname: str, fields: dict[str, Any]) -> None:
    fields["cfg_scale"] = gr.Slider(1.0, 30.0, value=7.0, step=0.5, label="CFG Scale", elem_id=f"{tabname}_cfg_scale")


def build_seed_panel(tabname: str, fields: dict[str, Any], ui_fields: dict[str, Any]) -> SeedPanel:
    """Seed with random and reuse buttons; the variation-seed extras in an "Extra" accordion."""
    with gr.Row(elem_id=f"{tabname}_seed_row", equal_height=True):
        seed = gr.Number(label="Seed", value=-1, precision=0, elem_id=f"{tabname}_seed", min_width=100, scale=4)
        random_seed = symbol_button(RANDOM_SYMBOL, f"{tabname}_random_seed")
        reuse_seed = symbol_button(REUSE_SYMBOL, f"{tabname}_reuse_seed")
    with gr.Accordion("Extra", open=False, elem_id=f"{tabname}_seed_extras") as extras:
        with gr.Row(equal_height=True, elem_id=f"{tabname}_subseed_row"):
            subseed = gr.Number(label="Variation seed", value=-1, precision=0, elem_id=f"{tabname}_subseed",
                                min_width=100, scale=4)
            random_subseed = symbol_button(RANDOM_SYMBOL, f"{tabname}_random_subseed")
            reuse_subseed = symbol_button(REUSE_SYMBOL, f"{tabname}_reuse_subseed")
            strength = gr.Slider(0, 1, value=0, step=0.01, label="Variation strength",
                                 elem_id=f"{tabname}_subseed_strength", min_width=160, scale=4)
        with gr.Row(elem_id=f"{tabname}_seed_resize_row"):
            resize_w = gr.Slider(0, 2048, value=0, step=8, label="Resize seed from width",
                                 elem_id=f"{tabname}_seed_resize_from_w")
            resize_h = gr.Slider(0, 2048, value=0, step=8, label="Resize seed from height",
                                 elem_id=f"{tabname}_seed_resize_from_h")
    fields.update(seed=seed, subseed=subseed, subseed_strength=strength, seed_resize_from_w=resize_w,
                  seed_resize_from_h=resize_h)
    ui_fields["show_extras"] = extras
    return SeedPanel(seed, random_seed, reuse_seed, extras, subseed, random_subseed, reuse_subseed, strength,
                     resize_w, resize_h)


def build_clip_skip(tabname: str, fields: dict[str, Any]) -> None:
    fields["clip_skip"] = gr.Slider(1, 12, value=1, step=1, label="Clip skip", elem_id=f"{tabname}_clip_skip")


# -- building the request -------------------------------------------------------------------------------------

_INT_FIELDS = {name for name in REQUEST_FIELDS if paste_mod.field_type(name) is int}


def request_values(names: list[str], values: list[Any]) -> dict[str, Any]:
    """Component values -> request keyword arguments (numbers from sliders arrive as floats)."""
    out = {}
    for name, value in zip(names, values):
        if name in _INT_FIELDS and isinstance(value, float) and value.is_integer():
            value = int(value)
        if value is None:
            continue  # an untouched box: the request's default applies
        if name in ("seed_resize_from_w", "seed_resize_from_h") and not value:
            value = -1  # 0 in the slider means "off", as in A1111
        out[name] = value
    return out


def build_request(kind: str, values: dict[str, Any], *, style_names: list[str], checkpoint: str | None,
                  builtin: bool) -> GenerationRequest:
    """The request for these control values, naming the chosen styles (the request gate applies them, as for
    the APIs, so the infotext shows the styled prompts). Raises ValueError or pydantic's ValidationError."""
    values = dict(values)
    values["styles"] = list(style_names or [])
    values["prompt"] = values.get("prompt") or ""
    values["negative_prompt"] = values.get("negative_prompt") or ""
    if checkpoint and not builtin:
        values["checkpoint"] = checkpoint
    values.setdefault("kind", kind)
    return GenerationRequest(**{k: v for k, v in values.items() if k in REQUEST_FIELDS})


# -- wiring ---------------------------------------------------------------------------------------------------

def connect_generate(app: Any, shared: UiShared, tab: GenerationTab,
                     extra_inputs: list[Any] | None = None,
                     adjust: Callable[[dict[str, Any], list[Any]], dict[str, Any]] | None = None) -> None:
    """Generate streams this session's job into the tab's results; Interrupt/Skip act on that job only.

    `extra_inputs` are more components whose values are handed to `adjust(values, extra_values)`, which may
    add request fields (img2img uses it for the init image and mask).
    """
    shared.generation_tabs[tab.name] = tab
    names = list(tab.fields)
    components = [tab.fields[n] for n in names]
    extra_inputs = list(extra_inputs or [])
    panel = tab.panel
    outputs = [panel.progress, panel.preview, panel.gallery, panel.info, panel.download, panel.job_id,
               panel.shown, panel.selected]

    def on_generate(request: gr.Request, *args):  # Gradio passes the request by position: it must come first
        n = len(names)
        values = request_values(names, list(args[:n]))
        style_names, checkpoint = args[n], args[n + 1]
        extra_values = list(args[n + 2:])
        try:
            if adjust is not None:
                values = adjust(values, extra_values)
            req = build_request(tab.kind, values, style_names=style_names or [],
                                checkpoint=checkpoint, builtin=app.models.is_builtin)
        except ValidationError as exc:
            message = validation_message(exc)
            yield {panel.progress: notice_html(message, "error")}
            return
        except ValueError as exc:
            yield {panel.progress: notice_html(str(exc), "error")}
            return
        yield from generate_stream(app, panel, req, owner_of(request))

    tab.area.generate.click(on_generate, inputs=components + [tab.area.styles, shared.checkpoint] + extra_inputs,
                            outputs=outputs, concurrency_limit=None, show_progress="hidden",
                            api_visibility=PRIVATE, trigger_mode="once")

    def on_interrupt(job_id, request: gr.Request):
        job = own_job(app, job_id, request)
        if job is not None:
            app.queue.cancel(job)

    def on_skip(job_id, request: gr.Request):
        job = own_job(app, job_id, request)
        if job is not None:
            job.control.skip()

    tab.area.interrupt.click(on_interrupt, inputs=[panel.job_id], outputs=[], concurrency_limit=None,
                             api_visibility=PRIVATE, show_progress="hidden")
    tab.area.skip.click(on_skip, inputs=[panel.job_id], outputs=[], concurrency_limit=None,
                        api_visibility=PRIVATE, show_progress="hidden")


def connect_seed_buttons(tab: GenerationTab) -> None:
    s, panel = tab.seed, tab.panel

    def reuse(shown: Shown, selected: int, which: str):
        i = shown.at(selected)
        values = shown.seeds if which == "seed" else shown.subseeds
        if i is None or values[i] is None:
            return gr.skip()
        return values[i]

    s.random_seed.click(lambda: -1, outputs=[s.seed], api_visibility=PRIVATE, queue=False, show_progress="hidden")
    s.random_subseed.click(lambda: -1, outputs=[s.subseed], api_visibility=PRIVATE, queue=False,
                           show_progress="hidden")
    s.reuse_seed.click(lambda sh, sel: reuse(sh, sel, "seed"), inputs=[panel.shown, panel.selected],
                       outputs=[s.seed], api_visibility=PRIVATE, queue=False, show_progress="hidden")
    s.reuse_subseed.click(lambda sh, sel: reuse(sh, sel, "subseed"), inputs=[panel.shown, panel.selected],
                          outputs=[s.subseed], api_visibility=PRIVATE, queue=False, show_progress="hidden")


def connect_swap(swap: Any, fields: dict[str, Any]) -> None:
    swap.click(lambda w, h: (h, w), inputs=[fields["width"], fields["height"]],
               outputs=[fields["width"], fields["height"]], api_visibility=PRIVATE, queue=False,
               show_progress="hidden")


def connect_token_counters(shared: UiShared, tab: GenerationTab) -> None:
    """Recount after each edit (always_last: at most one count in flight per box, the last text wins)."""
    area = tab.area
    steps = tab.fields["steps"]
    counter = shared.token_counter

    def count(text, steps_value, style_names, *, positive: bool):
        # A1111 counts the prompt with the selected styles applied (its include_styles_into_token_counters).
        if style_names:
            try:
                chosen = [shared.styles.get(n) for n in style_names]
                texts = [s.prompt if positive else s.negative_prompt for s in chosen if s is not None]
                text = apply_styles(text or "", texts)
            except ValueError:
                pass  # an unreadable styles.csv: count the prompt alone
        try:
            value = counter(text or "", int(steps_value or 20), is_positive=positive)
        except Exception as exc:  # noqa: BLE001 - the counter must never break typing
            return f"<span title='{html.escape(str(exc), quote=True)}'>?/75</span>"
        return f"<span>{value}</span>"

    for box, html_out, positive in ((area.prompt, area.token_counter, True),
                                    (area.negative, area.negative_token_counter, False)):
        fn = (lambda t, s, st, _p=positive: count(t, s, st, positive=_p))
        for trigger in (box.change, area.styles.change, steps.release):
            trigger(fn, inputs=[box, steps, area.styles], outputs=[html_out], trigger_mode="always_last",
                    show_progress="hidden", api_visibility=PRIVATE, concurrency_limit=None)


def connect_styles(shared: UiShared, tab: GenerationTab, all_dropdowns: Callable[[], list[Any]]) -> None:
    """Apply styles into the prompt boxes; create, edit and delete styles in styles.csv."""
    area = tab.area
    db = shared.styles

    def on_apply(prompt, negative, names):
        try:
            prompt, negative = db.apply(names or [], prompt or "", negative or "")
        except ValueError as exc:
            toast(str(exc))
            return gr.skip(), gr.skip(), gr.skip()
        return prompt, negative, []

    area.apply_styles.click(on_apply, inputs=[area.prompt, area.negative, area.styles],
                            outputs=[area.prompt, area.negative, area.styles], api_visibility=PRIVATE,
                            show_progress="hidden")

    def on_edit(prompt, negative, names):
        style = db.get(names[0]) if names else None
        if style is not None:
            return gr.Column(visible=True), style.name, style.prompt, style.negative_prompt, ""
        return gr.Column(visible=True), "", prompt or "", negative or "", ""

    area.edit_style.click(on_edit, inputs=[area.prompt, area.negative, area.styles],
                          outputs=[area.style_editor, area.style_name, area.style_prompt, area.style_negative,
                                   area.style_note], api_visibility=PRIVATE, show_progress="hidden")
    area.style_close.click(lambda: gr.Column(visible=False), outputs=[area.style_editor], api_visibility=PRIVATE,
                           queue=False, show_progress="hidden")

    dropdowns = all_dropdowns()

    def refreshed():
        names = db.names()
        return [gr.Dropdown(choices=names) for _ in dropdowns]

    def on_save(name, prompt, negative):
        name = (name or "").strip()
        try:
            db.save(PromptStyle(name, prompt or "", negative or ""))
        except (ValueError, OSError) as exc:
            return [notice_html(str(exc), "error")] + [gr.skip() for _ in dropdowns]
        return [notice_html(f"Saved style {name!r} to {db.path.name}", "info")] + refreshed()

    def on_delete(name):
        try:
            db.delete((name or "").strip())
        except (ValueError, OSError) as exc:
            return [notice_html(str(exc), "error")] + [gr.skip() for _ in dropdowns]
        return [notice_html(f"Deleted style {name!r}", "info")] + refreshed()

    area.style_save.click(on_save, inputs=[area.style_name, area.style_prompt, area.style_negative],
                          outputs=[area.style_note] + dropdowns, api_visibility=PRIVATE, show_progress="hidden")
    area.style_delete.click(on_delete, inputs=[area.style_name], outputs=[area.style_note] + dropdowns,
                            api_visibility=PRIVATE, show_progress="hidden")


def paste_outputs(tab: GenerationTab, shared: UiShared) -> tuple[list[str], list[Any]]:
    """(names, components) a paste into this tab can fill, in a fixed order."""
    names = list(tab.fields) + list(tab.ui_fields) + ["styles", "checkpoint"]
    components = ([tab.fields[n] for n in tab.fields] + [tab.ui_fields[n] for n in tab.ui_fields]
                  + [tab.area.styles, shared.checkpoint])
    return names, components


def paste_updates(values: dict[str, Any], names: list[str]) -> list[Any]:
    """One output per pasteable component: the pasted value, or unchanged."""
    out = []
    for name in names:
        if name not in values:
            out.append(gr.skip())
        elif name == "show_extras":
            out.append(gr.Accordion(open=bool(values[name])))
        elif name in ("seed_resize_from_w", "seed_resize_from_h"):
            out.append(max(0, values[name]))
        else:
            out.append(values[name])
    return out


def connect_paste(app: Any, shared: UiShared, tab: GenerationTab,
                  fields_table: tuple = paste_mod.TXT2IMG_FIELDS) -> None:
    """↙: fill every field from the infotext in the prompt box (or, when it is empty, this session's last image)."""
    names, components = paste_outputs(tab, shared)

    def on_paste(prompt_text, shown: Shown, selected: int):
        text = prompt_text or ""
        if not text.strip():
            i = shown.at(selected)
            if i is None:
                return [gr.skip() for _ in names] + [gr.skip()]
            text = shown.infotexts[i]
        result = paste_mod.paste_values(text, fields_table, wanted=names, registry=app.registry, styles=shared.styles)
        note = notice_html(" ".join(result.notes), "warning") if result.notes else ""
        return paste_updates(result.values, names) + [note]

    tab.area.paste.click(on_paste, inputs=[tab.area.prompt, tab.panel.shown, tab.panel.selected],
                         outputs=components + [tab.panel.progress], api_visibility=PRIVATE, show_progress="hidden")

    def on_clear():
        return "", ""

    tab.area.clear.click(on_clear, outputs=[tab.area.prompt, tab.area.negative], api_visibility=PRIVATE,
                         queue=False, show_progress="hidden")
