"""X/Y/Z plot (A1111's txt2img/img2img script), registered with the outputs folder so its grid can be saved."""
from __future__ import annotations

from .. import xyz_script


def setup(api) -> None:
    outputs = getattr(api.paths, "outputs_dir", None) if api.paths is not None else None
    api.register_script(xyz_script.XyzPlot(outputs_dir=outputs))
