"""Pixel-side preparation for img2img and inpainting, following A1111 (`masking.py`, `images.resize_image`,
`processing.StableDiffusionProcessingImg2Img.init`, `apply_overlay`).

Everything here works on PIL images and numpy arrays; nothing touches torch or a model, so the geometry
(resize modes, the "only masked" crop box, where the result is pasted back) can be checked on its own.

    mask (any size) -> binary mask -> [invert] -> Gaussian blur in x, then y
        whole picture: resized like the image to width x height; overlay mask = 2 * mask, clipped
        only masked:   box around the mask, grown by the padding and to the width:height aspect; that crop
                       of the image (and mask) is processed at width x height and pasted back afterwards
    overlay = the original image with alpha 255 - overlay mask, composited over the result, so every pixel
              where the blurred mask is 0 comes out exactly as it went in.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageFilter, ImageOps
from scipy import ndimage

log = logging.getLogger("athanor.masking")

LANCZOS = Image.Resampling.LANCZOS
NEAREST = Image.Resampling.NEAREST

RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")

#: Pixel upscalers built in (A1111's "None", "Lanczos", "Nearest"); model upscalers come later.
#: The resample filter is used to reach the scale; the last step to the exact size is always Lanczos.
PIXEL_UPSCALERS: dict[str, Image.Resampling] = {"None": LANCZOS, "Lanczos": LANCZOS, "Nearest": NEAREST}

#: Hires fix's latent upscalers: `torch.nn.functional.interpolate` mode and antialias (A1111's table).
LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
HIRES_UPSCALERS: tuple[str, ...] = (*LATENT_UPSCALE_MODES, *PIXEL_UPSCALERS)

DEFAULT_MAX_IMAGE_SIDE = 4096


# -- input checks ---------------------------------------------------------------------------------

def check_image(image: Any, what: str, max_side: int = DEFAULT_MAX_IMAGE_SIDE) -> Image.Image:
    """`image` if it is a usable PIL image, else ValueError with a sentence naming `what`.

    Refused: anything that is not a PIL image, an image with no pixels, a side longer than `max_side`, and
    more pixels than Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`).
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"{what} is not an image (got {type(image).__name__}); send a PNG, JPEG or WEBP image.")
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"{what} is empty ({width}x{height} pixels).")
    if width > max_side or height > max_side:
        raise ValueError(f"{what} is {width}x{height} pixels; the largest accepted is {max_side}x{max_side}.")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ValueError(f"{what} has {width * height} pixels, more than the {limit} that can be opened safely.")
    return image


# -- resizing -------------------------------------------------------------------------------------

def flatten(image: Image.Image, background: str = "#ffffff") -> Image.Image:
    """RGB version of `image`; transparent parts are laid over `background` (A1111's `images.flatten`)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background)
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def _scale_to(image: Image.Image, width: int, height: int, upscaler: str | None) -> Image.Image:
    resample = PIXEL_UPSCALERS.get(upscaler or "None", LANCZOS)
    scale = max(width / image.width, height / image.height)
    if resample != LANCZOS and image.mode != "L" and scale > 1.0:
        # A1111's upscalers enlarge by the scale first, then Lanczos fixes the size.
        image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
    if image.size != (width, height):
        image = image.resize((width, height), resample=LANCZOS)
    return image


def resize_image(mode: int, image: Image.Image, width: int, height: int, upscaler: str | None = None) -> Image.Image:
    """A1111's `images.resize_image`: `image` brought to width x height.

    0 "Just resize": stretched. 1 "Crop and resize": scaled to cover, centred, the overhang cut off.
    Any other mode, "Resize and fill": scaled to fit, centred, and the empty bands filled by stretching the
    image's outermost row or column. Modes 1 and 2 scale to `src_w = im.width * height // im.height` (or the
    height equivalent) and paste at `(width // 2 - src_w // 2, height // 2 - src_h // 2)`.
    """
    if upscaler is not None and upscaler not in PIXEL_UPSCALERS:
        raise ValueError(f"Unknown upscaler {upscaler!r}; available: {', '.join(PIXEL_UPSCALERS)}.")
    if mode == 0:
        return _scale_to(image, width, height, upscaler)

    ratio = width / height
    src_ratio = image.width / image.height
    if mode == 1:
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = _scale_to(image, src_w, src_h, upscaler)
    canvas = Image.new(image.mode if image.mode in ("L", "RGB", "RGBA") else "RGB", (width, height))
    canvas.paste(resized, (width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == 1:
        return canvas

    if ratio < src_ratio:  # bands above and below: stretch the first and last rows
        band = height // 2 - src_h // 2
        if band > 0:
            canvas.paste(resized.resize((width, band), box=(0, 0, width, 0)), (0, 0))
            canvas.paste(resized.resize((width, band), box=(0, resized.height, width, resized.height)),
                         (0, band + src_h))
    elif ratio > src_ratio:  # bands left and right: stretch the first and last columns
        band = width // 2 - src_w // 2
        if band > 0:
            canvas.paste(resized.resize((band, height), box=(0, 0, 0, height)), (0, 0))
            canvas.paste(resized.resize((band, height), box=(resized.width, 0, resized.width, height)),
                         (band + src_w, 0))
    return canvas


# -- masks ----------------------------------------------------------------------------------------

def create_binary_mask(image: Image.Image, round_alpha: bool = True) -> Image.Image:
    """The mask as an 'L' image (white = change this).

    An RGBA image whose alpha is not fully opaque is a brush layer: its alpha is the mask (with
    `round_alpha`, thresholded at > 128). Anything else is read by luminance.
    """
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        alpha = image.getchannel("A")
        return alpha.point(lambda v: 255 if v > 128 else 0) if round_alpha else alpha
    return image.convert("L")


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The 1-D kernel A1111 blurs masks with: size `2*int(2.5*sigma+0.5)+1`, OpenCV's Gaussian weights."""
    size = 2 * int(2.5 * sigma + 0.5) + 1
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-(offsets ** 2) / (2 * sigma * sigma))
    return kernel / kernel.sum()


def blur_mask(mask: Image.Image, blur_x: float, blur_y: float) -> Image.Image:
    """Gaussian blur across (x), then down (y), each rounded back to 8 bits, with mirrored borders
    (OpenCV's BORDER_REFLECT_101, which `cv2.GaussianBlur` uses in A1111)."""
    array = np.asarray(mask.convert("L"), dtype=np.uint8)
    for axis, sigma in ((1, blur_x), (0, blur_y)):
        if sigma > 0:
            blurred = ndimage.convolve1d(array.astype(np.float32), gaussian_kernel(sigma).astype(np.float32),
                                         axis=axis, mode="mirror")
            array = np.clip(np.rint(blurred), 0, 255).astype(np.uint8)
    return Image.fromarray(array, mode="L")


def get_crop_region(mask: Image.Image, pad: int = 0) -> tuple[int, int, int, int] | None:
    """Box (x1, y1, x2, y2) around the mask's non-zero pixels, grown by `pad` and clamped to the image;
    None for an empty mask (A1111's `get_crop_region_v2`)."""
    box = mask.convert("L").getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    if not pad:
        return box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)


def expand_crop_region(box: tuple[int, int, int, int], width: int, height: int, image_width: int,
                       image_height: int) -> tuple[int, int, int, int]:
    """Grow `box` along its short side to the width:height aspect, centred, then shift it back inside the
    image (A1111's `expand_crop_region`: the growth is truncated to whole pixels, the odd pixel goes to the
    right/bottom; a box that cannot fit is clipped to the image)."""
    x1, y1, x2, y2 = box
    if (x2 - x1) / (y2 - y1) > width / height:
        grow = int((x2 - x1) / (width / height) - (y2 - y1))
        y1, y2 = _grow_span(y1, y2, grow, image_height)
    else:
        grow = int((y2 - y1) * (width / height) - (x2 - x1))
        x1, x2 = _grow_span(x1, x2, grow, image_width)
    return x1, y1, x2, y2


def _grow_span(lo: int, hi: int, grow: int, limit: int) -> tuple[int, int]:
    lo -= grow // 2
    hi += grow - grow // 2
    if hi >= limit:  # past the far edge: slide back
        lo -= hi - limit
        hi = limit
    if lo < 0:  # past the near edge: slide forward
        hi -= lo
        lo = 0
    return lo, min(hi, limit)


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Masked content "fill": the masked area painted with the surrounding colours, by compositing ever
    less blurred copies of the unmasked part (radius 256 down to 0) over each other."""
    keep = Image.new("RGBa", image.size)
    keep.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    result = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = keep.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(layer)
    return result.convert("RGB")


# -- img2img preparation --------------------------------------------------------------------------

@dataclass(frozen=True)
class InpaintSettings:
    """The mask-related request fields, A1111's names and meanings."""

    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_round: bool = True
    invert: bool = False  # inpainting_mask_invert: 1 = "Inpaint not masked"
    inpainting_fill: int = 1  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    full_res: bool = False  # inpaint_full_res: "Only masked"
    padding: int = 32  # inpaint_full_res_padding


@dataclass(frozen=True)
class PreparedInit:
    """Init images ready to be encoded, and what is needed to put the result back over the original."""

    images: tuple[Image.Image, ...]  # RGB at width x height (resize mode 3: the original size)
    mask: Image.Image | None  # 'L' at width x height: the latent mask and inpainting conditioning come from it
    overlays: tuple[Image.Image, ...] | None  # RGBA per image; the original with alpha 255 - overlay mask
    mask_for_overlay: Image.Image | None
    paste_to: tuple[int, int, int, int] | None  # (x, y, w, h) in the original image ("only masked")
    crop_region: tuple[int, int, int, int] | None
    full_res: bool  # "only masked" in effect (False after an empty mask fell back to whole picture)
    infotext: dict[str, Any] = field(default_factory=dict)  # Mask mode/blur, Inpaint area, padding, Masked content
    comments: tuple[str, ...] = ()


def prepare_init_images(images: Sequence[Image.Image], width: int, height: int, resize_mode: int = 0,
                        mask: Image.Image | None = None, inpaint: InpaintSettings = InpaintSettings(),
                        background: str = "#ffffff") -> PreparedInit:
    """A1111's img2img `init()` on the pixel side: resize or crop the init images, build the blurred mask,
    the overlays that restore the unmasked pixels, and apply masked content "fill".

    A mask of another size than the images is first stretched to their size. With "only masked" and an empty
    mask, A1111 falls back to plain img2img of the whole picture (no mask at all); so does this.
    """
    if not images:
        raise ValueError("img2img needs at least one init image.")
    fields: dict[str, Any] = {}
    comments: list[str] = []
    crop = None
    paste_to = None
    proc_mask = None  # A1111's image_mask after the crop/resize: width x height
    overlay_mask = None  # A1111's mask_for_overlay
    full_res = inpaint.full_res
    # resize mode 3 scales the latent: for the mask and overlay it is a plain stretch
    pixel_mode = 0 if resize_mode == 3 else resize_mode

    if mask is not None:
        size = images[0].size
        if any(im.size != size for im in images):
            raise ValueError("With a mask, all init images must have the same size.")
        binary = create_binary_mask(mask, round_alpha=inpaint.mask_round)
        if binary.size != size:
            binary = binary.resize(size, LANCZOS)
        if inpaint.invert:
            binary = ImageOps.invert(binary)
            fields["Mask mode"] = "Inpaint not masked"
        blurred = blur_mask(binary, inpaint.mask_blur_x, inpaint.mask_blur_y)
        if (inpaint.mask_blur_x > 0 or inpaint.mask_blur_y > 0) and inpaint.mask_blur_x == inpaint.mask_blur_y:
            fields["Mask blur"] = inpaint.mask_blur_x

        if full_res:
            box = get_crop_region(blurred, inpaint.padding)
            if box is not None:
                crop = expand_crop_region(box, width, height, blurred.width, blurred.height)
                x1, y1, x2, y2 = crop
                overlay_mask = blurred
                proc_mask = resize_image(2, blurred.crop(crop), width, height).convert("L")
                paste_to = (x1, y1, x2 - x1, y2 - y1)
                fields["Inpaint area"] = "Only masked"
                fields["Masked area padding"] = inpaint.padding
            else:
                full_res = False
                message = 'Unable to perform "Inpaint Only mask" because mask is blank, switch to img2img mode.'
                comments.append(message)
                log.info(message)
        else:
            proc_mask = resize_image(pixel_mode, blurred, width, height).convert("L")
            doubled = np.clip(np.asarray(proc_mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
            overlay_mask = Image.fromarray(doubled, mode="L")

        if proc_mask is not None and inpaint.inpainting_fill != 1:
            fields["Masked content"] = MASKED_CONTENT[inpaint.inpainting_fill]

    prepared: list[Image.Image] = []
    overlays: list[Image.Image] | None = [] if proc_mask is not None else None
    for original in images:
        image = flatten(original, background)
        if crop is None and resize_mode != 3:
            image = resize_image(resize_mode, image, width, height)
        if overlays is not None:
            # the overlay has the size of the output: the image here, or width x height for a latent upscale
            base = image if resize_mode != 3 or crop is not None else resize_image(0, image, width, height)
            this_mask = overlay_mask if overlay_mask.size == base.size else resize_image(
                pixel_mode, overlay_mask, base.width, base.height).convert("L")
            overlay = Image.new("RGBa", base.size)
            overlay.paste(base.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(this_mask))
            overlays.append(overlay.convert("RGBA"))
        if crop is not None:
            image = resize_image(2, image.crop(crop), width, height)
        if proc_mask is not None and inpaint.inpainting_fill != 1:
            fill_mask = proc_mask if proc_mask.size == image.size else proc_mask.resize(image.size, LANCZOS)
            image = fill(image, fill_mask)
        prepared.append(image)

    return PreparedInit(images=tuple(prepared), mask=proc_mask,
                        overlays=tuple(overlays) if overlays is not None else None,
                        mask_for_overlay=overlay_mask if proc_mask is not None else None, paste_to=paste_to,
                        crop_region=crop, full_res=full_res, infotext=fields, comments=tuple(comments))


def apply_overlay(image: Image.Image, paste_to: tuple[int, int, int, int] | None,
                  overlay: Image.Image | None) -> Image.Image:
    """Put a generated image back over its original: for "only masked", scale it to the crop box
    ("crop and resize") and place it there on a transparent canvas of the original's size; then composite
    the overlay, which is opaque wherever the blurred mask is 0. No overlay: the image as it is."""
    if overlay is None:
        return image
    if paste_to is not None:
        x, y, w, h = paste_to
        canvas = Image.new("RGBA", overlay.size)
        canvas.paste(resize_image(1, image, w, h), (x, y))
        image = canvas
    image = image.convert("RGBA")
    image.alpha_composite(overlay)
    return image.convert("RGB")
