"""Device and precision choice (CUDA fp16 by default, MPS, CPU fp32)."""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp16", "bf16", "fp32")


@dataclass(frozen=True)
class DeviceConfig:
    device: torch.device
    dtype: torch.dtype  # weights and activations of UNet and text encoders
    vae_dtype: torch.dtype

    @property
    def label(self) -> str:
        name = str(self.device)
        if self.device.type == "cuda":
            name += f" ({torch.cuda.get_device_name(self.device)})"
        return f"{name}, {str(self.dtype).replace('torch.', '')}"


def choose_device(requested: str | None = None, precision: str = "auto", no_half: bool = False) -> DeviceConfig:
    """Pick the device and dtypes from the flags `--device`, `--precision` and `--no-half`."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {requested} was asked for, but this torch build sees no CUDA GPU")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {requested} was asked for, but MPS is not available")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")

    if device.type == "cpu" or no_half or precision == "fp32":
        dtype = torch.float32
    elif precision == "bf16":
        dtype = torch.bfloat16
    else:
        dtype = torch.float16
    return DeviceConfig(device=device, dtype=dtype, vae_dtype=dtype)


def torch_gc(device: torch.device | None = None) -> None:
    """Give freed memory back: Python objects first, then the CUDA caching allocator."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
    if device is not None and device.type == "mps":
        torch.mps.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
