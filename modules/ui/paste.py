"""Paste parameters (A1111's ↙ button): an infotext becomes values for a tab's fields.

`paste_values(text, ...)` parses with `modules.infotext.parse_generation_parameters`, maps each infotext key
to the UI field it belongs to (names are GenerationRequest fields, plus "checkpoint" and "show_extras"),
converts the text to the field's type, takes styles back out of the prompts, and finds the checkpoint by the
infotext's `Model hash` among the local files. Fields the infotext does not mention are left alone.
"""
from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from modules import infotext, samplers
from modules.request import GenerationRequest

Source = str | Callable[[Mapping[str, Any]], Any]


def _sampler(params: Mapping[str, Any]) -> str | None:
    if "Sampler" not in params:
        return None
    return samplers.split_sampler_name(params["Sampler"], params.get("Schedule type"))[0]


def _schedule(params: Mapping[str, Any]) -> str | None:
    if "Sampler" not in params:
        return params.get("Schedule type")
    return samplers.split_sampler_name(params["Sampler"], params.get("Schedule type"))[1]


def _enable_hr(params: Mapping[str, Any]) -> bool | None:
    # A1111 turns hires fix on when the infotext has a denoising strength and any hires key (txt2img only).
    if "Denoising strength" not in params:
        return False
    return any(key in params for key in ("Hires upscale", "Hires upscaler", "Hires resize-1"))


def _show_extras(params: Mapping[str, Any]) -> bool | None:
    return True if ("Variation seed" in params or "Seed resize from-1" in params) else None


# (field name, infotext key or function of the parsed dict), in A1111's txt2img paste order.
TXT2IMG_FIELDS: tuple[tuple[str, Source], ...] = (
    ("prompt", "Prompt"),
    ("negative_prompt", "Negative prompt"),
    ("steps", "Steps"),
    ("sampler_name", _sampler),
    ("scheduler", _schedule),
    ("cfg_scale", "CFG scale"),
    ("seed", "Seed"),
    ("width", "Size-1"),
    ("height", "Size-2"),
    ("batch_size", "Batch size"),
    ("subseed", "Variation seed"),
    ("subseed_strength", "Variation seed strength"),
    ("seed_resize_from_w", "Seed resize from-1"),
    ("seed_resize_from_h", "Seed resize from-2"),
    ("show_extras", _show_extras),
    ("clip_skip", "Clip skip"),
    ("enable_hr", _enable_hr),
    ("denoising_strength", "Denoising strength"),
    ("hr_scale", "Hires upscale"),
    ("hr_upscaler", "Hires upscaler"),
    ("hr_second_pass_steps", "Hires steps"),
    ("hr_resize_x", "Hires resize-1"),
    ("hr_resize_y", "Hires resize-2"),
    ("hr_checkpoint_name", "Hires checkpoint"),
    ("hr_sampler_name", "Hires sampler"),
    ("hr_scheduler", "Hires schedule type"),
    ("hr_prompt", "Hires prompt"),
    ("hr_negative_prompt", "Hires negative prompt"),
)

MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill order


def _index_of(value: Any, choices: Sequence[str]) -> int | None:
    return choices.index(value) if value in choices else None


# img2img's extra keys (A1111's img2img paste fields); the img2img tab uses the names it has.
IMG2IMG_FIELDS: tuple[tuple[str, Source], ...] = tuple(
    item for item in TXT2IMG_FIELDS if not item[0].startswith("hr_") and item[0] != "enable_hr"
) + (
    ("mask_blur", "Mask blur"),
    ("inpainting_mask_invert", lambda d: 1 if d.get("Mask mode") == "Inpaint not masked" else 0),
    ("inpainting_fill", lambda d: _index_of(d.get("Masked content"), MASKED_CONTENT)),
    ("inpaint_full_res", lambda d: d.get("Inpaint area") == "Only masked"),
    ("inpaint_full_res_padding", "Masked area padding"),
    ("initial_noise_multiplier", "Noise multiplier"),
)

# Fields that keep a bool/number/str type even though GenerationRequest does not (yet) have them.
_UI_TYPES: Mapping[str, type] = {"show_extras": bool, "checkpoint": str, "styles": list}


def field_type(name: str) -> type:
    """The Python type a field's value has: from GenerationRequest when it has the field, else str."""
    if name in _UI_TYPES:
        return _UI_TYPES[name]
    info = GenerationRequest.model_fields.get(name)
    if info is None:
        return str
    annotation = info.annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if args else str
    return annotation if isinstance(annotation, type) else str


def convert(value: Any, kind: type) -> Any:
    """Infotext text to a field value; raises ValueError when it does not fit."""
    if kind is bool:
        if isinstance(value, str):
            return value.strip().lower() == "true"
        return bool(value)
    if kind is int:
        return int(float(value))
    if kind is float:
        return float(value)
    if kind is list:
        return list(value)
    return str(value)


def checkpoint_for(params: Mapping[str, Any], registry: Any) -> tuple[str | None, str]:
    """(checkpoint title, note) for an infotext: found by `Model hash`, or by `Model` when there is no hash."""
    wanted_hash = params.get("Model hash")
    name = params.get("Model")
    if wanted_hash:
        for info in registry.checkpoints:
            if wanted_hash in (info.shorthash, info.hash_old) or (info.sha256 or "").startswith(wanted_hash):
                return info.title, ""
        what = f"{name} [{wanted_hash}]" if name else wanted_hash
        return None, f"Checkpoint {what} is not in the models folder; keeping the selected one."
    if name:
        for info in registry.checkpoints:
            if name in (info.model_name, info.name, info.name_for_extra):
                return info.title, ""
        return None, f"Checkpoint {name} is not in the models folder; keeping the selected one."
    return None, ""


@dataclass
class PasteResult:
    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def paste_values(text: str, fields: Sequence[tuple[str, Source]], *, wanted: Sequence[str] | None = None,
                 registry: Any = None, styles: Any = None, skip: Sequence[str] = ()) -> PasteResult:
    """Values for the fields named in `wanted` (all when None) from an infotext.

    `registry` (a ModelRegistry) enables the checkpoint lookup; `styles` (a StyleDatabase) takes styles out of
    the prompts as A1111's "Apply if any" does; `skip` names fields to leave alone (e.g. seed when the
    "send seed" option is off).
    """
    from modules.styles import extract_styles

    params = infotext.parse_generation_parameters(text or "")
    result = PasteResult()
    wanted_set = set(wanted) if wanted is not None else None

    def want(name: str) -> bool:
        return (wanted_set is None or name in wanted_set) and name not in skip

    if styles is not None and want("styles"):
        found, prompt, negative = extract_styles(styles.all(), params.get("Prompt", ""), params.get("Negative prompt", ""))
        if found:
            params["Prompt"], params["Negative prompt"] = prompt, negative
            result.values["styles"] = found

    for name, source in fields:
        if not want(name):
            continue
        value = source(params) if callable(source) else params.get(source)
        if value is None:
            continue
        try:
            result.values[name] = convert(value, field_type(name))
        except (TypeError, ValueError):
            result.notes.append(f"{name}: could not read {value!r}")

    if registry is not None and want("checkpoint"):
        title, note = checkpoint_for(params, registry)
        if title:
            result.values["checkpoint"] = title
        if note:
            result.notes.append(note)
    return result
