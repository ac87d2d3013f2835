"""The real `webuiapi` client from PyPI, unmodified, against app.py started as a real process on loopback.

Two servers start in parallel for the module: one open (`--api`) with two tiny checkpoints, one with
`--auth`. Every image is 64x64 with 2-3 steps on the tiny SD1 model.
"""
from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
import webuiapi
from PIL import Image, ImageDraw

from tests.test_app_start import start_app, stop, wait_for
from tests.tiny_checkpoints import tiny_checkpoint_path


def _data_dir(tmp_path_factory, name: str, seeds: tuple[int, ...]):
    folder = tmp_path_factory.mktemp(name)
    models = folder / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    for seed, label in zip(seeds, "ab"):
        shutil.copy(tiny_checkpoint_path("sd1", seed), models / f"tiny-{label}.safetensors")
    return folder


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    open_dir = _data_dir(tmp_path_factory, "open", (0, 1))
    auth_dir = _data_dir(tmp_path_factory, "auth", (0,))
    started = [start_app(open_dir, "--api"), start_app(auth_dir, "--api", "--auth", "alice:s3cret:x,bob:pw")]
    try:
        for proc, port, log in started:
            wait_for(port, proc, log, path="/sdapi/v1/samplers", timeout=180)
        yield {"open": started[0][1], "auth": started[1][1], "open_dir": open_dir}
    finally:
        for proc, _port, _log in started:
            stop(proc)


@pytest.fixture(scope="module")
def api(servers):
    return webuiapi.WebUIApi(host="127.0.0.1", port=servers["open"], sampler="Euler a", steps=3)


def small(api, **kwargs):
    args = dict(prompt="a red cube", width=64, height=64, steps=3, seed=1234)
    args.update(kwargs)
    return api.txt2img(**args)


def test_txt2img_returns_images_with_infotext_info_and_parameters(api):
    result = small(api, negative_prompt="blurry")
    assert len(result.images) == 1
    image = result.image
    assert image.size == (64, 64)
    text = image.info["parameters"]
    assert text.startswith("a red cube\nNegative prompt: blurry\n")
    assert "Steps: 3" in text and "Sampler: Euler a" in text and "Seed: 1234" in text and "Size: 64x64" in text
    assert "Model: tiny-a" in text
    assert result.info["all_seeds"] == [1234]
    assert result.info["infotexts"] == [text]
    assert result.parameters["steps"] == 3 and result.parameters["sampler_index"] == "Euler a"
    # the same request gives the same pixels
    again = small(api, negative_prompt="blurry")
    assert np.array_equal(np.asarray(again.image), np.asarray(image))


def test_batch_has_consecutive_seeds_and_a_grid_only_when_saving(api, servers):
    result = small(api, batch_size=2, seed=50)
    assert len(result.images) == 2 and result.info["index_of_first_image"] == 0  # A1111: no grid unless saving
    assert result.info["all_seeds"] == [50, 51]
    assert "Seed: 51" in result.images[1].info["parameters"]
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(result.images[1]))
    outputs = servers["open_dir"] / "outputs"
    assert not list(outputs.rglob("*-50.png"))  # save_images defaults to False over the API

    saved = small(api, batch_size=2, seed=50, save_images=True)
    assert len(saved.images) == 3 and saved.info["index_of_first_image"] == 1  # grid, then the two images
    assert saved.images[0].size == (128, 64)
    assert np.array_equal(np.asarray(saved.images[1]), np.asarray(result.images[0]))
    assert len(list(outputs.rglob("txt2img-images/*/*-50.png"))) == 1
    assert len(list(outputs.rglob("txt2img-grids/*/*.png"))) == 1


def test_a1111_defaults_and_legacy_sampler_names(servers):
    import requests

    base = f"http://127.0.0.1:{servers['open']}/sdapi/v1"
    # no sampler at all: A1111's API default is sampler_index "Euler"
    r = requests.post(f"{base}/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64}, timeout=60)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["sampler_name"] == "Euler"
    assert r.json()["parameters"]["save_images"] is False
    # a pre-1.9 name with the schedule in it
    r = requests.post(f"{base}/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                               "sampler_name": "DPM++ 2M Karras"}, timeout=60)
    assert r.status_code == 200, r.text
    text = json.loads(r.json()["info"])["infotexts"][0]
    assert "Sampler: DPM++ 2M" in text and "Schedule type: Karras" in text
    # send_images false returns no images, still the info
    r = requests.post(f"{base}/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                               "send_images": False, "seed": 7}, timeout=60)
    assert r.status_code == 200 and r.json()["images"] == []
    assert json.loads(r.json()["info"])["all_seeds"] == [7]


def test_infotext_field_fills_unset_fields(servers):
    import requests

    base = f"http://127.0.0.1:{servers['open']}/sdapi/v1"
    infotext = ("a blue sphere\nNegative prompt: ugly\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 99, Size: 64x64, "
                "Clip skip: 2")
    r = requests.post(f"{base}/txt2img", json={"infotext": infotext, "seed": 100}, timeout=60)
    assert r.status_code == 200, r.text
    params = r.json()["parameters"]
    assert params["prompt"] == "a blue sphere" and params["negative_prompt"] == "ugly"
    assert params["steps"] == 2 and params["cfg_scale"] == 5
    assert params["seed"] == 100  # set explicitly: the infotext does not override it
    assert json.loads(r.json()["info"])["all_seeds"] == [100]
    # options the infotext names become per-request overrides
    assert params["override_settings"] == {"CLIP_stop_at_last_layers": 2}
    assert "Clip skip: 2" in json.loads(r.json()["info"])["infotexts"][0]


def _img2img_or_skip(api, **kwargs):
    try:
        return api.img2img(**kwargs)
    except RuntimeError as exc:
        if exc.args and exc.args[0] == 501:
            pytest.skip("img2img has not landed in processing yet (the route answers 501)")
        raise


def test_img2img_and_inpaint(api):
    source = small(api, seed=5).image
    result = _img2img_or_skip(api, images=[source], prompt="a red cube", width=64, height=64, steps=3, seed=8,
                              denoising_strength=0.5, sampler_name="Euler")
    assert result.image.size == (64, 64)
    assert "Denoising strength: 0.5" in result.image.info["parameters"]
    assert result.parameters["init_images"] is None  # not echoed unless include_init_images

    # inpaint the right half only: with A1111's API defaults the left part stays as it was
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((32, 0, 63, 63), fill=255)
    painted = _img2img_or_skip(api, images=[source], mask_image=mask, prompt="green", width=64, height=64,
                               steps=3, seed=9, denoising_strength=1.0, sampler_name="Euler", mask_blur=0)
    before = np.asarray(source.convert("RGB")).astype(int)
    after = np.asarray(painted.image.convert("RGB")).astype(int)
    assert np.abs(after[:, :24] - before[:, :24]).max() <= 2
    assert np.abs(after[:, 40:] - before[:, 40:]).mean() > 2


def test_options_round_trip(api):
    options = api.get_options()
    original = options["send_seed"]
    api.set_options({"send_seed": not original})
    assert api.get_options()["send_seed"] is (not original)
    api.set_options({"send_seed": original})
    assert api.get_options()["send_seed"] is original


def test_model_list_and_switch(api):
    names = api.util_get_model_names()
    assert len(names) == 2 and names[0].startswith("tiny-a.safetensors [") and names[1].startswith("tiny-b")
    api.util_set_model("tiny-b")
    try:
        assert api.util_get_current_model() == names[1]
        result = small(api)
        assert result.info["sd_model_name"] == "tiny-b"
        assert "Model: tiny-b" in result.image.info["parameters"]
    finally:
        api.util_set_model(names[0])
    assert api.util_get_current_model() == names[0]


def test_png_info_reads_back_the_infotext(api):
    image = small(api, seed=4321).image
    result = api.png_info(image)
    assert result.info == image.info["parameters"]
    assert result.json["parameters"]["Seed"] == "4321"
    assert result.json["parameters"]["Prompt"] == "a red cube"


def test_styles_from_styles_csv_are_listed_and_applied(api, servers):
    (servers["open_dir"] / "styles.csv").write_text(
        "name,prompt,negative_prompt\nOil,\"{prompt}, oil painting\",lowres\nPlain,sharp,\n", encoding="utf-8")
    assert api.get_prompt_styles() == [{"name": "Oil", "prompt": "{prompt}, oil painting", "negative_prompt": "lowres"},
                                       {"name": "Plain", "prompt": "sharp", "negative_prompt": ""}]
    result = small(api, prompt="a cube", negative_prompt="blurry", styles=["Oil", "Plain"])
    assert result.image.info["parameters"].startswith("a cube, oil painting, sharp\nNegative prompt: blurry, lowres\n")
    assert result.info["styles"] == ["Oil", "Plain"]
    with pytest.raises(RuntimeError) as unknown:
        small(api, styles=["Missing"])
    assert unknown.value.args[0] == 422 and "styles" in unknown.value.args[1]


def test_listing_routes_answer_in_a1111_shapes(api):
    assert "Euler a" in api.util_get_sampler_names()
    assert "karras" in api.util_get_scheduler_names()
    assert {u["name"] for u in api.get_upscalers()} >= {"None", "Lanczos", "Nearest"}
    assert [m["name"] for m in api.get_latent_upscale_modes()][0] == "Latent"
    assert api.get_sd_vae() == [] and api.get_hypernetworks() == [] and api.get_loras() == []
    assert api.get_face_restorers() == [] and api.get_realesrgan_models() == []
    assert set(api.get_embeddings()) == {"loaded", "skipped"}
    scripts = api.get_scripts()
    assert set(scripts) == {"txt2img", "img2img"} and all(name == name.lower() for name in scripts["txt2img"])
    assert set(api.get_memory()) == {"ram", "cuda"}
    flags = api.get_cmd_flags()
    assert flags["api"] is True and flags["port"] > 0
    assert api.refresh_checkpoints() is None  # A1111 answers null


def test_progress_and_interrupt(api):
    results = {}

    def run():
        results["long"] = api.txt2img(prompt="slow", width=64, height=64, steps=150, seed=3, sampler_name="Euler")

    thread = threading.Thread(target=run)
    thread.start()
    seen = None
    deadline = time.time() + 60
    while time.time() < deadline:
        progress = api.get_progress()
        if progress["state"]["sampling_step"] >= 6:
            seen = progress
            break
        time.sleep(0.05)
    assert seen is not None, "the long job never reported progress"
    assert 0.01 < seen["progress"] < 1
    assert seen["state"]["sampling_steps"] == 150 and seen["state"]["job_count"] == 1
    assert seen["eta_relative"] > 0
    assert seen["current_image"]  # live preview as base64 (every 5 steps by default)
    stopped_at = time.time()
    api.interrupt()
    thread.join(60)
    assert not thread.is_alive()
    assert time.time() - stopped_at < 3, "interrupt did not stop the job promptly"
    assert len(results["long"].images) == 1
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    api.util_wait_for_ready(check_interval=0.1)


def test_set_auth_with_auth_flag(servers):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=servers["auth"], steps=2)
    with pytest.raises(RuntimeError) as refused:
        api.txt2img(prompt="x", width=64, height=64)
    assert refused.value.args[0] == 401
    api.set_auth("alice", "wrong")
    with pytest.raises(RuntimeError):
        api.txt2img(prompt="x", width=64, height=64)
    api.set_auth("alice", "s3cret:x")  # passwords may contain ':'
    result = api.txt2img(prompt="x", width=64, height=64, seed=11)
    assert result.info["all_seeds"] == [11]
    assert api.get_cmd_flags()["auth"] == "<redacted>"
