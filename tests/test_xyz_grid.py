"""The built-in "X/Y/Z plot" script: A1111's value syntax (pure functions) and real grids on the tiny model."""
from __future__ import annotations

import numpy as np
import pytest

from modules.jobs import DONE
from modules.request import RequestError
from tests.extension_helpers import builtin_module, generate, make_app, submit

axes = builtin_module("xyz-grid", "axes")


def test_a1111_range_syntax():
    assert axes.expand_ints("1-5") == [1, 2, 3, 4, 5]
    assert axes.expand_ints("1-5 (+2)") == [1, 3, 5]
    assert axes.expand_ints("10-1 (-3)") == [10, 7, 4]
    assert axes.expand_ints("1-10 [5]") == [1, 3, 5, 7, 10]
    assert axes.expand_ints("1, 2, 3-4, 8") == [1, 2, 3, 4, 8]
    assert axes.expand_floats("0.25-1 (+0.25)") == [0.25, 0.5, 0.75, 1.0]
    assert axes.expand_floats("1-2 [3]") == [1.0, 1.5, 2.0]
    assert axes.expand_floats("7, 7.5") == [7.0, 7.5]
    # csv quoting keeps commas inside a value (Prompt S/R)
    assert axes.csv_list('dog, "cat, small", bird') == ["dog", "cat, small", "bird"]
    with pytest.raises(ValueError, match="not a whole number"):
        axes.expand_ints("1-5 (2)")
    assert axes.find_axis_type("cfg scale").label == "CFG Scale"
    assert axes.find_axis_type(4).label == "Steps"
    with pytest.raises(ValueError, match="X axis type 'Bogus' is not available: choose one of Nothing, Seed"):
        axes.find_axis_type("Bogus", "X")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app = make_app(tmp_path_factory.mktemp("xyz"))
    yield app
    app.queue.shutdown(wait=10)


def test_steps_by_cfg_grid(app):
    result = generate(app, prompt="a red cube", script_name="X/Y/Z plot",
                      script_args={"x_type": "Steps", "x_values": "1-2", "y_type": "CFG Scale", "y_values": "3, 5",
                                   "include_lone_images": True})
    grid, cells = result.images[0], result.images[1:]
    assert len(cells) == 4 and all(c.size == (64, 64) for c in cells)
    # 2x2 cells plus the legend on top and on the left
    assert grid.width > 128 and grid.height > 128
    left, top = grid.width - 128, grid.height - 128
    for index, cell in enumerate(cells):  # each cell sits in its place after the legend margins
        x, y = left + (index % 2) * 64, top + (index // 2) * 64
        assert np.array_equal(np.asarray(grid.crop((x, y, x + 64, y + 64))), np.asarray(cell.convert("RGB")))
    expected = [(1, 3), (2, 3), (1, 5), (2, 5)]  # X fastest, as A1111
    for text, (steps, cfg) in zip(result.infotexts[1:], expected):
        assert f"Steps: {steps}," in text and f"CFG scale: {cfg}" in text, text
    assert result.infotexts[0] == result.infotexts[1]  # the grid keeps the first cell's infotext
    assert len({s for s in result.seeds}) == 1  # one fixed seed for every cell

    plain = generate(app, prompt="a red cube", script_name="X/Y/Z plot",
                     script_args=[4, "1-2", 6, "3, 5", 0, "", False, False, False, False, 2])
    assert len(plain.images) == 1 and plain.images[0].size == (64 * 2 + 2, 64 * 2 + 2)  # no legend, 2px margins


def test_prompt_search_and_replace(app):
    result = generate(app, prompt="a red cube", negative_prompt="red blur", script_name="X/Y/Z plot",
                      script_args={"x_type": "Prompt S/R", "x_values": "red, blue, green", "include_lone_images": True})
    assert result.prompts[1:] == ["a red cube", "a blue cube", "a green cube"]
    assert result.negative_prompts[1:] == ["red blur", "blue blur", "green blur"]
    with pytest.raises(RequestError, match="did not find red") as refused:  # before anything is queued
        submit(app, prompt="a cube", script_name="X/Y/Z plot", script_args={"x_type": "Prompt S/R", "x_values": "red, blue"})
    assert refused.value.field == ("script_args", "x_values")


def test_unknown_axis_type_is_refused(app):
    with pytest.raises(RequestError, match="X axis type 'Bogus' is not available"):
        submit(app, prompt="x", script_name="X/Y/Z plot", script_args={"x_type": "Bogus", "x_values": "1"})


def test_grid_and_cells_are_saved_when_the_request_saves(app):
    outputs = app.paths.outputs_dir
    before = set(outputs.rglob("*.png"))
    result = generate(app, prompt="a blue cube", save_images=True, script_name="X/Y/Z plot",
                      script_args={"x_type": "Steps", "x_values": "1-2"})
    new = set(outputs.rglob("*.png")) - before
    grids = [p for p in new if p.parent.parent.name == "txt2img-grids"]
    cells = [p for p in new if p.parent.parent.name == "txt2img-images"]
    assert len(grids) == 1 and len(cells) == 2
    assert result.grid_path == str(grids[0])
    from PIL import Image
    with Image.open(grids[0]) as saved:
        assert saved.info["parameters"] == result.infotexts[0]
    before = set(outputs.rglob("*.png"))
    generate(app, prompt="a blue cube", save_images=False, script_name="X/Y/Z plot",
             script_args={"x_type": "Steps", "x_values": "1-2"})
    assert set(outputs.rglob("*.png")) == before
