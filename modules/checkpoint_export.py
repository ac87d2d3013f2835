"""Write diffusers models back to the original single-file ("LDM" / A1111) checkpoint layout.

diffusers converts original checkpoints to its own layout but has no converter for the other direction.
This module is that converter: UNet keys go to ``model.diffusion_model.*``, the VAE to
``first_stage_model.*`` (attention weights back to 1x1 convolutions), CLIP ViT-L to
``cond_stage_model.transformer.text_model.*`` (SD 1.x) or ``conditioner.embedders.0.transformer.text_model.*``
(SDXL), and OpenCLIP to ``cond_stage_model.model.*`` (SD 2.x) or ``conditioner.embedders.1.model.*`` (SDXL)
with q/k/v fused into ``in_proj_weight``. The result loads in A1111 and, through ``model_loader``, back into
bit-identical diffusers modules.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from modules.model_families import (
    SD1_CLIP_PREFIX,
    SD2_OPENCLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    FamilyInfo,
)

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# A fresh OpenCLIP model starts from logit_scale = ln(1/0.07); trained ones end near ln(100). Unused by SD.
_OPENCLIP_LOGIT_SCALE = math.log(100.0)


def _resnet_key(rest: str) -> str:
    module, _, param = rest.rpartition(".")
    return f"{_RESNET_NAMES.get(module, module)}.{param}"


def unet_key_to_ldm(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    """The original-layout name of one diffusers UNet2DConditionModel parameter (without the prefix)."""
    module, _, param = key.rpartition(".")
    if module in _UNET_TOP_LEVEL:
        return f"{_UNET_TOP_LEVEL[module]}.{param}"
    per_level = layers_per_block + 1
    match = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
    if match:
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        if kind == "downsamplers":  # "conv.weight" -> "op.weight"
            return f"input_blocks.{1 + block * per_level + layers_per_block}.0.op.{rest.split('.', 1)[1]}"
        index = 1 + block * per_level + layer
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_resnet_key(rest)}"
        return f"input_blocks.{index}.1.{rest}"
    match = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if match:
        kind, layer, rest = match[1], int(match[2]), match[3]
        if kind == "resnets":
            return f"middle_block.{2 * layer}.{_resnet_key(rest)}"
        return f"middle_block.1.{rest}"
    match = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key)
    if match:
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        if kind == "upsamplers":
            position = 2 if block in up_blocks_with_attention else 1
            return f"output_blocks.{block * per_level + layers_per_block}.{position}.{rest}"
        index = block * per_level + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_resnet_key(rest)}"
        return f"output_blocks.{index}.1.{rest}"
    raise ValueError(f"Cannot place UNet parameter {key!r} in the original checkpoint layout.")


def unet_to_ldm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Original-layout UNet weights (``model.diffusion_model.*``) of a diffusers UNet2DConditionModel."""
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):
        raise ValueError("Only UNets with the same number of layers in every block can be exported.")
    with_attention = {i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t}
    return {
        UNET_PREFIX + unet_key_to_ldm(key, layers, with_attention): tensor
        for key, tensor in unet.state_dict().items()
    }


def vae_key_to_ldm(key: str, num_levels: int) -> str:
    """The original-layout name of one diffusers AutoencoderKL parameter (without the prefix)."""
    replacements = (
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"encoder.down.{m[1]}.block.{m[2]}."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}."),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample."),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.", lambda m: f"{m[1]}.mid.attn_1."),
    )
    for pattern, replace in replacements:
        key, count = re.subn("^" + pattern, replace, key)
        if count:
            break
    key = key.replace("conv_shortcut.", "nin_shortcut.").replace("conv_norm_out.", "norm_out.")
    if ".mid.attn_1." in key:
        head, _, tail = key.partition(".mid.attn_1.")
        module, _, param = tail.rpartition(".")
        key = f"{head}.mid.attn_1.{_VAE_ATTENTION_NAMES.get(module, module)}.{param}"
    return key


def vae_to_ldm(vae: torch.nn.Module, prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """Original-layout VAE weights of a diffusers AutoencoderKL (``first_stage_model.*`` by default).

    The mid-block attention projections were 1x1 convolutions in the original model: they get their
    trailing 1x1 dimensions back.
    """
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, tensor in vae.state_dict().items():
        ldm_key = vae_key_to_ldm(key, levels)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[prefix + ldm_key] = tensor
    return out


def _text_model_items(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The text transformer's parameters without the ``text_model.`` wrapper prefix (transformers 4 vs 5)."""
    items = {}
    for key, tensor in text_encoder.state_dict().items():
        if key.startswith("text_model."):
            key = key[len("text_model."):]
        items[key] = tensor
    return items


def clip_to_ldm(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """CLIP ViT-L text encoder weights in the original layout (``...transformer.text_model.*``)."""
    out = {}
    for key, tensor in _text_model_items(text_encoder).items():
        if key in ("text_projection.weight", "embeddings.position_ids"):
            continue
        out[prefix + key] = tensor
    positions = text_encoder.config.max_position_embeddings
    # Original checkpoints carry the position_ids buffer; A1111 reads files that have it.
    out[prefix + "embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None, :]
    return out


def openclip_to_ldm(text_encoder: torch.nn.Module, prefix: str, *, add_dropped_layer: bool) -> dict[str, torch.Tensor]:
    """OpenCLIP text encoder weights in the original layout (``...model.*``), q/k/v fused into in_proj.

    SD 2.x: diffusers keeps only the layers up to the penultimate one that SD 2.x conditions on, while the
    original file holds the full OpenCLIP tower. ``add_dropped_layer`` writes that last, unused layer (a copy
    of the one before it) and an identity ``text_projection`` so the file has the shape of a real SD 2.x file.
    """
    items = _text_model_items(text_encoder)
    layer_ids = sorted({int(k.split(".")[2]) for k in items if k.startswith("encoder.layers.")})
    out: dict[str, torch.Tensor] = {
        prefix + "token_embedding.weight": items["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": items["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": items["final_layer_norm.weight"],
        prefix + "ln_final.bias": items["final_layer_norm.bias"],
    }

    def write_layer(source: int, target: int) -> None:
        # a copied layer must not share storage with its source: safetensors refuses aliased tensors
        fresh = (lambda t: t.clone()) if source != target else (lambda t: t)
        src = f"encoder.layers.{source}."
        dst = f"{prefix}transformer.resblocks.{target}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [items[f"{src}self_attn.{name}_proj.{kind}"] for name in ("q", "k", "v")], dim=0
            )
            out[f"{dst}attn.out_proj.{kind}"] = fresh(items[f"{src}self_attn.out_proj.{kind}"])
            out[f"{dst}ln_1.{kind}"] = fresh(items[f"{src}layer_norm1.{kind}"])
            out[f"{dst}ln_2.{kind}"] = fresh(items[f"{src}layer_norm2.{kind}"])
            out[f"{dst}mlp.c_fc.{kind}"] = fresh(items[f"{src}mlp.fc1.{kind}"])
            out[f"{dst}mlp.c_proj.{kind}"] = fresh(items[f"{src}mlp.fc2.{kind}"])

    for layer in layer_ids:
        write_layer(layer, layer)
    hidden = items["embeddings.token_embedding.weight"].shape[1]
    dtype = items["embeddings.token_embedding.weight"].dtype
    if add_dropped_layer:
        write_layer(layer_ids[-1], layer_ids[-1] + 1)
        out[prefix + "text_projection"] = torch.eye(hidden, dtype=dtype)
    elif "text_projection.weight" in items:
        # OpenCLIP multiplies x @ text_projection; a torch Linear stores the transpose
        out[prefix + "text_projection"] = items["text_projection.weight"].T
    out[prefix + "logit_scale"] = torch.tensor(_OPENCLIP_LOGIT_SCALE, dtype=dtype)
    return out


def to_ldm_state_dict(components: Any, family: FamilyInfo) -> dict[str, torch.Tensor]:
    """The whole model (UNet, VAE, text encoders) as one original-layout state dict.

    ``components`` is anything with ``unet``, ``vae`` and ``text_encoders`` attributes: a
    ``ModelComponents`` from ``tiny_models`` or a ``LoadedModel`` from ``model_loader``.
    """
    state = {}
    state.update(unet_to_ldm(components.unet))
    state.update(vae_to_ldm(components.vae))
    encoders = list(components.text_encoders)
    if family.is_sdxl:
        if len(encoders) != 2:
            raise ValueError("An SDXL model needs two text encoders.")
        state.update(clip_to_ldm(encoders[0], SDXL_CLIP_PREFIX))
        state.update(openclip_to_ldm(encoders[1], SDXL_OPENCLIP_PREFIX, add_dropped_layer=False))
    elif family.is_sd2:
        state.update(openclip_to_ldm(encoders[0], SD2_OPENCLIP_PREFIX, add_dropped_layer=True))
    else:
        state.update(clip_to_ldm(encoders[0], SD1_CLIP_PREFIX))
    return state


def _modelspec_prediction_type(family: FamilyInfo, prediction_type: str | None) -> str:
    kind = prediction_type or family.prediction_type
    return "v" if kind == "v_prediction" else "epsilon"


def export_single_file(
    components: Any,
    family: FamilyInfo,
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    prediction_type: str | None = None,
) -> Path:
    """Save a model as one original-layout ``.safetensors`` checkpoint (the layout users' files have).

    ``modelspec.prediction_type`` ("epsilon" or "v") is written into the metadata so the loader knows a
    v-prediction model without guessing; entries in ``metadata`` win over it. Tensors are written contiguous,
    on the CPU, in their own dtype. The file is written to a temporary name and renamed, so a reader never
    sees half a file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"Export writes safetensors only; {path.name} should end in .safetensors.")
    state = {key: tensor.detach().to("cpu").contiguous() for key, tensor in to_ldm_state_dict(components, family).items()}
    header = {"modelspec.prediction_type": _modelspec_prediction_type(family, prediction_type)}
    header.update({str(k): str(v) for k, v in (metadata or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(state, str(partial), metadata=header)
    os.replace(partial, path)
    return path
