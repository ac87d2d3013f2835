"""Between pixels and latents: the VAE's decode and encode, and PIL <-> tensor.

Images on the tensor side are [B,3,H,W] float32 in 0..1; latents are scaled (and shifted) as the UNet
expects them. A half-precision VAE that produces NaNs (SDXL's VAE in float16 does) is run again in float32.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("athanor.vae")

LATENT_FACTOR = 8  # pixels per latent cell


def decode_latents(model, latents: torch.Tensor, *, warn: Callable[[str], None] = log.warning,
                   retry_fp32: bool = True) -> torch.Tensor:
    """Latents -> images in 0..1 ([B,3,H,W], float32, CPU). A NaN decode is retried in float32."""
    vae = model.vae
    scaled = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        scaled = scaled + shift
    with torch.inference_mode():
        decoded = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
        if torch.isnan(decoded).any() and retry_fp32 and vae.dtype != torch.float32:
            warn(f"VAE produced NaNs in {vae.dtype}; decoding again in float32")
            original = vae.dtype
            vae.to(torch.float32)
            try:
                decoded = vae.decode(scaled.float(), return_dict=False)[0]
            finally:
                vae.to(original)
    return ((decoded.float() + 1) / 2).clamp(0, 1).cpu()


def encode_pixels(model, pixels: torch.Tensor, *, warn: Callable[[str], None] = log.warning,
                  retry_fp32: bool = True) -> torch.Tensor:
    """Images in 0..1 ([B,3,H,W]) -> latents (float32), scaled as the UNet expects.

    The mean of the VAE's latent distribution is used (A1111 samples from it): the same image always gives
    the same latent, and the difference is far below what the sampler adds. NaNs are retried in float32.
    """
    vae = model.vae
    x = (pixels.float() * 2 - 1).to(vae.device)
    with torch.inference_mode():
        latent = vae.encode(x.to(vae.dtype)).latent_dist.mean
        if torch.isnan(latent).any() and retry_fp32 and vae.dtype != torch.float32:
            warn(f"VAE produced NaNs in {vae.dtype} while encoding; encoding again in float32")
            original = vae.dtype
            vae.to(torch.float32)
            try:
                latent = vae.encode(x.float()).latent_dist.mean
            finally:
                vae.to(original)
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        latent = latent - shift
    return latent.float() * vae.config.scaling_factor


def to_pil(batch: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] in 0..1 (CPU) -> RGB images."""
    arr = (batch.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def pil_to_tensor(images_: Sequence[Image.Image]) -> torch.Tensor:
    """RGB images of one size -> [B,3,H,W] float32 in 0..1."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images_])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
