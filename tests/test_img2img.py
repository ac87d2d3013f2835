"""img2img, inpainting and hires fix through the real processing path on tiny models (SD1, SD1 inpainting)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from modules import infotext, masking, rng, samplers
from modules.conditioning import PromptEncoder
from modules.image_conditioning import prepare_img2img
from modules.model_manager import ModelRef
from modules.options import Options
from modules.processing import ProcessingContext, process_img2img, process_txt2img
from modules.plan import make_plan
from modules.request import GenerationRequest
from modules.sampling import StepPlan, img2img_plan
from modules.vae_codec import decode_latents, encode_pixels, pil_to_tensor, to_pil

from tests.tiny_checkpoints import tiny_loaded_model

W = H = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors gain nothing from more threads, and on a shared CPU spinning threads slow everything down.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd1():
    return tiny_loaded_model("sd1")


@pytest.fixture(scope="module")
def inpaint_model():
    return tiny_loaded_model("sd1-inpaint")


def context(model, tmp_path, opts=None) -> ProcessingContext:
    return ProcessingContext(model=model, model_ref=ModelRef("tiny", "0123456789"),
                             opts=Options(None).snapshot(opts or {}), device=torch.device("cpu"), dtype=torch.float32,
                             outputs_dir=tmp_path)


def request(**fields) -> GenerationRequest:
    base = dict(kind="img2img", prompt="a red cat", width=W, height=H, steps=4, seed=1234, sampler_name="Euler",
                save_images=False)
    base.update(fields)
    return GenerationRequest(**base)


def picture(width=W, height=H, seed=0) -> Image.Image:
    """A smooth colour picture with some texture (easy to tell apart from the tiny model's output)."""
    yy, xx = np.mgrid[0:height, 0:width]
    noise = np.random.RandomState(seed).randint(0, 40, (height, width, 3))
    rgb = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], -1)
    return Image.fromarray(np.clip(rgb * 0.8 + noise, 0, 255).astype(np.uint8))


def rect_mask(size, box) -> Image.Image:
    """White rectangle; `box` is (x1, y1, x2, y2) with x2/y2 exclusive, like a crop box."""
    mask = Image.new("L", size)
    ImageDraw.Draw(mask).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
    return mask


def px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


class UNetInputs:
    """Records what the UNet is called with (sample and text context), call by call."""

    def __init__(self, model):
        self.samples: list[torch.Tensor] = []
        self.contexts: list[torch.Tensor] = []
        self.handle = model.unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module, args, kwargs):
        self.samples.append(args[0].detach().clone())
        self.contexts.append(kwargs["encoder_hidden_states"].detach().clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# -- steps ----------------------------------------------------------------------------------------

def test_step_counts_follow_a1111():
    # t_enc = int(min(d, 0.999) * steps); A1111 runs t_enc + 1 steps of a `steps`-step schedule
    assert img2img_plan(20, 0.75, fix_steps=False) == StepPlan(total=20, run=16)
    assert img2img_plan(20, 1.0, fix_steps=False) == StepPlan(total=20, run=20)
    assert img2img_plan(20, 0.01, fix_steps=False) == StepPlan(total=20, run=1)
    # "do exactly the amount of steps the slider specifies" (and the hires pass): int(steps / d) set, steps run
    assert img2img_plan(20, 0.75, fix_steps=True) == StepPlan(total=26, run=20)
    assert img2img_plan(5, 0.5, fix_steps=True) == StepPlan(total=10, run=5)
    assert img2img_plan(20, 0.0, fix_steps=False).run == 0
    assert img2img_plan(20, 0.0, fix_steps=True).run == 0


def test_img2img_runs_strength_times_steps(sd1, tmp_path):
    with UNetInputs(sd1) as seen:
        process_img2img(make_plan(request(init_images=[picture()], steps=10, denoising_strength=0.5)), context(sd1, tmp_path))
    assert len(seen.samples) == 6  # int(0.5 * 10) + 1
    with UNetInputs(sd1) as seen:
        process_img2img(make_plan(request(init_images=[picture()], steps=10, denoising_strength=0.5)),
                        context(sd1, tmp_path, {"img2img_fix_steps": True}))
    assert len(seen.samples) == 10


def test_every_sampler_runs_img2img(sd1, tmp_path):
    init = picture()
    for sampler in samplers.SAMPLERS:
        with UNetInputs(sd1) as seen:
            result = process_img2img(make_plan(request(init_images=[init], sampler_name=sampler.name, denoising_strength=0.5)),
                                     context(sd1, tmp_path))
        run = img2img_plan(4, 0.5, fix_steps=False).run  # 3 steps
        # diffusers' second-order schedulers call the model twice per step but once on the last; PLMS once more
        assert len(seen.samples) == samplers.denoiser_calls(sampler, run), sampler.name
        out = px(result.images[0])
        assert out.shape == (H, W, 3) and np.abs(out - px(init)).mean() > 1, sampler.name


@pytest.mark.parametrize("sampler_name", ["Euler", "DPM++ 2M", "DDIM"])
def test_init_latent_is_noised_to_where_the_schedule_starts(sd1, tmp_path, sampler_name):
    """A1111: `xi = init + noise * sigmas[steps - t_enc - 1]` (timestep samplers: the same in alpha form)."""
    req = request(init_images=[picture()], sampler_name=sampler_name, steps=10, denoising_strength=0.4, cfg_scale=1)
    ctx = context(sd1, tmp_path)
    init = prepare_img2img(req, ctx, [req.seed]).init_latent
    noise = rng.ImageRNG(init.shape[1:], [req.seed]).first()
    with UNetInputs(sd1) as seen:
        process_img2img(make_plan(req), ctx)
    sampler, schedule = samplers.resolve_sampler(sampler_name)
    scheduler = samplers.build_scheduler(sampler, schedule, sd1.scheduler_config, seeds=[0])
    scheduler.set_timesteps(10)
    t_start = 10 - 5  # int(0.4 * 10) + 1 = 5 steps run
    if hasattr(scheduler, "sigmas"):  # x = init + noise * sigma; the model sees it scaled by 1 / sqrt(sigma^2 + 1)
        sigma = float(scheduler.sigmas[t_start])
        expected = (init + noise * sigma) / (sigma ** 2 + 1) ** 0.5
    else:  # variance preserving: x = sqrt(a) * init + sqrt(1 - a) * noise at the first timestep that runs
        t = int(scheduler.timesteps[t_start])
        alpha = float(scheduler.alphas_cumprod[t])
        expected = alpha ** 0.5 * init + (1 - alpha) ** 0.5 * noise
    assert torch.allclose(seen.samples[0], expected, atol=1e-4)


# -- denoising 0 ------------------------------------------------------------------------------------

def test_denoising_zero_returns_the_init_image_exactly(sd1, tmp_path):
    init = picture()
    with UNetInputs(sd1) as seen:
        result = process_img2img(make_plan(request(init_images=[init], denoising_strength=0.0)), context(sd1, tmp_path))
    assert not seen.samples  # no step runs
    assert np.array_equal(px(result.images[0]), px(init))
    # with a mask, too: nothing is repainted (where the blurred mask is partial, compositing the original over
    # itself in premultiplied alpha may round by a few levels, as in A1111)
    mask = rect_mask((W, H), (8, 8, 40, 40))
    masked = process_img2img(make_plan(request(init_images=[init], denoising_strength=0.0, mask=mask)), context(sd1, tmp_path))
    blurred = np.asarray(masking.blur_mask(mask, 4, 4))
    solid = (blurred == 0) | (blurred == 255)
    assert np.array_equal(px(masked.images[0])[solid], px(init)[solid])
    assert np.abs(px(masked.images[0]) - px(init)).max() <= 3


def test_denoising_zero_with_latent_upscale_is_the_vae_round_trip(sd1, tmp_path):
    init = picture(96, 48)
    req = request(init_images=[init], denoising_strength=0.0, resize_mode=3)
    ctx = context(sd1, tmp_path)
    with UNetInputs(sd1) as seen:
        result = process_img2img(make_plan(req), ctx)
    assert not seen.samples
    # resize mode 3 scales the latent, so the only way back to pixels is the VAE: decode(scaled encode(init))
    latent = F.interpolate(encode_pixels(sd1, pil_to_tensor([init])), size=(H // 8, W // 8), mode="bilinear")
    assert np.array_equal(px(result.images[0]), px(to_pil(decode_latents(sd1, latent))[0]))


# -- inpainting: the pixels outside the mask --------------------------------------------------------

@pytest.mark.parametrize("only_masked", [False, True])
@pytest.mark.parametrize("fill", [0, 1])
def test_pixels_outside_the_blurred_mask_are_the_original(sd1, tmp_path, only_masked, fill):
    size = (96, 64) if only_masked else (W, H)  # only masked keeps the original size
    init = picture(*size)
    mask = rect_mask(size, (40, 20, 64, 40))
    result = process_img2img(make_plan(request(init_images=[init], mask=mask, inpaint_full_res=only_masked, inpainting_fill=fill,
                                     inpaint_full_res_padding=8, denoising_strength=0.9)), context(sd1, tmp_path))
    out, orig = px(result.images[0]), px(init)
    assert out.shape == orig.shape
    blurred = np.asarray(masking.blur_mask(mask, 4, 4))
    assert np.array_equal(out[blurred == 0], orig[blurred == 0])
    assert np.abs(out[blurred > 200] - orig[blurred > 200]).mean() > 5  # the masked part was repainted


def test_inverted_mask_repaints_the_outside(sd1, tmp_path):
    init = picture()
    mask = rect_mask((W, H), (16, 16, 48, 48))
    result = process_img2img(make_plan(request(init_images=[init], mask=mask, inpainting_mask_invert=1, denoising_strength=0.9)),
                             context(sd1, tmp_path))
    out, orig = px(result.images[0]), px(init)
    kept = np.asarray(masking.blur_mask(mask, 4, 4)) == 255  # inverted and blurred: 0 well inside the rectangle
    assert np.array_equal(out[kept], orig[kept])
    assert np.abs(out[:4] - orig[:4]).mean() > 5
    assert "Mask mode: Inpaint not masked" in result.infotexts[0]


# -- only masked: crop geometry -----------------------------------------------------------------------

def test_crop_region_by_hand():
    mask = rect_mask((128, 128), (100, 10, 120, 30))
    assert masking.get_crop_region(mask, 0) == (100, 10, 120, 30)
    assert masking.get_crop_region(mask, 4) == (96, 6, 124, 34)
    # 28x28 box to 2:1: 56 wide, 14 more on each side; x2 = 138 > 128, so slide 10 back
    assert masking.expand_crop_region((96, 6, 124, 34), 64, 32, 128, 128) == (72, 6, 128, 34)
    # 40x10 box to 1:2: 80 high, 35 above and below
    assert masking.expand_crop_region((10, 60, 50, 70), 32, 64, 128, 128) == (10, 25, 50, 105)
    # the padding stops at the image edge
    assert masking.get_crop_region(rect_mask((128, 128), (0, 0, 10, 10)), 32) == (0, 0, 42, 42)
    # growing past the top edge slides down
    assert masking.expand_crop_region((0, 0, 128, 8), 64, 64, 128, 128) == (0, 0, 128, 128)
    assert masking.get_crop_region(Image.new("L", (32, 32)), 8) is None


def test_only_masked_is_pasted_back_at_the_crop_box():
    init = picture(128, 128)
    mask = rect_mask((128, 128), (100, 10, 120, 30))
    settings = masking.InpaintSettings(mask_blur_x=0, mask_blur_y=0, full_res=True, padding=4)
    prepared = masking.prepare_init_images([init], 64, 32, mask=mask, inpaint=settings)
    assert prepared.crop_region == (72, 6, 128, 34)
    assert prepared.paste_to == (72, 6, 56, 28)
    assert prepared.images[0].size == (64, 32)  # the crop, processed at width x height
    # the processed image is the crop scaled up
    expected = masking.resize_image(2, init.crop((72, 6, 128, 34)), 64, 32)
    assert np.array_equal(px(prepared.images[0]), px(expected))
    assert prepared.infotext == {"Inpaint area": "Only masked", "Masked area padding": 4}

    # a "generated" image: red top half, blue bottom half
    generated = np.zeros((32, 64, 3), np.uint8)
    generated[:16] = (255, 0, 0)
    generated[16:] = (0, 0, 255)
    out = px(masking.apply_overlay(Image.fromarray(generated), prepared.paste_to, prepared.overlays[0]))
    inside = np.asarray(mask) == 255
    assert np.array_equal(out[~inside], px(init)[~inside])
    # box rows 6..33 hold the 28 rows of the scaled result: rows 10..16 red, rows 24..29 blue
    assert (out[10:17, 100:120] == (255, 0, 0)).all()
    assert (out[24:30, 100:120] == (0, 0, 255)).all()


# -- masked content ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_each_masked_content_mode_makes_its_starting_latent(sd1, tmp_path, fill):
    init = picture()
    mask = rect_mask((W, H), (16, 16, 48, 48))
    req = request(init_images=[init], mask=mask, mask_blur=0, inpainting_fill=fill, seed=77)
    prepared = prepare_img2img(req, context(sd1, tmp_path), [77])
    latent = prepared.init_latent
    original = encode_pixels(sd1, pil_to_tensor([init]))
    # every mode but "original" encodes the filled image (A1111 fills the pixels for latent noise/nothing too)
    filled_latent = encode_pixels(sd1, pil_to_tensor(prepared.prepared.images))
    paint = prepared.latent_mask.nmask.bool().expand_as(latent)
    assert paint[0, 0, 2:6, 2:6].all() and paint.sum() == 4 * 4 * 4  # the 32x32 square is 4x4 latent cells
    if fill == 1:  # original: the image as it is
        assert torch.equal(latent, original)
    elif fill == 0:  # fill: the hole painted with the surrounding colours before encoding
        filled = px(prepared.prepared.images[0])
        inside = np.asarray(mask) == 255
        assert np.array_equal(filled[~inside], px(init)[~inside])
        def roughness(a):  # mean step between neighbouring pixels inside the square
            return np.abs(np.diff(a[16:48, 16:48], axis=1)).mean()
        assert roughness(filled) < roughness(px(init)) / 3  # smooth colours from around, not the picture
        assert torch.equal(latent, filled_latent)
    elif fill == 2:  # latent noise: the seed's noise in the hole
        noise = rng.ImageRNG(latent.shape[1:], [77]).first()
        assert torch.equal(latent[paint], noise[paint])
        assert torch.equal(latent[~paint], filled_latent[~paint])
    else:  # latent nothing: zeros in the hole
        assert torch.all(latent[paint] == 0)
        assert torch.equal(latent[~paint], filled_latent[~paint])


# -- inpainting checkpoints -------------------------------------------------------------------------

def test_inpainting_checkpoint_receives_mask_and_masked_image(inpaint_model, tmp_path):
    assert inpaint_model.unet.config.in_channels == 9  # loaded through the normal loader
    init = picture()
    mask = rect_mask((W, H), (16, 16, 48, 48))
    req = request(init_images=[init], mask=mask, mask_blur=0, denoising_strength=0.5, steps=2)
    with UNetInputs(inpaint_model) as seen:
        result = process_img2img(make_plan(req), context(inpaint_model, tmp_path))
    x = seen.samples[0]
    assert x.shape[1] == 9
    expected_mask = torch.zeros(8, 8)
    expected_mask[2:6, 2:6] = 1
    assert torch.equal(x[0, 4], expected_mask)
    # Conditional mask weight 1: the masked area of the conditioning image is blank (mid grey)
    masked = pil_to_tensor([init])
    masked[:, :, 16:48, 16:48] = 0.5
    assert torch.allclose(x[0, 5:], encode_pixels(inpaint_model, masked)[0], atol=1e-5)
    assert "Conditional mask weight: 1.0" in result.infotexts[0]
    assert result.info["is_using_inpainting_conditioning"] is True
    # outside the (unblurred) mask the original pixels come back
    inside = np.asarray(mask) == 255
    assert np.array_equal(px(result.images[0])[~inside], px(init)[~inside])

    # weight 0 keeps the whole image in the conditioning
    with UNetInputs(inpaint_model) as seen:
        process_img2img(make_plan(req), context(inpaint_model, tmp_path, {"inpainting_mask_weight": 0.0}))
    assert torch.allclose(seen.samples[0][0, 5:], encode_pixels(inpaint_model, pil_to_tensor([init]))[0], atol=1e-5)

    # txt2img with an inpainting checkpoint: everything masked, a grey image
    with UNetInputs(inpaint_model) as seen:
        process_txt2img(make_plan(GenerationRequest(prompt="a cat", width=W, height=H, steps=2, seed=1, sampler_name="Euler",
                                          save_images=False)), context(inpaint_model, tmp_path))
    x = seen.samples[0]
    assert torch.all(x[:, 4] == 1)
    grey = encode_pixels(inpaint_model, torch.full((1, 3, H, W), 0.5))
    assert torch.allclose(x[0, 5:], grey[0], atol=1e-5)


# -- resize modes -----------------------------------------------------------------------------------

def test_resize_modes_size_and_placement():
    src = np.zeros((50, 100, 3), np.uint8)
    src[:, :50] = (255, 0, 0)
    src[:, 50:] = (0, 0, 255)
    halves = Image.fromarray(src)
    just = px(masking.resize_image(0, halves, 64, 64))  # stretched: still half and half
    assert (just[:, :28] == (255, 0, 0)).all() and (just[:, 36:] == (0, 0, 255)).all()
    crop = px(masking.resize_image(1, halves, 64, 64))  # scaled to 128x64, the middle 64 columns kept
    assert (crop[:, :28] == (255, 0, 0)).all() and (crop[:, 36:] == (0, 0, 255)).all()

    bands = np.full((50, 100, 3), 128, np.uint8)
    bands[:10] = (0, 255, 0)
    bands[-10:] = (255, 0, 255)
    fit = px(masking.resize_image(2, Image.fromarray(bands), 64, 64))  # scaled to 64x32 at y = 16
    assert fit.shape == (64, 64, 3)
    assert np.abs(fit[:16] - (0, 255, 0)).max() <= 1  # top band: the first row stretched
    assert np.abs(fit[48:] - (255, 0, 255)).max() <= 1  # bottom band: the last row stretched
    assert np.abs(fit[28:36] - 128).max() <= 1  # the picture's middle


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_img2img_output_size_for_each_resize_mode(sd1, tmp_path, mode):
    init = picture(96, 48)
    result = process_img2img(make_plan(request(init_images=[init], resize_mode=mode, denoising_strength=0.0)),
                             context(sd1, tmp_path))
    assert result.images[0].size == (W, H)
    if mode != 3:  # no step: exactly the resized init image
        assert np.array_equal(px(result.images[0]), px(masking.resize_image(mode, init, W, H)))


# -- hires fix --------------------------------------------------------------------------------------

def test_hires_fix_size_and_second_pass_steps(sd1, tmp_path):
    req = GenerationRequest(prompt="a cat", width=W, height=H, steps=3, seed=5, sampler_name="Euler", save_images=False,
                            enable_hr=True, hr_scale=1.5, hr_second_pass_steps=5, denoising_strength=0.5)
    with UNetInputs(sd1) as seen:
        result = process_txt2img(make_plan(req), context(sd1, tmp_path))
    assert result.images[0].size == (96, 96)
    sizes = [tuple(x.shape[-2:]) for x in seen.samples]
    assert sizes == [(8, 8)] * 3 + [(12, 12)] * 5  # first pass, then exactly the requested hires steps
    params = infotext.parse_generation_parameters(result.infotexts[0])
    assert params["Size-1"] == "64" and params["Denoising strength"] == "0.5"
    assert params["Hires upscale"] == "1.5" and params["Hires steps"] == "5" and params["Hires upscaler"] == "Latent"

    # "resize to" with another aspect: scaled to cover, the latent cut to the requested size
    wide = req.model_copy(update={"hr_resize_x": 128, "hr_resize_y": 64, "hr_second_pass_steps": 0,
                                  "hr_upscaler": "Lanczos"})
    with UNetInputs(sd1) as seen:
        result = process_txt2img(make_plan(wide), context(sd1, tmp_path))
    assert result.images[0].size == (128, 64)
    assert len(seen.samples) == 3 + 3  # hires steps 0: the same as steps
    assert "Hires resize: 128x64" in result.infotexts[0] and "Hires steps" not in result.infotexts[0]


def test_hires_prompt_editing_uses_the_hires_schedule(sd1, tmp_path):
    # [cat:dog:6] with 4 + 4 steps: the first pass stays "cat"; in the hires pass 6 means hires step 6 - 4 = 2
    req = GenerationRequest(prompt="[cat:dog:6]", width=W, height=H, steps=4, seed=5, sampler_name="Euler",
                            cfg_scale=1.0, save_images=False, enable_hr=True, hr_scale=1.5, denoising_strength=1.0)
    ctx = context(sd1, tmp_path)
    with UNetInputs(sd1) as seen:
        process_txt2img(make_plan(req), ctx)
    encoder = PromptEncoder(sd1, ctx.opts, device=ctx.device, dtype=ctx.dtype)
    cat, dog = encoder.encode("cat").context, encoder.encode("dog").context
    used = ["cat" if torch.allclose(c, cat) else "dog" if torch.allclose(c, dog) else "?" for c in seen.contexts]
    assert used == ["cat"] * 4 + ["cat"] * 3 + ["dog"]


def test_hires_sampler_and_prompt_fields(sd1, tmp_path):
    req = GenerationRequest(prompt="a cat", width=W, height=H, steps=2, seed=5, sampler_name="Euler", save_images=False,
                            enable_hr=True, hr_scale=1.5, hr_sampler_name="DPM++ 2M", hr_prompt="a dog",
                            hr_upscaler="Nearest")
    result = process_txt2img(make_plan(req), context(sd1, tmp_path))
    assert result.images[0].size == (96, 96)
    assert ("Hires sampler: DPM++ 2M, Hires prompt: a dog, Hires schedule type: Karras, Hires upscale: 1.5, "
            "Hires upscaler: Nearest") in result.infotexts[0]


# -- infotext, outputs and bad input ----------------------------------------------------------------

def test_img2img_infotext_and_output_folder(sd1, tmp_path):
    init = picture(96, 64)
    req = request(init_images=[init], mask=rect_mask((96, 64), (40, 20, 64, 40)), inpainting_mask_invert=1,
                  mask_blur=6, inpainting_fill=0, inpaint_full_res=True, inpaint_full_res_padding=16,
                  initial_noise_multiplier=0.9, save_images=True, steps=2)
    result = process_img2img(make_plan(req), context(sd1, tmp_path))
    saved = list((tmp_path / "img2img-images").rglob("*.png"))
    assert [p.name for p in saved] == ["00000-1234.png"]
    with Image.open(saved[0]) as im:
        text = im.info["parameters"]
    assert ("Denoising strength: 0.75, Mask mode: Inpaint not masked, Mask blur: 6, Inpaint area: Only masked, "
            "Masked area padding: 16, Masked content: fill, Noise multiplier: 0.9") in text
    assert result.info["denoising_strength"] == 0.75
    assert result.info["is_using_inpainting_conditioning"] is False


def test_empty_and_full_masks(sd1, tmp_path):
    init = picture()
    black, white = Image.new("L", (W, H)), Image.new("L", (W, H), 255)
    # whole picture with an empty mask: nothing to repaint
    kept = process_img2img(make_plan(request(init_images=[init], mask=black, denoising_strength=0.9)), context(sd1, tmp_path))
    assert np.array_equal(px(kept.images[0]), px(init))
    # only masked with an empty mask: A1111 falls back to img2img of the whole picture
    wide = picture(96, 48)
    fallback = process_img2img(make_plan(request(init_images=[wide], mask=Image.new("L", (96, 48)), inpaint_full_res=True,
                                       denoising_strength=0.9)), context(sd1, tmp_path))
    assert fallback.images[0].size == (W, H)
    assert "Inpaint area" not in fallback.infotexts[0]
    assert any("mask is blank" in c for c in fallback.comments)
    # a full mask repaints everything, in both inpaint areas
    for only_masked in (False, True):
        full = process_img2img(make_plan(request(init_images=[init], mask=white, inpaint_full_res=only_masked,
                                       denoising_strength=0.9)), context(sd1, tmp_path))
        assert np.abs(px(full.images[0]) - px(init)).mean() > 5


def test_mask_of_another_size_is_stretched_to_the_image(sd1, tmp_path):
    init = picture()
    big = rect_mask((128, 128), (64, 64, 128, 128))  # the bottom-right quarter, at twice the size
    result = process_img2img(make_plan(request(init_images=[init], mask=big, mask_blur=0, denoising_strength=0.9)),
                             context(sd1, tmp_path))
    out, orig = px(result.images[0]), px(init)
    # (Lanczos rings a pixel or two beyond the stretched edge)
    assert np.array_equal(out[:28], orig[:28]) and np.array_equal(out[:, :28], orig[:, :28])
    assert np.abs(out[34:, 34:] - orig[34:, 34:]).mean() > 5


def test_alpha_brush_layer_is_a_mask():
    brush = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    ImageDraw.Draw(brush).rectangle((4, 4, 7, 7), fill=(255, 255, 255, 200))
    binary = np.asarray(masking.create_binary_mask(brush))
    assert binary[4:8, 4:8].min() == 255 and binary.sum() == 16 * 255


def test_bad_inputs_are_clear_errors(sd1, tmp_path):
    cases = [
        (dict(kind="img2img"), "at least one image"),
        (dict(kind="img2img", init_images=["aGVsbG8="]), "not an image"),
        (dict(kind="img2img", init_images=[Image.new("RGB", (0, 0))]), "empty"),
        (dict(kind="img2img", init_images=[Image.new("RGB", (4100, 8))]), "largest accepted is 4096x4096"),
        (dict(kind="img2img", init_images=[picture()], mask="a mask"), "mask is not an image"),
        (dict(kind="img2img", init_images=[picture()], denoising_strength=1.5), "less than or equal to 1"),
        (dict(kind="img2img", init_images=[picture()] * 3, batch_size=2), "at most batch_size"),
        (dict(init_images=[picture()]), "only used by img2img"),
        (dict(enable_hr=True, hr_upscaler="4x-UltraSharp"), "unknown hires upscaler"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            GenerationRequest(**fields)
    # the size limit is configurable through the validation context
    big = GenerationRequest.model_validate(dict(kind="img2img", init_images=[Image.new("RGB", (4100, 8))]),
                                           context={"max_image_side": 8192})
    assert big.init_images[0].size == (4100, 8)
    with pytest.raises(ValueError, match="between 64 and 16384"):
        process_txt2img(make_plan(GenerationRequest(width=W, height=H, steps=1, enable_hr=True, hr_scale=0.5, save_images=False)),
                        context(sd1, tmp_path))


# -- the job service and the page ---------------------------------------------------------------------

def test_app_runs_img2img_jobs(tmp_path):
    import app as app_module

    args = app_module.build_parser().parse_args(["--data-dir", str(tmp_path)])
    app = app_module.App(args=args, paths=app_module.Paths.from_args(args))
    app.load_initial_model()
    app.queue.start()
    try:
        job = app.submit(request(init_images=[picture()], mask=rect_mask((W, H), (8, 8, 24, 24)), steps=2,
                                 save_images=True), owner="tests")
        assert job.wait(120)
        assert job.error is None
        (path,) = job.result.paths
        assert "img2img-images" in path and "Denoising strength: 0.75" in job.result.infotexts[0]
    finally:
        app.queue.shutdown(wait=10)


def test_page_inputs_become_init_image_and_mask():
    from modules.ui.img2img import init_and_mask

    image = picture()
    strokes = Image.new("RGBA", (W, H))
    ImageDraw.Draw(strokes).rectangle((10, 10, 19, 19), fill=(255, 255, 255, 255))
    editor = {"background": image, "layers": [strokes], "composite": image}
    init, mask = init_and_mask("img2img_inpaint_tab", None, None, editor, None, None)
    assert init is image
    assert np.asarray(masking.create_binary_mask(mask)).sum() == 100 * 255  # the painted square
    assert init_and_mask("img2img_img2img_tab", image, None, None, None, None) == (image, None)
    with pytest.raises(ValueError, match="Draw a mask"):
        init_and_mask("img2img_inpaint_tab", None, None, {"background": image, "layers": []}, None, None)
    with pytest.raises(ValueError, match="both an image and a mask"):
        init_and_mask("img2img_inpaint_upload_tab", None, None, None, image, None)
