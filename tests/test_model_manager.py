"""Choosing, switching and freeing checkpoints as a user does: by title/name/hash, with broken files around."""
from __future__ import annotations

import gc
import shutil

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import save_file

from modules import checkpoint_export, model_families
from modules.devices import choose_device
from modules.model_manager import BUILTIN_TITLE, ModelManager
from modules.model_registry import HashCache, ModelRegistry
from modules.options import Options
from modules.processing import ProcessingContext, process_txt2img
from modules.plan import make_plan
from modules.request import GenerationRequest

from tests.tiny_checkpoints import tiny_checkpoint_path


@pytest.fixture
def setup(tmp_path):
    ckpt_dir, vae_dir = tmp_path / "Stable-diffusion", tmp_path / "VAE"
    ckpt_dir.mkdir()
    vae_dir.mkdir()
    shutil.copy(tiny_checkpoint_path("sd1", 0), ckpt_dir / "alpha.safetensors")
    shutil.copy(tiny_checkpoint_path("sd1", 1), ckpt_dir / "beta.safetensors")
    registry = ModelRegistry(ckpt_dir, vae_dir, HashCache(tmp_path / "hashes.json"))
    registry.refresh()
    notices = []
    manager = ModelManager(registry, choose_device("cpu"), on_notice=notices.append)
    return manager, registry, ckpt_dir, vae_dir, notices


def generate(active, tmp_path, seed=7):
    ctx = ProcessingContext(model=active.model, model_ref=active.ref, opts=Options(None).snapshot(),
                            device=torch.device("cpu"), dtype=torch.float32, outputs_dir=tmp_path)
    req = GenerationRequest(prompt="a cat", width=64, height=64, steps=2, seed=seed, sampler_name="Euler",
                            save_images=False)
    result = process_txt2img(make_plan(req), ctx)
    return np.asarray(result.images[0]), result.infotexts[0]


def test_select_by_every_alias(setup, tmp_path):
    manager, registry, *_ = setup
    beta = registry.find_checkpoint("beta.safetensors")
    for query in (beta.title, beta.name, beta.model_name, beta.shorthash, beta.sha256, beta.hash_old):
        manager.ensure("alpha.safetensors")
        active = manager.ensure(query)
        assert active.info == beta, query
    _, text = generate(manager.active, tmp_path)
    assert f"Model hash: {beta.shorthash}, Model: beta" in text


def test_first_checkpoint_is_loaded_by_default_and_unknown_names_are_clear(setup):
    manager, registry, *_ = setup
    assert manager.ensure(None).info.name == "alpha.safetensors"
    with pytest.raises(ValueError, match="not found"):
        manager.ensure("gamma.safetensors")
    assert manager.active.info.name == "alpha.safetensors"


def test_builtin_model_when_folder_is_empty(tmp_path):
    registry = ModelRegistry(tmp_path / "none", tmp_path / "vae", HashCache(tmp_path / "h.json"))
    registry.refresh()
    notices = []
    manager = ModelManager(registry, choose_device("cpu"), on_notice=notices.append)
    active = manager.ensure(None)
    assert active.title == BUILTIN_TITLE and manager.is_builtin
    assert any("random weights" in n and str(tmp_path / "none") in n for n in notices)
    pixels, text = generate(active, tmp_path)
    assert pixels.shape == (64, 64, 3)


def test_truncated_file_fails_clearly_and_previous_model_stays(setup, tmp_path):
    manager, registry, ckpt_dir, *_ = setup
    data = (ckpt_dir / "alpha.safetensors").read_bytes()
    (ckpt_dir / "broken.safetensors").write_bytes(data[: len(data) // 2])
    registry.refresh()
    manager.ensure("beta.safetensors")
    before, _ = generate(manager.active, tmp_path)
    with pytest.raises(model_families.CheckpointError, match="broken.safetensors"):
        manager.ensure("broken.safetensors")
    assert manager.active.info.name == "beta.safetensors"
    after, _ = generate(manager.active, tmp_path)
    assert np.array_equal(before, after)


def test_file_that_fails_after_its_header_brings_the_previous_model_back(setup, tmp_path):
    manager, registry, ckpt_dir, *_ = setup
    # A checkpoint whose header looks right but whose VAE weights are missing: loading fails late.
    from modules.model_loader import read_state_dict
    state = read_state_dict(ckpt_dir / "alpha.safetensors")
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("first_stage_model.")},
              str(ckpt_dir / "novae.safetensors"))
    registry.refresh()
    manager.ensure("beta.safetensors")
    before, _ = generate(manager.active, tmp_path)
    with pytest.raises(ValueError):
        manager.ensure("novae.safetensors")
    assert manager.active is not None and manager.active.info.name == "beta.safetensors"
    after, _ = generate(manager.active, tmp_path)
    assert np.array_equal(before, after)


def test_vae_override_from_file_and_back(setup, tmp_path):
    manager, registry, ckpt_dir, vae_dir, _ = setup
    # beta's VAE saved as an A1111-style VAE file (no first_stage_model. prefix)
    from modules.model_loader import read_state_dict
    state = read_state_dict(ckpt_dir / "beta.safetensors")
    vae_state = {k[len("first_stage_model."):]: v.contiguous() for k, v in state.items()
                 if k.startswith("first_stage_model.")}
    save_file(vae_state, str(vae_dir / "other.vae.safetensors"))
    registry.refresh()
    own, _ = generate(manager.ensure("alpha.safetensors", "Automatic"), tmp_path)
    swapped_active = manager.ensure("alpha.safetensors", "other.vae.safetensors")
    swapped, _ = generate(swapped_active, tmp_path)
    assert not np.array_equal(own, swapped)
    # asking again for what is loaded loads nothing
    assert manager.ensure("alpha.safetensors", "other.vae.safetensors") is swapped_active
    back, _ = generate(manager.ensure("alpha.safetensors", "None"), tmp_path)
    assert np.array_equal(own, back)


def test_ten_switches_do_not_leak_memory(setup):
    manager, *_ = setup
    process = psutil.Process()
    manager.ensure("alpha.safetensors")
    model_bytes = sum(p.numel() * p.element_size() for p in manager.active.model.unet.parameters())
    model_bytes += sum(p.numel() * p.element_size() for p in manager.active.model.vae.parameters())
    model_bytes += sum(p.numel() * p.element_size() for e in manager.active.model.text_encoders
                       for p in e.parameters())
    manager.ensure("beta.safetensors")
    gc.collect()
    unets_before = sum(type(o).__name__ == "UNet2DConditionModel" for o in gc.get_objects())
    baseline = process.memory_info().rss
    for i in range(10):
        manager.ensure("alpha.safetensors" if i % 2 == 0 else "beta.safetensors")
    gc.collect()
    growth = process.memory_info().rss - baseline
    # Keeping every switched-out model would grow by 10 models; allow allocator noise of about two.
    assert growth < 2.5 * model_bytes, (growth, model_bytes)
    # no UNet of a switched-out model is still alive
    assert sum(type(o).__name__ == "UNet2DConditionModel" for o in gc.get_objects()) <= unets_before


def test_automatic_vae_picks_the_one_named_after_the_checkpoint(setup, tmp_path):
    manager, registry, ckpt_dir, vae_dir, _ = setup
    from modules.model_loader import read_state_dict
    state = read_state_dict(ckpt_dir / "beta.safetensors")
    vae_state = {k[len("first_stage_model."):]: v.contiguous() for k, v in state.items()
                 if k.startswith("first_stage_model.")}
    own, _ = generate(manager.ensure("alpha.safetensors", "None"), tmp_path)
    save_file(vae_state, str(ckpt_dir / "alpha.vae.safetensors"))  # beside the checkpoint, A1111-style
    registry.refresh()
    assert [c.name for c in registry.checkpoints] == ["alpha.safetensors", "beta.safetensors"]
    manager.unload()
    automatic, _ = generate(manager.ensure("alpha.safetensors", "Automatic"), tmp_path)
    assert manager.active.model.vae_path.endswith("alpha.vae.safetensors")
    assert not np.array_equal(own, automatic)
