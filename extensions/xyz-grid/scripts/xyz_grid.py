"""X/Y/Z plot (A1111's txt2img/img2img script), registered with the outputs folder and the App's hooks so its
grid is saved as every generated image is."""
from __future__ import annotations

from .. import xyz_script


def setup(api) -> None:
    outputs = getattr(api.paths, "outputs_dir", None) if api.paths is not None else None
    api.register_script(xyz_script.XyzPlot(outputs_dir=outputs, hooks=api.hooks))
