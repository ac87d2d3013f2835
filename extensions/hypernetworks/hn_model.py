"""A1111 hypernetworks: the `.pt` format and the small networks that transform attention keys and values.

A file is a dict with int keys (context widths such as 768, 320, 640, 1280) mapping to a pair of state
dicts (the module for keys, the module for values), plus `layer_structure` ("1, 2, 1" as [1, 2, 1]),
`activation_func`, `is_layer_norm`, `use_dropout`, `dropout_structure`, `last_layer_dropout`,
`activate_output`, `weight_initialization`, `step`, `name`, `sd_checkpoint`, `sd_checkpoint_name`.
Each module is `x + layers(x) * multiplier`, where the layers follow `layer_structure`: for each step
i a Linear(width*a_i -> width*a_{i+1}), then the activation (not after the last Linear unless
`activate_output`), then LayerNorm (if `is_layer_norm`), then Dropout where `dropout_structure[i+1] > 0`.
The order of those layers decides the state-dict keys (`linear.0.weight`, ...), so it is kept exactly.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ACTIVATIONS: dict[str, type] = {
    "linear": torch.nn.Identity,
    "relu": torch.nn.ReLU,
    "leakyrelu": torch.nn.LeakyReLU,
    "elu": torch.nn.ELU,
    "swish": torch.nn.Hardswish,
    "tanh": torch.nn.Tanh,
    "sigmoid": torch.nn.Sigmoid,
}
# A1111 also accepts every activation class of torch by its lowercased name (without overriding the above).
for _name, _cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass):
    if _cls.__module__ == "torch.nn.modules.activation":
        ACTIVATIONS.setdefault(_name.lower(), _cls)


def parse_layer_structure(value: Any) -> list[float]:
    """"1, 2, 1" or [1, 2, 1] -> [1.0, 2.0, 1.0]; must start and end with 1."""
    if value is None:
        value = [1, 2, 1]
    if isinstance(value, str):
        value = [item.strip() for item in value.split(",") if item.strip()]
    try:
        structure = [float(item) for item in value]
    except (TypeError, ValueError):
        raise ValueError(f"Hypernetwork layer structure {value!r} must be numbers such as \"1, 2, 1\"") from None
    if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1:
        raise ValueError(f"Hypernetwork layer structure {value!r} must start and end with 1")
    return structure


def parse_dropout_structure(layer_structure: list[float], use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """A1111's default dropout per layer: 0.3 after the inner layers, optionally after the last hidden one."""
    if not use_dropout:
        return [0.0] * len(layer_structure)
    values = [0.0] + [0.3] * (len(layer_structure) - 3)
    values.append(0.3 if last_layer_dropout else 0.0)
    values.append(0.0)
    return values


class HypernetworkModule(torch.nn.Module):
    """`x + layers(x) * multiplier` for one context width."""

    def __init__(self, dim: int, layer_structure: list[float], activation_func: str | None = None,
                 add_layer_norm: bool = False, activate_output: bool = False,
                 dropout_structure: list[float] | None = None):
        super().__init__()
        layers: list[torch.nn.Module] = []
        last = len(layer_structure) - 2
        for i in range(len(layer_structure) - 1):
            layers.append(torch.nn.Linear(int(dim * layer_structure[i]), int(dim * layer_structure[i + 1])))
            if activation_func not in (None, "linear") and (i < last or activate_output):
                if activation_func not in ACTIVATIONS:
                    raise ValueError(f"hypernetwork uses an unsupported activation function: {activation_func}")
                layers.append(ACTIVATIONS[activation_func]())
            if add_layer_norm:
                layers.append(torch.nn.LayerNorm(int(dim * layer_structure[i + 1])))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                if not 0 < dropout_structure[i + 1] < 1:
                    raise ValueError("Hypernetwork dropout must be 0 or between 0 and 1")
                layers.append(torch.nn.Dropout(p=dropout_structure[i + 1]))
        self.linear = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        return x + self.linear(x) * multiplier


_OLD_KEYS = {"linear1.bias": "linear.0.bias", "linear1.weight": "linear.0.weight",
             "linear2.bias": "linear.1.bias", "linear2.weight": "linear.1.weight"}


def _state_dict(raw: Any) -> dict[str, torch.Tensor]:
    state = {_OLD_KEYS.get(k, k): v for k, v in dict(raw).items()}  # the earliest files used linear1/linear2
    return state


@dataclass
class Hypernetwork:
    name: str
    path: Path | None
    layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]]
    layer_structure: list[float]
    activation_func: str | None = None
    add_layer_norm: bool = False
    activate_output: bool = True
    dropout_structure: list[float] = field(default_factory=list)
    step: int = 0
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    mtime_ns: int = 0

    def to(self, device: torch.device) -> "Hypernetwork":
        for pair in self.layers.values():
            for module in pair:
                module.to(device)
        return self

    def apply(self, context_k: torch.Tensor, context_v: torch.Tensor, multiplier: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """A1111's `apply_single_hypernetwork`: transform k and v contexts of a matching width, in float32."""
        pair = self.layers.get(int(context_k.shape[-1]))
        if pair is None:
            return context_k, context_v
        module_k, module_v = pair
        device = context_k.device
        if next(module_k.parameters()).device != device:
            self.to(device)
        context_k = module_k(context_k.float(), multiplier).to(context_k.dtype)
        context_v = module_v(context_v.float(), multiplier).to(context_v.dtype)
        return context_k, context_v


def build_hypernetwork(data: dict, name: str, path: Path | None = None) -> Hypernetwork:
    """A Hypernetwork from a loaded A1111 dict."""
    layer_structure = parse_layer_structure(data.get("layer_structure", [1, 2, 1]))
    activation = data.get("activation_func")
    add_layer_norm = bool(data.get("is_layer_norm", False))
    dropout_structure = data.get("dropout_structure")
    use_dropout = (True if dropout_structure is not None and any(dropout_structure)
                   else bool(data.get("use_dropout", False)))
    activate_output = bool(data.get("activate_output", True))
    if dropout_structure is None:
        dropout_structure = parse_dropout_structure(layer_structure, use_dropout,
                                                    bool(data.get("last_layer_dropout", False)))
    dropout_structure = [float(v) for v in dropout_structure]
    if len(dropout_structure) != len(layer_structure):
        raise ValueError(f"{name}: dropout structure {dropout_structure} does not match layer structure "
                         f"{layer_structure}")
    layers = {}
    for size, pair in data.items():
        if not isinstance(size, int) or isinstance(size, bool):
            continue
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"{name}: layers for width {size} must be a pair of state dicts")
        modules = []
        for raw in pair:
            module = HypernetworkModule(size, layer_structure, activation, add_layer_norm, activate_output,
                                        dropout_structure)
            module.load_state_dict(_state_dict(raw))
            module.eval()
            module.requires_grad_(False)
            modules.append(module)
        layers[size] = (modules[0], modules[1])
    if not layers:
        raise ValueError(f"{name} has no layers (no integer keys such as 768)")
    step = data.get("step")
    return Hypernetwork(name=name, path=path, layers=layers, layer_structure=layer_structure,
                        activation_func=activation, add_layer_norm=add_layer_norm, activate_output=activate_output,
                        dropout_structure=dropout_structure, step=int(step) if isinstance(step, int) else 0,
                        sd_checkpoint=data.get("sd_checkpoint") if isinstance(data.get("sd_checkpoint"), str) else None,
                        sd_checkpoint_name=(data.get("sd_checkpoint_name")
                                            if isinstance(data.get("sd_checkpoint_name"), str) else None))


def load_hypernetwork(path: Path) -> Hypernetwork:
    """Read a `.pt` hypernetwork with `torch.load(weights_only=True)` (no code runs)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path.name} cannot be read as a hypernetwork (only tensors and plain data are "
                         f"loaded): {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a hypernetwork file (it holds no dict)")
    network = build_hypernetwork(data, path.stem, path)
    network.mtime_ns = path.stat().st_mtime_ns
    return network


def list_hypernetworks(folder: Path) -> dict[str, Path]:
    """name (file stem) -> path for every `.pt` under the folder; A1111 ignores a file named None.pt."""
    found: list[Path] = []
    if folder.is_dir():
        for root, dirs, files in os.walk(folder, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [Path(root) / f for f in files if f.lower().endswith(".pt") and not f.startswith(".")]
    out = {}
    for path in sorted(found, key=lambda p: str(p).lower()):
        if path.stem != "None":
            out[path.stem] = path
    return out
