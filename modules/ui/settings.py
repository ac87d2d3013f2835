"""Settings: the quicksettings row (checkpoint, VAE) and the Settings tab over `app.opts` (config.json).

Every option in modules.options (and those extensions add) gets a control named `setting_<key>`, grouped by
section. Apply validates all changes first and applies none when one is wrong, naming it. Output paths (and
other settings that change paths or code) are locked in the page: they are set in config.json on the server.
"""
from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from modules.options import OPTIONS, OptionInfo
from modules.ui.common import PRIVATE, REFRESH_SYMBOL, notice_html, symbol_button

log = logging.getLogger("athanor.ui")

QUICKSETTINGS = ("sd_model_checkpoint", "sd_vae")
READ_ONLY = frozenset({"sd_checkpoint_hash"})
VAE_FIXED_CHOICES = ("Automatic", "None")
LOCKED_NOTE = "Locked in the page: edit config.json on the server while Athanor is stopped"


def all_options(opts: Any) -> dict[str, OptionInfo]:
    """Core options then extension options, in declaration order."""
    return {**OPTIONS, **getattr(opts, "extra", {})}


def sections(options: dict[str, OptionInfo]) -> list[str]:
    seen: list[str] = []
    for info in options.values():
        if info.section not in seen:
            seen.append(info.section)
    return seen


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def is_locked(info: OptionInfo) -> bool:
    """Settings that change paths or which code runs are never changed from the page, listening or not: a web
    page that reaches the server (DNS rebinding, a shared browser) must not be able to point outputs anywhere."""
    return info.restrict_api


def option_component(key: str, info: OptionInfo, value: Any, *, locked: bool) -> Any:
    """The control for one option: checkbox, dropdown/radio, slider, number or textbox."""
    common = dict(label=info.label, elem_id=f"setting_{key}", interactive=not locked and key not in READ_ONLY,
                  info=(LOCKED_NOTE if locked else (info.comment or None)))
    default = info.default
    if isinstance(default, bool):
        return gr.Checkbox(value=bool(value), **common)
    if isinstance(default, (list, tuple)):
        return gr.Textbox(value=display_value(info, value), **common)
    if info.choices:
        choices = [str(c) for c in info.choices]
        if len(choices) <= 4:
            return gr.Radio(choices, value=str(value), **common)
        return gr.Dropdown(choices, value=str(value), **common)
    if isinstance(default, (int, float)):
        if info.minimum is not None and info.maximum is not None:  # a bounded number: a slider
            is_int = isinstance(default, int)
            span = info.maximum - info.minimum
            step = 1 if is_int else (0.01 if span <= 2 else 0.05)
            return gr.Slider(info.minimum, info.maximum, value=value, step=step, **common)
        # No minimum/maximum here: Gradio would reject the whole form with its own message; Apply names the option.
        return gr.Number(value=value, precision=0 if isinstance(default, int) else None, **common)
    return gr.Textbox(value=str(value), **common)


def display_value(info: OptionInfo, value: Any) -> Any:
    """An option's value as its control shows it (lists as "a, b")."""
    if isinstance(info.default, (list, tuple)):
        return ", ".join(str(v) for v in (value or []))
    if info.choices:
        return str(value)
    return value


def coerce_ui_value(info: OptionInfo, value: Any) -> Any:
    """Sliders and numbers arrive as floats: give int options ints back when they are whole."""
    if isinstance(info.default, int) and not isinstance(info.default, bool) and isinstance(value, float):
        return int(value) if value.is_integer() else value
    return value


def bounds_error(info: OptionInfo, value: Any) -> str:
    """"must be at least 0" / "must be between 1 and 12" for a number out of the option's range, else ""."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    low, high = info.minimum, info.maximum
    if (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            return f"must be between {low:g} and {high:g} (got {value:g})"
        if low is not None:
            return f"must be at least {low:g} (got {value:g})"
        return f"must be at most {high:g} (got {value:g})"
    return ""


def compute_changes(opts: Any, keys: list[str], values: list[Any]) -> tuple[dict, list[str]]:
    """(changes to apply, error sentences) for the values the Settings page holds."""
    options = all_options(opts)
    changes: dict[str, Any] = {}
    errors: list[str] = []
    for key, value in zip(keys, values):
        info = options[key]
        if key in READ_ONLY:
            continue
        value = coerce_ui_value(info, value)
        bound = bounds_error(info, value)
        if bound:
            errors.append(f"{info.label}: {bound}.")
            continue
        try:
            coerced = opts.validate({key: value})[key]
        except ValueError as exc:
            errors.append(f"{info.label}: {exc}")
            continue
        if coerced == opts.get(key):
            continue
        if is_locked(info):
            errors.append(f"{info.label}: {LOCKED_NOTE.lower()}")
            continue
        changes[key] = coerced
    return changes, errors


@dataclass
class SettingsTab:
    keys: list[str]
    components: list[Any]
    apply: Any
    result: Any


@dataclass
class Quicksettings:
    checkpoint: Any
    refresh_checkpoint: Any
    vae: Any
    refresh_vae: Any
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_choices(app: Any) -> list[str]:
    titles = [c.title for c in app.registry.checkpoints]
    active = app.models.active
    if active is not None and active.title not in titles:
        titles.insert(0, active.title)
    return titles


def current_checkpoint(app: Any) -> str | None:
    active = app.models.active
    return active.title if active else None


def vae_choices(app: Any) -> list[str]:
    return list(VAE_FIXED_CHOICES) + [v.name for v in app.registry.vaes]


def build_quicksettings(app: Any) -> Quicksettings:
    with gr.Row(elem_id="quicksettings", equal_height=True):
        checkpoint = gr.Dropdown(checkpoint_choices(app), value=current_checkpoint(app),
                                 label="Stable Diffusion checkpoint", elem_id="setting_sd_model_checkpoint",
                                 interactive=True, scale=4, min_width=240)
        refresh_checkpoint = symbol_button(REFRESH_SYMBOL, "refresh_sd_model_checkpoint")
        vae = gr.Dropdown(vae_choices(app), value=app.opts.get("sd_vae"), label="SD VAE", elem_id="setting_sd_vae",
                          interactive=True, scale=2, min_width=160)
        refresh_vae = symbol_button(REFRESH_SYMBOL, "refresh_sd_vae")
    return Quicksettings(checkpoint, refresh_checkpoint, vae, refresh_vae)


def builtin_notice(app: Any) -> str:
    if app.models.is_builtin:
        return ("<div class='athanor-notice athanor-warning'><b>Built-in tiny model with random weights</b> — for "
                "trying the interface only; its images are noise. Put a checkpoint (.safetensors) in "
                f"<code>{html.escape(str(app.registry.ckpt_dir))}</code>, then press {REFRESH_SYMBOL}.</div>")
    return ""


def connect_quicksettings(app: Any, qs: Quicksettings, notice: Any) -> None:
    """Switching the checkpoint or VAE loads it now; a failure keeps the previous model and says why."""

    def on_refresh():
        app.registry.refresh()
        return (gr.Dropdown(choices=checkpoint_choices(app), value=current_checkpoint(app)),
                gr.Dropdown(choices=vae_choices(app)), builtin_notice(app))

    for button in (qs.refresh_checkpoint, qs.refresh_vae):
        button.click(on_refresh, outputs=[qs.checkpoint, qs.vae, notice], api_visibility=PRIVATE)

    def on_checkpoint(title):
        active = app.models.active
        if not title or (active is not None and title == active.title):
            return gr.skip(), builtin_notice(app)
        try:
            with app.models.lock:
                app.models.ensure(title, app.opts.get("sd_vae"))
            app.opts.set("sd_model_checkpoint", title)
        except Exception as exc:  # noqa: BLE001 - any load failure: keep the previous model, say why
            log.warning("Switching to %s failed: %s", title, exc)
            message = f"Could not load {title}: {exc}. Still using {current_checkpoint(app)}."
            return gr.Dropdown(value=current_checkpoint(app)), notice_html(message, "error")
        return gr.Dropdown(value=current_checkpoint(app)), builtin_notice(app)

    qs.checkpoint.input(on_checkpoint, inputs=[qs.checkpoint], outputs=[qs.checkpoint, notice],
                        api_visibility=PRIVATE, show_progress="minimal")

    def on_vae(name):
        try:
            with app.models.lock:
                keep = None if app.models.is_builtin else current_checkpoint(app)
                app.models.ensure(keep, name)
            app.opts.set("sd_vae", name)
        except Exception as exc:  # noqa: BLE001 - a broken VAE file must not take the model down
            log.warning("Switching the VAE to %s failed: %s", name, exc)
            message = f"Could not load the VAE {name}: {exc}"
            return gr.Dropdown(value=app.opts.get("sd_vae")), notice_html(message, "error")
        return gr.skip(), builtin_notice(app)

    qs.vae.input(on_vae, inputs=[qs.vae], outputs=[qs.vae, notice], api_visibility=PRIVATE,
                 show_progress="minimal")


def build_settings_tab(app: Any) -> SettingsTab:
    """Lay out the Settings tab's contents (inside its gr.Tab)."""
    options = {k: v for k, v in all_options(app.opts).items() if k not in QUICKSETTINGS}
    keys: list[str] = []
    components: list[Any] = []
    with gr.Row(elem_id="settings_top"):
        apply = gr.Button("Apply settings", variant="primary", elem_id="settings_submit", scale=0, min_width=160)
        result = gr.HTML("", elem_id="settings_result")
    gr.HTML(notice_html("Output paths and the list of disabled extensions are changed in config.json on the "
                        "server (while Athanor is stopped), never from the page.", "info"),
            elem_id="settings_paths_note")
    with gr.Tabs(elem_id="settings"):
        for section in sections(options):
            with gr.Tab(section, id=f"settings_{slug(section)}", elem_id=f"settings_{slug(section)}"):
                for key, info in options.items():
                    if info.section != section:
                        continue
                    keys.append(key)
                    components.append(option_component(key, info, current_values(app, [key])[0],
                                                       locked=is_locked(info)))
    return SettingsTab(keys, components, apply, result)


def connect_settings(app: Any, tab: SettingsTab) -> None:
    options = all_options(app.opts)

    def on_apply(*values):
        changes, errors = compute_changes(app.opts, tab.keys, list(values))
        if errors:
            return notice_html("Nothing was applied. " + " ".join(errors), "error")
        if not changes:
            return notice_html("No settings changed.", "info")
        try:
            app.opts.set_many(changes, is_api=True)  # the page is a remote caller too: paths stay locked
        except (ValueError, OSError) as exc:
            return notice_html(f"Nothing was applied: {exc}", "error")
        names = ", ".join(options[k].label for k in changes)
        return notice_html(f"{len(changes)} setting{'s' if len(changes) != 1 else ''} changed: {names}.", "info")

    tab.apply.click(on_apply, inputs=tab.components, outputs=[tab.result], api_visibility=PRIVATE)


def current_values(app: Any, keys: list[str]) -> list[Any]:
    """What the Settings controls show now (read on every page load)."""
    options = all_options(app.opts)
    values = []
    for key in keys:
        value = app.opts.get(key)
        if key == "sd_checkpoint_hash" and not value:
            active = app.models.active
            value = (active.info.sha256 if active is not None and active.info is not None else "") or ""
        values.append(display_value(options[key], value))
    return values
