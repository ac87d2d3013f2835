"""Pure image helpers of SD upscale: A1111's pixel upscale, tile grid (`split_grid`) and overlap blending
(`combine_grid`), written as small functions over a frozen `GridLayout`.

A1111's rules, kept exactly because they decide where every tile lands:
- columns = ceil((W - overlap) / (tile_w - overlap)), rows likewise; tiles are spread evenly
  (x = int(col * (W - tile_w) / (cols - 1))) and the last one is pushed back to end at the image's edge.
- combining pastes each row's first tile whole; every later tile fades in over its first `overlap` pixels
  with a linear ramp (mask value int(i * 255 / overlap)), then rows are joined the same way top to bottom.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from modules.masking import LANCZOS, PIXEL_UPSCALERS

#: What SD upscale can use today, in A1111's order (its `sd_upscalers` list starts with these three; an index
#: over the API means a position in this list).
UPSCALERS: tuple[str, ...] = tuple(PIXEL_UPSCALERS)


def resolve_upscaler(value: Any) -> str:
    """An upscaler name (any case) or A1111's index into the list -> its name; ValueError for anything else."""
    available = ", ".join(UPSCALERS)
    if isinstance(value, bool):
        raise ValueError(f"Upscaler must be a name ({available}), not {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        if 0 <= value < len(UPSCALERS):
            return UPSCALERS[value]
        raise ValueError(f"Upscaler index {value} is not available: the upscalers are {available} (0-"
                         f"{len(UPSCALERS) - 1}); model upscalers such as ESRGAN are not supported yet")
    if isinstance(value, str):
        for name in UPSCALERS:
            if name.lower() == value.strip().lower():
                return name
        raise ValueError(f"Upscaler {value!r} is not available for SD upscale: choose one of {available} "
                         "(model upscalers such as ESRGAN are not supported yet)")
    raise ValueError(f"Upscaler must be a name ({available}), not {type(value).__name__}")


def upscale(image: Image.Image, factor: float, upscaler: str) -> Image.Image:
    """A1111's `Upscaler.upscale`: "None" keeps the image as it is; otherwise the image is enlarged by `factor`
    with the upscaler's filter (up to 3 times until it is big enough) and finally Lanczos-resized to
    (size * factor) rounded down to a multiple of 8."""
    name = resolve_upscaler(upscaler)
    if name == "None":
        return image
    if not factor > 0:
        raise ValueError(f"Scale factor must be above 0 (got {factor})")
    dest_w = int((image.width * factor) // 8 * 8)
    dest_h = int((image.height * factor) // 8 * 8)
    if dest_w < 1 or dest_h < 1:
        raise ValueError(f"A {image.width}x{image.height} image scaled by {factor} is smaller than 8 pixels; "
                         "use a larger image or scale factor")
    resample = PIXEL_UPSCALERS[name]
    for _ in range(3):
        if image.width >= dest_w and image.height >= dest_h and factor != 1:
            break
        before = image.size
        image = image.resize((int(image.width * factor), int(image.height * factor)), resample=resample)
        if image.size == before:
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=LANCZOS)
    return image


@dataclass(frozen=True)
class GridLayout:
    """Where the tiles of an image go: column lefts `xs` and row tops `ys` (the same for every row/column)."""

    image_width: int
    image_height: int
    tile_width: int
    tile_height: int
    overlap: int
    xs: tuple[int, ...]
    ys: tuple[int, ...]

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(left, top, right, bottom) of every tile, row by row (the order tiles are generated in)."""
        return [(x, y, x + self.tile_width, y + self.tile_height) for y in self.ys for x in self.xs]

    @property
    def count(self) -> int:
        return len(self.xs) * len(self.ys)


def _positions(size: int, tile: int, overlap: int) -> tuple[int, ...]:
    count = max(1, math.ceil((size - overlap) / (tile - overlap)))
    step = (size - tile) / (count - 1) if count > 1 else 0
    out = []
    for index in range(count):
        at = int(index * step)
        if at + tile >= size:
            at = size - tile  # the last tile ends at the edge (negative for an image smaller than a tile)
        out.append(at)
    return tuple(out)


def grid_layout(image_width: int, image_height: int, tile_width: int, tile_height: int,
                overlap: int) -> GridLayout:
    """A1111's `split_grid` geometry; ValueError when the overlap leaves no room between tiles."""
    if tile_width < 1 or tile_height < 1:
        raise ValueError(f"Tiles must be at least 1x1 pixels (got {tile_width}x{tile_height})")
    if overlap < 0 or overlap >= min(tile_width, tile_height):
        raise ValueError(f"Tile overlap {overlap} must be at least 0 and smaller than the tile size "
                         f"{tile_width}x{tile_height} (the request's width and height)")
    return GridLayout(image_width, image_height, tile_width, tile_height, overlap,
                      _positions(image_width, tile_width, overlap), _positions(image_height, tile_height, overlap))


def split_grid(image: Image.Image, tile_width: int, tile_height: int,
               overlap: int) -> tuple[GridLayout, list[Image.Image]]:
    """The layout and the tiles cut from `image`, row by row (parts outside the image are black)."""
    layout = grid_layout(image.width, image.height, tile_width, tile_height, overlap)
    return layout, [image.crop(box) for box in layout.boxes]


def _ramp(length: int, across: int, horizontal: bool) -> Image.Image:
    # float32 and truncation as A1111, so blended pixels match its output exactly
    values = (np.arange(length, dtype=np.float32) * 255 / length).astype(np.uint8)
    array = np.repeat(values[None, :], across, axis=0) if horizontal else np.repeat(values[:, None], across, axis=1)
    return Image.fromarray(np.ascontiguousarray(array), "L")


def combine_grid(layout: GridLayout, tiles: Sequence[Image.Image]) -> Image.Image:
    """The tiles (row by row, each tile_width x tile_height) joined into one image, overlaps blended."""
    if len(tiles) != layout.count:
        raise ValueError(f"combine_grid needs {layout.count} tiles, got {len(tiles)}")
    tw, th, ov = layout.tile_width, layout.tile_height, layout.overlap
    mask_w = _ramp(ov, th, horizontal=True) if ov else None
    mask_h = _ramp(ov, layout.image_width, horizontal=False) if ov else None
    combined = Image.new("RGB", (layout.image_width, layout.image_height))
    columns = len(layout.xs)
    for row_index, y in enumerate(layout.ys):
        row = Image.new("RGB", (layout.image_width, th))
        for col_index, x in enumerate(layout.xs):
            tile = tiles[row_index * columns + col_index].convert("RGB")
            if tile.size != (tw, th):
                tile = tile.resize((tw, th), resample=LANCZOS)
            if col_index == 0:
                row.paste(tile, (x, 0))
                continue
            if mask_w is not None:
                row.paste(tile.crop((0, 0, ov, th)), (x, 0), mask=mask_w)
            row.paste(tile.crop((ov, 0, tw, th)), (x + ov, 0))
        if row_index == 0:
            combined.paste(row, (0, y))
            continue
        if mask_h is not None:
            combined.paste(row.crop((0, 0, row.width, ov)), (0, y), mask=mask_h)
        combined.paste(row.crop((0, ov, row.width, th)), (0, y + ov))
    return combined
