"""X/Y/Z plot (A1111's txt2img/img2img script), registered when the extension loads."""
from __future__ import annotations

from .. import xyz_script


def setup(api) -> None:
    api.register_script(xyz_script.XyzPlot())
