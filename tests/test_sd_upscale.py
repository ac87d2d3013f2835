"""The built-in "SD upscale" img2img script: tile geometry and blending (pure functions), and A1111's own API
payload through app.py started as a real process with --api on a tiny SD1 checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import requests
from PIL import Image

from modules.images import decode_image_base64, encode_image_base64
from tests.extension_helpers import builtin_module, generate, make_app
from tests.test_app_start import tiny_api_server

tiling = builtin_module("sd-upscale", "tiling")


def gradient(width: int, height: int) -> Image.Image:
    """Every pixel different enough to show where a tile was cut from."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x % 256, y % 256, (x * 7 + y * 3) % 256], axis=-1).astype(np.uint8))


# -- geometry and blending ---------------------------------------------------------------------

def test_split_grid_places_tiles_as_a1111():
    # 128 wide, tiles of 64 overlapping by 8: ceil(120 / 56) = 3 columns, spread by (128 - 64) / 2 = 32
    layout, tiles = tiling.split_grid(gradient(128, 128), 64, 64, 8)
    assert (layout.xs, layout.ys) == ((0, 32, 64), (0, 32, 64))
    # 200x100, tiles 64 overlapping 16: ceil(184 / 48) = 4 columns at int(k * 136 / 3), the last pushed to 200 - 64;
    # ceil(84 / 48) = 2 rows at 0 and 36
    image = gradient(200, 100)
    layout, tiles = tiling.split_grid(image, 64, 64, 16)
    assert layout.boxes == [(0, 0, 64, 64), (45, 0, 109, 64), (90, 0, 154, 64), (136, 0, 200, 64),
                            (0, 36, 64, 100), (45, 36, 109, 100), (90, 36, 154, 100), (136, 36, 200, 100)]
    assert all(t.size == (64, 64) for t in tiles)
    assert np.array_equal(np.asarray(tiles[5]), np.asarray(image)[36:100, 45:109])
    # a single tile when the image is the tile size; no overlap needed
    assert tiling.grid_layout(64, 64, 64, 64, 0).boxes == [(0, 0, 64, 64)]
    with pytest.raises(ValueError, match="overlap 64 must be .* smaller than the tile size 64x64"):
        tiling.grid_layout(128, 128, 64, 64, 64)


def test_combining_untouched_tiles_gives_the_image_back_and_constants_stay_constant():
    image = gradient(200, 100)
    for overlap in (0, 8, 16, 48):
        layout, tiles = tiling.split_grid(image, 64, 64, overlap)
        assert np.array_equal(np.asarray(tiling.combine_grid(layout, tiles)), np.asarray(image)), overlap
    flat = Image.new("RGB", (128, 128), (37, 140, 222))
    layout, tiles = tiling.split_grid(flat, 64, 64, 32)
    combined = np.asarray(tiling.combine_grid(layout, tiles))
    assert (combined == (37, 140, 222)).all()


def test_overlap_fades_linearly_from_one_tile_to_the_next():
    layout = tiling.grid_layout(96, 64, 64, 64, 32)  # two columns: x = 0 and 32, overlapping over 32..63
    assert layout.xs == (0, 32)
    black, white = Image.new("RGB", (64, 64), 0), Image.new("RGB", (64, 64), (255, 255, 255))
    row = np.asarray(tiling.combine_grid(layout, [black, white]))[10, :, 0].astype(int)
    assert (row[:32] == 0).all() and (row[64:] == 255).all()
    ramp = [int(i * 255 / 32) for i in range(32)]  # A1111's mask value at overlap pixel i
    assert np.abs(row[32:64] - ramp).max() <= 1
    # and top to bottom the same way
    layout = tiling.grid_layout(64, 96, 64, 64, 32)
    column = np.asarray(tiling.combine_grid(layout, [black, white]))[:, 5, 0].astype(int)
    assert (column[:32] == 0).all() and np.abs(column[32:64] - ramp).max() <= 1 and (column[64:] == 255).all()


def test_upscalers_and_their_names():
    assert tiling.upscale(gradient(64, 48), 2.0, "Lanczos").size == (128, 96)
    assert tiling.upscale(gradient(64, 64), 1.3, "Nearest").size == (80, 80)  # 83.2 rounded down to a multiple of 8
    assert tiling.upscale(gradient(64, 64), 2.0, "None").size == (64, 64)  # A1111: "None" does not enlarge
    nearest = np.asarray(tiling.upscale(gradient(64, 64), 2.0, "Nearest"))
    assert np.array_equal(nearest[::2, ::2], np.asarray(gradient(64, 64)))
    assert tiling.resolve_upscaler("lanczos") == "Lanczos" and tiling.resolve_upscaler(2) == "Nearest"
    with pytest.raises(ValueError, match="'R-ESRGAN 4x\\+' is not available.*None, Lanczos, Nearest"):
        tiling.resolve_upscaler("R-ESRGAN 4x+")


# -- through the A1111 API ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_api_server(tmp_path_factory.mktemp("sd-upscale")) as url:
        yield url


def img2img(base: str, **fields) -> requests.Response:
    payload = dict(prompt="a red cube", init_images=[encode_image_base64(gradient(64, 64))], width=64, height=64,
                   steps=2, sampler_name="Euler", seed=1234, denoising_strength=0.5)
    payload.update(fields)
    return requests.post(f"{base}/img2img", json=payload, timeout=120)


def test_a1111_payload_upscales_through_the_api(server):
    scripts = requests.get(f"{server}/scripts", timeout=10).json()
    assert "sd upscale" in scripts["img2img"] and "sd upscale" not in scripts["txt2img"]

    response = img2img(server, script_name="sd upscale", script_args=["", 8, "Lanczos", 2.0])
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["images"]) == 1
    image = decode_image_base64(body["images"][0])
    assert image.size == (128, 128)
    info = json.loads(body["info"])
    text = info["infotexts"][0]
    # A1111 keeps the first tile's infotext: tile size, its seed, and what SD upscale did
    assert "Seed: 1234," in text and "Size: 64x64" in text and "Denoising strength: 0.5" in text
    assert "SD upscale overlap: 8, SD upscale upscaler: Lanczos" in text
    assert image.info["parameters"] == text

    # named arguments, any case for the upscaler; batch count 2: image n starts at seed + n, so the second
    # image is the first image of a run with seed 1235
    named = dict(script_name="SD upscale", script_args={"tile_overlap": 16, "upscaler": "nearest", "scale_factor": 1.5})
    two = img2img(server, n_iter=2, **named)
    assert two.status_code == 200, two.text
    first, second = (np.asarray(decode_image_base64(b)) for b in two.json()["images"])
    assert first.shape == (96, 96, 3) and json.loads(two.json()["info"])["all_seeds"] == [1234, 1235]
    alone = img2img(server, seed=1235, **named)
    assert np.array_equal(np.asarray(decode_image_base64(alone.json()["images"][0])), second)
    assert not np.array_equal(first, second)


def test_bad_script_arguments_are_refused_with_422(server):
    unknown = img2img(server, script_name="sd upscale", script_args=["", 8, "ESRGAN_4x", 2.0])
    assert unknown.status_code == 422
    assert "Upscaler 'ESRGAN_4x' is not available" in unknown.text and "Lanczos" in unknown.text
    on_txt2img = requests.post(f"{server}/txt2img", json=dict(prompt="x", width=64, height=64, steps=2,
                                                              script_name="sd upscale"), timeout=60)
    assert on_txt2img.status_code == 422 and "not found" in on_txt2img.text


def test_interrupt_stops_after_the_current_tile(tmp_path):
    app = make_app(tmp_path)
    batches: list[int] = []

    def interrupt_on_second_tile(params):
        batches.append(params.batch_number)
        if len(batches) == 2:
            app.queue.interrupt_user("tests")

    app.hooks.register("process_batch", interrupt_on_second_tile)
    try:
        # 9 tiles per image, 2 images: without the interrupt that is 18 tile batches
        result = generate(app, kind="img2img", init_images=[gradient(64, 64)], n_iter=2, script_name="sd upscale",
                          script_args={"tile_overlap": 8, "upscaler": "Lanczos"})
    finally:
        app.queue.shutdown(wait=10)
    assert len(batches) == 2 and result.interrupted
    assert len(result.images) == 1 and result.images[0].size == (128, 128)
