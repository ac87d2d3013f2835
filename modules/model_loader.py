"""Load users' Stable Diffusion checkpoints, fully offline, into diffusers pipelines.

Single-file checkpoints (``.safetensors``, or ``.ckpt``/``.pt`` read only with
``torch.load(weights_only=True)``) go through diffusers' ``from_single_file(path, config=<folder>,
local_files_only=True)``. The config folder is assembled per load in a temporary directory from the family's
shipped configs (``modules/model_configs/<family>/``) with the architecture read from the file's tensor shapes
laid on top, so full-size and tiny checkpoints take the same path. Tokenizers are built in memory from the one
shared CLIP vocabulary and handed to diffusers, so no folder needs a copy of it. Nothing here touches the
network.

Every failure a user can cause (a damaged file, a pickle with code in it, an unknown model) is a
``CheckpointError`` (a ``ValueError``) with a sentence that says what is wrong.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from modules.model_families import (
    FAMILIES,
    SD1_CLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    CheckpointError,
    FamilyInfo,
    ModelComponents,
    build_tokenizers,
    detect_family,
    family_configs,
    family_from_diffusers_configs,
    infer_vae_config,
    infer_vae_config_diffusers,
    key_shapes,
    prediction_type_evidence,
    resolved_configs,
    write_config_folder,
    describe_layout,
)

__all__ = [
    "CheckpointError",
    "LoadedModel",
    "read_state_dict",
    "read_checkpoint_header",
    "load_checkpoint",
    "load_from_components",
    "load_vae",
    "with_vae",
    "a1111_v_prediction_test",
]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: every call below also passes local_files_only

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
SAFETENSORS_SUFFIX = ".safetensors"


@dataclass
class LoadedModel:
    """A loaded model: the diffusers pipeline plus its parts, its family and where it came from."""

    family: FamilyInfo
    pipeline: Any  # StableDiffusionPipeline / ...InpaintPipeline / StableDiffusionXLPipeline / ...InpaintPipeline
    unet: Any  # UNet2DConditionModel
    vae: Any  # AutoencoderKL (the override when one is attached)
    text_encoders: list  # [CLIPTextModel] or [CLIPTextModel, CLIPTextModelWithProjection]
    tokenizers: list  # matching CLIPTokenizers, model_max_length 77
    scheduler_config: dict  # the family's scheduler config with the detected prediction_type
    prediction_type: str  # "epsilon" | "v_prediction"
    path: str | None
    vae_path: str | None = None
    checkpoint_vae: Any = None  # the checkpoint's own VAE, kept so a VAE override can be undone


# --------------------------------------------------------------------------------------------- reading files


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"Model file {path} was not found.")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a model file.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path.name} is empty (0 bytes); the download or copy probably failed.")


_PICKLE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _refused_pickle(path: Path, error: Exception) -> CheckpointError:
    found = _PICKLE_GLOBAL.search(str(error))
    what = f" (it references {found.group(1)})" if found else ""
    return CheckpointError(
        f"{path.name} contains Python objects besides weights{what}. Unpickling them could run code hidden in "
        "the file, so Athanor will not load it. Convert the checkpoint to .safetensors with a tool you trust, "
        "or download the .safetensors version of the model."
    )


def _torch_load_weights_only(path: Path) -> Any:
    """``torch.load`` in weights-only mode; refusals and damage become CheckpointErrors."""
    mmap = zipfile.is_zipfile(path)  # memory-map the zip format: a 4 GB .ckpt is not read into RAM twice
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        text = str(error)
        if "weights_only" in text.lower() or "weights only" in text.lower() or "unsupported global" in text.lower():
            raise _refused_pickle(path, error) from None
        raise CheckpointError(f"{path.name} is damaged or truncated ({error}); download it again.") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError, AttributeError, KeyError) as error:
        raise CheckpointError(
            f"{path.name} is not a readable PyTorch checkpoint; it looks truncated or damaged ({error})."
        ) from None


def _unwrap_state_dict(path: Path, loaded: Any) -> dict[str, torch.Tensor]:
    # Lightning/A1111 .ckpt files nest the weights under "state_dict", next to counters like global_step.
    while isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path.name} does not hold a dictionary of weights (found {type(loaded).__name__}).")
    return {str(key): value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def _safetensors_error(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path.name} is not a valid safetensors file ({str(error).strip() or error.__class__.__name__}); "
        "it is probably truncated or damaged: download it again."
    )


def read_checkpoint_header(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Key -> shape table and metadata of a checkpoint, reading as little as possible.

    For safetensors only the header is parsed (and the file's length checked against it); a pickle
    checkpoint has no header, so it is loaded (weights-only, memory-mapped where possible).
    """
    path = Path(path)
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except Exception as error:  # safetensors raises its own SafetensorError for every kind of damage
            raise _safetensors_error(path, error) from None
        return shapes, metadata
    if suffix in PICKLE_SUFFIXES:
        return key_shapes(_unwrap_state_dict(path, _torch_load_weights_only(path))), {}
    raise CheckpointError(f"{path.name}: unsupported model file type {suffix or '(none)'}; use .safetensors or .ckpt.")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors in a checkpoint file, on the CPU.

    ``.safetensors`` through safetensors' own loader; ``.ckpt``/``.pt``/``.pth``/``.bin`` only through
    ``torch.load(..., weights_only=True)`` (a nested ``state_dict`` is unwrapped, non-tensor entries such as
    ``global_step`` are dropped). A pickle holding arbitrary objects is refused, never unpickled.
    """
    path = Path(path)
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:
            raise _safetensors_error(path, error) from None
    if suffix in PICKLE_SUFFIXES:
        return _unwrap_state_dict(path, _torch_load_weights_only(path))
    raise CheckpointError(f"{path.name}: unsupported model file type {suffix or '(none)'}; use .safetensors or .ckpt.")


def _sibling_config_text(path: Path) -> str | None:
    """The original-config YAML A1111 reads beside a checkpoint (``name.yaml``), if there is one."""
    for candidate in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if candidate.is_file():
            try:
                return candidate.read_text(encoding="utf-8", errors="replace")
            except OSError:
                return None
    return None


# --------------------------------------------------------------------------------------------- helpers


def _diffusers_class(name: str) -> Any:
    import diffusers

    return getattr(diffusers, name)


def _scheduler_from_config(config: Mapping[str, Any]) -> Any:
    return _diffusers_class(config["_class_name"]).from_config(dict(config))


def make_pipeline(family: FamilyInfo, components: ModelComponents) -> Any:
    """A diffusers pipeline of the family's class around already-built components (no weights copied)."""
    pipeline_class = _diffusers_class(family.pipeline_class)
    encoders, tokenizers = components.text_encoders, components.tokenizers
    if family.is_sdxl:
        extra = {"requires_aesthetics_score": False} if family.is_inpaint else {}
        return pipeline_class(
            vae=components.vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1], unet=components.unet, scheduler=components.scheduler,
            force_zeros_for_empty_prompt=True, add_watermarker=False, **extra,
        )
    return pipeline_class(
        vae=components.vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=components.unet,
        scheduler=components.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _components_of(pipeline: Any, family: FamilyInfo) -> ModelComponents:
    encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if family.is_sdxl else [])
    tokenizers = [pipeline.tokenizer] + ([pipeline.tokenizer_2] if family.is_sdxl else [])
    return ModelComponents(unet=pipeline.unet, vae=pipeline.vae, text_encoders=encoders, tokenizers=tokenizers,
                           scheduler=pipeline.scheduler)


def _loaded(family: FamilyInfo, pipeline: Any, path: str | None, vae_path: str | None,
            checkpoint_vae: Any) -> LoadedModel:
    parts = _components_of(pipeline, family)
    for tokenizer in parts.tokenizers:
        tokenizer.model_max_length = 77
    scheduler_config = dict(pipeline.scheduler.config)
    return LoadedModel(
        family=family, pipeline=pipeline, unet=parts.unet, vae=parts.vae, text_encoders=parts.text_encoders,
        tokenizers=parts.tokenizers, scheduler_config=scheduler_config,
        prediction_type=scheduler_config.get("prediction_type", family.prediction_type),
        path=path, vae_path=vae_path, checkpoint_vae=checkpoint_vae if checkpoint_vae is not None else parts.vae,
    )


def _check_all_weights_loaded(name: str, components: ModelComponents) -> None:
    """diffusers leaves weights that a file lacks on the meta device without complaint: catch that here."""
    modules = {"UNet": components.unet, "VAE": components.vae}
    modules.update({f"text encoder {i + 1}": encoder for i, encoder in enumerate(components.text_encoders)})
    for label, module in modules.items():
        for key, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_meta:
                raise CheckpointError(f"{name} is missing weights for its {label} (for example {key}); "
                                      "the file is incomplete or not a standard checkpoint.")


def a1111_v_prediction_test(unet: Any) -> bool:
    """A1111's test for SD 2.x files that do not say their prediction type.

    Run the UNet at t=999 on a constant 0.5 latent with a constant 0.5 context: an epsilon model predicts
    noise near the input, a v-prediction model's output minus the input has a mean below -1
    (A1111 ``sd_models_config.is_using_v_parameterization_for_sd2``).
    """
    parameter = next(unet.parameters())
    options = {"device": parameter.device, "dtype": parameter.dtype}
    with torch.no_grad():
        latent = torch.ones((1, unet.config.in_channels, 8, 8), **options) * 0.5
        context = torch.ones((1, 2, unet.config.cross_attention_dim), **options) * 0.5
        timestep = torch.asarray([999], device=parameter.device)
        output = unet(latent, timestep, encoder_hidden_states=context).sample
        return (output.float() - latent.float()).mean().item() < -1


def _upcast_attention(unet: Any) -> None:
    """Compute attention scores in float32, as the SD 2.1 768-v config asks (fp16 overflows to NaN otherwise)."""
    from diffusers.models.attention_processor import Attention

    unet.register_to_config(upcast_attention=True)
    for module in unet.modules():
        if isinstance(module, Attention):
            module.upcast_attention = True


def _float32_text_config(config: Mapping[str, Any]) -> Any:
    """A CLIPTextConfig that builds float32 weights: the shipped SDXL config says float16, and weights loaded
    into float16 parameters would be rounded before the cast to the requested dtype."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig.from_dict({**config, "torch_dtype": "float32", "dtype": "float32"})


def _openclip_text_encoder(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], prefix: str,
                           dtype: torch.dtype) -> Any:
    """SDXL's second text encoder converted with diffusers' own OpenCLIP converter.

    Used when both SDXL encoders have the same width: diffusers then cannot tell them apart and would load
    the first encoder's weights twice (it picks by width).
    """
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection(_float32_text_config(config))
    converted = convert_open_clip_checkpoint(model, state, prefix=prefix)
    missing, _ = model.load_state_dict(converted, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing:
        raise CheckpointError(f"The SDXL checkpoint is missing text encoder weights (for example {missing[0]}).")
    return model.to(dtype).eval()


def _legacy_sd1_text_encoder(state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                             dtype: torch.dtype) -> Any:
    """SD 1.x text encoder from early files whose CLIP keys lack ``text_model.`` (A1111 renames them too)."""
    from transformers import CLIPTextModel

    model = CLIPTextModel(_float32_text_config(config))
    prefix = "cond_stage_model.transformer."
    converted = {key[len(prefix):]: value for key, value in state.items()
                 if key.startswith(prefix) and not key.endswith("position_ids")}
    missing, _ = model.load_state_dict(converted, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing:
        raise CheckpointError(f"The checkpoint is missing text encoder weights (for example {missing[0]}).")
    return model.to(dtype).eval()


def _legacy_sd1_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]] | None:
    """Shapes with early SD 1.x CLIP key names moved under ``text_model.``, or None if not such a file."""
    old = "cond_stage_model.transformer."
    if any(key.startswith(SD1_CLIP_PREFIX) for key in shapes):
        return None
    if not any(key.startswith(old + "embeddings.") for key in shapes):
        return None
    return {(SD1_CLIP_PREFIX + key[len(old):] if key.startswith(old) else key): shape
            for key, shape in shapes.items()}


# --------------------------------------------------------------------------------------------- loading


def load_checkpoint(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_path: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a single-file checkpoint (or a diffusers model folder) of any supported family, offline.

    The family comes from the file's keys and shapes; for SD 2.x the prediction type comes from a
    ``v_pred`` key, ``modelspec.prediction_type`` metadata or a ``<name>.yaml`` beside the file, and failing
    those from A1111's UNet test. ``vae_path`` attaches a VAE override (the checkpoint's own VAE stays
    available through ``with_vae(model, None)``).
    """
    path = Path(path)
    if path.is_dir():
        return _load_diffusers_folder(path, device=device, dtype=dtype, vae_path=vae_path)
    shapes, metadata = read_checkpoint_header(path)
    legacy_shapes = _legacy_sd1_shapes(shapes)
    if legacy_shapes is not None:
        shapes = legacy_shapes
    config_text = _sibling_config_text(path)
    family = detect_family(shapes, metadata=metadata, config_text=config_text)
    evidence = prediction_type_evidence(shapes, metadata, config_text)
    prediction_type = evidence or family.prediction_type
    run_v_test = family.is_sd2 and not family.is_inpaint and evidence is None
    configs = resolved_configs(family, shapes, prediction_type)

    tokenizers = build_tokenizers(family)
    passed: dict[str, Any] = {"tokenizer": tokenizers[0]}
    if family.is_sdxl:
        passed["tokenizer_2"] = tokenizers[1]
    else:
        passed.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    override_vae = load_vae(vae_path, family=family, dtype=dtype) if vae_path is not None else None
    has_own_vae = infer_vae_config(shapes) is not None
    if not has_own_vae:
        if override_vae is None:
            raise CheckpointError(f"{path.name} has no VAE weights; choose a VAE file to use with it.")
        passed["vae"] = override_vae

    # The test runs in float32 as A1111 runs it; the model is cast to the requested dtype afterwards.
    load_dtype = torch.float32 if run_v_test else dtype
    needs_state = legacy_shapes is not None or (
        family.is_sdxl
        and configs["text_encoder/config.json"]["hidden_size"] == configs["text_encoder_2/config.json"]["hidden_size"]
    )
    if needs_state:
        state = read_state_dict(path)
        if legacy_shapes is not None:
            passed["text_encoder"] = _legacy_sd1_text_encoder(state, configs["text_encoder/config.json"], load_dtype)
        else:
            passed["text_encoder_2"] = _openclip_text_encoder(
                state, configs["text_encoder_2/config.json"], SDXL_OPENCLIP_PREFIX, load_dtype)
        del state

    pipeline_class = _diffusers_class(family.pipeline_class)
    with tempfile.TemporaryDirectory(prefix="athanor-config-") as folder:
        write_config_folder(configs, Path(folder))
        try:
            pipeline = pipeline_class.from_single_file(
                str(path), config=folder, local_files_only=True, torch_dtype=load_dtype, **passed
            )
        except CheckpointError:
            raise
        except Exception as error:  # diffusers raises many kinds; the user needs the file name and the reason
            raise CheckpointError(f"{path.name} could not be loaded as {family.label}: {error}") from error
    parts = _components_of(pipeline, family)
    _check_all_weights_loaded(path.name, parts)
    checkpoint_vae = pipeline.vae if has_own_vae else None

    if run_v_test and a1111_v_prediction_test(pipeline.unet):
        family, prediction_type = FAMILIES["sd2-v"], "v_prediction"
        scheduler_config = resolved_configs(family, None, prediction_type)["scheduler/scheduler_config.json"]
        pipeline.scheduler = _scheduler_from_config(scheduler_config)
        _upcast_attention(pipeline.unet)
    if load_dtype != dtype:
        pipeline.to(dtype=dtype)
        if checkpoint_vae is not None:
            checkpoint_vae.to(dtype=dtype)
    if override_vae is not None and has_own_vae:
        pipeline = make_pipeline(family, dataclasses.replace(_components_of(pipeline, family), vae=override_vae))
    pipeline.to(device)
    if checkpoint_vae is not None:
        checkpoint_vae.to(device)
    return _loaded(family, pipeline, str(path), str(vae_path) if vae_path is not None else None, checkpoint_vae)


def _read_json_file(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent.name} is not a diffusers model folder: {what} is missing.") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} cannot be read ({error}).") from None


def _load_diffusers_folder(folder: Path, *, device: str | torch.device, dtype: torch.dtype,
                           vae_path: str | os.PathLike | None) -> LoadedModel:
    index = _read_json_file(folder / "model_index.json", "model_index.json")
    unet_config = _read_json_file(folder / "unet" / "config.json", "unet/config.json")
    scheduler_config = _read_json_file(folder / "scheduler" / "scheduler_config.json", "scheduler/scheduler_config.json")
    family = family_from_diffusers_configs(unet_config, scheduler_config)
    extra: dict[str, Any] = {}
    if "safety_checker" in index:
        extra.update(safety_checker=None, requires_safety_checker=False)
    if "feature_extractor" in index:
        extra["feature_extractor"] = None
    try:
        pipeline = _diffusers_class(family.pipeline_class).from_pretrained(
            str(folder), local_files_only=True, torch_dtype=dtype, **extra
        )
    except Exception as error:
        raise CheckpointError(f"The diffusers model folder {folder.name} could not be loaded: {error}") from error
    checkpoint_vae = pipeline.vae
    if vae_path is not None:
        override = load_vae(vae_path, family=family, dtype=dtype)
        pipeline = make_pipeline(family, dataclasses.replace(_components_of(pipeline, family), vae=override))
    pipeline.to(device)
    checkpoint_vae.to(device)
    return _loaded(family, pipeline, str(folder), str(vae_path) if vae_path is not None else None, checkpoint_vae)


def load_from_components(family: FamilyInfo | str, components: ModelComponents, *,
                         path: str | None = None) -> LoadedModel:
    """A LoadedModel around models already in memory (the app's embedded tiny default model)."""
    family = FAMILIES[family] if isinstance(family, str) else family
    tokenizers = components.tokenizers or build_tokenizers(family)
    scheduler = components.scheduler
    if scheduler is None:
        scheduler = _scheduler_from_config(resolved_configs(family)["scheduler/scheduler_config.json"])
    parts = dataclasses.replace(components, tokenizers=tokenizers, scheduler=scheduler)
    return _loaded(family, make_pipeline(family, parts), path, None, None)


# --------------------------------------------------------------------------------------------- VAE overrides


def load_vae(
    path: str | os.PathLike,
    *,
    family: FamilyInfo | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Any:
    """Load a VAE override file (A1111 ``models/VAE`` files) into an AutoencoderKL.

    Accepts the original layout (``encoder.down.0.block.0...``, ``quant_conv``; a ``first_stage_model.``
    prefix is stripped) and the diffusers layout (``encoder.down_blocks.0.resnets.0...``). The scaling factor
    is the family's (0.18215 for SD 1.x/2.x, 0.13025 for SDXL).
    """
    from diffusers import AutoencoderKL

    path = Path(path)
    state = read_state_dict(path)
    if any(key.startswith("first_stage_model.") for key in state):
        state = {key[len("first_stage_model."):]: value for key, value in state.items()
                 if key.startswith("first_stage_model.")}
    shapes = key_shapes(state)
    base = family_configs(family or FAMILIES["sd1"])["vae/config.json"]
    original = infer_vae_config(shapes, prefix="")
    try:
        if original is not None:
            base.update(original)
            with tempfile.TemporaryDirectory(prefix="athanor-vae-config-") as folder:
                write_config_folder({"vae/config.json": base}, Path(folder))
                vae = AutoencoderKL.from_single_file(state, config=folder, subfolder="vae", local_files_only=True,
                                                     torch_dtype=dtype)
        else:
            layout = infer_vae_config_diffusers(shapes)
            if layout is None:
                raise CheckpointError(f"{path.name} is not a VAE: {describe_layout(shapes)}.")
            base.update(layout)
            vae = AutoencoderKL.from_config(base)
            vae.load_state_dict(state, strict=True)
            vae.to(dtype)
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"The VAE file {path.name} could not be loaded: {error}") from error
    _check_all_weights_loaded(path.name, ModelComponents(unet=torch.nn.Module(), vae=vae, text_encoders=[]))
    return vae.to(device).eval()


def with_vae(model: LoadedModel, vae: Any | None, vae_path: str | os.PathLike | None = None) -> LoadedModel:
    """The same model with another VAE; ``vae=None`` restores the checkpoint's own VAE.

    The VAE is moved to the device and dtype of the one it replaces. The returned LoadedModel has a new
    pipeline object sharing every other component; ``model`` itself is left unchanged.
    """
    if vae is None:
        vae, vae_path = model.checkpoint_vae, None
        if vae is None:
            raise CheckpointError("This checkpoint has no VAE of its own; choose a VAE file for it.")
    reference = next(model.vae.parameters())
    vae = vae.to(device=reference.device, dtype=reference.dtype)
    parts = dataclasses.replace(_components_of(model.pipeline, model.family), vae=vae)
    pipeline = make_pipeline(model.family, parts)
    return dataclasses.replace(
        model, pipeline=pipeline, vae=vae, vae_path=str(vae_path) if vae_path is not None else None,
    )
