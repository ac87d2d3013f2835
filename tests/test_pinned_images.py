"""Request -> image pins: the same requests must keep giving the same pixels through every refactor.

A handful of requests covering the main paths (txt2img with several samplers and schedules, batches and
variation seeds, hires. fix, img2img, inpainting, X/Y/Z plot, SD upscale) run through `App.submit` on the
built-in tiny model; each image's pixels are hashed and compared with `tests/data/pinned_images.json`.

Float results can differ in the last bit between CPU kernels (AVX2 vs AVX-512), so the exact hashes are
compared on the CPU capability they were recorded on; on another one an 8x8 thumbnail of every image must
stay within 2 levels. Regenerate after an intended change of the images with
`python -m tests.test_pinned_images --write` (and say why in the commit).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

PINS = Path(__file__).resolve().parent / "data" / "pinned_images.json"


def _init_image() -> Image.Image:
    image = Image.new("RGB", (64, 64), (40, 90, 200))
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill=(230, 200, 20))
    return image


def _mask() -> Image.Image:
    mask = Image.new("L", (64, 64))
    ImageDraw.Draw(mask).rectangle((8, 8, 39, 39), fill=255)
    return mask


def cases() -> dict[str, dict]:
    base = dict(prompt="a (red:1.2) circle, [blue:green:2] background", negative_prompt="blur", width=64,
                height=64, steps=4, cfg_scale=7.0, seed=1234, save_images=False)
    return {
        "euler_a": {**base, "sampler_name": "Euler a"},
        "dpmpp_2m_karras": {**base, "sampler_name": "DPM++ 2M", "scheduler": "Karras"},
        "ddim": {**base, "sampler_name": "DDIM"},
        "batch_variation": {**base, "sampler_name": "Euler", "batch_size": 2, "n_iter": 2, "subseed": 77,
                            "subseed_strength": 0.3},
        "and_alternation": {**base, "prompt": "a [cat|dog] AND a red ball:0.5", "sampler_name": "Euler"},
        "hires": {**base, "sampler_name": "Euler", "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2,
                  "denoising_strength": 0.6},
        "img2img": {**base, "kind": "img2img", "sampler_name": "Euler", "init_images": [_init_image()],
                    "denoising_strength": 0.6},
        "inpaint": {**base, "kind": "img2img", "sampler_name": "Euler", "init_images": [_init_image()],
                    "mask": _mask(), "denoising_strength": 0.8, "inpainting_fill": 1},
        "inpaint_only_masked": {**base, "kind": "img2img", "sampler_name": "Euler", "init_images": [_init_image()],
                                "mask": _mask(), "denoising_strength": 0.8, "inpaint_full_res": True,
                                "inpaint_full_res_padding": 8},
        "xyz": {**base, "sampler_name": "Euler", "script_name": "X/Y/Z plot",
                "script_args": {"x_type": "Steps", "x_values": "2, 3", "y_type": "CFG Scale", "y_values": "5, 9"}},
        "sd_upscale": {**base, "kind": "img2img", "sampler_name": "Euler", "init_images": [_init_image()],
                       "denoising_strength": 0.4, "script_name": "SD upscale",
                       "script_args": {"upscaler": "Lanczos", "scale_factor": 1.5, "tile_overlap": 16}},
    }


def _fingerprint(image: Image.Image) -> dict:
    pixels = np.asarray(image.convert("RGB"))
    thumb = np.asarray(image.convert("RGB").resize((8, 8), Image.BOX)).astype(int)
    return {"size": list(image.size), "sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
            "thumb": thumb.flatten().tolist()}


def run_cases(data_dir: Path) -> dict[str, list[dict]]:
    from modules.jobs import DONE
    from modules.request import GenerationRequest
    from tests.extension_helpers import make_app

    app = make_app(data_dir)
    try:
        out = {}
        for name, fields in cases().items():
            job = app.submit(GenerationRequest(**fields), owner="pins")
            assert job.wait(300) and job.status == DONE, (name, job.error)
            out[name] = [_fingerprint(image) for image in job.result.images]
        return out
    finally:
        app.queue.shutdown(wait=10)


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    return run_cases(tmp_path_factory.mktemp("pins"))


@pytest.mark.parametrize("name", list(cases()))
def test_request_gives_the_pinned_image(produced, name):
    pins = json.loads(PINS.read_text())
    expected, got = pins["cases"][name], produced[name]
    assert [e["size"] for e in expected] == [g["size"] for g in got], name
    exact = pins["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    for index, (want, have) in enumerate(zip(expected, got)):
        if exact:
            assert have["sha256"] == want["sha256"], f"{name}[{index}]: pixels changed"
        else:
            drift = np.abs(np.array(have["thumb"]) - np.array(want["thumb"])).max()
            assert drift <= 2, f"{name}[{index}]: thumbnail moved by {drift} levels"


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    torch.set_num_threads(1)  # as the suite runs (tests/conftest.py)
    with tempfile.TemporaryDirectory() as folder:
        results = run_cases(Path(folder))
    PINS.parent.mkdir(parents=True, exist_ok=True)
    PINS.write_text(json.dumps({"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                "torch": torch.__version__, "cases": results}, indent=1) + "\n")
    print(f"wrote {PINS}: {sum(len(v) for v in results.values())} images in {len(results)} cases")
