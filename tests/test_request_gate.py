"""The request gate: one set of checks for the page, both APIs and every request a script makes.

An App on the built-in tiny model with small limits (--max-steps 10 --max-images 4 --max-pixels 16384):
what is over them is refused with the field named and never reaches the queue.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from modules.jobs import DONE, FAILED
from modules.request import GenerationRequest, RequestError
from modules.scripts import Script
from modules.ui.results import generate_stream
from tests.extension_helpers import FAST, make_app

LIMITS = ("--max-steps", "10", "--max-images", "4", "--max-pixels", "16384")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app = make_app(tmp_path_factory.mktemp("gate"), *LIMITS)
    yield app
    app.queue.shutdown(wait=10)


def _refused(app, **fields) -> RequestError:
    queued = len(app.queue.all_jobs())
    with pytest.raises(RequestError) as refused:
        app.submit(GenerationRequest(**{**FAST, **fields}), owner="tests")
    assert len(app.queue.all_jobs()) == queued, "a refused request was queued"
    return refused.value


@pytest.mark.parametrize("fields,field,words", [
    (dict(steps=11), "steps", "at most 10 steps"),
    (dict(batch_size=3, n_iter=2), "batch_size", "at most 4 images"),
    (dict(width=256, height=128), "width", "16384 pixels"),
    (dict(width=8, height=64), "width", "at least 64"),
    (dict(enable_hr=True, hr_scale=3.0), "hr_scale", "hires. fix size 192x192"),
    (dict(enable_hr=True, hr_second_pass_steps=20), "hr_second_pass_steps", "at most 10 steps"),
    (dict(sampler_name="Euler z"), "sampler_name", "Valid samplers"),
    (dict(prompt="x" * 20_001), "prompt", "at most 20000 characters"),
])
def test_limits_and_samplers_are_checked_at_the_door(app, fields, field, words):
    error = _refused(app, **fields)
    assert error.field == (field,) and words in str(error)


def test_the_page_path_is_refused_with_a_visible_message_and_nothing_queued(app):
    # generate_stream is what the page's Generate button runs with the request it built
    panel = SimpleNamespace(progress="progress", job_id="job_id")
    queued = len(app.queue.all_jobs())
    updates = list(generate_stream(app, panel, GenerationRequest(**{**FAST, "steps": 40}), "user:page"))
    assert len(updates) == 1 and "at most 10 steps" in updates[0]["progress"]
    assert "athanor-notice athanor-error" in updates[0]["progress"]  # shown as an error box, not a progress line
    assert len(app.queue.all_jobs()) == queued


def _xyz(app, **script_args) -> RequestError:
    return _refused(app, prompt="a cube", script_name="X/Y/Z plot", script_args=script_args)


@pytest.mark.parametrize("script_args,arg,words", [
    ({"x_type": "Steps", "x_values": "2, 40"}, "x_values", "X axis Steps = 40: at most 10 steps"),
    ({"x_type": "Size", "x_values": "64x64, 256x256"}, "x_values", "X axis Size = 256x256"),
    ({"x_type": "Size", "x_values": "8x8"}, "x_values", "at least 64"),
    ({"x_type": "Size", "x_values": "72x64, 65x64"}, "x_values", "multiple of 8"),
    ({"x_type": "CFG Scale", "x_values": "7, nan"}, "x_values", "CFG Scale"),
    ({"x_type": "CFG Scale", "x_values": "1e308"}, "x_values", "CFG Scale"),
    ({"x_type": "Seed", "x_values": "1", "y_type": "Steps", "y_values": "1, 99"}, "y_values", "Y axis Steps = 99"),
    ({"x_type": "Steps", "x_values": "1-1000000000"}, None, "at most 1000"),
])
def test_every_xyz_cell_passes_the_gate_before_the_job_is_queued(app, script_args, arg, words):
    error = _xyz(app, **script_args)
    assert error.field[0] == "script_args" and (arg is None or error.field == ("script_args", arg)), error.problems
    assert "X/Y/Z plot" in str(error) and words in str(error)


def test_a_grid_over_the_image_limit_is_refused_as_a_whole(app):
    error = _xyz(app, x_type="Seed", x_values="1, 2, 3", y_type="Steps", y_values="1, 2")  # 6 cells, 4 allowed
    assert error.field == ("script_args",) and "would make 6 images in 6 generations" in str(error)
    assert "at most 4" in str(error)


def test_a_grid_within_the_limits_runs(app):
    job = app.submit(GenerationRequest(**{**FAST, "prompt": "a cube", "script_name": "X/Y/Z plot",
                                          "script_args": {"x_type": "Steps", "x_values": "1, 2"}}), owner="tests")
    assert job.wait(120) and job.status == DONE, job.error
    assert job.result.images[0].size[0] > 64  # the grid of two 64x64 cells


def test_sd_upscale_is_refused_when_the_picture_or_its_tiles_are_over_the_limits(app):
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    base = dict(kind="img2img", init_images=[image], denoising_strength=0.5, script_name="SD upscale")
    big = _refused(app, **base, script_args={"upscaler": "Lanczos", "scale_factor": 4, "tile_overlap": 0})
    assert big.field == ("script_args", "scale_factor") and "256x256" in str(big)
    # 2x of 64x64 in 64x64 tiles without overlap: 4 tiles per image; two images make 8 > 4
    many = _refused(app, **base, n_iter=2, script_args={"upscaler": "Lanczos", "scale_factor": 2, "tile_overlap": 0})
    assert "would make 8 images" in str(many)
    bad = _refused(app, **base, script_args={"upscaler": "Lanczos", "scale_factor": 2, "tile_overlap": 64})
    assert bad.field == ("script_args",) and "overlap" in str(bad).lower()


class _Sneaky(Script):
    """A script whose run() turns the request into one over the limits: the gate sees it when it runs."""

    def title(self) -> str:
        return "Sneaky"

    def run(self, p, **_):
        p.request.steps = 50  # within the model's 1000, over the server's 10
        return p.process_images()


def test_what_a_script_runs_is_checked_again_when_it_runs(app):
    app.scripts.add(_Sneaky(), extension="sneaky-test")
    try:
        job = app.submit(GenerationRequest(**{**FAST, "script_name": "Sneaky"}), owner="tests")
        assert job.wait(60) and job.status == FAILED
        assert job.error_kind == "input" and "at most 10 steps" in job.error  # not "extension failed"
        assert job.progress.sampling_step == 0  # refused before the first step
    finally:
        app.scripts.remove_extension("sneaky-test")


def test_limits_violations_name_nan_and_huge_values_without_crashing():
    from modules.gate import RequestLimits

    limits = RequestLimits(max_steps=10)
    assert limits.violations({"steps": 11, "width": 64, "height": 64})[0][0] == "steps"
    with pytest.raises(ValueError):  # the request model itself refuses NaN; the limits never see it
        GenerationRequest(cfg_scale=float("nan"))
