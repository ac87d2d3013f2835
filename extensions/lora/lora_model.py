"""LoRA files (kohya / A1111 layout) and the weight deltas they add to a loaded diffusers model.

Keys look like `<layer>.<part>`, where layer names a module with dots turned into underscores:
  UNet, diffusers names:  lora_unet_down_blocks_0_attentions_0_proj_in
  UNet, LDM names:        lora_unet_input_blocks_1_1_proj_in   (SDXL files use these)
  text encoder:           lora_te_text_model_encoder_layers_0_self_attn_q_proj
  SDXL text encoders:     lora_te1_... (CLIP-L), lora_te2_... (OpenCLIP bigG)
and part is `lora_down.weight` / `lora_up.weight` (or PEFT's `lora_A.weight` / `lora_B.weight`), optional
`lora_mid.weight` (LoCon CP decomposition) and `alpha`. A layer's change is
    delta = up @ down * (alpha / rank) * multiplier
(reshaped to the module's weight; for convolutions down may be [r, in, kh, kw]).
"""
from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("athanor.ext.lora")

SUFFIXES = (".safetensors", ".pt", ".ckpt")
FORBIDDEN_ALIASES = frozenset({"none", "addams"})  # A1111 never matches these aliases

_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_PART_ALIASES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                 "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight"}


# -- files -------------------------------------------------------------------------------------------
def read_safetensors_metadata(path: Path) -> dict[str, Any]:
    """The `__metadata__` of a safetensors header; values that look like JSON objects are decoded (A1111)."""
    with open(path, "rb") as file:
        raw = file.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path.name} is not a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 1024 * 1024:
            raise ValueError(f"{path.name} has an implausible safetensors header")
        header = json.loads(file.read(length))
    metadata = dict(header.get("__metadata__") or {})
    for key, value in list(metadata.items()):
        if isinstance(value, str) and value[:1] == "{":
            try:
                metadata[key] = json.loads(value)
            except ValueError:
                pass
    metadata.pop("ssmd_cover_images", None)  # cover images: too big to list
    return metadata


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path.name} cannot be read safely (only tensors are loaded): {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} does not hold a dict of tensors")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


@dataclass
class LoraOnDisk:
    """A LoRA file: its name (file stem), alias (`ss_output_name`) and metadata."""

    name: str
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def alias(self) -> str:
        return str(self.metadata.get("ss_output_name") or self.name)

    @property
    def is_safetensors(self) -> bool:
        return self.path.suffix.lower() == ".safetensors"

    def api_info(self) -> dict[str, Any]:
        return {"name": self.name, "alias": self.alias, "path": str(self.path), "metadata": self.metadata}


def list_loras(folder: Path) -> dict[str, LoraOnDisk]:
    """name -> LoraOnDisk for every LoRA file under the folder (recursive, sorted)."""
    found: list[Path] = []
    if folder.is_dir():
        for root, dirs, files in os.walk(folder, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [Path(root) / f for f in files if f.lower().endswith(SUFFIXES) and not f.startswith(".")]
    out: dict[str, LoraOnDisk] = {}
    for path in sorted(found, key=lambda p: str(p).lower()):
        metadata = {}
        if path.suffix.lower() == ".safetensors":
            try:
                metadata = read_safetensors_metadata(path)
            except (OSError, ValueError) as exc:
                log.error("Reading LoRA %s: %s", path, exc)
                continue
        out[path.stem] = LoraOnDisk(path.stem, path, metadata)
    return out


def find_lora(loras: dict[str, LoraOnDisk], name: str) -> LoraOnDisk | None:
    """By file name, else by alias (A1111's `available_network_aliases`)."""
    if name in loras:
        return loras[name]
    for lora in loras.values():
        if lora.alias == name and lora.alias.lower() not in FORBIDDEN_ALIASES:
            return lora
    return None


# -- module names ------------------------------------------------------------------------------------
def _per_block(value: Any, count: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * count


def ldm_unet_name(name: str, config: Any) -> str | None:
    """The LDM (original Stable Diffusion) name of a diffusers UNet module, or None if it has none."""
    parts = name.split(".")
    down_types = list(config.down_block_types)
    up_types = list(config.up_block_types)
    down_layers = _per_block(config.layers_per_block, len(down_types))
    up_layers = list(reversed(down_layers))

    def resnet(rest: list[str]) -> str:
        return ".".join([_RESNET_PARTS.get(rest[0], rest[0])] + rest[1:]) if rest else ""

    def join(*items: str) -> str:
        return ".".join(item for item in items if item)

    head = parts[0]
    if head == "conv_in":
        return join("input_blocks.0.0", *parts[1:])
    if head == "conv_norm_out":
        return join("out.0", *parts[1:])
    if head == "conv_out":
        return join("out.2", *parts[1:])
    if head == "time_embedding" and len(parts) >= 2 and parts[1] in ("linear_1", "linear_2"):
        return join(f"time_embed.{0 if parts[1] == 'linear_1' else 2}", *parts[2:])
    if head == "add_embedding" and len(parts) >= 2 and parts[1] in ("linear_1", "linear_2"):
        return join(f"label_emb.0.{0 if parts[1] == 'linear_1' else 2}", *parts[2:])
    if head == "down_blocks" and len(parts) >= 4:
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        first = 1 + sum(n + 1 for n in down_layers[:block])
        if kind == "resnets":
            return join(f"input_blocks.{first + index}.0", resnet(rest))
        if kind == "attentions":
            return join(f"input_blocks.{first + index}.1", *rest)
        if kind == "downsamplers" and rest[:1] == ["conv"]:
            return join(f"input_blocks.{first + down_layers[block]}.0.op", *rest[1:])
    if head == "mid_block" and len(parts) >= 3:
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "attentions":
            return join("middle_block.1", *rest)
        if kind == "resnets":
            return join(f"middle_block.{index * 2}", resnet(rest))
    if head == "up_blocks" and len(parts) >= 4:
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        first = sum(n + 1 for n in up_layers[:block])
        if kind == "resnets":
            return join(f"output_blocks.{first + index}.0", resnet(rest))
        if kind == "attentions":
            return join(f"output_blocks.{first + index}.1", *rest)
        if kind == "upsamplers" and rest[:1] == ["conv"]:
            has_attention = "CrossAttn" in up_types[block]
            return join(f"output_blocks.{first + up_layers[block]}.{2 if has_attention else 1}.conv", *rest[1:])
    return None


@dataclass(frozen=True)
class Target:
    """A model module a LoRA layer can change."""

    module: torch.nn.Module
    kind: str  # "te" or "unet"


def lora_key_map(model: Any) -> dict[str, Target]:
    """Every kohya layer name this model answers to -> the module it means."""
    out: dict[str, Target] = {}
    patchable = (torch.nn.Linear, torch.nn.Conv2d)
    unet = model.unet
    for name, module in unet.named_modules():
        if not isinstance(module, patchable):
            continue
        out["lora_unet_" + name.replace(".", "_")] = Target(module, "unet")
        ldm = ldm_unet_name(name, unet.config)
        if ldm is not None:
            out.setdefault("lora_unet_" + ldm.replace(".", "_"), Target(module, "unet"))
    encoders = list(model.text_encoders)
    prefixes = [["lora_te1_"], ["lora_te2_"]] if len(encoders) > 1 else [["lora_te_", "lora_te1_"]]
    for encoder, names in zip(encoders, prefixes):
        for name, module in encoder.named_modules():
            if not isinstance(module, patchable):
                continue
            bare = name[len("text_model."):] if name.startswith("text_model.") else name
            for prefix in names:
                out[prefix + "text_model_" + bare.replace(".", "_")] = Target(module, "te")
    return out


# -- networks -----------------------------------------------------------------------------------------
@dataclass
class LoraLayer:
    key: str
    up: torch.Tensor
    down: torch.Tensor
    mid: torch.Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, shape: torch.Size, multiplier: float, dyn_dim: int | None = None,
              device: torch.device | str = "cpu") -> torch.Tensor:
        """The change to a weight of `shape`, in float32."""
        up = self.up.to(device=device, dtype=torch.float32)
        down = self.down.to(device=device, dtype=torch.float32)
        scale = self.alpha / self.rank if self.alpha is not None else 1.0
        if self.mid is not None:  # LoCon CP decomposition: mid [r, r, kh, kw]
            mid = self.mid.to(device=device, dtype=torch.float32)
            updown = torch.einsum("n m k l, i n, m j -> i j k l", mid, up.flatten(1), down.flatten(1))
        else:
            if dyn_dim is not None:
                dyn_dim = min(dyn_dim, up.shape[1])
                up, down = up[:, :dyn_dim], down[:dyn_dim]
            out_shape = [up.shape[0], down.shape[1], *down.shape[2:]]
            updown = (up.flatten(1) @ down.flatten(1)).reshape(out_shape)
        if len(shape) == 4 and updown.ndim == 4 and shape[1] == 9 and updown.shape[1] == 4:
            # inpainting UNet: its first convolution has 5 extra input channels the LoRA never saw
            updown = torch.nn.functional.pad(updown, (0, 0, 0, 0, 0, 5))
        if updown.numel() != torch.Size(shape).numel():
            raise ValueError(f"LoRA layer {self.key} has shape {tuple(updown.shape)}, the model's has {tuple(shape)}")
        return updown.reshape(shape) * (scale * multiplier)


@dataclass
class LoraNetwork:
    """A loaded LoRA file: its layers by kohya name."""

    on_disk: LoraOnDisk
    layers: dict[str, LoraLayer]
    mtime_ns: int = 0

    @property
    def name(self) -> str:
        return self.on_disk.name

    def matched(self, key_map: dict[str, Target]) -> tuple[list[tuple[LoraLayer, Target]], list[str]]:
        """(layers with the module each changes, layer names this model does not have)."""
        found, missing = [], []
        for key, layer in self.layers.items():
            target = key_map.get(key)
            if target is None:
                missing.append(key)
            else:
                found.append((layer, target))
        return found, missing


def parse_lora(state: dict[str, torch.Tensor], on_disk: LoraOnDisk) -> LoraNetwork:
    """Group a LoRA state dict by layer; unknown parts are ignored with a warning."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for full_key, tensor in state.items():
        if "." not in full_key:
            continue
        layer, part = full_key.split(".", 1)
        grouped.setdefault(layer, {})[_PART_ALIASES.get(part, part)] = tensor
    layers: dict[str, LoraLayer] = {}
    unknown = []
    for key, parts in grouped.items():
        if "lora_up.weight" in parts and "lora_down.weight" in parts:
            alpha = parts.get("alpha")
            layers[key] = LoraLayer(key, parts["lora_up.weight"], parts["lora_down.weight"],
                                    parts.get("lora_mid.weight"), float(alpha.item()) if alpha is not None else None)
        else:
            unknown.append(key)
    if unknown:
        log.warning("LoRA %s: %d layers in a format this version does not apply (e.g. %s)", on_disk.name,
                    len(unknown), unknown[0])
    if not layers:
        raise ValueError(f"{on_disk.path.name} has no LoRA layers (lora_up/lora_down weights)")
    return LoraNetwork(on_disk, layers)


def load_lora(on_disk: LoraOnDisk) -> LoraNetwork:
    network = parse_lora(read_state_dict(on_disk.path), on_disk)
    network.mtime_ns = on_disk.path.stat().st_mtime_ns
    return network


@dataclass(frozen=True)
class LoraUse:
    """One `<lora:...>` tag: which network and how strongly (A1111's te / unet multipliers and dyn)."""

    name: str  # as written in the prompt
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None


def parse_lora_params(params: Any) -> LoraUse:
    """`<lora:name:te:unet:dyn>` or named `te=`, `unet=`, `dyn=` (unet defaults to te)."""
    positional, named = list(params.positional), dict(params.named)
    if not positional:
        raise ValueError("<lora:...> needs a name")
    name = str(positional[0])
    try:
        te = float(positional[1]) if len(positional) > 1 else 1.0
        te = float(named.get("te", te))
        unet = float(positional[2]) if len(positional) > 2 else te
        unet = float(named.get("unet", unet))
        dyn = int(positional[3]) if len(positional) > 3 else None
        dyn = int(named["dyn"]) if "dyn" in named else dyn
    except (TypeError, ValueError):
        raise ValueError(f"<lora:{':'.join(map(str, params.items))}>: weights must be numbers") from None
    return LoraUse(name, te, unet, dyn)
