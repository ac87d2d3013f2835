"""txt2img through the real processing path on the tiny SD1 model: samplers, seeds, ENSD, output files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from modules import infotext, samplers
from modules.model_manager import ModelRef
from modules.options import Options
from modules.processing import ProcessingContext, process_txt2img
from modules.plan import make_plan
from modules.request import GenerationRequest
from modules.vae_codec import decode_latents

from tests.tiny_checkpoints import tiny_loaded_model


@pytest.fixture(scope="module")
def model():
    return tiny_loaded_model("sd1")


def run(model, tmp_path, opts_overrides=None, **fields):
    opts = Options(None).snapshot(opts_overrides or {})
    base = dict(prompt="a red cat", negative_prompt="blurry", width=64, height=64, steps=4, seed=1234,
                sampler_name="Euler", cfg_scale=7.0)
    base.update(fields)
    ctx = ProcessingContext(model=model, model_ref=ModelRef("tiny-sd1", "0123456789"), opts=opts,
                            device=torch.device("cpu"), dtype=torch.float32, outputs_dir=tmp_path)
    return process_txt2img(make_plan(GenerationRequest(**base)), ctx)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("sampler", [s.name for s in samplers.SAMPLERS])
def test_every_sampler_runs_and_denoises(model, tmp_path, sampler):
    result = run(model, tmp_path, sampler_name=sampler, steps=3, save_images=False)
    assert len(result.images) == 1
    out = pixels(result.images[0])
    assert out.shape == (64, 64, 3)
    # The sampled image differs from what the untouched starting noise decodes to.
    from modules import rng
    noise = rng.ImageRNG((4, 8, 8), [1234]).first()
    start = decode_latents(model, noise * 1.0)
    start_px = (start[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)
    assert np.abs(out - start_px).mean() > 1.0
    assert f"Sampler: {sampler}," in result.infotexts[0]


def test_same_request_twice_is_bit_identical(model, tmp_path):
    for sampler in ("Euler a", "DPM++ 2M", "DPM++ SDE"):
        a = run(model, tmp_path, sampler_name=sampler, save_images=False)
        b = run(model, tmp_path, sampler_name=sampler, save_images=False)
        assert np.array_equal(pixels(a.images[0]), pixels(b.images[0])), sampler


def test_different_seeds_differ(model, tmp_path):
    a = run(model, tmp_path, seed=1, save_images=False)
    b = run(model, tmp_path, seed=2, save_images=False)
    assert not np.array_equal(pixels(a.images[0]), pixels(b.images[0]))


def test_variation_strength_zero_and_one(model, tmp_path):
    plain = run(model, tmp_path, seed=11, save_images=False)
    other = run(model, tmp_path, seed=22, save_images=False)
    at0 = run(model, tmp_path, seed=11, subseed=22, subseed_strength=0.0, save_images=False)
    at1 = run(model, tmp_path, seed=11, subseed=22, subseed_strength=1.0, save_images=False)
    mid = run(model, tmp_path, seed=11, subseed=22, subseed_strength=0.5, save_images=False)
    assert np.array_equal(pixels(at0.images[0]), pixels(plain.images[0]))
    assert np.array_equal(pixels(at1.images[0]), pixels(other.images[0]))
    assert not np.array_equal(pixels(mid.images[0]), pixels(plain.images[0]))
    assert "Variation seed: 22, Variation seed strength: 0.5" in mid.infotexts[0]


def test_ensd_changes_only_ancestral_samplers(model, tmp_path):
    for sampler, ancestral in (("Euler a", True), ("Euler", False), ("DPM++ 2M", False)):
        a = run(model, tmp_path, sampler_name=sampler, save_images=False)
        b = run(model, tmp_path, {"eta_noise_seed_delta": 31337}, sampler_name=sampler, save_images=False)
        same = np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
        assert same != ancestral, sampler
        assert ("ENSD: 31337" in b.infotexts[0]) == ancestral


def test_batch_seeds_and_saved_files(model, tmp_path):
    result = run(model, tmp_path, seed=100, batch_size=2, n_iter=2)
    assert result.seeds == [100, 101, 102, 103]
    saved = sorted(p for p in (tmp_path / "txt2img-images").rglob("*.png"))
    assert [p.name for p in saved] == ["00000-100.png", "00001-101.png", "00002-102.png", "00003-103.png"]
    # image i of the batch equals a single-image job with seed+i (same noise; batched float math may
    # round a pixel differently, as on any backend)
    single = run(model, tmp_path, seed=102, save_images=False)
    assert np.abs(pixels(single.images[0]) - pixels(result.images[2])).max() <= 2
    other = run(model, tmp_path, seed=103, save_images=False)
    assert np.abs(pixels(other.images[0]) - pixels(result.images[2])).mean() > 5
    # the PNG carries the infotext, which parses back to the request's values
    with Image.open(saved[1]) as im:
        text = im.info["parameters"]
    params = infotext.parse_generation_parameters(text)
    assert params["Prompt"] == "a red cat"
    assert params["Negative prompt"] == "blurry"
    assert params["Seed"] == "101"
    assert params["Steps"] == "4"
    assert params["Size-1"] == "64" and params["Size-2"] == "64"
    assert params["Model hash"] == "0123456789"
    assert result.grid is not None and result.grid_path is not None


def test_legacy_sampler_name_and_schedule(model, tmp_path):
    result = run(model, tmp_path, sampler_name="DPM++ 2M Karras", scheduler="Automatic", save_images=False)
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in result.infotexts[0]


def test_bad_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of 8"):
        GenerationRequest(width=65)
    with pytest.raises(ValueError, match="sampler"):
        samplers.resolve_sampler("No Such Sampler")


def test_interrupt_keeps_partial_batch(model, tmp_path):
    from modules.job_state import JobControl

    control = JobControl()
    calls = []

    opts = Options(None).snapshot({})
    ctx = ProcessingContext(model=model, model_ref=ModelRef("tiny", None), opts=opts, device=torch.device("cpu"),
                            dtype=torch.float32, outputs_dir=tmp_path, control=control)
    original = ctx.progress

    class Watch:
        def __setattr__(self, name, value):
            setattr(original, name, value)
            if name == "sampling_step" and value == 2:
                calls.append(value)
                control.interrupt()

        def __getattr__(self, name):
            return getattr(original, name)

    ctx.progress = Watch()
    req = GenerationRequest(prompt="x", width=64, height=64, steps=10, n_iter=3, seed=5, sampler_name="Euler",
                            save_images=False)
    result = process_txt2img(make_plan(req), ctx)
    assert result.interrupted
    assert len(result.images) == 1  # the first batch stopped at step 2; batches 2 and 3 never ran
    assert calls == [2]


def test_old_prompt_editing_timelines_noted_when_they_differ(model, tmp_path):
    # "[a:b:2]" with old scheduling: 2 >= 1 is a step number in both modes -> same schedule, no field
    same = run(model, tmp_path, {"use_old_scheduling": True}, prompt="[cat:dog:2]", save_images=False)
    assert "Old prompt editing timelines" not in same.infotexts[0]
    # "0.5" is a fraction in both, but "1.0" is step 1 in old mode and all steps in new mode
    differ = run(model, tmp_path, {"use_old_scheduling": True}, prompt="[cat:dog:1.0]", save_images=False)
    assert "Old prompt editing timelines: True" in differ.infotexts[0]
    new_mode = run(model, tmp_path, prompt="[cat:dog:1.0]", save_images=False)
    assert "Old prompt editing timelines" not in new_mode.infotexts[0]


def test_tiling_wraps_convolutions_for_the_job_only(model, tmp_path):
    from modules.processing import circular_padding, process

    plain = run(model, tmp_path, save_images=False)
    opts = Options(None).snapshot({})
    ctx = ProcessingContext(model=model, model_ref=ModelRef("tiny", None), opts=opts, device=torch.device("cpu"),
                            dtype=torch.float32, outputs_dir=tmp_path)
    req = GenerationRequest(prompt="a red cat", negative_prompt="blurry", width=64, height=64, steps=4, seed=1234,
                            sampler_name="Euler", tiling=True, save_images=False)
    tiled = process(make_plan(req), ctx)
    assert "Tiling: True" in tiled.infotexts[0] and "Tiling" not in plain.infotexts[0]
    assert not np.array_equal(pixels(tiled.images[0]), pixels(plain.images[0]))
    convs = [m for m in model.vae.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.padding_mode == "zeros" for m in convs)  # restored after the job
    # Seamless: with wrap-around padding, shifting the latent by one shifts the decoded image by 8 pixels.
    z = torch.randn(1, 4, 8, 8)
    with circular_padding(model, True), torch.no_grad():
        a = model.vae.decode(z).sample
        b = model.vae.decode(torch.roll(z, 1, dims=3)).sample
    assert torch.allclose(torch.roll(a, 8, dims=3), b, atol=1e-4)
