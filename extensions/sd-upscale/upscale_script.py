"""The "SD upscale" img2img script (A1111's `scripts/sd_upscale.py`), on Athanor's Script API.

The init image is upscaled, cut into tiles of the request's width x height that overlap by the tile
overlap, every tile is redrawn with img2img (in batches of the request's batch size, through the job's
own `p.process_images()`), and the tiles are blended back into one image; batch count gives that many
upscaled images.

Seeds follow A1111: image n of the batch count starts at seed + n; after every batch of tiles the next
batch starts one higher (A1111's `p.seed = processed.seed + 1`), and within a batch tile j gets +j as in
any img2img batch. Every result keeps the first tile's infotext (A1111's `initial_info`), which records
"SD upscale overlap" and "SD upscale upscaler".
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

from PIL import Image

from modules.hooks import HookRegistry
from modules.images import save_output
from modules.job_state import GenerationResult
from modules.masking import flatten
from modules.rng import get_fixed_seed
from modules.scripts import PlannedRequest, ScriptArg, Script, Slider, Textbox

from . import tiling

log = logging.getLogger("athanor.ext.sd_upscale")

INFO = "Will upscale the image by the selected scale factor; use width and height sliders to set tile size"


@dataclasses.dataclass(frozen=True)
class UpscalerArg(ScriptArg):
    """The upscaler radio: a name (any case) or A1111's index; anything else is refused with the choices."""

    def coerce(self, value: Any) -> Any:
        return tiling.resolve_upscaler(value)


class SdUpscale(Script):
    """Tiled img2img over an upscaled init image. `outputs_dir` is where results are saved (None: never);
    `hooks` (the App's) run before_image_saved / image_saved for each saved result."""

    def __init__(self, outputs_dir: str | Path | None = None, hooks: HookRegistry | None = None) -> None:
        self.outputs_dir = outputs_dir
        self.hooks = hooks

    def title(self) -> str:
        return "SD upscale"

    def show(self, is_img2img: bool) -> Any:
        return bool(is_img2img)

    def ui(self, is_img2img: bool) -> list[ScriptArg]:
        # A1111's order: [info, overlap, upscaler_index, scale_factor]; positional script_args follow it
        return [
            Textbox("Info", INFO, name="info"),
            Slider("Tile overlap", 0, 256, 64, step=16, name="tile_overlap"),
            UpscalerArg("Upscaler", tiling.UPSCALERS[0], name="upscaler", kind="radio", choices=tiling.UPSCALERS),
            Slider("Scale Factor", 1.0, 4.0, 2.0, step=0.05, name="scale_factor"),
        ]

    def planned_requests(self, request, info: str = "", tile_overlap: int = 64, upscaler: str = "None",
                         scale_factor: float = 2.0, **_: Any) -> list[PlannedRequest]:
        """The tile batches `run` will draw and the upscaled picture, for the request gate: checked against the
        server's limits (tiles count as images) before the job is queued, from the image sizes alone."""
        source = request.init_images[0] if request.init_images else None
        if source is None:
            return []
        name = tiling.resolve_upscaler(upscaler)
        width, height = source.size
        if name != "None":
            width, height = int(width * float(scale_factor)) // 8 * 8, int(height * float(scale_factor)) // 8 * 8
        factor_text = f"Scale Factor {float(scale_factor):g} makes a {width}x{height} picture"
        out = [PlannedRequest(request.model_copy(update=dict(width=width, height=height)), "the upscaled picture",
                              {"width": ("scale_factor", factor_text)}, generates=False)]
        layout = tiling.grid_layout(width, height, request.width, request.height, int(tile_overlap))
        tiles, batch = layout.count, request.batch_size
        for _n in range(request.n_iter):
            for start in range(0, tiles, batch):
                size = min(batch, tiles - start)
                tile_request = request.model_copy(update=dict(init_images=[source] * size, batch_size=size, n_iter=1,
                                                              mask=None))
                out.append(PlannedRequest(tile_request, f"{tiles} tiles of {request.width}x{request.height}"))
        return out

    def run(self, p, info: str = "", tile_overlap: int = 64, upscaler: str = "None", scale_factor: float = 2.0,
            **_: Any) -> GenerationResult:
        base = p.request
        upscaler = tiling.resolve_upscaler(upscaler)
        overlap = int(tile_overlap)
        seed = get_fixed_seed(base.seed)  # A1111's fix_seed: one random seed for the whole job
        subseed = get_fixed_seed(base.subseed)
        p.extra_generation_params["SD upscale overlap"] = overlap
        p.extra_generation_params["SD upscale upscaler"] = upscaler

        background = str(p.opts.get("img2img_background_color", "#ffffff") or "#ffffff")
        source = flatten(base.init_images[0], background)
        upscaled = tiling.upscale(source, float(scale_factor), upscaler)
        layout, work = tiling.split_grid(upscaled, base.width, base.height, overlap)
        batch_size = base.batch_size
        batches = math.ceil(len(work) / batch_size)
        log.info("SD upscale: %d tiles (%dx%d) per image, %d batches per image, %d image(s)", len(work),
                 len(layout.xs), len(layout.ys), batches, base.n_iter)

        first = None
        outputs: list[Image.Image] = []
        start_seeds: list[int] = []
        interrupted = False
        for n in range(base.n_iter):
            start_seed = seed + n
            batch_seed = start_seed
            redrawn: list[Image.Image] = []
            for b in range(batches):
                chunk = work[b * batch_size:(b + 1) * batch_size]
                # the tiles are the init images of a plain img2img batch; no saving, no grid, no mask (a mask
                # drawn over the whole picture does not fit a tile)
                p.request = base.model_copy(update=dict(
                    init_images=chunk, batch_size=len(chunk), n_iter=1, seed=batch_seed, subseed=subseed,
                    mask=None, resize_mode=0, save_images=False, save_grid=False))
                processed = p.process_images()
                if first is None and processed.infotexts:
                    first = processed
                redrawn += processed.images[:len(chunk)]
                batch_seed = (processed.seeds[0] if processed.seeds else batch_seed) + 1
                if processed.interrupted:
                    interrupted = True
                    break
            if not redrawn:
                break
            # tiles an interrupt left undone keep their upscaled pixels
            tiles = redrawn + work[len(redrawn):]
            outputs.append(tiling.combine_grid(layout, tiles))
            start_seeds.append(start_seed)
            if interrupted:
                break
        p.request = base
        return self._result(p, base, first, outputs, start_seeds, seed, subseed, interrupted)

    def _result(self, p, base, first: GenerationResult | None, outputs: list[Image.Image], start_seeds: list[int],
                seed: int, subseed: int, interrupted: bool) -> GenerationResult:
        text = first.infotexts[0] if first is not None else ""
        count = len(outputs)
        result = GenerationResult(images=outputs, infotexts=[text] * count, seeds=start_seeds,
                                  subseeds=[subseed] * count, prompts=[base.prompt] * count,
                                  negative_prompts=[base.negative_prompt] * count, paths=[None] * count,
                                  interrupted=interrupted)
        if self.outputs_dir is not None and base.save_images and p.opts.get("samples_save", True):
            for index, start_seed in enumerate(start_seeds):
                saved = save_output(result.images[index], self.outputs_dir, "img2img", seed=start_seed,
                                    infotext=text, opts=p.opts, hooks=self.hooks)
                # what was saved (a before_image_saved hook may change it) is what the job returns
                result.images[index], result.infotexts[index] = saved.image, saved.infotext
                result.paths[index] = str(saved.path)
        if first is not None:
            info = dict(first.info)
            info.update(seed=seed, subseed=subseed, all_seeds=list(start_seeds), all_subseeds=[subseed] * count,
                        all_prompts=result.prompts, all_negative_prompts=result.negative_prompts,
                        infotexts=list(result.infotexts), index_of_first_image=0)
            result.info = info
        return result
