"""SD upscale (A1111's img2img script): registered with the outputs folder and the App's hooks so its results are
saved as every generated image is."""
from __future__ import annotations

from .. import upscale_script


def setup(api) -> None:
    outputs = getattr(api.paths, "outputs_dir", None) if api.paths is not None else None
    api.register_script(upscale_script.SdUpscale(outputs_dir=outputs, hooks=api.hooks))
