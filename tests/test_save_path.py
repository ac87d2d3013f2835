"""One save path: processing's images and grids, the X/Y/Z plot's grid and SD upscale's results are all saved
by `images.save_output`, so each runs the save hooks and writes the infotext only with `enable_pnginfo` on."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.extension_helpers import generate, make_app

STAMP = ", Saved by: tests"
NO_PNGINFO = {"enable_pnginfo": False}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app = make_app(tmp_path_factory.mktemp("save-path"))
    yield app
    app.queue.shutdown(wait=10)


@pytest.fixture
def saves(app):
    """What the save hooks saw: (kind, seed) before each save, the file after it. The before hook also edits
    the infotext, so its edit must reach both the file and the result."""
    seen: dict[str, list] = {"before": [], "files": []}

    def before(params):
        seen["before"].append((params.kind, params.seed))
        params.infotext += STAMP

    def after(params):
        seen["files"].append(Path(params.filename))

    app.hooks.register("before_image_saved", before, extension="save-path-tests")
    app.hooks.register("image_saved", after, extension="save-path-tests")
    yield seen
    app.hooks.unregister_extension("save-path-tests")


def new_pngs(app, run) -> tuple[object, set[Path]]:
    before = set(app.paths.outputs_dir.rglob("*.png"))
    result = run()
    return result, set(app.paths.outputs_dir.rglob("*.png")) - before


def parameters(path: Path) -> str | None:
    with Image.open(path) as image:
        return image.info.get("parameters")


def gradient() -> Image.Image:
    return Image.linear_gradient("L").resize((64, 64)).convert("RGB")


XYZ = dict(prompt="a blue cube", save_images=True, script_name="X/Y/Z plot",
           script_args={"x_type": "Steps", "x_values": "1-2"})


def test_xyz_grid_runs_the_save_hooks_and_writes_its_infotext(app, saves):
    result, files = new_pngs(app, lambda: generate(app, **XYZ))
    grid = Path(result.grid_path)
    assert grid.parent.parent.name == "txt2img-grids"
    assert files == set(saves["files"]) and len(files) == 3  # two cells (saved by processing) and the grid
    assert saves["files"][-1] == grid and saves["before"][-1] == ("txt2img", result.seeds[0])
    assert parameters(grid) == result.infotexts[0] and result.infotexts[0].endswith(STAMP)
    assert result.info["infotexts"][0] == result.infotexts[0]


def test_xyz_grid_has_no_infotext_with_pnginfo_off(app, saves):
    result, files = new_pngs(app, lambda: generate(app, **XYZ, override_settings=NO_PNGINFO))
    assert files == set(saves["files"]) and len(files) == 3
    assert Path(result.grid_path) in files
    assert all(parameters(path) is None for path in files)


UPSCALE = dict(kind="img2img", init_images=[gradient()], denoising_strength=0.4, save_images=True,
               script_name="SD upscale", script_args={"tile_overlap": 16, "upscaler": "Lanczos", "scale_factor": 1.5})


def test_sd_upscale_results_run_the_save_hooks_and_write_their_infotext(app, saves):
    result, files = new_pngs(app, lambda: generate(app, **UPSCALE, n_iter=2))
    # the tiles are never saved; the two upscaled pictures are, with their start seeds
    assert saves["before"] == [("img2img", 1234), ("img2img", 1235)]
    assert files == set(saves["files"]) == {Path(p) for p in result.paths}
    for path, text in zip(result.paths, result.infotexts):
        assert Path(path).parent.parent.name == "img2img-images"
        assert parameters(Path(path)) == text and text.endswith(STAMP)
        assert Image.open(path).size == (96, 96)
    assert result.info["infotexts"] == result.infotexts


def test_sd_upscale_results_have_no_infotext_with_pnginfo_off(app, saves):
    result, files = new_pngs(app, lambda: generate(app, **UPSCALE, override_settings=NO_PNGINFO))
    assert len(files) == 1 and files == set(saves["files"])
    assert parameters(files.pop()) is None
    assert "SD upscale overlap: 16" in result.infotexts[0]  # the result keeps its infotext all the same


def test_processing_grid_runs_the_save_hooks_and_writes_its_infotext(app, saves):
    result, files = new_pngs(app, lambda: generate(app, prompt="two cubes", batch_size=2, save_images=True,
                                                   seed=50))
    grid = Path(result.grid_path)
    assert grid.parent.parent.name == "txt2img-grids" and grid in files
    assert files == set(saves["files"]) and len(files) == 3  # two images and the grid
    assert saves["before"] == [("txt2img", 50), ("txt2img", 51), ("txt2img", 50)]
    assert parameters(grid) == result.infotexts[0] + STAMP  # the first image's infotext, stamped once more


def test_processing_grid_has_no_infotext_with_pnginfo_off(app, saves):
    result, files = new_pngs(app, lambda: generate(app, prompt="two cubes", batch_size=2, save_images=True,
                                                   override_settings=NO_PNGINFO))
    assert Path(result.grid_path) in files and len(files) == 3
    assert all(parameters(path) is None for path in files)
