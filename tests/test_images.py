"""Image files: A1111 names and folders, atomic and concurrent-safe writes, grids, base64."""
import base64
import datetime as dt
import io
import os
import threading
from pathlib import Path

import pytest
from PIL import Image

from modules import images
from modules.infotext import create_infotext, parse_generation_parameters, read_info_from_image

INFOTEXT = create_infotext("a red fox, 狐", "blurry", {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7,
                                                      "Seed": 123, "Size": (16, 16), "Version": "v1.10.1"})


def _tiny(color="red", size=(16, 16), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def _visible_files(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if not name.startswith("."))


# --- names and folders -----------------------------------------------------------------------

def test_first_image_in_a_new_folder_is_00000_seed_png(tmp_path):
    path = images.save_image(_tiny(), tmp_path / "new" / "folder", seed=123, infotext=INFOTEXT)
    assert path == tmp_path / "new" / "folder" / "00000-123.png"
    assert path.is_file()


def test_numbering_continues_after_the_largest_existing_number(tmp_path):
    for name in ["00007-1.png", "00003-2.jpg", "00011.webp", "grid-0042.png", "notes.txt", "abc-5.png"]:
        (tmp_path / name).write_bytes(b"x")
    path = images.save_image(_tiny(), tmp_path, seed=9, infotext=INFOTEXT)
    assert path.name == "00012-9.png"
    assert images.save_image(_tiny(), tmp_path, seed=9, infotext=INFOTEXT).name == "00013-9.png"


def test_grids_are_numbered_on_their_own_as_grid_NNNN(tmp_path):
    (tmp_path / "00020-5.png").write_bytes(b"x")
    first = images.save_grid(_tiny(), tmp_path, infotext=INFOTEXT)
    second = images.save_grid(_tiny(), tmp_path, infotext=INFOTEXT)
    assert (first.name, second.name) == ("grid-0000.png", "grid-0001.png")
    # Grid files have no leading number, so they do not move the sample counter.
    assert images.save_image(_tiny(), tmp_path, seed=1, infotext=INFOTEXT).name == "00021-1.png"


def test_image_without_seed_is_just_the_number(tmp_path):
    assert images.save_image(_tiny(), tmp_path, seed=None, infotext=None).name == "00000.png"


def test_filename_pattern_tags(tmp_path):
    path = images.save_image(_tiny(size=(24, 16)), tmp_path, seed=77, infotext=INFOTEXT,
                             filename_pattern="[seed]-[width]x[height]-[prompt_spaces]-[steps]-[unknown]",
                             prompt="a cat: on/the mat", tags={"steps": 20})
    assert path.name == "00000-77-24x16-a cat_ on_the mat-20-[unknown].png"


def test_filename_pattern_cannot_leave_the_folder(tmp_path):
    path = images.save_image(_tiny(), tmp_path / "out", seed=1, infotext=None, filename_pattern="../../[seed]/x")
    assert path.parent == tmp_path / "out"
    assert "/" not in path.name and "\\" not in path.name


def test_filename_pattern_date_and_prompt_words(tmp_path):
    now = dt.datetime(2024, 5, 1, 13, 45, 7)
    path = images.save_image(_tiny(), tmp_path, seed=3, infotext=None, now=now, prompt="Hello, (big) world! again",
                             filename_pattern="[date]-[datetime<%H%M>]-[prompt_words]")
    assert path.name == "00000-2024-05-01-1345-Hello big world again.png"


def test_date_folder_matches_a1111_layout(tmp_path):
    day = dt.date(2024, 5, 1)
    assert images.date_folder(tmp_path, "txt2img", day) == tmp_path / "txt2img-images" / "2024-05-01"
    assert images.date_folder(tmp_path, "img2img", day) == tmp_path / "img2img-images" / "2024-05-01"
    assert images.date_folder(tmp_path, "txt2img-grids", day) == tmp_path / "txt2img-grids" / "2024-05-01"
    assert images.date_folder(tmp_path, "img2img-grids", day) == tmp_path / "img2img-grids" / "2024-05-01"
    with pytest.raises(ValueError):
        images.date_folder(tmp_path, "../etc", day)


def test_unknown_extension_and_bad_basename_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="Cannot save images"):
        images.save_image(_tiny(), tmp_path, seed=1, infotext=None, extension="docx")
    with pytest.raises(ValueError, match="Basename"):
        images.save_image(_tiny(), tmp_path, seed=1, infotext=None, basename="../grid")
    assert os.listdir(tmp_path) == []


# --- metadata in saved files -----------------------------------------------------------------

def test_png_has_the_infotext_in_the_parameters_chunk(tmp_path):
    path = images.save_image(_tiny(), tmp_path, seed=123, infotext=INFOTEXT)
    with Image.open(path) as image:
        assert image.info["parameters"] == INFOTEXT
        assert image.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("extension", ["jpg", "jpeg", "webp", "avif"])
def test_lossy_formats_carry_the_infotext_in_exif(tmp_path, extension):
    path = images.save_image(_tiny(mode="RGBA", color=(0, 0, 255, 128)), tmp_path, seed=5, infotext=INFOTEXT,
                             extension=extension)
    assert path.name == f"00000-5.{extension}"
    with Image.open(path) as image:
        geninfo, _ = read_info_from_image(image)
        assert image.mode == "RGB"
    assert geninfo == INFOTEXT
    assert parse_generation_parameters(geninfo)["Prompt"] == "a red fox, 狐"


def test_encode_decode_base64_keeps_pixels_and_infotext():
    source = Image.new("RGB", (8, 4))
    source.putpixel((3, 2), (10, 200, 30))
    encoded = images.encode_image_base64(source, infotext=INFOTEXT)
    decoded = images.decode_image_base64(encoded)
    assert decoded.size == (8, 4)
    assert decoded.getpixel((3, 2)) == (10, 200, 30)
    assert decoded.info["parameters"] == INFOTEXT
    # The image's own infotext travels when none is given, as A1111's API does.
    again = images.decode_image_base64(images.encode_image_base64(decoded))
    assert again.info["parameters"] == INFOTEXT


def test_encode_base64_jpeg_has_exif_infotext():
    decoded = images.decode_image_base64(images.encode_image_base64(_tiny(), fmt="jpg", infotext=INFOTEXT))
    assert read_info_from_image(decoded)[0] == INFOTEXT


def test_decode_accepts_data_urls_whitespace_and_missing_padding():
    encoded = images.encode_image_base64(_tiny("green", (5, 3)))
    for variant in (f"data:image/png;base64,{encoded}", "\n".join(encoded[i:i + 60] for i in range(0, len(encoded), 60)),
                    encoded.rstrip("="), f"  {encoded}  ", encoded.encode("ascii")):
        assert images.decode_image_base64(variant).size == (5, 3)


@pytest.mark.parametrize("data, message", [
    ("", "empty"),
    ("   ", "empty"),
    ("this is not base64!!", "not valid base64"),
    (base64.b64encode(b"just some text, not an image").decode(), "not an image"),
    ("data:text/plain;base64,aGVsbG8=", "data URL"),
    ("https://example.com/cat.png", "URLs are not accepted"),
])
def test_decode_rejects_broken_data_with_a_clear_message(data, message):
    with pytest.raises(ValueError, match=message):
        images.decode_image_base64(data)


def test_decode_rejects_a_truncated_png():
    encoded = images.encode_image_base64(Image.effect_noise((64, 64), 50).convert("RGB"))
    raw = base64.b64decode(encoded)
    with pytest.raises(ValueError, match="damaged or cut short"):
        images.decode_image_base64(base64.b64encode(raw[: len(raw) // 2]).decode())


def test_decode_turns_images_upright_by_exif_orientation():
    source = Image.new("RGB", (8, 4), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    source.save(buffer, format="JPEG", exif=exif)
    decoded = images.decode_image_base64(base64.b64encode(buffer.getvalue()).decode())
    assert decoded.size == (4, 8)


# --- atomic and concurrent writes ------------------------------------------------------------

def test_the_final_name_only_ever_holds_a_complete_file(tmp_path, monkeypatch):
    real_replace = os.replace
    seen = []

    def checking_replace(src, dst):
        src, dst = Path(src), Path(dst)
        # Just before the rename: the data is complete under a hidden temporary name in the same
        # folder, and nothing exists yet under the final name.
        assert src.parent == dst.parent == tmp_path
        assert src.name.startswith(".") and src.name.endswith(".tmp")
        assert not dst.exists()
        with Image.open(src) as image:
            image.load()
            assert image.info["parameters"] == INFOTEXT
        seen.append(dst.name)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", checking_replace)
    path = images.save_image(_tiny(), tmp_path, seed=1, infotext=INFOTEXT)
    assert seen == [path.name]
    assert os.listdir(tmp_path) == [path.name]


def test_a_failed_write_leaves_no_file_behind(tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        images.save_image(_tiny(), tmp_path, seed=1, infotext=INFOTEXT)
    assert os.listdir(tmp_path) == []


def test_a_watcher_never_sees_a_partial_image(tmp_path):
    stop = threading.Event()
    problems: list[str] = []
    checked: set[str] = set()

    def watch():
        while not stop.is_set():
            for name in _visible_files(tmp_path):
                if name in checked:
                    continue
                try:
                    with Image.open(tmp_path / name) as image:
                        image.load()
                        if image.info.get("parameters") != INFOTEXT:
                            problems.append(f"{name}: no infotext")
                except Exception as error:  # noqa: BLE001 - any failure here is a partial file
                    problems.append(f"{name}: {error}")
                checked.add(name)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        big = Image.effect_noise((256, 256), 80).convert("RGB")  # slow enough to write to overlap the watcher
        for seed in range(12):
            images.save_image(big, tmp_path, seed=seed, infotext=INFOTEXT)
    finally:
        stop.set()
        watcher.join()
    assert problems == []
    assert len(_visible_files(tmp_path)) == 12


def test_eight_threads_saving_at_once_get_eight_distinct_numbers(tmp_path):
    threads_count, rounds = 8, 3
    barrier = threading.Barrier(threads_count)
    results: list[Path] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(index: int):
        try:
            for round_index in range(rounds):
                barrier.wait()
                seed = index * 100 + round_index
                path = images.save_image(_tiny((index * 30, round_index * 80, 0)), tmp_path, seed=seed,
                                         infotext=f"t{seed}\nSteps: 1, Seed: {seed}, Size: 16x16")
                with lock:
                    results.append(path)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads_count)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()

    assert errors == []
    assert len(results) == len(set(results)) == threads_count * rounds
    numbers = sorted(int(path.name.split("-")[0]) for path in results)
    assert numbers == list(range(threads_count * rounds))
    assert _visible_files(tmp_path) == sorted(path.name for path in results)
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []
    for path in results:
        seed = path.stem.split("-")[1]
        with Image.open(path) as image:
            assert image.info["parameters"] == f"t{seed}\nSteps: 1, Seed: {seed}, Size: 16x16"


def test_concurrent_grids_get_distinct_numbers(tmp_path):
    barrier = threading.Barrier(4)
    paths: list[Path] = []

    def worker():
        barrier.wait()
        paths.append(images.save_grid(_tiny(), tmp_path, infotext=INFOTEXT))

    workers = [threading.Thread(target=worker) for _ in range(4)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert sorted(path.name for path in paths) == ["grid-0000.png", "grid-0001.png", "grid-0002.png", "grid-0003.png"]


# --- grids -----------------------------------------------------------------------------------

@pytest.mark.parametrize("count, rows, cols", [
    (1, 1, 1), (2, 1, 2), (3, 2, 2), (4, 2, 2), (5, 2, 3), (6, 2, 3), (7, 3, 3), (8, 3, 3), (9, 3, 3), (10, 3, 4),
    (16, 4, 4),
])
def test_default_grid_shape_is_round_sqrt_rows(count, rows, cols):
    grid = images.image_grid([_tiny(size=(8, 6)) for _ in range(count)])
    assert grid.size == (cols * 8, rows * 6)


@pytest.mark.parametrize("count, rows", [(6, 2), (7, 1), (8, 2), (9, 3), (12, 3)])
def test_prevent_empty_spots_picks_a_divisor(count, rows):
    assert images.grid_rows(count, prevent_empty_spots=True) == rows
    grid = images.image_grid([_tiny(size=(4, 4)) for _ in range(count)], prevent_empty_spots=True)
    assert grid.size == (count // rows * 4, rows * 4)


def test_grid_rows_options():
    assert images.grid_rows(8, n_rows=4) == 4
    assert images.grid_rows(8, n_rows=0, batch_size=2) == 2
    assert images.grid_rows(3, n_rows=5) == 3  # never more rows than images
    with pytest.raises(ValueError):
        images.grid_rows(0)
    with pytest.raises(ValueError):
        images.image_grid([])


def test_grid_places_images_row_by_row_and_fills_gaps_with_black():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    grid = images.image_grid([_tiny(color, (10, 10)) for color in colors])  # 2 rows x 2 cols
    assert grid.getpixel((5, 5)) == colors[0]
    assert grid.getpixel((15, 5)) == colors[1]
    assert grid.getpixel((5, 15)) == colors[2]
    assert grid.getpixel((15, 15)) == (0, 0, 0)


def test_explicit_rows(tmp_path):
    grid = images.image_grid([_tiny(size=(4, 4)) for _ in range(6)], rows=3)
    assert grid.size == (8, 12)
    path = images.save_grid(grid, tmp_path, infotext=INFOTEXT, extension="jpg")
    assert path.name == "grid-0000.jpg"
    with Image.open(path) as image:
        assert read_info_from_image(image)[0] == INFOTEXT
