"""What the UNet sees besides the prompt: the image side of a generation.

- SDXL's size and crop conditions (`sdxl_time_ids`).
- The extra input channels of inpainting (9-channel) UNets: the mask and the masked image's latent
  (`txt2img_image_conditioning`, `inpainting_image_conditioning`).
- The latent mask that keeps the original outside the painted area (`LatentMask`).
- img2img's starting point: the prepared init images, their latent with the masked content applied, the mask
  and the inpainting conditioning (`prepare_img2img`, A1111's img2img `init()`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from modules import masking, rng
from modules.request import GenerationRequest
from modules.vae_codec import LATENT_FACTOR, encode_pixels, pil_to_tensor

if TYPE_CHECKING:
    from modules.processing import ProcessingContext

log = logging.getLogger("athanor.processing")


def sdxl_time_ids(width: int, height: int, batch: int) -> torch.Tensor:
    """SDXL's added conditions, [B, 6]: original size, crop top-left, target size (A1111 uses the image size
    for both sizes, no crop)."""
    ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)
    return ids.unsqueeze(0).repeat(batch, 1)


def uses_inpainting_conditioning(model) -> bool:
    """Inpainting UNets take 9 channels: the latent, the mask and the masked image's latent."""
    return model.unet.config.in_channels == 9


# -- image conditioning for 9-channel (inpainting) UNets -----------------------------------------

def txt2img_image_conditioning(model, batch: int, height: int, width: int, device: torch.device,
                               warn: Callable[[str], None] = log.warning) -> torch.Tensor:
    """What an inpainting UNet gets in txt2img (A1111): mask all ones (paint everything) and the latent
    of a plain mid-grey image. [B, 5, H/8, W/8]."""
    grey = torch.full((1, 3, height, width), 0.5, device=device)
    latent = encode_pixels(model, grey, warn=warn).to(device)
    ones = torch.ones(1, 1, *latent.shape[-2:], device=device)
    return torch.cat([ones, latent], dim=1).expand(batch, -1, -1, -1)


def inpainting_image_conditioning(model, pixels: torch.Tensor, mask: Image.Image | None, latent_size: tuple[int, int],
                                  *, weight: float, round_mask: bool, device: torch.device,
                                  warn: Callable[[str], None] = log.warning) -> torch.Tensor:
    """A1111's `inpainting_image_conditioning`: [mask, latent of the masked image], [B, 5, h, w].

    pixels: the prepared init images in 0..1, [B,3,H,W]. The masked image is `lerp(image, image * (1 - mask),
    weight)` (the option "Conditional mask weight": 1 blanks the masked area, 0 keeps the whole image). No
    mask means everything is masked.
    """
    pixels = pixels.to(device)
    if mask is None:
        cond_mask = torch.ones(1, 1, *pixels.shape[-2:], device=device)
    else:
        cond_mask = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None].to(device)
        if round_mask:
            cond_mask = torch.round(cond_mask)
        if cond_mask.shape[-2:] != pixels.shape[-2:]:
            cond_mask = F.interpolate(cond_mask, size=pixels.shape[-2:])
    source = pixels * 2 - 1
    masked = torch.lerp(source, source * (1.0 - cond_mask), float(weight))
    latent = encode_pixels(model, (masked + 1) / 2, warn=warn).to(device)
    latent_mask = F.interpolate(cond_mask, size=latent_size).expand(latent.shape[0], -1, -1, -1)
    return torch.cat([latent_mask, latent], dim=1)


# -- the latent mask ------------------------------------------------------------------------------

@dataclass(frozen=True)
class LatentMask:
    """Latent inpainting mask: `mask` is 1 where the init latent is kept, `nmask` (= 1 - mask) where the
    sampler paints."""

    mask: torch.Tensor
    nmask: torch.Tensor

    def blend(self, init_latent: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return init_latent * self.mask + x * self.nmask


def latent_mask_from_image(mask: Image.Image, latent_shape: Sequence[int], round_mask: bool,
                           device: torch.device) -> LatentMask:
    """A1111's latent mask: the processing-size mask scaled (bicubic) to the latent size, rounded to 0/1
    when `mask_round` is on."""
    channels, height, width = latent_shape[-3:]
    small = mask.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    values = np.asarray(small, dtype=np.float32)[..., 0] / 255.0
    if round_mask:
        values = np.around(values)
    paint = torch.from_numpy(values)[None, None].expand(1, channels, -1, -1).to(device)
    return LatentMask(mask=1.0 - paint, nmask=paint)


# -- img2img's starting point ---------------------------------------------------------------------

@dataclass
class Img2ImgInit:
    """img2img's starting point, shared by every batch of the job."""

    prepared: masking.PreparedInit  # pixel side: prepared images, mask, overlays, crop box
    pixels: torch.Tensor  # [B,3,H,W] in 0..1: what was encoded (B = images per batch)
    init_latent: torch.Tensor  # [B,C,h,w]: the encoding, scaled (resize mode 3) and with masked content applied
    latent_mask: LatentMask | None
    image_cond: torch.Tensor | None  # 9-channel UNets: mask + masked-image latent
    pixels_exact: bool  # init_latent is the plain encoding of `pixels` (no latent upscale, no latent fill)
    fields: dict[str, Any]  # infotext: Denoising strength, Conditional mask weight, Mask blur, ...


def prepare_img2img(req: GenerationRequest, ctx: ProcessingContext, seeds: Sequence[int]) -> Img2ImgInit:
    """A1111's img2img `init()`: prepare the init images and mask, encode them, apply masked content
    (fill and original in pixels; latent noise from the first images' `seeds`, latent nothing) and build
    the inpainting conditioning."""
    opts = ctx.opts
    model = ctx.model
    batch_size = req.effective_batch_size
    blur_x, blur_y = req.mask_blur_xy
    inpaint = masking.InpaintSettings(mask_blur_x=blur_x, mask_blur_y=blur_y, mask_round=req.mask_round,
                                      invert=bool(req.inpainting_mask_invert), inpainting_fill=req.inpainting_fill,
                                      full_res=req.inpaint_full_res, padding=req.inpaint_full_res_padding)
    prepared = masking.prepare_init_images(req.init_images, req.width, req.height, req.resize_mode, req.mask,
                                           inpaint, background=str(opts.get("img2img_background_color", "#ffffff")))
    fields: dict[str, Any] = {"Denoising strength": req.denoising_strength}
    inpainting = uses_inpainting_conditioning(model)
    weight = float(opts.get("inpainting_mask_weight", 1.0))
    if inpainting:
        fields["Conditional mask weight"] = weight
    fields.update(prepared.infotext)

    pixels = pil_to_tensor(prepared.images)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(batch_size, -1, -1, -1)
    pixels = pixels.to(ctx.device)
    init_latent = encode_pixels(model, pixels, warn=ctx.warn).to(ctx.device)
    if req.resize_mode == 3:
        size = (req.height // LATENT_FACTOR, req.width // LATENT_FACTOR)
        init_latent = F.interpolate(init_latent, size=size, mode="bilinear")
    pixels_exact = req.resize_mode != 3
    latent_mask = None
    if prepared.mask is not None:
        latent_mask = latent_mask_from_image(prepared.mask, init_latent.shape, req.mask_round, ctx.device)
        if req.inpainting_fill == 2:
            # A1111 draws this noise once, from the first images' seeds, for every batch
            fill_rng = rng.ImageRNG(init_latent.shape[1:], list(seeds[:init_latent.shape[0]]),
                                    source=opts.get("randn_source", "GPU"), device=ctx.device)
            init_latent = latent_mask.blend(init_latent, fill_rng.first().float())
            pixels_exact = False
        elif req.inpainting_fill == 3:
            init_latent = init_latent * latent_mask.mask
            pixels_exact = False
    image_cond = None
    if inpainting:
        cond_pixels = pixels
        if cond_pixels.shape[-2:] != (req.height, req.width):  # resize mode 3: the latent was scaled instead
            cond_pixels = F.interpolate(cond_pixels, size=(req.height, req.width), mode="bilinear")
        image_cond = inpainting_image_conditioning(model, cond_pixels, prepared.mask, init_latent.shape[-2:],
                                                   weight=weight, round_mask=req.mask_round, device=ctx.device,
                                                   warn=ctx.warn)
    return Img2ImgInit(prepared, pixels, init_latent, latent_mask, image_cond, pixels_exact, fields)
