"""Where the hires fix goes: the size of the second pass and how much of its latent is cut off.

Pure arithmetic on the request's numbers, shared by processing (which draws the pass) and the request gate
(which checks the size against the server's limits before the job is queued).
"""
from __future__ import annotations

from dataclasses import dataclass

from modules.vae_codec import LATENT_FACTOR


@dataclass(frozen=True)
class HiresTarget:
    """Where the hires pass goes: the upscaled size and how much of the latent to cut off afterwards."""

    width: int  # A1111's hr_upscale_to_x
    height: int
    truncate_x: int  # latent cells cut off (half on each side) for "resize to" with another aspect
    truncate_y: int

    @property
    def final_size(self) -> tuple[int, int]:
        lw = self.width // LATENT_FACTOR - self.truncate_x // 2 - (self.truncate_x + 1) // 2
        lh = self.height // LATENT_FACTOR - self.truncate_y // 2 - (self.truncate_y + 1) // 2
        return lw * LATENT_FACTOR, lh * LATENT_FACTOR


def hires_target(width: int, height: int, hr_scale: float, hr_resize_x: int, hr_resize_y: int) -> HiresTarget:
    """A1111's `calculate_target_resolution`: by factor, or to a size (one side 0: keep the aspect; both
    set: scale to cover, then cut the latent to the requested size)."""
    if hr_resize_x == 0 and hr_resize_y == 0:
        return HiresTarget(int(width * hr_scale), int(height * hr_scale), 0, 0)
    if hr_resize_y == 0:
        return HiresTarget(hr_resize_x, hr_resize_x * height // width, 0, 0)
    if hr_resize_x == 0:
        return HiresTarget(hr_resize_y * width // height, hr_resize_y, 0, 0)
    if width / height < hr_resize_x / hr_resize_y:
        up_w, up_h = hr_resize_x, hr_resize_x * height // width
    else:
        up_w, up_h = hr_resize_y * width // height, hr_resize_y
    return HiresTarget(up_w, up_h, (up_w - hr_resize_x) // LATENT_FACTOR, (up_h - hr_resize_y) // LATENT_FACTOR)
