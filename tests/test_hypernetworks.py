"""Hypernetworks (built-in extension): A1111's .pt format, applied to attention keys and values only."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.extension_helpers import builtin_module, generate, make_app

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"  # 32 channels; its context (the prompt) is 64 wide


def a1111_state(dim: int, seed: int) -> dict[str, torch.Tensor]:
    """A module's state dict as A1111 saves it for layer_structure [1, 2, 1], relu, layer norm, dropout 0.3.

    A1111 builds Linear(0), ReLU(1), LayerNorm(2), Dropout(3), Linear(4), LayerNorm(5): no activation after
    the last Linear (activate_output False) and no dropout after it, so the keys are linear.0/2/4/5.
    """
    g = torch.Generator().manual_seed(seed)
    return {
        "linear.0.weight": torch.randn(2 * dim, dim, generator=g) * 0.1, "linear.0.bias": torch.randn(2 * dim, generator=g) * 0.1,
        "linear.2.weight": 1 + torch.randn(2 * dim, generator=g) * 0.1, "linear.2.bias": torch.randn(2 * dim, generator=g) * 0.1,
        "linear.4.weight": torch.randn(dim, 2 * dim, generator=g) * 0.1, "linear.4.bias": torch.randn(dim, generator=g) * 0.1,
        "linear.5.weight": 1 + torch.randn(dim, generator=g) * 0.1, "linear.5.bias": torch.randn(dim, generator=g) * 0.1,
    }


def write_hypernetwork(path, seed: int = 0, dims=(64,)):
    data = {dim: (a1111_state(dim, seed + 2 * i), a1111_state(dim, seed + 2 * i + 1)) for i, dim in enumerate(dims)}
    data.update({"step": 1200, "name": path.stem, "layer_structure": [1, 2, 1], "activation_func": "relu",
                 "is_layer_norm": True, "weight_initialization": "Normal", "sd_checkpoint": "abcd1234",
                 "sd_checkpoint_name": "model", "activate_output": False, "use_dropout": True,
                 "dropout_structure": [0, 0.3, 0], "last_layer_dropout": False, "optional_info": None})
    torch.save(data, path)
    return data


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor, multiplier: float) -> torch.Tensor:
    """The module's math written out: x + LN(W2 · LN(relu(W1 x + b1)) + b2) * multiplier (dropout off)."""
    h = F.linear(x, state["linear.0.weight"], state["linear.0.bias"]).relu()
    h = F.layer_norm(h, h.shape[-1:], state["linear.2.weight"], state["linear.2.bias"])
    h = F.linear(h, state["linear.4.weight"], state["linear.4.bias"])
    h = F.layer_norm(h, h.shape[-1:], state["linear.5.weight"], state["linear.5.bias"])
    return x + h * multiplier


def test_reads_a1111_file_layouts(tmp_path):
    hn = builtin_module("hypernetworks", "hn_model")
    data = write_hypernetwork(tmp_path / "styled.pt", dims=(64, 320))
    network = hn.load_hypernetwork(tmp_path / "styled.pt")
    assert sorted(network.layers) == [64, 320] and network.step == 1200
    x = torch.randn(2, 5, 320)
    k, v = network.apply(x, x, 0.7)
    assert torch.allclose(k, reference_forward(data[320][0], x, 0.7), atol=1e-5)
    assert torch.allclose(v, reference_forward(data[320][1], x, 0.7), atol=1e-5)
    kinds = [type(m).__name__ for m in network.layers[64][0].linear]
    assert kinds == ["Linear", "ReLU", "LayerNorm", "Dropout", "Linear", "LayerNorm"]

    # the earliest format: linear1/linear2, no activation, default layer structure
    old = {"linear1.weight": torch.zeros(128, 64), "linear1.bias": torch.zeros(128),
           "linear2.weight": torch.zeros(64, 128), "linear2.bias": torch.ones(64)}
    torch.save({64: (old, old)}, tmp_path / "old.pt")
    network = hn.load_hypernetwork(tmp_path / "old.pt")
    assert torch.equal(network.apply(torch.zeros(1, 1, 64), torch.zeros(1, 1, 64), 2.0)[0], torch.full((1, 1, 64), 2.0))

    # "1, 2, 1" as text, swish (A1111's name for Hardswish), activation after the output layer too
    assert hn.parse_layer_structure("1, 1.5, 1") == [1.0, 1.5, 1.0]
    module = hn.HypernetworkModule(8, [1, 2, 1], "swish", activate_output=True)
    assert [type(m).__name__ for m in module.linear] == ["Linear", "Hardswish", "Linear", "Hardswish"]
    with pytest.raises(ValueError, match="start and end with 1"):
        hn.parse_layer_structure([2, 1])
    assert hn.parse_dropout_structure([1, 2, 2, 1], True, True) == [0.0, 0.3, 0.3, 0.0]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app = make_app(tmp_path_factory.mktemp("data"))
    folder = app.paths.hypernetwork_dir
    write_hypernetwork(folder / "hn-a.pt", seed=10)
    write_hypernetwork(folder / "hn-b.pt", seed=20)
    torch.save({64: (a1111_state(64, 0), a1111_state(64, 1))}, folder / "None.pt")  # A1111 never lists None.pt
    yield app
    app.queue.shutdown(wait=10)


def record_attention(app):
    """Inputs of to_q / to_k / to_v of one cross-attention, at each call."""
    attn = dict(app.models.active.model.unet.named_modules())[ATTN]
    seen = {"q": [], "k": [], "v": []}
    handles = [getattr(attn, f"to_{name}").register_forward_pre_hook(
        lambda _m, args, name=name: seen[name].append(args[0].detach().clone())) for name in "qkv"]
    return seen, handles


def run_recorded(app, prompt: str, **fields):
    seen, handles = record_attention(app)
    try:
        result = generate(app, prompt=prompt, **fields)
    finally:
        for handle in handles:
            handle.remove()
    return result, seen


def pixels(result):
    return np.asarray(result.images[0])


def test_changes_keys_and_values_only_while_the_tag_is_in_the_prompt(app):
    unet = app.models.active.model.unet
    original_processors = dict(unet.attn_processors)
    plain, seen_plain = run_recorded(app, "a castle")
    tagged, seen_tagged = run_recorded(app, "a castle <hypernet:hn-a:0.8>")
    network = app.hooks.provide("hypernetwork-loader").load(app.paths.hypernetwork_dir / "hn-a.pt")

    # step 0: the query input is untouched, keys and values see the transformed prompt
    context = seen_plain["k"][0]
    assert torch.equal(seen_tagged["q"][0], seen_plain["q"][0])
    assert torch.allclose(seen_tagged["k"][0], network.layers[64][0](context, 0.8), atol=1e-6)
    assert torch.allclose(seen_tagged["v"][0], network.layers[64][1](context, 0.8), atol=1e-6)
    assert not torch.equal(seen_tagged["k"][0], context)
    assert not np.array_equal(pixels(plain), pixels(tagged))

    # the job ended: the UNet has its own processors back, and a prompt without the tag is unchanged
    assert dict(unet.attn_processors) == original_processors
    again = generate(app, prompt="a castle")
    assert np.array_equal(pixels(again), pixels(plain))


def test_multiplier_zero_equals_no_hypernetwork_and_default_is_one(app):
    plain = generate(app, prompt="a tower")
    zero = generate(app, prompt="a tower <hypernet:hn-a:0>")
    one = generate(app, prompt="a tower <hypernet:hn-a:1>")
    default = generate(app, prompt="a tower <hypernet:hn-a>")
    assert np.array_equal(pixels(zero), pixels(plain))
    assert np.array_equal(pixels(default), pixels(one))
    assert not np.array_equal(pixels(one), pixels(plain))


def test_several_hypernetworks_stack_in_order(app):
    _, seen_plain = run_recorded(app, "a bridge")
    _, seen = run_recorded(app, "a bridge <hypernet:hn-a:1> <hypernet:hn-b:0.5>")
    loader = app.hooks.provide("hypernetwork-loader")
    a = loader.load(app.paths.hypernetwork_dir / "hn-a.pt")
    b = loader.load(app.paths.hypernetwork_dir / "hn-b.pt")
    context = seen_plain["k"][0]
    assert torch.allclose(seen["k"][0], b.layers[64][0](a.layers[64][0](context, 1.0), 0.5), atol=1e-6)
    assert torch.allclose(seen["v"][0], b.layers[64][1](a.layers[64][1](context, 1.0), 0.5), atol=1e-6)


def test_listed_for_the_api(app):
    listed = app.api_providers.hypernetworks()
    assert [item["name"] for item in listed] == ["hn-a", "hn-b"]
    assert listed[0]["path"] == str(app.paths.hypernetwork_dir / "hn-a.pt")
