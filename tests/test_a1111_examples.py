"""A1111's own API test payloads (its test/test_txt2img.py and test/test_img2img.py), sent unchanged but for
the images, to a live server: every one must answer 200 with images, as it does on A1111."""
from __future__ import annotations

import base64
import io

import pytest
import requests
from PIL import Image, ImageDraw

from tests.test_app_start import tiny_api_server


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    with tiny_api_server(tmp_path_factory.mktemp("a1111-examples")) as url:
        yield url


TXT2IMG = {
    "batch_size": 1, "cfg_scale": 7, "denoising_strength": 0, "enable_hr": False, "eta": 0,
    "firstphase_height": 0, "firstphase_width": 0, "height": 64, "n_iter": 1, "negative_prompt": "",
    "prompt": "example prompt", "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0,
    "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3,
    "styles": [], "subseed": -1, "subseed_strength": 0, "tiling": False, "width": 64,
}

TXT2IMG_VARIANTS = {
    "simple": {},
    "negative_prompt": {"negative_prompt": "example negative prompt"},
    "complex_prompt": {"prompt": "((emphasis)), (emphasis1:1.1), [to:1], [from::2], [from:to:0.3], [alt|alt1]"},
    "not_square": {"width": 64, "height": 128},
    "with_hrfix": {"enable_hr": True},
    "tiling": {"tiling": True},
    "sampler_PLMS": {"sampler_index": "PLMS"},
    "sampler_DDIM": {"sampler_index": "DDIM"},
    "sampler_UniPC": {"sampler_index": "UniPC"},
    "multiple_batches": {"n_iter": 2},
    "batch_size": {"batch_size": 2},
}


@pytest.mark.parametrize("variant", list(TXT2IMG_VARIANTS))
def test_a1111_txt2img_payloads(base, variant):
    payload = dict(TXT2IMG, **TXT2IMG_VARIANTS[variant])
    response = requests.post(f"{base}/txt2img", json=payload, timeout=300)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["images"] and isinstance(body["info"], str)
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][-1])))
    expected = (payload["width"], payload["height"])
    if payload["enable_hr"]:
        expected = (payload["width"] * 2, payload["height"] * 2)  # hr_scale defaults to 2
    assert image.size == expected


def init_image() -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((8, 8, 56, 56), fill="red")
    return image


def mask_image() -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    return mask


IMG2IMG = {
    "batch_size": 1, "cfg_scale": 7, "denoising_strength": 0.75, "eta": 0, "height": 64,
    "include_init_images": False, "inpaint_full_res": False, "inpaint_full_res_padding": 0, "inpainting_fill": 0,
    "inpainting_mask_invert": False, "mask": None, "mask_blur": 4, "n_iter": 1, "negative_prompt": "",
    "override_settings": {}, "prompt": "example prompt", "resize_mode": 0, "restore_faces": False, "s_churn": 0,
    "s_noise": 1, "s_tmax": 0, "s_tmin": 0, "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1,
    "seed_resize_from_w": -1, "steps": 3, "styles": [], "subseed": -1, "subseed_strength": 0, "tiling": False,
    "width": 64,
}


@pytest.mark.parametrize("variant", ["simple", "inpainting_masked", "inpainting_with_inverted_masked", "sd_upscale"])
def test_a1111_img2img_payloads(base, variant):
    payload = dict(IMG2IMG, init_images=[png_data_url(init_image())])
    if variant != "simple" and variant != "sd_upscale":
        payload["mask"] = png_data_url(mask_image())
    if variant == "inpainting_with_inverted_masked":
        payload["inpainting_mask_invert"] = True
    if variant == "sd_upscale":
        payload["script_name"] = "sd upscale"
        payload["script_args"] = ["", 8, "Lanczos", 2.0]
    response = requests.post(f"{base}/img2img", json=payload, timeout=300)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    assert image.size == ((128, 128) if variant == "sd_upscale" else (64, 64))


def test_fields_athanor_cannot_honour_are_refused_not_dropped(base):
    # A1111's own restore_faces example: there is no face restorer here, so say so instead of ignoring it
    faces = requests.post(f"{base}/txt2img", json=dict(TXT2IMG, restore_faces=True), timeout=60)
    assert faces.status_code == 422 and faces.json()["detail"][0]["loc"] == ["body", "restore_faces"]
    assert "no face restorer is installed" in faces.json()["errors"]
    refiner = requests.post(f"{base}/txt2img", json=dict(TXT2IMG, refiner_checkpoint="sdxl_refiner"), timeout=60)
    assert refiner.status_code == 422 and refiner.json()["detail"][0]["loc"] == ["body", "refiner_checkpoint"]
    other = requests.post(f"{base}/txt2img", json=dict(TXT2IMG, enable_hr=True, hr_checkpoint_name="other.safetensors"),
                          timeout=60)
    assert other.status_code == 422 and other.json()["detail"][0]["loc"] == ["body", "hr_checkpoint_name"]
    same = requests.post(f"{base}/txt2img", json=dict(TXT2IMG, enable_hr=True, hr_checkpoint_name="Use same checkpoint"),
                         timeout=300)
    assert same.status_code == 200, same.text
