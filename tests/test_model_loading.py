"""Loading users' single-file checkpoints offline, for every family, through tiny models built in code."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modules.checkpoint_export import to_ldm_state_dict, vae_to_ldm
from modules.model_families import FAMILIES, CheckpointError, ModelComponents, detect_family
from modules.model_loader import (
    LoadedModel,
    load_checkpoint,
    load_from_components,
    load_vae,
    read_checkpoint_header,
    read_state_dict,
    with_vae,
)
from modules.tiny_models import build_tiny_components, tiny_configs, write_tiny_checkpoint

EXPECTED_PIPELINES = {
    "sd1": "StableDiffusionPipeline",
    "sd1-inpaint": "StableDiffusionInpaintPipeline",
    "sd2": "StableDiffusionPipeline",
    "sd2-v": "StableDiffusionPipeline",
    "sd2-inpaint": "StableDiffusionInpaintPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sdxl-inpaint": "StableDiffusionXLInpaintPipeline",
}


class TinyCheckpoints:
    """Builds each tiny family's model and checkpoint once per test session."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._cache: dict[str, tuple] = {}

    def get(self, family: str):
        if family not in self._cache:
            components = build_tiny_components(family, seed=0)
            path = write_tiny_checkpoint(family, self.folder / f"tiny-{family}.safetensors", seed=0)
            self._cache[family] = (components, path)
        return self._cache[family]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyCheckpoints:
    return TinyCheckpoints(tmp_path_factory.mktemp("tiny-checkpoints"))


def _plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # transformers 4 wraps CLIPTextModel weights in "text_model.", transformers 5 does not
    return {key.removeprefix("text_model."): value for key, value in module.state_dict().items()}


def assert_same_weights(built: torch.nn.Module, loaded: torch.nn.Module, what: str) -> None:
    expected, actual = _plain_state(built), _plain_state(loaded)
    assert set(expected) == set(actual), f"{what}: parameter names differ: {sorted(set(expected) ^ set(actual))[:5]}"
    different = [key for key in expected if not torch.equal(expected[key], actual[key].to(expected[key].dtype))]
    assert not different, f"{what}: weights differ after the round trip: {different[:5]}"


def assert_model_matches(components, model: LoadedModel) -> None:
    assert_same_weights(components.unet, model.unet, "UNet")
    assert_same_weights(components.vae, model.vae, "VAE")
    assert len(model.text_encoders) == len(components.text_encoders)
    for index, (built, loaded) in enumerate(zip(components.text_encoders, model.text_encoders)):
        assert type(loaded) is type(built)
        assert_same_weights(built, loaded, f"text encoder {index + 1}")


@pytest.mark.parametrize("family", list(EXPECTED_PIPELINES))
def test_every_family_round_trips_through_a_single_file_checkpoint(tiny, family):
    components, path = tiny.get(family)
    shapes, metadata = read_checkpoint_header(path)
    assert detect_family(shapes, metadata=metadata).name == family

    model = load_checkpoint(path)

    assert model.family.name == family
    assert type(model.pipeline).__name__ == EXPECTED_PIPELINES[family]
    assert model.prediction_type == FAMILIES[family].prediction_type
    assert model.scheduler_config["prediction_type"] == model.prediction_type
    assert model.pipeline.scheduler.config.prediction_type == model.prediction_type
    assert model.path == str(path)
    assert_model_matches(components, model)
    assert all(tokenizer.model_max_length == 77 for tokenizer in model.tokenizers)


def test_original_layout_keys_are_the_ones_a1111_files_use(tiny):
    keys = set(read_checkpoint_header(tiny.get("sd2-v")[1])[0])
    # SD 2.x: OpenCLIP with fused attention, the extra last layer SD 2.x skips, and the projection
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in keys  # tiny model: 2 + dropped
    assert "cond_stage_model.model.text_projection" in keys
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in keys
    shapes = read_checkpoint_header(tiny.get("sd1")[1])[0]
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"][2:] == (1, 1)  # 1x1 convolution, as in LDM
    assert "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias" in shapes
    xl = read_checkpoint_header(tiny.get("sdxl")[1])[0]
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in xl
    assert xl["conditioner.embedders.1.model.text_projection"] == (128, 96)  # (width, projection): x @ P
    assert "model.diffusion_model.label_emb.0.0.weight" in xl


def test_tokenizers_pad_like_the_real_ones(tiny):
    sd1 = load_checkpoint(tiny.get("sd1")[1])
    sd2 = load_checkpoint(tiny.get("sd2")[1])
    xl = load_checkpoint(tiny.get("sdxl")[1])
    assert sd1.tokenizers[0]("a cat").input_ids == [49406, 320, 2368, 49407]
    assert sd1.tokenizers[0].pad_token_id == 49407
    assert sd2.tokenizers[0].pad_token_id == 0  # OpenCLIP pads with "!"
    assert [t.pad_token_id for t in xl.tokenizers] == [49407, 0]


def test_tiny_models_are_deterministic_per_seed():
    first = build_tiny_components("sd1", seed=3)
    again = build_tiny_components("sd1", seed=3)
    other = build_tiny_components("sd1", seed=4)
    assert_same_weights(first.unet, again.unet, "UNet")
    assert not torch.equal(first.unet.conv_in.weight, other.unet.conv_in.weight)


def test_ckpt_files_load_through_weights_only_torch_load(tiny, tmp_path):
    components, path = tiny.get("sd1")
    state = read_state_dict(path)
    plain = tmp_path / "plain.ckpt"
    torch.save(state, plain)
    nested = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, nested)

    for file in (plain, nested):
        model = load_checkpoint(file)
        assert model.family.name == "sd1"
        assert_model_matches(components, model)


class _RunsCodeWhenUnpickled:
    """A pickle payload that would create a marker file if anything unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_objects_is_refused_without_running_it(tiny, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": read_state_dict(tiny.get("sd1")[1]), "callbacks": _RunsCodeWhenUnpickled(marker)}, evil)

    with pytest.raises(CheckpointError, match=r"evil\.ckpt contains Python objects .*safetensors"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError, match="will not load it"):
        read_state_dict(evil)
    assert not marker.exists()


@pytest.mark.parametrize(
    "name, cut, message",
    [
        ("half.safetensors", 0.5, "not a valid safetensors file"),
        ("header-only.safetensors", 60, "not a valid safetensors file"),
        ("empty.safetensors", 0, "empty"),
        ("half.ckpt", 0.5, "truncated or damaged"),
        ("empty.ckpt", 0, "empty"),
    ],
)
def test_damaged_files_give_a_checkpoint_error(tiny, tmp_path, name, cut, message):
    source = tiny.get("sd1")[1]
    if name.endswith(".ckpt"):
        whole = tmp_path / "whole.ckpt"
        torch.save(read_state_dict(source), whole)
        data = whole.read_bytes()
    else:
        data = source.read_bytes()
    keep = int(len(data) * cut) if isinstance(cut, float) else cut
    damaged = tmp_path / name
    damaged.write_bytes(data[:keep])

    with pytest.raises(CheckpointError, match=message) as caught:
        load_checkpoint(damaged)
    assert name in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_files_that_are_not_checkpoints_are_explained(tiny, tmp_path):
    vae_only = tmp_path / "some-vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae_to_ldm(tiny.get("sd1")[0].vae, prefix="").items()}, str(vae_only))
    with pytest.raises(CheckpointError, match=r"VAE on its own.*Supported model families: SD 1\.x"):
        load_checkpoint(vae_only)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="unsupported model file type"):
        (tmp_path / "model.gguf").write_bytes(b"GGUF....")
        load_checkpoint(tmp_path / "model.gguf")


def _unlabelled_sd2(components, path: Path) -> Path:
    """An SD 2.x file with no prediction-type metadata, like the files Stability AI published."""
    state = {k: v.contiguous() for k, v in to_ldm_state_dict(components, FAMILIES["sd2"]).items()}
    save_file(state, str(path))
    return path


def test_sd2_prediction_type_comes_from_yaml_key_or_a1111_unet_test(tiny, tmp_path):
    components, _ = tiny.get("sd2")

    plain = _unlabelled_sd2(components, tmp_path / "plain.safetensors")
    assert load_checkpoint(plain).prediction_type == "epsilon"  # random tiny UNet: A1111's test says epsilon

    with_yaml = _unlabelled_sd2(components, tmp_path / "with-yaml.safetensors")
    (tmp_path / "with-yaml.yaml").write_text('model:\n  params:\n    parameterization: "v"\n    linear_start: 0.00085\n')
    model = load_checkpoint(with_yaml)
    assert (model.family.name, model.prediction_type) == ("sd2-v", "v_prediction")
    assert model.pipeline.scheduler.config.prediction_type == "v_prediction"

    keyed = tmp_path / "keyed.safetensors"
    state = read_state_dict(plain)
    state["v_pred"] = torch.tensor([])
    save_file(state, str(keyed))
    assert load_checkpoint(keyed).family.name == "sd2-v"

    # A UNet whose output sits far below its input at t=999 is what A1111's test calls v-prediction.
    shifted = build_tiny_components("sd2", seed=0)
    with torch.no_grad():
        shifted.unet.conv_out.weight.zero_()
        shifted.unet.conv_out.bias.fill_(-3.0)
    tested = _unlabelled_sd2(shifted, tmp_path / "tested.safetensors")
    model = load_checkpoint(tested)
    assert (model.family.name, model.prediction_type) == ("sd2-v", "v_prediction")
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    assert model.unet.config.upcast_attention  # as the SD 2.1 768-v config has it


def test_vae_override_replaces_the_vae_and_can_be_undone(tiny, tmp_path):
    components, path = tiny.get("sd1")
    other = build_tiny_components("sd1", seed=7).vae
    a1111_vae = tmp_path / "other.vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae_to_ldm(other, prefix="").items()}, str(a1111_vae))
    diffusers_vae = tmp_path / "other-diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(diffusers_vae))
    pt_vae = tmp_path / "other.vae.pt"
    torch.save({"state_dict": vae_to_ldm(other, prefix="first_stage_model.")}, pt_vae)

    model = load_checkpoint(path, vae_path=a1111_vae)
    assert model.vae_path == str(a1111_vae)
    assert_same_weights(other, model.vae, "override VAE")
    assert model.pipeline.vae is model.vae
    assert_same_weights(components.unet, model.unet, "UNet")

    restored = with_vae(model, None)
    assert restored.vae_path is None
    assert_same_weights(components.vae, restored.vae, "checkpoint VAE")
    assert restored.pipeline.vae is restored.vae

    for file in (diffusers_vae, pt_vae):
        swapped = with_vae(restored, load_vae(file), file)
        assert_same_weights(other, swapped.vae, f"VAE from {file.name}")
        assert_same_weights(components.vae, restored.vae, "the model it was derived from")


def test_a_diffusers_folder_loads(tiny, tmp_path):
    components, path = tiny.get("sdxl")
    folder = tmp_path / "tiny-sdxl-diffusers"
    load_checkpoint(path).pipeline.save_pretrained(folder)

    model = load_checkpoint(folder)
    assert model.family.name == "sdxl"
    assert type(model.pipeline).__name__ == "StableDiffusionXLPipeline"
    assert_model_matches(components, model)
    assert [t.pad_token_id for t in model.tokenizers] == [49407, 0]


def test_early_sd1_files_without_text_model_prefix_load(tiny, tmp_path):
    # Files saved with old transformers have cond_stage_model.transformer.embeddings.* (A1111 renames them).
    components, path = tiny.get("sd1")
    state = {key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): value
             for key, value in read_state_dict(path).items()}
    old = tmp_path / "early.safetensors"
    save_file(state, str(old))
    model = load_checkpoint(old)
    assert model.family.name == "sd1"
    assert_model_matches(components, model)


def test_sdxl_with_equally_wide_text_encoders_keeps_them_apart(tmp_path):
    # diffusers picks SDXL's encoders by width; when they are equally wide it would load the first one twice
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from modules.checkpoint_export import export_single_file

    configs = tiny_configs(FAMILIES["sdxl"])
    configs["text_encoder_2/config.json"].update(hidden_size=64, intermediate_size=128, num_attention_heads=1)
    configs["unet/config.json"].update(cross_attention_dim=128)
    torch.manual_seed(0)
    components = ModelComponents(
        unet=UNet2DConditionModel.from_config(configs["unet/config.json"]),
        vae=AutoencoderKL.from_config(configs["vae/config.json"]),
        text_encoders=[CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder/config.json"])),
                       CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2/config.json"]))],
    )
    path = export_single_file(components, FAMILIES["sdxl"], tmp_path / "same-width.safetensors")
    assert_model_matches(components, load_checkpoint(path))


def test_half_precision_load(tiny):
    components, path = tiny.get("sd1")
    model = load_checkpoint(path, dtype=torch.float16)
    assert model.unet.conv_in.weight.dtype == torch.float16
    assert torch.equal(model.unet.conv_in.weight, components.unet.conv_in.weight.half())


def test_loading_never_asks_the_hub(tiny, monkeypatch):
    import diffusers.loaders.single_file as single_file
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("the loader tried to reach the Hugging Face hub")

    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse)
    monkeypatch.setattr(single_file, "snapshot_download", refuse)
    for family in ("sd1", "sd2-v", "sdxl-inpaint"):
        assert load_checkpoint(tiny.get(family)[1]).family.name == family


@pytest.mark.parametrize("family", list(EXPECTED_PIPELINES))
def test_models_in_memory_get_their_family_pipeline(tiny, family):
    components = tiny.get(family)[0]
    model = load_from_components(family, components)
    assert type(model.pipeline).__name__ == EXPECTED_PIPELINES[family]
    assert model.pipeline.unet is components.unet and model.vae is components.vae
    assert model.prediction_type == FAMILIES[family].prediction_type
    assert model.path is None


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_embedded_default_model_generates_a_64px_image(tiny, family):
    model = load_from_components(family, tiny.get(family)[0])
    result = model.pipeline(
        "a cat", num_inference_steps=2, height=64, width=64, output_type="np",
        generator=torch.Generator().manual_seed(1),
    )
    image = result.images[0]
    assert image.shape == (64, 64, 3)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
