"""Saving and loading images: numbered output files with infotext, grids, date folders, base64.

Output layout and names follow AUTOMATIC1111 (v1.10 defaults), so users' folders and scripts carry over::

    outputs/txt2img-images/2024-05-01/00000-1234.png      sample: 5-digit counter, seed
    outputs/txt2img-grids/2024-05-01/grid-0000.png        grid: "grid-" and a 4-digit counter

Every file is written atomically: the bytes go to a hidden ``.NNNNN.tmp`` file in the same folder,
are fsynced, then renamed over the final name with ``os.replace``, so a file under its final name is
always complete. The temporary name doubles as a reservation of the counter (created with O_EXCL),
so any number of threads or processes can save into one folder without sharing a number.

Generated images (processing's samples and grids, the grids and results scripts assemble) reach disk through
one function, `save_output`: the same hooks, the same `enable_pnginfo` rule, the same folders.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import io
import math
import os
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from PIL import Image, ImageOps, UnidentifiedImageError

from modules.hooks import BeforeImageSavedParams, HookRegistry, ImageSavedParams
from modules.infotext import infotext_to_exif, infotext_to_png_info

__all__ = [
    "DEFAULT_QUALITY",
    "GRID_BASENAME",
    "SavedOutput",
    "TEMP_SUFFIX",
    "apply_filename_pattern",
    "date_folder",
    "decode_image_base64",
    "encode_image",
    "encode_image_base64",
    "grid_rows",
    "image_grid",
    "next_sequence_number",
    "sanitize_filename_part",
    "save_grid",
    "save_image",
    "save_output",
]

DEFAULT_QUALITY = 80  # A1111's jpeg_quality default, also used for WEBP and AVIF
GRID_BASENAME = "grid"
TEMP_SUFFIX = ".tmp"
SAMPLE_NUMBER_WIDTH = 5  # 00000-1234.png
BASENAME_NUMBER_WIDTH = 4  # grid-0000.png
DEFAULT_FILENAME_PATTERN = "[seed]"
MAX_PROMPT_WORDS = 8  # A1111's directories_max_prompt_words default

_MAX_NUMBER_ATTEMPTS = 10_000
_MAX_FILENAME_BYTES = 240  # under the 255-byte limit of common file systems, with room for the temp name
_MAX_FILENAME_PART_LENGTH = 128
_INVALID_FILENAME_CHARS = '<>:"/\\|?*\n\r\t\0'
_EXIF_FORMATS = frozenset({"JPEG", "WEBP", "AVIF"})
_KIND_RE = re.compile(r"^[A-Za-z0-9_]+(?:-grids)?$")
_PATTERN_RE = re.compile(r"(.*?)(?:\[([^\[\]]+)\]|$)")
_PATTERN_ARG_RE = re.compile(r"(.*)<([^>]*)>$")
_NON_LETTERS_RE = re.compile(r"[\s" + re.escape(string.punctuation) + r"]+")
_DATA_URL_RE = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Folders and names
# ---------------------------------------------------------------------------------------------

def date_folder(base: str | os.PathLike[str], kind: str, now: dt.date | None = None) -> Path:
    """The folder for today's outputs of one kind: ``base/<kind>-images/YYYY-MM-DD``.

    `kind` is "txt2img", "img2img", "extras", ...; grid kinds end in "-grids" and keep their name
    (``base/txt2img-grids/YYYY-MM-DD``), as in A1111.
    """
    if not _KIND_RE.match(kind):
        raise ValueError(f"Output kind {kind!r} is not a plain name such as 'txt2img' or 'txt2img-grids'.")
    folder = kind if kind.endswith("-grids") else f"{kind}-images"
    day = now if now is not None else dt.datetime.now()
    return Path(base) / folder / day.strftime("%Y-%m-%d")


def sanitize_filename_part(text: str, replace_spaces: bool = True) -> str:
    """Make `text` safe inside a file name: no path separators or reserved characters, at most 128 chars."""
    if replace_spaces:
        text = text.replace(" ", "_")
    text = text.translate({ord(char): "_" for char in _INVALID_FILENAME_CHARS})
    text = text.lstrip(" ")[:_MAX_FILENAME_PART_LENGTH]
    return text.rstrip(" .")


def _sequence_number(name: str, prefix: str) -> int | None:
    """The counter in a file name such as "00012-1234.png" (prefix "") or "grid-0003.png" (prefix "grid-")."""
    if name.startswith(".") and name.endswith(TEMP_SUFFIX):
        name = name[1:-len(TEMP_SUFFIX)]  # a reservation: ".00012.tmp" holds number 12
    if not name.startswith(prefix):
        return None
    leading = os.path.splitext(name[len(prefix):])[0].split("-")[0]
    try:
        return int(leading)
    except ValueError:
        return None


def _names_in(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def next_sequence_number(directory: str | os.PathLike[str], basename: str = "") -> int:
    """The counter the next file saved in `directory` gets: the largest one in use plus one, from 0.

    Like A1111's `get_next_sequence_number`: with no basename every file's leading number counts;
    with basename "grid" only files named "grid-NNNN...".
    """
    prefix = f"{basename}-" if basename else ""
    numbers = (_sequence_number(name, prefix) for name in _names_in(Path(directory)))
    return max((n for n in numbers if n is not None), default=-1) + 1


def _number_in_use(directory: Path, basename: str, number: int, ignore: str) -> bool:
    prefix = f"{basename}-" if basename else ""
    return any(name != ignore and _sequence_number(name, prefix) == number for name in _names_in(directory))


def _numbered_stem(basename: str, number: int) -> str:
    if basename:
        return f"{basename}-{number:0{BASENAME_NUMBER_WIDTH}}"
    return f"{number:0{SAMPLE_NUMBER_WIDTH}}"


def apply_filename_pattern(pattern: str, tags: Mapping[str, object]) -> str:
    """Replace ``[tag]`` and ``[tag<arg>...]`` in `pattern` with values from `tags` (keys lower-case).

    A value may be a callable taking the ``<arg>`` strings. Unknown tags, and tags whose value is
    None, stay in the text as written, as in A1111.
    """
    parts: list[str] = []
    for match in _PATTERN_RE.finditer(pattern):
        text, tag = match.groups()
        parts.append(text)
        if tag is None:
            continue
        name, args = tag, []
        while (arg_match := _PATTERN_ARG_RE.match(name)) is not None:
            name, arg = arg_match.groups()
            args.insert(0, arg)
        value = tags.get(name.lower())
        if callable(value):
            try:
                value = value(*args)
            except (TypeError, ValueError):
                value = None
        parts.append(f"[{tag}]" if value is None else str(value))
    return "".join(parts)


def _format_datetime(now: dt.datetime, time_format: str = "", time_zone: str | None = None) -> str:
    default_format = "%Y%m%d%H%M%S"
    try:
        zone = ZoneInfo(time_zone) if time_zone else None
    except (ZoneInfoNotFoundError, ValueError):
        zone = None  # an unknown zone falls back to local time, as in A1111
    moment = now.astimezone(zone)
    try:
        text = moment.strftime(time_format or default_format)
    except ValueError:
        text = moment.strftime(default_format)
    return sanitize_filename_part(text, replace_spaces=False)


def _filename_tags(
    image: Image.Image,
    seed: int | None,
    prompt: str | None,
    extra: Mapping[str, object] | None,
    now: dt.datetime,
) -> dict[str, object]:
    tags: dict[str, object] = {
        "seed": "" if seed is None else seed,
        "width": image.width,
        "height": image.height,
        "date": now.strftime("%Y-%m-%d"),
        "datetime": lambda time_format="", time_zone=None: _format_datetime(now, time_format, time_zone),
    }
    if prompt is not None:
        words = [word for word in _NON_LETTERS_RE.split(prompt) if word] or ["empty"]
        tags.update({
            "prompt": sanitize_filename_part(prompt),
            "prompt_spaces": sanitize_filename_part(prompt, replace_spaces=False),
            "prompt_words": sanitize_filename_part(" ".join(words[:MAX_PROMPT_WORDS]), replace_spaces=False),
            "prompt_hash": hashlib.sha256(prompt.encode()).hexdigest()[:8],
        })
    for key, value in (extra or {}).items():
        tags[key.lower()] = None if value is None else sanitize_filename_part(str(value), replace_spaces=False)
    return tags


def _truncate_utf8(text: str, max_bytes: int) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max(max_bytes, 0)].decode("utf-8", errors="ignore")


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------

def _pil_format(extension: str) -> tuple[str, str]:
    ext = extension.lower().lstrip(".")
    pil_format = Image.registered_extensions().get(f".{ext}")
    if not ext or pil_format is None or pil_format not in Image.SAVE:
        raise ValueError(f"Cannot save images as {extension!r}: use png, jpg, webp or another format Pillow writes.")
    return ext, pil_format


def encode_image(
    image: Image.Image,
    extension: str = "png",
    *,
    infotext: str | None = None,
    extra_info: Mapping[str, str] | None = None,
    quality: int = DEFAULT_QUALITY,
    lossless: bool = False,
) -> bytes:
    """Encode `image` as `extension` ("png", "jpg", "webp", ...) with the infotext embedded.

    PNG: ``parameters`` text chunk (plus `extra_info` chunks). JPEG/WEBP/AVIF: EXIF UserComment;
    RGBA is flattened to RGB as A1111 does. GIF: the comment. Other formats carry no metadata.
    """
    _, pil_format = _pil_format(extension)
    buffer = io.BytesIO()
    if pil_format == "PNG":
        image.save(buffer, format="PNG", pnginfo=infotext_to_png_info(infotext, extra_info))
    elif pil_format in _EXIF_FORMATS:
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        options: dict[str, object] = {"quality": quality}
        if pil_format == "WEBP":
            options["lossless"] = lossless
        if infotext is not None:
            options["exif"] = infotext_to_exif(infotext)
        image.save(buffer, format=pil_format, **options)
    elif pil_format == "GIF" and infotext is not None:
        image.save(buffer, format="GIF", comment=infotext)
    else:
        image.save(buffer, format=pil_format)
    return buffer.getvalue()


def encode_image_base64(image: Image.Image, fmt: str = "png", infotext: str | None = None) -> str:
    """Base64 text (no ``data:`` prefix, as A1111's API returns) of `image` encoded as `fmt`.

    Without `infotext` the image's own ``parameters`` (and, for PNG, its other text items) are kept.
    """
    text_items = {k: v for k, v in (image.info or {}).items() if isinstance(k, str) and isinstance(v, str)}
    if infotext is None:
        infotext = text_items.get("parameters")
    data = encode_image(image, fmt, infotext=infotext, extra_info=text_items)
    return base64.b64encode(data).decode("ascii")


def decode_image_base64(data: str) -> Image.Image:
    """Decode base64 image data, raw or as a ``data:image/...;base64,`` URL, into a loaded image.

    The image is turned upright by its EXIF orientation, and palette images with transparency
    become RGBA (as A1111's `images.read`). Its ``info`` (infotext included) is kept.
    Raises ValueError with a message for the user when the data is not a readable image.
    """
    if isinstance(data, (bytes, bytearray)):
        data = bytes(data).decode("ascii", errors="replace")
    if not isinstance(data, str):
        raise ValueError(f"Expected the image as base64 text, got {type(data).__name__}.")
    text = data.strip()
    if not text:
        raise ValueError("The image data is empty.")
    if text[:8].lower().startswith(("http://", "https://")):
        raise ValueError("Image URLs are not accepted: send the image itself, base64-encoded.")
    if text[:5].lower() == "data:":
        prefix = _DATA_URL_RE.match(text)
        if prefix is None:
            raise ValueError("A data URL must look like 'data:image/png;base64,<data>'.")
        text = text[prefix.end():]
    text = re.sub(r"\s+", "", text).translate(str.maketrans("-_", "+/"))  # also accept URL-safe base64
    text += "=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError("The image data is not valid base64.") from error
    if not raw:
        raise ValueError("The image data is empty.")
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except Image.DecompressionBombError as error:
        raise ValueError(f"The image is too large to open safely ({error}).") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise ValueError("The decoded data is not an image that can be read (PNG, JPEG, WEBP, ...), "
                         "or the image is damaged or cut short.") from error
    return _fix_image(image)


def _fix_image(image: Image.Image) -> Image.Image:
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError):
        pass  # unreadable orientation: keep the pixels as stored
    if image.mode in ("RGB", "P") and isinstance(image.info.get("transparency"), bytes):
        image = image.convert("RGBA")
    return image


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable on POSIX; Windows cannot open folders this way.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RESERVATION = re.compile(r"\.(?:[\w-]*?)\d{4,5}" + re.escape(TEMP_SUFFIX))


def remove_stale_reservations(outputs_dir: Path) -> list[Path]:
    """Remove the hidden `.NNNNN.tmp` files a killed process left under `outputs_dir` (a save in flight when
    it died: some or all of an image's bytes, never renamed to a final name). Called once at start, before
    any job runs: this process is the only writer of its outputs. Returns what was removed."""
    removed = []
    for path in Path(outputs_dir).rglob(f"*{TEMP_SUFFIX}"):
        if path.is_file() and not path.is_symlink() and _RESERVATION.fullmatch(path.name):
            _unlink_quietly(path)
            removed.append(path)
    return removed


def _write_numbered(directory: Path, basename: str, decoration: str, extension: str, data: bytes) -> Path:
    """Write `data` as the next numbered file in `directory`, atomically, never reusing a number."""
    number = next_sequence_number(directory, basename)
    for _ in range(_MAX_NUMBER_ATTEMPTS):
        stem = _numbered_stem(basename, number)
        temp_path = directory / f".{stem}{TEMP_SUFFIX}"
        try:
            fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            number += 1  # another writer holds this number right now
            continue
        final_path = directory / f"{stem}{decoration}.{extension}"
        # Holding the reservation, check that no writer finished this number before we got it.
        if final_path.exists() or _number_in_use(directory, basename, number, ignore=temp_path.name):
            os.close(fd)
            _unlink_quietly(temp_path)
            number = max(number + 1, next_sequence_number(directory, basename))
            continue
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp_path, final_path)
        except BaseException:
            _unlink_quietly(temp_path)
            raise
        _fsync_directory(directory)
        return final_path
    raise OSError(f"Could not find a free file number in {directory}.")


def save_image(
    image: Image.Image,
    directory: str | os.PathLike[str],
    *,
    seed: int | None,
    infotext: str | None,
    extension: str = "png",
    basename: str = "",
    filename_pattern: str | None = None,
    prompt: str | None = None,
    tags: Mapping[str, object] | None = None,
    extra_info: Mapping[str, str] | None = None,
    quality: int = DEFAULT_QUALITY,
    lossless: bool = False,
    now: dt.datetime | None = None,
) -> Path:
    """Save `image` as the next numbered file in `directory` (created if missing) and return its path.

    Names follow A1111: ``NNNNN-<pattern>.png`` without a basename (pattern default ``[seed]``),
    ``<basename>-NNNN-<pattern>.png`` with one; without a seed there is no ``-<pattern>`` part.
    `filename_pattern` understands [seed], [width], [height], [date], [datetime<fmt><zone>],
    [prompt], [prompt_spaces], [prompt_words], [prompt_hash] (with `prompt`) and any key of `tags`
    (e.g. steps, cfg, sampler, model_name). The infotext goes into the PNG ``parameters`` chunk or the
    JPEG/WEBP/AVIF EXIF UserComment. The write is atomic and safe with concurrent writers.
    """
    ext, _ = _pil_format(extension)
    if basename != sanitize_filename_part(basename, replace_spaces=False) or basename.startswith("."):
        raise ValueError(f"Basename {basename!r} must be a plain file name part without path characters.")
    data = encode_image(image, ext, infotext=infotext, extra_info=extra_info, quality=quality, lossless=lossless)

    decoration = ""
    if seed is not None:
        moment = now if now is not None else dt.datetime.now()
        applied = apply_filename_pattern(filename_pattern or DEFAULT_FILENAME_PATTERN,
                                         _filename_tags(image, seed, prompt, tags, moment))
        # The pattern's own text must not reach outside the folder either.
        applied = applied.translate({ord(char): "_" for char in _INVALID_FILENAME_CHARS}).rstrip(" .")
        if applied:
            room = _MAX_FILENAME_BYTES - len(f"{_numbered_stem(basename, 0)}0000-.{ext}")
            decoration = "-" + _truncate_utf8(applied, room)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return _write_numbered(directory, basename, decoration, ext, data)


# ---------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------

def grid_rows(count: int, *, batch_size: int = 1, n_rows: int = -1, prevent_empty_spots: bool = False) -> int:
    """How many rows A1111 gives a grid of `count` images.

    `n_rows` > 0 fixes the rows; 0 uses the batch size; -1 (the default) picks ``round(sqrt(count))``,
    or with `prevent_empty_spots` the largest divisor of `count` not above ``sqrt(count)``.
    Never more rows than images.
    """
    if count < 1:
        raise ValueError("A grid needs at least one image.")
    if n_rows > 0:
        rows = n_rows
    elif n_rows == 0:
        rows = batch_size
    elif prevent_empty_spots:
        rows = math.floor(math.sqrt(count))
        while count % rows != 0:
            rows -= 1
    else:
        rows = round(math.sqrt(count))
    return max(1, min(rows, count))


def image_grid(
    images: Iterable[Image.Image],
    rows: int | None = None,
    *,
    batch_size: int = 1,
    n_rows: int = -1,
    prevent_empty_spots: bool = False,
) -> Image.Image:
    """Paste `images` row by row into one RGB image on black, each cell the size of the first image.

    `rows` defaults to A1111's choice (`grid_rows`); columns are ``ceil(count / rows)``.
    """
    images = list(images)
    if not images:
        raise ValueError("A grid needs at least one image.")
    if rows is None:
        rows = grid_rows(len(images), batch_size=batch_size, n_rows=n_rows, prevent_empty_spots=prevent_empty_spots)
    if rows < 1:
        raise ValueError(f"A grid needs at least one row, not {rows}.")
    rows = min(rows, len(images))
    cols = math.ceil(len(images) / rows)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), color="black")
    for index, image in enumerate(images):
        grid.paste(image, box=(index % cols * width, index // cols * height))
    return grid


def save_grid(
    grid: Image.Image,
    directory: str | os.PathLike[str],
    *,
    infotext: str | None,
    extension: str = "png",
    quality: int = DEFAULT_QUALITY,
    lossless: bool = False,
) -> Path:
    """Save a grid as ``grid-NNNN.<ext>`` in `directory`, A1111's default grid name."""
    return save_image(grid, directory, seed=None, infotext=infotext, extension=extension,
                      basename=GRID_BASENAME, quality=quality, lossless=lossless)


# ---------------------------------------------------------------------------------------------
# Generated images: the one save path
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SavedOutput:
    """What was written: the image and infotext as the `before_image_saved` hooks left them, and the file."""

    image: Image.Image
    infotext: str
    path: Path


def save_output(
    image: Image.Image,
    outputs_dir: str | os.PathLike[str],
    kind: str,
    *,
    seed: int,
    infotext: str,
    opts: Mapping[str, object],
    hooks: HookRegistry | None = None,
    grid: bool = False,
) -> SavedOutput:
    """Save one generated image or grid the way every generated file is saved, and return what was written.

    `before_image_saved` hooks may replace the image or edit the infotext first; `image_saved` hooks see the
    file after. The infotext goes into the file only with the option `enable_pnginfo` on (the hooks get it
    either way). `kind` is "txt2img" or "img2img": samples go to ``<kind>-images/DATE/NNNNN-<seed>`` in the
    option `samples_format`, grids (`grid=True`) to ``<kind>-grids/DATE/grid-NNNN.png``. Callers decide
    whether to save at all (`save_images`, `samples_save`, `grid_save`).
    """
    if hooks is not None and hooks.has("before_image_saved"):
        params = hooks.run("before_image_saved", BeforeImageSavedParams(image, infotext, seed, kind))
        image, infotext = params.image, params.infotext
    embedded = infotext if opts.get("enable_pnginfo", True) else None
    if grid:
        path = save_grid(image, date_folder(outputs_dir, f"{kind}-grids"), infotext=embedded)
    else:
        path = save_image(image, date_folder(outputs_dir, kind), seed=seed, infotext=embedded,
                          extension=str(opts.get("samples_format") or "png"))
    if hooks is not None and hooks.has("image_saved"):
        hooks.run("image_saved", ImageSavedParams(image, str(path), infotext))
    return SavedOutput(image, infotext, path)
