"""Device/precision choice, the float32 VAE retry, and the test suite's own network guard."""
from __future__ import annotations

import logging
import socket

import pytest
import torch

from modules.devices import choose_device
from modules.vae_codec import decode_latents

from tests.tiny_checkpoints import tiny_loaded_model


def test_cpu_is_float32_whatever_the_precision_flag():
    for precision in ("auto", "fp16", "bf16", "fp32"):
        assert choose_device("cpu", precision).dtype == torch.float32
    with pytest.raises(ValueError, match="--precision"):
        choose_device("cpu", "fp8")


def test_missing_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA"):
        choose_device("cuda")


def test_nan_vae_decode_is_retried_in_float32_and_logged():
    model = tiny_loaded_model("sd1")
    model.vae.to(torch.bfloat16)

    def poison(module, inputs, output):
        # stands in for the fp16 overflow real VAEs hit: NaNs unless running in float32
        if output.dtype != torch.float32:
            return output * float("nan")
        return output

    handle = model.vae.decoder.register_forward_hook(poison)
    warnings = []
    try:
        images = decode_latents(model, torch.randn(1, 4, 8, 8), warn=warnings.append)
    finally:
        handle.remove()
    assert torch.isfinite(images).all()
    assert warnings and "float32" in warnings[0]
    assert model.vae.dtype == torch.bfloat16  # back to the configured precision afterwards


def test_guard_blocks_non_loopback_connections(network_guard_error):
    s = socket.socket()
    try:
        with pytest.raises(network_guard_error):
            s.connect(("93.184.216.34", 80))
        with pytest.raises(network_guard_error):
            socket.getaddrinfo("example.com", 443)
    finally:
        s.close()


def test_guard_allows_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.socket()
    try:
        client.connect(server.getsockname())
    finally:
        client.close()
        server.close()
