"""Pure helpers of the X/Y/Z plot: A1111's axis value syntax, the axis types, and the legend drawing.

Value syntax (A1111's `xyz_grid.py`): values are a CSV list (quotes allowed); for number axes each item may be
a range: `1-5` (inclusive, step 1), `1-5 (+2)` or `10-1 (-3)` (a signed step), `1-10 [5]` (that many evenly
spaced values; integers truncated). Float ranges work the same (`0.5-1.5 (+0.25)`).
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from io import StringIO
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from modules.samplers import find_sampler, find_schedule

_INT = r"[+-]?\s*\d+"
_FLOAT = r"[+-]?\s*\d+(?:\.\d*)?"
RE_RANGE = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\(([+-]\d+)\s*\))?\s*")
RE_RANGE_COUNT = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\[(\d+)\s*\])?\s*")
RE_RANGE_FLOAT = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*")
RE_RANGE_COUNT_FLOAT = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\[(\d+(?:\.\d*)?)\s*\])?\s*")


MAX_AXIS_VALUES = 1000  # a range such as 1-1000000000 is refused before a list of that size is built


def _check_count(count: float, item: str) -> None:
    if count > MAX_AXIS_VALUES:
        raise ValueError(f"The range {item!r} makes {int(count)} values; an axis takes at most {MAX_AXIS_VALUES}")


def csv_list(text: str) -> list[str]:
    """A1111's `csv_string_to_list_strip`: CSV items (spaces after commas skipped), stripped, empty ones dropped."""
    rows = csv.reader(StringIO(text or ""), skipinitialspace=True)
    return [item.strip() for row in rows for item in row if item.strip()]


def _num(text: str) -> str:
    return text.replace(" ", "")


def expand_ints(text: str) -> list[int]:
    """Integer axis values: `1-5` -> 1..5, `1-5 (+2)` -> 1,3,5, `1-10 [5]` -> 1,3,5,7,10 (A1111's linspace)."""
    out: list[int] = []
    for item in csv_list(text):
        plain, counted = RE_RANGE.fullmatch(item), RE_RANGE_COUNT.fullmatch(item)
        if plain:
            start, end = int(_num(plain.group(1))), int(_num(plain.group(2)))
            step = int(plain.group(3)) if plain.group(3) else 1
            if step == 0:
                raise ValueError(f"The range {item!r} has a step of 0")
            _check_count(len(range(start, end + 1, step)) + len(out), item)
            out += list(range(start, end + 1, step))  # as A1111: end + 1 even for a negative step
        elif counted:
            start, end, count = int(_num(counted.group(1))), int(_num(counted.group(2))), int(counted.group(3))
            _check_count(count + len(out), item)
            out += [int(x) for x in np.linspace(start, end, count).tolist()]
        else:
            try:
                out.append(int(item))
            except ValueError:
                raise ValueError(f"{item!r} is not a whole number or a range such as 1-5, 1-5 (+2) or "
                                 "1-10 [5]") from None
    return out


def expand_floats(text: str) -> list[float]:
    """Float axis values: `0-1 (+0.5)` -> 0, 0.5, 1 (numpy arange up to end + step), `1-2 [3]` -> 1, 1.5, 2."""
    out: list[float] = []
    for item in csv_list(text):
        plain, counted = RE_RANGE_FLOAT.fullmatch(item), RE_RANGE_COUNT_FLOAT.fullmatch(item)
        if plain:
            start, end = float(_num(plain.group(1))), float(_num(plain.group(2)))
            step = float(plain.group(3)) if plain.group(3) else 1.0
            if step == 0:
                raise ValueError(f"The range {item!r} has a step of 0")
            _check_count(max(0.0, (end + step - start) / step) + len(out), item)
            out += np.arange(start, end + step, step).tolist()
        elif counted:
            start, end = float(_num(counted.group(1))), float(_num(counted.group(2)))
            _check_count(float(counted.group(3)) + len(out), item)
            out += np.linspace(start, end, int(float(counted.group(3)))).tolist()
        else:
            try:
                out.append(float(item))
            except ValueError:
                raise ValueError(f"{item!r} is not a number or a range such as 1-2 (+0.5) or 1-2 [3]") from None
    return out


def _size(value: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
    if not match:
        raise ValueError(f"Size {value!r} must look like 512x768")
    return int(match.group(1)), int(match.group(2))


def _sampler(value: str) -> str:
    return find_sampler(value).name


def _schedule(value: str) -> str:
    return find_schedule(value).label


@dataclass(frozen=True)
class AxisType:
    """One axis type: its A1111 label, how its text is parsed, and the request fields a value sets.

    `apply(value, fields)` returns the request fields for one cell; `fields` are the cell's fields so far
    (Prompt S/R reads the prompts from them). `label_value` says whether the legend reads "Label: value".
    """

    label: str
    parse: Callable[[str], list[Any]]
    apply: Callable[[Any, dict[str, Any]], dict[str, Any]]
    label_value: bool = True


def _field(name: str) -> Callable[[Any, dict[str, Any]], dict[str, Any]]:
    return lambda value, fields: {name: value}


def _strings(convert: Callable[[str], Any] = str) -> Callable[[str], list[Any]]:
    return lambda text: [convert(item) for item in csv_list(text)]


def _prompt_sr(value: str, fields: dict[str, Any]) -> dict[str, Any]:
    search = fields["_sr_search"]
    return {"prompt": fields["prompt"].replace(search, value),
            "negative_prompt": fields["negative_prompt"].replace(search, value)}


def _apply_size(value: tuple[int, int], fields: dict[str, Any]) -> dict[str, Any]:
    return {"width": value[0], "height": value[1]}


#: The axis types, in the order of the dropdown (an integer type over the API is an index into this).
AXIS_TYPES: tuple[AxisType, ...] = (
    AxisType("Nothing", lambda text: [None], lambda value, fields: {}, label_value=False),
    AxisType("Seed", expand_ints, _field("seed")),
    AxisType("Var. seed", expand_ints, _field("subseed")),
    AxisType("Var. strength", expand_floats, _field("subseed_strength")),
    AxisType("Steps", expand_ints, _field("steps")),
    AxisType("Hires steps", expand_ints, _field("hr_second_pass_steps")),
    AxisType("CFG Scale", expand_floats, _field("cfg_scale")),
    AxisType("Prompt S/R", _strings(), _prompt_sr, label_value=False),
    AxisType("Sampler", _strings(_sampler), _field("sampler_name"), label_value=False),
    AxisType("Hires sampler", _strings(_sampler), _field("hr_sampler_name")),
    AxisType("Schedule type", _strings(_schedule), _field("scheduler")),
    AxisType("Eta", expand_floats, _field("eta")),
    AxisType("Denoising", expand_floats, _field("denoising_strength")),
    AxisType("Size", _strings(_size), _apply_size),
)
AXIS_LABELS: tuple[str, ...] = tuple(t.label for t in AXIS_TYPES)


def find_axis_type(value: Any, axis: str = "X") -> AxisType:
    """An axis type by label (any case) or index into AXIS_TYPES; ValueError naming the choices otherwise."""
    choices = ", ".join(AXIS_LABELS)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(AXIS_TYPES):
            return AXIS_TYPES[value]
        raise ValueError(f"{axis} axis type index {value} is out of range: the types are {choices} "
                         f"(0-{len(AXIS_TYPES) - 1})")
    if isinstance(value, str):
        if value.strip().isdigit():
            return find_axis_type(int(value.strip()), axis)
        for axis_type in AXIS_TYPES:
            if axis_type.label.lower() == value.strip().lower():
                return axis_type
    raise ValueError(f"{axis} axis type {value!r} is not available: choose one of {choices}")


def parse_axis(axis_type: AxisType, text: str, axis: str = "X") -> list[Any]:
    """The values of one axis; ValueError (naming the axis) for bad syntax or no values."""
    if axis_type.label == "Nothing":
        return [None]
    try:
        values = axis_type.parse(text or "")
    except ValueError as exc:
        raise ValueError(f"{axis} axis ({axis_type.label}): {exc}") from None
    if not values:
        raise ValueError(f"{axis} axis ({axis_type.label}) has no values")
    return values


def legend_text(axis_type: AxisType, value: Any) -> str:
    """What the legend shows for a value: "Steps: 20", or the value alone (Prompt S/R, Sampler)."""
    if axis_type.label == "Nothing":
        return ""
    shown = f"{value[0]}x{value[1]}" if axis_type.label == "Size" else value
    return f"{axis_type.label}: {shown}" if axis_type.label_value else str(shown)


# -- drawing ---------------------------------------------------------------------------------------

def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def annotated_grid(cells: list[Image.Image], columns: int, rows: int, column_texts: list[str],
                   row_texts: list[str], margin: int = 0) -> Image.Image:
    """Cells (row by row, each the first cell's size) on white with `margin` pixels between them, column labels
    above and row labels on the left (omitted when all empty). Pillow's built-in font: nothing is downloaded."""
    if len(cells) != columns * rows:
        raise ValueError(f"A {columns}x{rows} grid needs {columns * rows} images, got {len(cells)}")
    width, height = cells[0].size
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    has_top, has_left = any(column_texts), any(row_texts)
    line = 4
    pad_top = (max(_text_size(probe, t, font)[1] for t in column_texts) + line * 2) if has_top else 0
    pad_left = max(width * 3 // 4, max(_text_size(probe, t, font)[0] for t in row_texts) + line * 2) if has_left else 0
    result = Image.new("RGB", (pad_left + columns * width + margin * (columns - 1),
                               pad_top + rows * height + margin * (rows - 1)), "white")
    draw = ImageDraw.Draw(result)
    for index, cell in enumerate(cells):
        row, col = divmod(index, columns)
        cell = cell.convert("RGB")
        if cell.size != (width, height):
            cell = cell.resize((width, height))
        result.paste(cell, (pad_left + col * (width + margin), pad_top + row * (height + margin)))
    for col, text in enumerate(column_texts if has_top else []):
        w, h = _text_size(draw, text, font)
        x = pad_left + col * (width + margin) + (width - w) // 2
        draw.multiline_text((x, line), text, fill="black", font=font, align="center")
    for row, text in enumerate(row_texts if has_left else []):
        w, h = _text_size(draw, text, font)
        y = pad_top + row * (height + margin) + (height - h) // 2
        draw.multiline_text(((pad_left - w) // 2, y), text, fill="black", font=font, align="center")
    return result
