"""Stable Diffusion model families: what a checkpoint is, told from its keys and tensor shapes alone.

A user's single-file checkpoint (A1111 / original "LDM" layout) carries no config. This module decides which
family it belongs to (SD 1.x, SD 2.x epsilon or v-prediction, SDXL, and their inpainting variants) and infers
the architecture sizes (channels, depths, text encoder widths) from the shapes, on top of the family's real
diffusers config shipped in ``modules/model_configs/<family>/``. The same code therefore handles a 2 GB
checkpoint and a tiny test model built in code.

Nothing here imports torch at module level: shapes may come from a safetensors header without loading weights.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import CLIPTokenizer

MODEL_CONFIGS_DIR = Path(__file__).resolve().parent / "model_configs"
CLIP_TOKENIZER_DIR = MODEL_CONFIGS_DIR / "clip_tokenizer"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer.text_model."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

# OpenCLIP / CLIP text encoders and the SD2/SDXL UNets all use 64-wide attention heads; shapes cannot tell
# the head count, so this rule (true for every released model) fills it in.
ATTENTION_HEAD_WIDTH = 64
SD1_UNET_HEADS = 8

KeyShapes = Mapping[str, tuple[int, ...]]


class CheckpointError(ValueError):
    """A model file cannot be used; the message says why in words a user understands."""


@dataclass(frozen=True)
class FamilyInfo:
    """One model family: its label, its shipped diffusers config folder and how it runs."""

    name: str  # e.g. "sd1", the folder name under modules/model_configs
    label: str  # shown to users, e.g. "SD 1.x"
    is_sdxl: bool
    is_inpaint: bool
    is_sd2: bool  # OpenCLIP ViT-H text encoder (SD 2.x)
    prediction_type: str  # "epsilon" | "v_prediction"
    pipeline_class: str  # diffusers pipeline class name
    default_size: int  # native resolution in pixels
    unet_in_channels: int

    @property
    def config_dir(self) -> Path:
        """The folder holding this family's diffusers configs (model_index.json, unet/, vae/, ...)."""
        return MODEL_CONFIGS_DIR / self.name

    @property
    def text_encoder_folders(self) -> tuple[str, ...]:
        return ("text_encoder", "text_encoder_2") if self.is_sdxl else ("text_encoder",)

    @property
    def tokenizer_folders(self) -> tuple[str, ...]:
        return ("tokenizer", "tokenizer_2") if self.is_sdxl else ("tokenizer",)


FAMILIES: dict[str, FamilyInfo] = {
    info.name: info
    for info in (
        FamilyInfo("sd1", "SD 1.x", False, False, False, "epsilon", "StableDiffusionPipeline", 512, 4),
        FamilyInfo("sd1-inpaint", "SD 1.x Inpainting", False, True, False, "epsilon",
                   "StableDiffusionInpaintPipeline", 512, 9),
        FamilyInfo("sd2", "SD 2.x", False, False, True, "epsilon", "StableDiffusionPipeline", 512, 4),
        FamilyInfo("sd2-v", "SD 2.x (768-v)", False, False, True, "v_prediction", "StableDiffusionPipeline", 768, 4),
        FamilyInfo("sd2-inpaint", "SD 2.x Inpainting", False, True, True, "epsilon",
                   "StableDiffusionInpaintPipeline", 512, 9),
        FamilyInfo("sdxl", "SDXL", True, False, False, "epsilon", "StableDiffusionXLPipeline", 1024, 4),
        FamilyInfo("sdxl-inpaint", "SDXL Inpainting", True, True, False, "epsilon",
                   "StableDiffusionXLInpaintPipeline", 1024, 9),
    )
}

SUPPORTED_FAMILIES_TEXT = ", ".join(info.label for info in FAMILIES.values())


@dataclass
class ModelComponents:
    """The diffusers modules that make up one model (what a checkpoint file holds, plus tokenizers/scheduler)."""

    unet: Any  # UNet2DConditionModel
    vae: Any  # AutoencoderKL
    text_encoders: list  # [CLIPTextModel] or [CLIPTextModel, CLIPTextModelWithProjection]
    tokenizers: list = field(default_factory=list)  # matching CLIPTokenizers
    scheduler: Any = None


# --------------------------------------------------------------------------------------------- shapes


def key_shapes(state_dict_or_shapes: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Normalise a state dict (tensors) or a key -> shape mapping to key -> shape tuples."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key, value in state_dict_or_shapes.items():
        shape = getattr(value, "shape", value)
        try:
            shapes[key] = tuple(int(n) for n in shape)
        except TypeError:  # a non-tensor entry (e.g. an int step counter): no shape
            shapes[key] = ()
    return shapes


def _indices(shapes: KeyShapes, prefix: str) -> list[int]:
    """Distinct integers that follow ``prefix`` in any key (block or layer numbers)."""
    found = set()
    for key in shapes:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _has_prefix(shapes: KeyShapes, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in shapes)


def _first_cross_attention_dim(shapes: KeyShapes) -> int | None:
    for key, shape in shapes.items():
        if key.startswith(UNET_PREFIX) and key.endswith(".attn2.to_k.weight") and len(shape) == 2:
            return shape[1]
    return None


# --------------------------------------------------------------------------------------------- detection


def describe_layout(shapes: KeyShapes) -> str:
    """A short guess at what a file that is not a full SD checkpoint contains, for error messages."""
    keys = list(shapes)
    if not keys:
        return "it contains no tensors"
    if any("lora_" in k or ".lora." in k for k in keys):
        return "it looks like a LoRA (put it in models/Lora)"
    if "encoder.conv_in.weight" in shapes and "decoder.conv_out.weight" in shapes:
        return "it looks like a VAE on its own (put it in models/VAE)"
    if "conv_in.weight" in shapes and _has_prefix(shapes, "down_blocks."):
        return "it looks like a diffusers-format UNet on its own, not a full checkpoint"
    if any(k in shapes for k in ("string_to_param.*", "emb_params", "clip_g", "clip_l")):
        return "it looks like a textual inversion embedding (put it in models/embeddings)"
    if _has_prefix(shapes, "control_model.") or _has_prefix(shapes, "controlnet_cond_embedding."):
        return "it looks like a ControlNet"
    if _has_prefix(shapes, "model.diffusion_model.") and not (
        _has_prefix(shapes, "cond_stage_model.") or _has_prefix(shapes, "conditioner.")
    ):
        return "it holds UNet weights but no text encoder"
    if _has_prefix(shapes, "model.diffusion_model.double_blocks.") or _has_prefix(shapes, "double_blocks."):
        return "it looks like a FLUX model"
    if _has_prefix(shapes, "model.diffusion_model.joint_blocks.") or _has_prefix(shapes, "joint_blocks."):
        return "it looks like an SD3 model"
    sample = ", ".join(sorted(keys)[:3])
    return f"its {len(keys)} tensors have names like {sample}"


def _unsupported(what: str) -> CheckpointError:
    return CheckpointError(f"{what}. Supported model families: {SUPPORTED_FAMILIES_TEXT}.")


_V_WORDS = {"v", "v_prediction", "v-prediction", "vpred", "v_pred", "v-pred"}
_EPS_WORDS = {"epsilon", "eps"}
_YAML_PARAMETERIZATION = re.compile(r"""^\s*parameterization\s*:\s*["']?([A-Za-z_-]+)["']?""", re.MULTILINE)


def prediction_type_evidence(
    shapes: KeyShapes, metadata: Mapping[str, str] | None = None, config_text: str | None = None
) -> str | None:
    """What the file itself says about its prediction type, or None when it says nothing.

    Evidence, in order: a ``v_pred`` key (written by ComfyUI and trainers), safetensors metadata
    ``modelspec.prediction_type``, then ``parameterization:`` in the original-config YAML beside the file
    (A1111 reads ``<name>.yaml``; ``parameterization: "v"`` means v-prediction).
    """
    if "v_pred" in shapes:
        return "v_prediction"
    value = (metadata or {}).get("modelspec.prediction_type")
    if value:
        word = value.strip().lower()
        if word in _V_WORDS:
            return "v_prediction"
        if word in _EPS_WORDS:
            return "epsilon"
    if config_text:
        match = _YAML_PARAMETERIZATION.search(config_text)
        if match:
            word = match.group(1).lower()
            if word in _V_WORDS:
                return "v_prediction"
            if word in _EPS_WORDS:
                return "epsilon"
    return None


def detect_family(
    state_dict_or_shapes: Mapping[str, Any],
    *,
    metadata: Mapping[str, str] | None = None,
    config_text: str | None = None,
) -> FamilyInfo:
    """Tell the model family of an original-layout checkpoint from its keys and shapes only.

    SDXL: ``conditioner.embedders.1.model.*`` (OpenCLIP bigG) and ``model.diffusion_model.label_emb``.
    SD 2.x: an OpenCLIP text encoder at ``cond_stage_model.model.*`` (or, without text encoder keys, a
    1024-wide cross attention). SD 1.x: a CLIP text encoder at ``cond_stage_model.transformer.*``.
    Inpainting: the UNet's first convolution takes 9 channels instead of 4.
    For SD 2.x the v-prediction variant is chosen only on evidence in the file, its metadata or its YAML
    (see ``prediction_type_evidence``); a loader may then run A1111's UNet test for files without evidence.
    Works for tiny test models: no test depends on a layer that exists only at full depth.
    Raises CheckpointError for anything else, saying what the file looks like.
    """
    shapes = key_shapes(state_dict_or_shapes)
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        raise _unsupported(f"This file is not a Stable Diffusion checkpoint: {describe_layout(shapes)}")
    in_channels = conv_in[1]

    has_sdxl_openclip = _has_prefix(shapes, SDXL_OPENCLIP_PREFIX)
    has_label_emb = _has_prefix(shapes, UNET_PREFIX + "label_emb.")
    has_sd2_openclip = _has_prefix(shapes, SD2_OPENCLIP_PREFIX)
    has_sd1_clip = _has_prefix(shapes, "cond_stage_model.transformer.")
    context_dim = _first_cross_attention_dim(shapes)

    if _has_prefix(shapes, "conditioner.embedders.0.model.") and not has_sdxl_openclip:
        raise _unsupported("This looks like an SDXL refiner checkpoint, which is not supported")
    if in_channels == 8:
        raise _unsupported("This looks like an InstructPix2Pix checkpoint (8 input channels), which is not supported")
    if in_channels not in (4, 9):
        raise _unsupported(f"This checkpoint's UNet takes {in_channels} input channels (expected 4, or 9 for inpainting)")
    inpaint = in_channels == 9

    if has_sdxl_openclip and has_label_emb:
        return FAMILIES["sdxl-inpaint" if inpaint else "sdxl"]
    if has_label_emb:
        raise _unsupported("This checkpoint has a class-conditioned UNet (label_emb) but no SDXL text encoders")
    if has_sd2_openclip or (not has_sd1_clip and context_dim == 1024):
        if inpaint:
            return FAMILIES["sd2-inpaint"]
        evidence = prediction_type_evidence(shapes, metadata, config_text)
        return FAMILIES["sd2-v" if evidence == "v_prediction" else "sd2"]
    if has_sd1_clip or context_dim == 768:
        return FAMILIES["sd1-inpaint" if inpaint else "sd1"]
    raise _unsupported(f"This file is not a complete Stable Diffusion checkpoint: {describe_layout(shapes)}")


def family_from_diffusers_configs(unet_config: Mapping[str, Any], scheduler_config: Mapping[str, Any]) -> FamilyInfo:
    """The family of a diffusers-format model folder, from its UNet and scheduler configs."""
    inpaint = unet_config.get("in_channels") == 9
    if unet_config.get("addition_embed_type") == "text_time":
        return FAMILIES["sdxl-inpaint" if inpaint else "sdxl"]
    if unet_config.get("cross_attention_dim") == 1024:
        if inpaint:
            return FAMILIES["sd2-inpaint"]
        v = scheduler_config.get("prediction_type") == "v_prediction"
        return FAMILIES["sd2-v" if v else "sd2"]
    return FAMILIES["sd1-inpaint" if inpaint else "sd1"]


# --------------------------------------------------------------------------------------------- configs


@lru_cache(maxsize=None)
def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def family_configs(family: FamilyInfo) -> dict[str, dict]:
    """The family's shipped diffusers configs, keyed by file path relative to its folder (fresh copies)."""
    configs: dict[str, dict] = {}
    for path in sorted(family.config_dir.rglob("*.json")):
        configs[path.relative_to(family.config_dir).as_posix()] = copy.deepcopy(_read_json(str(path)))
    return configs


def _heads_for(family: FamilyInfo, block_out_channels: list[int]) -> int | list[int]:
    if family.name.startswith("sd1"):
        return SD1_UNET_HEADS  # diffusers calls this "attention_head_dim" but for SD 1.x it is the head count
    return [max(1, channels // ATTENTION_HEAD_WIDTH) for channels in block_out_channels]


def infer_unet_config(shapes: KeyShapes, family: FamilyInfo) -> dict[str, Any]:
    """UNet2DConditionModel config fields read from an original-layout checkpoint's shapes."""
    p = UNET_PREFIX
    levels: list[list[int]] = [[]]
    for index in _indices(shapes, p + "input_blocks."):
        if index == 0:
            continue
        if p + f"input_blocks.{index}.0.op.weight" in shapes:
            levels.append([])
        else:
            levels[-1].append(index)
    levels = [level for level in levels if level]
    if not levels:
        raise CheckpointError("The checkpoint's UNet has no down blocks; the file looks damaged.")

    block_out_channels, down_types, depths = [], [], []
    for level in levels:
        first = level[0]
        out_key = p + f"input_blocks.{first}.0.out_layers.3.weight"
        if out_key not in shapes:
            raise CheckpointError(f"The checkpoint's UNet is missing {out_key}; the file looks damaged.")
        block_out_channels.append(shapes[out_key][0])
        has_attention = _has_prefix(shapes, p + f"input_blocks.{first}.1.")
        down_types.append("CrossAttnDownBlock2D" if has_attention else "DownBlock2D")
        depth = len(_indices(shapes, p + f"input_blocks.{first}.1.transformer_blocks."))
        depths.append(depth if has_attention and depth else 1)
    up_types = ["CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D" for t in reversed(down_types)]

    conv_in = shapes[p + "input_blocks.0.0.weight"]
    out_conv = shapes.get(p + "out.2.weight", (conv_in[1],))
    proj_in = next((shape for key, shape in shapes.items()
                    if key.startswith(p) and key.endswith(".proj_in.weight")), None)
    config: dict[str, Any] = {
        "in_channels": conv_in[1],
        "out_channels": out_conv[0],
        "block_out_channels": block_out_channels,
        "layers_per_block": len(levels[0]),
        "down_block_types": down_types,
        "up_block_types": up_types,
        "attention_head_dim": _heads_for(family, block_out_channels),
    }
    context_dim = _first_cross_attention_dim(shapes)
    if context_dim is not None:
        config["cross_attention_dim"] = context_dim
    if proj_in is not None:
        config["use_linear_projection"] = len(proj_in) == 2
    if family.is_sdxl or any(depth != 1 for depth in depths):
        config["transformer_layers_per_block"] = depths
    label_in = shapes.get(p + "label_emb.0.0.weight")
    if family.is_sdxl and label_in is not None:
        projection_in = label_in[1]
        config["projection_class_embeddings_input_dim"] = projection_in
        pooled = shapes.get(SDXL_OPENCLIP_PREFIX + "text_projection")
        if pooled is not None and (projection_in - pooled[1]) > 0 and (projection_in - pooled[1]) % 6 == 0:
            # SDXL embeds 6 size/crop numbers next to the pooled text embedding
            config["addition_time_embed_dim"] = (projection_in - pooled[1]) // 6
    return config


def infer_vae_config(shapes: KeyShapes, prefix: str = VAE_PREFIX) -> dict[str, Any] | None:
    """AutoencoderKL config fields from original-layout VAE shapes; None when the file has no VAE."""
    levels = _indices(shapes, prefix + "encoder.down.")
    if not levels or prefix + "post_quant_conv.weight" not in shapes:
        return None
    channels = []
    for level in levels:
        key = prefix + f"encoder.down.{level}.block.0.conv2.weight"
        if key not in shapes:
            raise CheckpointError(f"The VAE weights are missing {key}; the file looks damaged.")
        channels.append(shapes[key][0])
    return {
        "in_channels": shapes[prefix + "encoder.conv_in.weight"][1],
        "out_channels": shapes[prefix + "decoder.conv_out.weight"][0],
        "latent_channels": shapes[prefix + "post_quant_conv.weight"][0],
        "block_out_channels": channels,
        "layers_per_block": len(_indices(shapes, prefix + "encoder.down.0.block.")),
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
    }


def infer_vae_config_diffusers(shapes: KeyShapes) -> dict[str, Any] | None:
    """AutoencoderKL config fields from a diffusers-layout VAE state dict's shapes."""
    levels = _indices(shapes, "encoder.down_blocks.")
    if not levels or "post_quant_conv.weight" not in shapes:
        return None
    channels = [shapes[f"encoder.down_blocks.{level}.resnets.0.conv2.weight"][0] for level in levels]
    return {
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "latent_channels": shapes["post_quant_conv.weight"][0],
        "block_out_channels": channels,
        "layers_per_block": len(_indices(shapes, "encoder.down_blocks.0.resnets.")),
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
    }


def _clip_config(shapes: KeyShapes, prefix: str) -> dict[str, Any] | None:
    token = shapes.get(prefix + "embeddings.token_embedding.weight")
    if token is None:
        return None
    hidden = token[1]
    return {
        "vocab_size": token[0],
        "hidden_size": hidden,
        "max_position_embeddings": shapes[prefix + "embeddings.position_embedding.weight"][0],
        "num_hidden_layers": len(_indices(shapes, prefix + "encoder.layers.")),
        "intermediate_size": shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0],
        "num_attention_heads": max(1, hidden // ATTENTION_HEAD_WIDTH),
    }


def _openclip_config(shapes: KeyShapes, prefix: str, drop_last_layer: bool) -> dict[str, Any] | None:
    token = shapes.get(prefix + "token_embedding.weight")
    if token is None:
        return None
    hidden = token[1]
    layers = len(_indices(shapes, prefix + "transformer.resblocks."))
    config = {
        "vocab_size": token[0],
        "hidden_size": hidden,
        "max_position_embeddings": shapes[prefix + "positional_embedding"][0],
        # SD 2.x conditions on the penultimate layer, so diffusers' text encoder stops one layer short
        "num_hidden_layers": layers - 1 if drop_last_layer else layers,
        "intermediate_size": shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0],
        "num_attention_heads": max(1, hidden // ATTENTION_HEAD_WIDTH),
    }
    projection = shapes.get(prefix + "text_projection")
    if projection is not None and not drop_last_layer:
        config["projection_dim"] = projection[1]
    return config


def infer_text_encoder_configs(shapes: KeyShapes, family: FamilyInfo) -> list[dict[str, Any] | None]:
    """Config fields for each text encoder of the family (None where the file lacks that encoder)."""
    if family.is_sdxl:
        return [_clip_config(shapes, SDXL_CLIP_PREFIX), _openclip_config(shapes, SDXL_OPENCLIP_PREFIX, False)]
    if family.is_sd2:
        return [_openclip_config(shapes, SD2_OPENCLIP_PREFIX, True)]
    return [_clip_config(shapes, SD1_CLIP_PREFIX)]


def resolved_configs(
    family: FamilyInfo, shapes: KeyShapes | None = None, prediction_type: str | None = None
) -> dict[str, dict]:
    """The family's diffusers configs with the architecture read from ``shapes`` laid on top.

    Keys are paths relative to a diffusers folder ("unet/config.json", "scheduler/scheduler_config.json", ...).
    """
    configs = family_configs(family)
    if shapes is not None:
        configs["unet/config.json"].update(infer_unet_config(shapes, family))
        vae = infer_vae_config(shapes)
        if vae is not None:
            configs["vae/config.json"].update(vae)
        for folder, text in zip(family.text_encoder_folders, infer_text_encoder_configs(shapes, family)):
            if text is not None:
                configs[f"{folder}/config.json"].update(text)
    configs["scheduler/scheduler_config.json"]["prediction_type"] = prediction_type or family.prediction_type
    return configs


def write_config_folder(configs: Mapping[str, Mapping[str, Any]], folder: Path) -> Path:
    """Write resolved configs as a diffusers config folder (JSON only; tokenizers are built in memory)."""
    folder = Path(folder)
    for relative, config in configs.items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


# --------------------------------------------------------------------------------------------- tokenizers


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    vocab = _read_json(str(CLIP_TOKENIZER_DIR / "vocab.json"))
    merges = []
    with open(CLIP_TOKENIZER_DIR / "merges.txt", encoding="utf-8") as handle:
        for line in handle.read().split("\n")[1:]:  # first line is the "#version" header
            if line:
                first, second = line.split()
                merges.append((first, second))
    return vocab, tuple(merges)


def _token_text(value: Any) -> str:
    return value["content"] if isinstance(value, dict) else str(value)


def build_tokenizers(family: FamilyInfo) -> list["CLIPTokenizer"]:
    """The family's CLIP tokenizers, built in memory from the shared BPE vocabulary (no files, no network).

    The pad token comes from the family's tokenizer files: "<|endoftext|>" for CLIP ViT-L, "!" (id 0) for
    the OpenCLIP tokenizers of SD 2.x and SDXL's second encoder.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    tokenizers = []
    for folder in family.tokenizer_folders:
        special = _read_json(str(family.config_dir / folder / "special_tokens_map.json"))
        tokenizers.append(
            CLIPTokenizer(
                vocab=dict(vocab),
                merges=list(merges),
                model_max_length=77,
                pad_token=_token_text(special.get("pad_token", "<|endoftext|>")),
            )
        )
    return tokenizers
