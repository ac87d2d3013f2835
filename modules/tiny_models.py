"""Tiny random-weight Stable Diffusion models, built in code for every family.

They use the family's real diffusers configs with small sizes laid on top, the real CLIP vocabulary (49408
tokens, 77 positions) and the family's real tokenizer and scheduler, so they exercise the same code paths as
full-size models: ``write_tiny_checkpoint`` writes one in the original single-file layout, and loading it goes
through ``model_loader.load_checkpoint`` like a user's file. A 64x64 image takes well under a second per step
on a CPU. The app uses the tiny SD 1.x model (labelled as random weights) when no checkpoint exists.

Size rules the loader relies on (shapes cannot tell head counts): SD 1.x UNets have 8 heads; SD 2.x/SDXL
UNets and every text encoder have 64-wide heads, so their widths are multiples of 64. Every width is a
multiple of 32 for the 32-group GroupNorms. The VAE keeps four levels so latents stay 1/8 of the image
size, as A1111 assumes for seeds and latent upscaling.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from modules.checkpoint_export import export_single_file
from modules.model_families import (
    FAMILIES,
    FamilyInfo,
    ModelComponents,
    build_tokenizers,
    family_configs,
)

TINY_VAE = {
    "block_out_channels": [32, 32, 32, 32],
    "layers_per_block": 1,
    "sample_size": 64,
}
TINY_CLIP_L = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 1}
TINY_OPENCLIP_SD2 = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 1}
# SDXL's two encoders must differ in width, as they do at full size (768 vs 1280); 96 != 128 also checks
# that text_projection is written transposed.
TINY_OPENCLIP_SDXL = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "projection_dim": 96}


def _tiny_unet(family: FamilyInfo) -> dict[str, Any]:
    if family.is_sdxl:
        context = TINY_CLIP_L["hidden_size"] + TINY_OPENCLIP_SDXL["hidden_size"]
        return {
            "block_out_channels": [64, 128],
            "layers_per_block": 1,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": [1, 2],
            "transformer_layers_per_block": [1, 2],
            "cross_attention_dim": context,
            "projection_class_embeddings_input_dim": TINY_OPENCLIP_SDXL["projection_dim"] + 6 * 256,
            "addition_time_embed_dim": 256,
            "sample_size": 8,
        }
    if family.is_sd2:
        return {
            "block_out_channels": [64, 128],
            "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "attention_head_dim": [1, 2],
            "cross_attention_dim": TINY_OPENCLIP_SD2["hidden_size"],
            "sample_size": 8,
        }
    return {
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": 8,
        "cross_attention_dim": TINY_CLIP_L["hidden_size"],
        "sample_size": 8,
    }


def _installed_diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def tiny_configs(family: FamilyInfo) -> dict[str, dict]:
    """The family's configs with the tiny sizes laid on top (keys like "unet/config.json")."""
    configs = family_configs(family)
    configs["unet/config.json"].update(_tiny_unet(family))
    configs["vae/config.json"].update(TINY_VAE)
    if family.is_sdxl:
        configs["text_encoder/config.json"].update(TINY_CLIP_L)
        configs["text_encoder_2/config.json"].update(TINY_OPENCLIP_SDXL)
    elif family.is_sd2:
        configs["text_encoder/config.json"].update(TINY_OPENCLIP_SD2)
    else:
        configs["text_encoder/config.json"].update(TINY_CLIP_L)
    # Old config versions with a small sample_size make StableDiffusionPipeline warn and rewrite it to 64.
    configs["unet/config.json"]["_diffusers_version"] = _installed_diffusers_version()
    for folder in family.text_encoder_folders:
        # the shipped SDXL config says float16 (as the real one does); tiny models are built in float32
        configs[f"{folder}/config.json"].update(torch_dtype="float32", dtype="float32")
    return configs


def _resolve_family(family: FamilyInfo | str) -> FamilyInfo:
    if isinstance(family, FamilyInfo):
        return family
    if family not in FAMILIES:
        raise ValueError(f"Unknown model family {family!r}; known: {', '.join(FAMILIES)}.")
    return FAMILIES[family]


def build_tiny_components(family: FamilyInfo | str, seed: int = 0) -> ModelComponents:
    """Random-weight UNet, VAE, text encoder(s), tokenizer(s) and scheduler of ``family``, tiny and CPU-fast.

    Deterministic for a given seed; the global torch RNG is left as it was.
    """
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    family = _resolve_family(family)
    configs = tiny_configs(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(configs["unet/config.json"])
        vae = AutoencoderKL.from_config(configs["vae/config.json"])
        encoders = [CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder/config.json"]))]
        if family.is_sdxl:
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2/config.json"])))
        # Freshly initialised LayerNorms (weight 1, bias 0) give text features whose mean is exactly
        # zero, which no trained model has and which makes A1111's mean-restoring emphasis divide by ~0.
        for encoder in encoders:
            for norm in (m for m in encoder.modules() if isinstance(m, torch.nn.LayerNorm)):
                torch.nn.init.normal_(norm.weight, mean=1.0, std=0.1)
                torch.nn.init.normal_(norm.bias, mean=0.1, std=0.1)
    for module in (unet, vae, *encoders):
        module.eval()
    scheduler_config = configs["scheduler/scheduler_config.json"]
    scheduler_config["prediction_type"] = family.prediction_type
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    return ModelComponents(unet=unet, vae=vae, text_encoders=encoders, tokenizers=build_tokenizers(family),
                           scheduler=scheduler)


def write_tiny_checkpoint(
    family: FamilyInfo | str, path: str | os.PathLike, seed: int = 0, **metadata: str
) -> Path:
    """Build a tiny model of ``family`` and save it as an original-layout single-file ``.safetensors``."""
    family = _resolve_family(family)
    return export_single_file(build_tiny_components(family, seed), family, path, metadata=metadata or None)
