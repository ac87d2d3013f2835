"""LoRA (built-in extension): kohya/A1111 files, weight deltas through the hook API, bit-exact restore."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modules.extension_runtime import start_job
from modules.extra_networks import ExtraNetworkParams
from modules.model_manager import ModelRef
from modules.model_registry import addnet_hash_safetensors
from modules.processing import ProcessingContext
from modules.request import GenerationRequest
from tests.extension_helpers import FAST, builtin_module, generate, make_app, model_weights
from tests.tiny_checkpoints import tiny_checkpoint_path, tiny_loaded_model

UNET_TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # Linear 64 -> 32
UNET_Q_LDM = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"  # = down_blocks.0...attn1.to_q
TE_Q = "encoder.layers.0.self_attn.q_proj"  # Linear 64 -> 64


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.2


def kohya_lora(rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya-style LoRA for the tiny SD1 model: diffusers-named and LDM-named UNet layers, a 1x1 and a 3x3
    convolution (LoCon), and the text encoder, each with its alpha."""
    def layer(key, out_f, in_f, k=None, s=0):
        down = rand(rank, in_f, *(k or ()), seed=seed + s)
        up = rand(out_f, rank, *((1, 1) if k else ()), seed=seed + s + 100)
        return {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
    state = {}
    state.update(layer("lora_unet_" + UNET_TO_K.replace(".", "_"), 32, 64, s=1))
    state.update(layer(UNET_Q_LDM, 32, 32, s=2))
    state.update(layer("lora_unet_down_blocks_0_attentions_0_proj_in", 32, 32, k=(1, 1), s=3))
    state.update(layer("lora_unet_down_blocks_0_resnets_0_conv1", 32, 32, k=(3, 3), s=4))
    state.update(layer("lora_te_text_model_" + TE_Q.replace(".", "_"), 64, 64, s=5))
    state.update(layer("lora_te_text_model_encoder_layers_1_mlp_fc1", 128, 64, s=6))
    return state


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app = make_app(tmp_path_factory.mktemp("data"))
    folder = app.paths.lora_dir
    save_file(kohya_lora(seed=0), str(folder / "style.safetensors"),
              metadata={"ss_output_name": "fancy-alias", "ss_network_dim": "4", "ss_tag_frequency": '{"a": {"b": 1}}'})
    peft = {k.replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v for k, v in kohya_lora(seed=50).items()}
    save_file(peft, str(folder / "peft-style.safetensors"))
    yield app
    app.queue.shutdown(wait=10)


def modules_of(model):
    return {**{f"unet.{n}": m for n, m in model.unet.named_modules()},
            **{f"te0.{n}": m for n, m in model.text_encoders[0].named_modules()}}


def session_for(app, prompt: str):
    model = app.models.active.model
    ctx = ProcessingContext(model=model, model_ref=ModelRef("tiny", None), opts=app.opts.snapshot(),
                            device=torch.device("cpu"), dtype=torch.float32, outputs_dir=app.paths.outputs_dir,
                            hooks=app.hooks)
    return start_job(app.extensions.hooks, app.extensions.scripts, GenerationRequest(prompt=prompt, **FAST), ctx)


def test_weights_get_up_down_alpha_delta_and_come_back_bit_identical(app):
    model = app.models.active.model
    before = model_weights(model)
    mods = modules_of(model)
    lora = kohya_lora(seed=0)
    with app.models.lock:
        session = session_for(app, "a cat <lora:style:0.5>")
        with session:
            setup = session.begin_batch(0, ["a cat <lora:style:0.5>"], [""], [1], [1])
            assert setup.weights_changed
            key = "lora_unet_" + UNET_TO_K.replace(".", "_")
            up, down = lora[f"{key}.lora_up.weight"], lora[f"{key}.lora_down.weight"]
            expected = before[f"unet.{UNET_TO_K}.weight"] + up @ down * (2.0 / 4) * 0.5
            assert torch.allclose(mods[f"unet.{UNET_TO_K}"].weight, expected, atol=1e-6)
            # LDM-named key, 1x1 and 3x3 convolutions, text encoder: all changed
            for name in ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                         "unet.down_blocks.0.attentions.0.proj_in", "unet.down_blocks.0.resnets.0.conv1",
                         f"te0.{TE_Q}", "te0.encoder.layers.1.mlp.fc1"):
                assert not torch.equal(mods[name].weight, before[f"{name}.weight"]), name
            conv = mods["unet.down_blocks.0.resnets.0.conv1"].weight
            ckey = "lora_unet_down_blocks_0_resnets_0_conv1"
            conv_delta = (lora[f"{ckey}.lora_up.weight"].flatten(1) @ lora[f"{ckey}.lora_down.weight"].flatten(1))
            assert torch.allclose(conv - before["unet.down_blocks.0.resnets.0.conv1.weight"],
                                  conv_delta.reshape(conv.shape) * 0.25, atol=1e-6)
            # the same networks in the next batch: nothing is recomputed
            assert not session.begin_batch(1, ["a cat <lora:style:0.5>"], [""], [2], [2]).weights_changed
    after = model_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_generation_with_lora_changes_the_image_and_leaves_no_trace(app):
    model = app.models.active.model
    before = model_weights(model)
    plain = generate(app, prompt="a cat")
    styled = generate(app, prompt="a cat <lora:style:1>")
    again = generate(app, prompt="a cat")
    assert not np.array_equal(np.asarray(styled.images[0]), np.asarray(plain.images[0]))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(plain.images[0]))
    after = model_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    digest = addnet_hash_safetensors(app.paths.lora_dir / "style.safetensors")
    assert f"Lora hashes: \"style: {digest[:12]}\"" in styled.infotexts[0]
    assert "<lora:style:1>" in styled.infotexts[0]  # the prompt keeps the tag


def test_text_encoder_and_unet_multipliers(app):
    model = app.models.active.model
    before = model_weights(model)
    mods = modules_of(model)

    def changed(prompt):
        with app.models.lock:
            session = session_for(app, prompt)
            with session:
                session.begin_batch(0, [prompt], [""], [1], [1])
                return ({n for n in (f"te0.{TE_Q}",) if not torch.equal(mods[n].weight, before[f"{n}.weight"])}
                        | {n for n in (f"unet.{UNET_TO_K}",) if not torch.equal(mods[n].weight, before[f"{n}.weight"])})

    assert changed("<lora:style:0:1>") == {f"unet.{UNET_TO_K}"}
    assert changed("<lora:style:1:0>") == {f"te0.{TE_Q}"}
    assert changed("<lora:style:te=0:unet=1>") == {f"unet.{UNET_TO_K}"}
    assert changed("<lora:style:0.7>") == {f"te0.{TE_Q}", f"unet.{UNET_TO_K}"}  # unet follows te when not given


def test_alias_peft_keys_and_api_listing(app):
    by_alias = generate(app, prompt="a dog <lora:fancy-alias:1>")
    by_name = generate(app, prompt="a dog <lora:style:1>")
    assert np.array_equal(np.asarray(by_alias.images[0]), np.asarray(by_name.images[0]))
    assert 'Lora hashes: "fancy-alias: ' in by_alias.infotexts[0]
    peft = generate(app, prompt="a dog <lora:peft-style:1>")
    assert not np.array_equal(np.asarray(peft.images[0]), np.asarray(by_name.images[0]))
    listed = {item["name"]: item for item in app.api_providers.loras()}
    assert set(listed) == {"style", "peft-style"}
    assert listed["style"]["alias"] == "fancy-alias"
    assert listed["style"]["path"] == str(app.paths.lora_dir / "style.safetensors")
    assert listed["style"]["metadata"]["ss_tag_frequency"] == {"a": {"b": 1}}  # JSON values decoded, as A1111


def test_lora_params_follow_a1111():
    lora = builtin_module("lora", "lora_model")
    use = lora.parse_lora_params(ExtraNetworkParams(["x", "0.5"]))
    assert (use.name, use.te, use.unet, use.dyn) == ("x", 0.5, 0.5, None)
    use = lora.parse_lora_params(ExtraNetworkParams(["x", "0.5", "0.25", "8"]))
    assert (use.te, use.unet, use.dyn) == (0.5, 0.25, 8)
    use = lora.parse_lora_params(ExtraNetworkParams(["x", "unet=0.3", "dyn=2"]))
    assert (use.te, use.unet, use.dyn) == (1.0, 0.3, 2)
    with pytest.raises(ValueError, match="numbers"):
        lora.parse_lora_params(ExtraNetworkParams(["x", "heavy"]))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_ldm_layer_names_reach_the_same_modules_as_the_checkpoint(family):
    """Every Linear/Conv weight of the LDM single-file checkpoint has a LoRA name that finds a module of that size."""
    lora = builtin_module("lora", "lora_model")
    model = tiny_loaded_model(family)
    key_map = lora.lora_key_map(model)
    prefix = "model.diffusion_model."
    with safe_open(str(tiny_checkpoint_path(family)), "pt") as f:
        shapes = {k[len(prefix):]: f.get_slice(k).get_shape() for k in f.keys() if k.startswith(prefix)}
    checked = 0
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) not in (2, 4):
            continue
        target = key_map.get("lora_unet_" + key[: -len(".weight")].replace(".", "_"))
        assert target is not None, key
        assert target.module.weight.numel() == int(np.prod(shape)), key
        checked += 1
    assert checked > 20
    if family == "sdxl":
        assert key_map["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"].module is \
            dict(model.text_encoders[0].named_modules())["encoder.layers.0.self_attn.q_proj"]
        te2 = dict(model.text_encoders[1].named_modules())["text_model.encoder.layers.0.self_attn.q_proj"]
        assert key_map["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"].module is te2
