"""The "X/Y/Z plot" script (A1111's `scripts/xyz_grid.py`), on Athanor's Script API.

Every combination of the axes' values is one generation (through the job's own `p.process_images()`), in
A1111's order: Z slowest, then Y, X fastest. The result is A1111's: the grid first (labelled when "Draw
legend" is on), then one sub-grid per Z value with "Include Sub Grids", then every cell with "Include Sub
Images". The grid carries the first cell's infotext; each cell keeps its own. -1 seeds (the request's, and
-1 values on the Seed / Var. seed axes) become one fixed random seed before the first cell unless "Keep -1
for seeds" is on. An interrupt stops after the current cell; cells not drawn are left black.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import ValidationError

from modules.hooks import HookRegistry
from modules.images import image_grid, save_output
from modules.job_state import GenerationResult
from modules.request import RequestError
from modules.rng import get_fixed_seed
from modules.scripts import Checkbox, PlannedRequest, ScriptArg, Script, Slider, Textbox

from . import axes


@dataclasses.dataclass(frozen=True)
class AxisTypeArg(ScriptArg):
    """An axis type dropdown: a label (any case) or an index into the list; refused (422) otherwise."""

    def coerce(self, value: Any) -> Any:
        return axes.find_axis_type(value, self.label.split()[0]).label


def _fix_seeds(axis_type: axes.AxisType, values: list[Any]) -> list[Any]:
    if axis_type.label not in ("Seed", "Var. seed"):
        return values
    return [random.randrange(4294967294) if v in (None, -1) else v for v in values]


def _shown(axis_type: axes.AxisType, value: Any) -> str:
    """"Steps = 40", "Size = 256x256", "Prompt S/R = blue": an axis value in an error message."""
    shown = f"{value[0]}x{value[1]}" if axis_type.label == "Size" else value
    return f"{axis_type.label} = {shown}"


class XyzPlot(Script):
    """One generation per combination of up to three axes, drawn as a grid."""

    def __init__(self, outputs_dir: str | Path | None = None, hooks: HookRegistry | None = None) -> None:
        self.outputs_dir = outputs_dir  # where the grid is saved (None: never)
        self.hooks = hooks  # the App's hooks: the grid's save runs before_image_saved / image_saved

    def title(self) -> str:
        return "X/Y/Z plot"

    def show(self, is_img2img: bool) -> Any:
        return True

    def ui(self, is_img2img: bool) -> list[ScriptArg]:
        choices = axes.AXIS_LABELS
        return [
            AxisTypeArg("X type", "Seed", name="x_type", kind="dropdown", choices=choices),
            Textbox("X values", "", name="x_values"),
            AxisTypeArg("Y type", "Nothing", name="y_type", kind="dropdown", choices=choices),
            Textbox("Y values", "", name="y_values"),
            AxisTypeArg("Z type", "Nothing", name="z_type", kind="dropdown", choices=choices),
            Textbox("Z values", "", name="z_values"),
            Checkbox("Draw legend", True, name="draw_legend"),
            Checkbox("Include Sub Images", False, name="include_lone_images"),
            Checkbox("Include Sub Grids", False, name="include_sub_grids"),
            Checkbox("Keep -1 for seeds", False, name="no_fixed_seeds"),
            Slider("Grid margins (px)", 0, 500, 0, step=2, name="margin_size"),
        ]

    def planned_requests(self, request, **args: Any) -> list[PlannedRequest]:
        """Every cell's request, for the request gate (limits, each cell's values) before the job is queued."""
        _, _, _, cells = self._plan(request, **args)
        return cells

    def run(self, p, draw_legend: bool = True, include_lone_images: bool = False, include_sub_grids: bool = False,
            margin_size: int = 0, **args: Any) -> GenerationResult:
        # every cell's request is built (and validated) before the first generation
        base, types, values, cells = self._plan(p.request, **args)
        results: list[GenerationResult] = []
        interrupted = False
        for cell in cells:
            p.request = cell.request
            processed = p.process_images()
            results.append(processed)
            if processed.interrupted:
                interrupted = True
                break
        p.request = base
        result = self._result(base, types, values, results, interrupted, bool(draw_legend),
                              bool(include_lone_images), bool(include_sub_grids), int(margin_size))
        if self.outputs_dir is not None and result.images and base.save_images and p.opts.get("grid_save", True):
            saved = save_output(result.images[0], self.outputs_dir, base.kind, seed=result.seeds[0],
                                infotext=result.infotexts[0], opts=p.opts, hooks=self.hooks, grid=True)
            # what was saved (a before_image_saved hook may change it) is what the job returns
            result.images[0], result.infotexts[0], result.grid_path = saved.image, saved.infotext, str(saved.path)
            result.info["infotexts"] = list(result.infotexts)
        return result

    def _plan(self, base, x_type: Any = "Seed", x_values: str = "", y_type: Any = "Nothing", y_values: str = "",
              z_type: Any = "Nothing", z_values: str = "", no_fixed_seeds: bool = False, **_: Any):
        """(base request, axis types, axis values, one PlannedRequest per cell in A1111's order: Z slowest,
        then Y, X fastest). ValueError naming the axis for a value that does not fit."""
        types = [axes.find_axis_type(t, name) for t, name in ((x_type, "X"), (y_type, "Y"), (z_type, "Z"))]
        values = [axes.parse_axis(t, v, name) for t, v, name in zip(types, (x_values, y_values, z_values), "XYZ")]
        if not no_fixed_seeds:
            values = [_fix_seeds(t, v) for t, v in zip(types, values)]
            base = base.model_copy(update=dict(seed=get_fixed_seed(base.seed),
                                               subseed=get_fixed_seed(base.subseed)))
        xs, ys, zs = values
        cells = [self._cell_request(base, types, values, (x, y, z)) for z, y, x in itertools.product(zs, ys, xs)]
        return base, types, values, cells

    @staticmethod
    def _cell_request(base, types: list[axes.AxisType], values: list[list[Any]],
                      cell: tuple[Any, Any, Any]) -> PlannedRequest:
        # cells are saved like any image when the request saves (A1111 does); the plot's grid is saved once below
        request = base.model_copy(update=dict(save_grid=False))
        fields: dict[str, Any] = {"prompt": base.prompt, "negative_prompt": base.negative_prompt}
        sources: dict[str, tuple[str, str]] = {}
        used = [(axis, t, v) for axis, t, v in zip("XYZ", types, cell) if t.label != "Nothing"]
        where = ", ".join(f"{axis} {_shown(t, v)}" for axis, t, v in used) or "the plot"
        for axis, axis_type, axis_values, value in zip("XYZ", types, values, cell):
            if axis_type.label == "Prompt S/R":
                search = axis_values[0]  # A1111: the axis's first value is the search term
                if search not in fields["prompt"] and search not in fields["negative_prompt"]:
                    raise RequestError(f"{axis.lower()}_values", f"Prompt S/R did not find {search} in prompt or "
                                                                 "negative prompt.")
                fields["_sr_search"] = search
            changed = axis_type.apply(value, fields)
            fields.update(changed)
            fields.pop("_sr_search", None)
            text = f"{axis} axis {_shown(axis_type, value)}"
            for name in changed:
                if not name.startswith("_"):
                    sources[name] = (f"{axis.lower()}_values", text)
        for name, value in fields.items():
            try:
                setattr(request, name, value)  # validated: a bad value is refused before anything is drawn
            except ValidationError as exc:
                arg, text = sources.get(name, ("", name))
                reason = exc.errors()[0].get("msg", str(exc)) if exc.errors() else str(exc)
                raise RequestError(arg, f"{text}: {reason}") from None
        return PlannedRequest(request, where, sources)

    @staticmethod
    def _result(base, types, values, results: list[GenerationResult], interrupted: bool, draw_legend: bool,
                include_lone_images: bool, include_sub_grids: bool, margin: int) -> GenerationResult:
        xs, ys, zs = values
        if not results or not results[0].images:
            return GenerationResult(images=[], infotexts=[], seeds=[], subseeds=[], prompts=[], negative_prompts=[],
                                    paths=[], interrupted=True)
        cell_images: list[Image.Image] = []
        for processed in results:
            cell_images.append(processed.images[0] if len(processed.images) == 1 else image_grid(processed.images))
        size = cell_images[0].size
        count = len(xs) * len(ys) * len(zs)
        padded = cell_images + [Image.new("RGB", size) for _ in range(count - len(cell_images))]
        x_texts = [axes.legend_text(types[0], x) for x in xs] if draw_legend else [""] * len(xs)
        y_texts = [axes.legend_text(types[1], y) for y in ys] if draw_legend else [""] * len(ys)
        z_texts = [axes.legend_text(types[2], z) for z in zs] if draw_legend else [""] * len(zs)
        per_z = len(xs) * len(ys)
        sub_grids = [axes.annotated_grid(padded[i * per_z:(i + 1) * per_z], len(xs), len(ys), x_texts, y_texts,
                                         margin) for i in range(len(zs))]
        if len(zs) > 1:
            grid = axes.annotated_grid(sub_grids, len(zs), 1, z_texts, [""], margin)
        else:
            grid = sub_grids[0]
        first = results[0]
        grid_text = first.infotexts[0] if first.infotexts else ""
        out_images = [grid]
        infotexts = [grid_text]
        seeds, subseeds = [first.seeds[0] if first.seeds else base.seed], [first.subseeds[0] if first.subseeds else base.subseed]
        prompts, negatives = [base.prompt], [base.negative_prompt]
        if include_sub_grids:
            out_images += sub_grids
            infotexts += [grid_text] * len(sub_grids)
            seeds += seeds[:1] * len(sub_grids)
            subseeds += subseeds[:1] * len(sub_grids)
            prompts += [base.prompt] * len(sub_grids)
            negatives += [base.negative_prompt] * len(sub_grids)
        if include_lone_images:
            for processed in results:
                out_images += processed.images
                infotexts += processed.infotexts
                seeds += processed.seeds
                subseeds += processed.subseeds
                prompts += processed.prompts
                negatives += processed.negative_prompts
        result = GenerationResult(images=out_images, infotexts=infotexts, seeds=seeds, subseeds=subseeds,
                                  prompts=prompts, negative_prompts=negatives, paths=[None] * len(out_images),
                                  interrupted=interrupted)
        info = dict(first.info)
        info.update(seed=seeds[0], subseed=subseeds[0], all_seeds=seeds, all_subseeds=subseeds, all_prompts=prompts,
                    all_negative_prompts=negatives, infotexts=list(infotexts), index_of_first_image=1)
        result.info = info
        return result
