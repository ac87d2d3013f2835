"""Infotext: the A1111 "generation parameters" text stored with every image.

The format, byte for byte as AUTOMATIC1111's web UI writes it (v1.10)::

    <prompt, possibly several lines>
    Negative prompt: <negative prompt, possibly several lines>     (only when non-empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...

PNG files carry it in the ``parameters`` text chunk; JPEG, WEBP and AVIF files in the EXIF
UserComment (UNICODE prefix + UTF-16BE, as piexif writes it); GIF files in the comment.
Civitai, other UIs and users' scripts read exactly this, so every detail here is deliberate.
"""
from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from PIL import Image, PngImagePlugin

from modules.prompt_parser import parse_prompt_attention

__all__ = [
    "FIELD_ORDER",
    "TRAILING_FIELDS",
    "SIZE_FIELDS",
    "IGNORED_INFO_KEYS",
    "SAMPLER_NAME_MAP",
    "quote",
    "unquote",
    "create_infotext",
    "parse_generation_parameters",
    "encode_user_comment",
    "decode_user_comment",
    "infotext_to_exif",
    "infotext_to_png_info",
    "read_info_from_image",
    "novelai_to_infotext",
]

logger = logging.getLogger(__name__)

# A1111's fixed keys, in the order `processing.create_infotext` lists them. Any other key follows in
# insertion order, and Version / User always come last.
FIELD_ORDER: tuple[str, ...] = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "Tiling",
)
TRAILING_FIELDS: tuple[str, ...] = ("Version", "User")

# Fields whose value is a width x height pair; a (w, h) tuple is written as "WxH".
SIZE_FIELDS: frozenset[str] = frozenset({"Size", "Seed resize from", "Hires resize", "First pass size"})

NEGATIVE_PROMPT_PREFIX = "Negative prompt:"

# One "Key: value" pair of the parameter line; a value is either JSON-quoted or runs to the next comma.
PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
IMAGE_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")

# The last line is the parameter line only when it holds at least this many pairs; otherwise a
# prompt such as "photo: a cat" would lose its text.
MIN_PARAMS_ON_PARAMETER_LINE = 3

# Image.info entries that say nothing about the generation (A1111 drops the same ones).
IGNORED_INFO_KEYS: frozenset[str] = frozenset({
    "jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif",
    "loop", "background", "timestamp", "duration", "progressive", "progression",
    "icc_profile", "chromaticity", "photoshop",
})

# Defaults A1111 fills in for keys an infotext does not mention, in the order it applies them.
_DEFAULTS_BEFORE_OLD_HIRES = (
    ("Hires sampler", "Use same sampler"),
    ("Hires schedule type", "Use same scheduler"),
    ("Hires checkpoint", "Use same checkpoint"),
    ("Hires prompt", ""),
    ("Hires negative prompt", ""),
    ("Mask mode", "Inpaint masked"),
    ("Masked content", "original"),
    ("Inpaint area", "Whole picture"),
    ("Masked area padding", 32),
)
_DEFAULTS_AFTER_OLD_HIRES = (
    ("RNG", "GPU"),
    ("Schedule type", "Automatic"),
    ("Schedule max sigma", 0),
    ("Schedule min sigma", 0),
    ("Schedule rho", 0),
    ("VAE Encoder", "Full"),
    ("VAE Decoder", "Full"),
    ("FP8 weight", "Disable"),
)


def _build_sampler_name_map() -> Mapping[str, str]:
    # (label, aliases) of every sampler A1111 v1.10 registers; its `samplers_map` keys are the
    # lower-cased labels and aliases.
    samplers = (
        ("DPM++ 2M", ("k_dpmpp_2m",)),
        ("DPM++ SDE", ("k_dpmpp_sde",)),
        ("DPM++ 2M SDE", ("k_dpmpp_2m_sde",)),
        ("DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",)),
        ("DPM++ 2S a", ("k_dpmpp_2s_a",)),
        ("DPM++ 3M SDE", ("k_dpmpp_3m_sde",)),
        ("Euler a", ("k_euler_a", "k_euler_ancestral")),
        ("Euler", ("k_euler",)),
        ("LMS", ("k_lms",)),
        ("Heun", ("k_heun",)),
        ("DPM2", ("k_dpm_2",)),
        ("DPM2 a", ("k_dpm_2_a",)),
        ("DPM fast", ("k_dpm_fast",)),
        ("DPM adaptive", ("k_dpm_ad",)),
        ("Restart", ("restart",)),
        ("DDIM", ("ddim",)),
        ("DDIM CFG++", ("ddim_cfgpp",)),
        ("PLMS", ("plms",)),
        ("UniPC", ("unipc",)),
        ("LCM", ("k_lcm",)),
    )
    table: dict[str, str] = {}
    for label, aliases in samplers:
        table[label.lower()] = label
        for alias in aliases:
            table[alias.lower()] = label
    return MappingProxyType(table)


SAMPLER_NAME_MAP: Mapping[str, str] = _build_sampler_name_map()

# EXIF UserComment: an 8-byte character-code prefix, then the text (EXIF 2.3, section 4.6.5).
_USER_COMMENT_PREFIX_LEN = 8
_USER_COMMENT_ASCII = b"ASCII\x00\x00\x00"
_USER_COMMENT_JIS = b"JIS\x00\x00\x00\x00\x00"
_USER_COMMENT_UNICODE = b"UNICODE\x00"
_USER_COMMENT_UNDEFINED = b"\x00" * 8
_EXIF_IFD_POINTER = 0x8769
_EXIF_USER_COMMENT = 0x9286
_TIFF_LONG = 4
_TIFF_UNDEFINED = 7


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def quote(value: object) -> object:
    """Return `value` JSON-quoted when it holds a comma, a newline or a colon, else unchanged.

    Those three characters would otherwise break the ``Key: value, Key: value`` line.
    """
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        # Not JSON-serialisable (an arbitrary object): quote its text instead.
        return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    """Undo `quote`: a value in double quotes is JSON-decoded; anything else comes back unchanged."""
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)  # starts and ends with '"', so a valid value decodes to a str
    except ValueError:
        return text


def _ordered_items(fields: Mapping[str, object]) -> list[tuple[str, object]]:
    fixed = [(key, fields[key]) for key in FIELD_ORDER if key in fields]
    known = set(FIELD_ORDER) | set(TRAILING_FIELDS)
    extras = [(key, value) for key, value in fields.items() if key not in known]
    trailing = [(key, fields[key]) for key in TRAILING_FIELDS if key in fields]
    return fixed + extras + trailing


def _format_size(key: str, value: object) -> object:
    if key in SIZE_FIELDS and isinstance(value, (tuple, list)) and len(value) == 2:
        width, height = value
        return f"{width}x{height}"
    return value


def create_infotext(prompt: str, negative_prompt: str, fields: Mapping[str, object]) -> str:
    """Build the infotext exactly as A1111 writes it.

    `fields` maps infotext keys to values, e.g. ``{"Steps": 20, "Sampler": "Euler a", "CFG scale": 7,
    "Seed": 1, "Size": (512, 512), "Version": "v1.10.1"}``. Keys are written in A1111's fixed order
    (`FIELD_ORDER`), then any other key in insertion order, then Version and User. None values are
    left out; a value equal to its key is written as the key alone; values are ``str()`` of what was
    passed (so ``7`` and ``7.0`` differ) and JSON-quoted when they contain ``,``, ``\\n`` or ``:``.
    """
    parts = []
    for key, value in _ordered_items(fields):
        if value is None:
            continue
        value = _format_size(key, value)
        parts.append(key if key == value else f"{key}: {quote(value)}")
    parameter_line = ", ".join(parts)
    negative_text = f"\n{NEGATIVE_PROMPT_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative_text}\n{parameter_line}".strip()


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

def _old_hires_fix_first_pass_dimensions(width: int, height: int) -> tuple[int, int]:
    # Hires fix before v1.0 picked a first pass of about 512x512 pixels, rounded up to multiples of 64.
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def _restore_old_hires_fix_params(res: dict) -> None:
    """Convert the pre-v1.0 hires keys ("First pass size") into Size + Hires resize, in place."""
    first_width = res.get("First pass size-1")
    first_height = res.get("First pass size-2")
    if first_width is None or first_height is None:
        return
    first_width, first_height = int(first_width), int(first_height)
    width = int(res.get("Size-1", 512))
    height = int(res.get("Size-2", 512))
    if first_width == 0 or first_height == 0:
        first_width, first_height = _old_hires_fix_first_pass_dimensions(width, height)
    # Old infotexts stored the final size as Size; the first pass is what the Size fields mean now.
    res["Size-1"] = first_width
    res["Size-2"] = first_height
    res["Hires resize-1"] = width
    res["Hires resize-2"] = height


def _prompt_uses_emphasis(prompt: str, negative_prompt: str) -> bool:
    runs = parse_prompt_attention(prompt) + parse_prompt_attention(negative_prompt)
    return any(weight != 1.0 and text != "BREAK" for text, weight in runs)


_VERSION_RE = re.compile(
    r"^v?(\d+(?:\.\d+)*)"  # release: 1.10.1
    r"(?:[-.]?(?:(\d+)|(post|rev|r)(\d*)|(dev|a|alpha|b|beta|c|rc|pre|preview)(\d*)))?$",  # -225, -post1, -RC
    re.IGNORECASE,
)


def _parse_version(text: object) -> tuple | None:
    """A sortable key for an infotext Version such as "v1.10.1" or "v1.7.0-225-g1234abc"; None if unknown."""
    if not isinstance(text, str):
        return None
    # "v1.7.0-225-gdeadbeef" (git describe): keep "v1.7.0-225", as A1111 does.
    described = re.match(r"([^-]+-[^-]+)-.*", text)
    if described:
        text = described.group(1)
    match = _VERSION_RE.match(text.strip())
    if match is None:
        return None
    release = [int(part) for part in match.group(1).split(".")]
    while len(release) > 3 and release[-1] == 0:  # 1.7.0.0 is 1.7.0
        release.pop()
    release = tuple(release + [0] * (3 - len(release)))
    if match.group(2) is not None:  # "-225": commits after a release count as later than it
        return release, 1, int(match.group(2))
    if match.group(3) is not None:
        return release, 1, int(match.group(4) or 0)
    if match.group(5) is not None:  # any pre-release sorts before the release
        return release, -1, int(match.group(6) or 0)
    return release, 0, 0


_V160 = ((1, 6, 0), 0, 0)
_V170_TSNR = ((1, 7, 0), 1, 225)
_V180 = ((1, 8, 0), 0, 0)


def _apply_version_backcompat(res: dict) -> None:
    """Turn on the compatibility options an older A1111 version implies (infotext_versions.backcompat)."""
    version = _parse_version(res.get("Version"))
    if version is None:
        return
    if version < _V160 and "[" in res.get("Prompt", ""):
        res["Old prompt editing timelines"] = True
    if version < _V160 and res.get("Sampler", "") in ("DDIM", "PLMS"):
        res["Pad conds v0"] = True
    if version < _V170_TSNR:
        res["Downcast alphas_cumprod"] = True
    if version < _V180 and res.get("Refiner"):
        res["Refiner switch by sampling steps"] = True


def parse_generation_parameters(text: str, skip_fields: Iterable[str] = ()) -> dict:
    """Parse an infotext into a dict, with A1111's semantics (`infotext_utils.parse_generation_parameters`).

    The result has "Prompt" and "Negative prompt" plus one entry per parameter, all as strings;
    ``WxH`` values become ``Key-1`` / ``Key-2``. Keys the text does not mention get A1111's defaults
    (some of those are ints or bools, as in A1111). Keys in `skip_fields` are removed at the end.
    """
    res: dict = {}
    *lines, last_line = text.strip().split("\n")
    if len(PARAM_RE.findall(last_line)) < MIN_PARAMS_ON_PARAMETER_LINE:
        lines.append(last_line)
        last_line = ""

    prompt = ""
    negative_prompt = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PROMPT_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PROMPT_PREFIX):].strip()
        if in_negative:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line

    for key, value in PARAM_RE.findall(last_line):
        if not value:
            continue  # A1111 cannot read "Key: " with nothing after it and leaves the key out
        if value[0] == '"' and value[-1] == '"':
            value = unquote(value)
        size = IMAGE_SIZE_RE.match(value)
        if size is not None:
            res[f"{key}-1"] = size.group(1)
            res[f"{key}-2"] = size.group(2)
        else:
            res[key] = value

    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt

    # A missing Clip skip means the default, 1.
    res.setdefault("Clip skip", "1")

    hypernet = res.get("Hypernet")
    if hypernet is not None:
        # Hypernetworks used to be chosen in settings; now they are prompt tokens.
        res["Prompt"] += f"<hypernet:{hypernet}:{res.get('Hypernet strength', '1.0')}>"

    if "Hires resize-1" not in res:
        res["Hires resize-1"] = 0
        res["Hires resize-2"] = 0
    for key, default in _DEFAULTS_BEFORE_OLD_HIRES:
        res.setdefault(key, default)

    _restore_old_hires_fix_params(res)

    for key, default in _DEFAULTS_AFTER_OLD_HIRES:
        res.setdefault(key, default)
    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False

    if "Emphasis" not in res and _prompt_uses_emphasis(prompt, negative_prompt):
        # Images made before the Emphasis option existed used what is now called "Original".
        res["Emphasis"] = "Original"
    res.setdefault("Refiner switch by sampling steps", False)

    _apply_version_backcompat(res)

    for key in skip_fields:
        res.pop(key, None)
    return res


# ---------------------------------------------------------------------------------------------
# Storage in image files
# ---------------------------------------------------------------------------------------------

def encode_user_comment(text: str) -> bytes:
    """EXIF UserComment bytes for `text`: the UNICODE prefix and UTF-16BE, as piexif (and so A1111) writes."""
    return _USER_COMMENT_UNICODE + text.encode("utf-16-be")


def decode_user_comment(data: bytes) -> str:
    """Decode EXIF UserComment bytes (ASCII, JIS or UNICODE prefix).

    Raises ValueError when the data is too short, has no (or an unknown) character-code prefix.
    """
    if len(data) < _USER_COMMENT_PREFIX_LEN:
        raise ValueError("The EXIF user comment is too short to hold a character-code prefix.")
    prefix, body = data[:_USER_COMMENT_PREFIX_LEN], data[_USER_COMMENT_PREFIX_LEN:]
    if prefix == _USER_COMMENT_ASCII:
        return body.decode("ascii", errors="replace")
    if prefix == _USER_COMMENT_JIS:
        return body.decode("shift_jis", errors="replace")
    if prefix == _USER_COMMENT_UNICODE:
        # piexif writes UTF-16BE without a byte-order mark; honour a mark when another tool wrote one.
        if body.startswith(b"\xff\xfe"):
            return body[2:].decode("utf-16-le", errors="replace")
        if body.startswith(b"\xfe\xff"):
            body = body[2:]
        return body.decode("utf-16-be", errors="replace")
    if prefix == _USER_COMMENT_UNDEFINED:
        raise ValueError("The EXIF user comment does not say which character code it uses.")
    raise ValueError("The EXIF user comment has an unknown character-code prefix.")


def infotext_to_exif(infotext: str) -> bytes:
    """EXIF bytes holding `infotext` as UserComment, for ``image.save(..., exif=...)`` (JPEG/WEBP/AVIF).

    Built by hand rather than with ``Image.Exif``: Pillow would store the comment as type BYTE, which
    piexif (and so A1111's PNG Info) reads as a tuple of ints and fails on. This is what
    ``piexif.dump`` writes: a big-endian TIFF whose IFD0 points to an Exif IFD with one entry,
    UserComment of type UNDEFINED.
    """
    comment = encode_user_comment(infotext)
    entry = struct.Struct(">HHII")  # tag, type, count, value or offset
    ifd0_offset = 8
    exif_ifd_offset = ifd0_offset + 2 + entry.size + 4
    comment_offset = exif_ifd_offset + 2 + entry.size + 4
    tiff = b"".join((
        b"MM\x00\x2a", struct.pack(">I", ifd0_offset),
        struct.pack(">H", 1), entry.pack(_EXIF_IFD_POINTER, _TIFF_LONG, 1, exif_ifd_offset), struct.pack(">I", 0),
        struct.pack(">H", 1), entry.pack(_EXIF_USER_COMMENT, _TIFF_UNDEFINED, len(comment), comment_offset),
        struct.pack(">I", 0),
        comment,
    ))
    return b"Exif\x00\x00" + tiff


def infotext_to_png_info(infotext: str | None, extra: Mapping[str, str] | None = None) -> PngImagePlugin.PngInfo:
    """PNG text chunks for a writer: `infotext` under ``parameters`` plus any `extra` text items.

    Pillow writes latin-1 text as tEXt and anything else as UTF-8 iTXt, so non-ASCII prompts survive.
    """
    png_info = PngImagePlugin.PngInfo()
    for key, value in (extra or {}).items():
        if key != "parameters":
            png_info.add_text(key, str(value))
    if infotext is not None:
        png_info.add_text("parameters", str(infotext))
    return png_info


def _user_comment_from_exif(data: object) -> str:
    if not isinstance(data, (bytes, bytearray)):
        return ""
    try:
        exif = Image.Exif()
        exif.load(bytes(data))
        raw = exif.get_ifd(_EXIF_IFD_POINTER).get(_EXIF_USER_COMMENT, b"")
    except Exception:  # noqa: BLE001 - Pillow raises many types on damaged EXIF; the image is still usable
        return ""
    if isinstance(raw, str):
        return raw
    try:
        return decode_user_comment(bytes(raw))
    except ValueError:
        # As A1111: fall back to reading the bytes as UTF-8; drop the NUL padding of an undefined prefix.
        return bytes(raw).decode("utf8", errors="ignore").lstrip("\x00")


def novelai_to_infotext(items: Mapping[str, object], width: int, height: int) -> str:
    """Convert NovelAI's PNG metadata (prompt in ``Description``, JSON settings in ``Comment``) to infotext.

    Raises ValueError when the metadata is not in NovelAI's format.
    """
    try:
        settings = json.loads(items["Comment"])  # type: ignore[arg-type]
        sampler = SAMPLER_NAME_MAP.get(settings["sampler"], "Euler a")
        return (
            f"{items['Description']}\n"
            f"Negative prompt: {settings['uc']}\n"
            f"Steps: {settings['steps']}, Sampler: {sampler}, CFG scale: {settings['scale']}, "
            f"Seed: {settings['seed']}, Size: {width}x{height}, Clip skip: 2, ENSD: 31337"
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"The NovelAI metadata in this image could not be read ({error!r}).") from error


def read_info_from_image(image: Image.Image) -> tuple[str | None, dict]:
    """Return ``(infotext, other_metadata)`` for an opened image, as A1111's PNG Info tab reads it.

    The infotext comes from the PNG ``parameters`` chunk, the EXIF UserComment (JPEG/WEBP/AVIF),
    the GIF comment, or NovelAI's metadata (converted). `other_metadata` holds the remaining
    ``image.info`` items without the ones that say nothing about the generation.
    """
    items = dict(image.info or {})
    geninfo = items.pop("parameters", None)
    if geninfo is not None:
        geninfo = str(geninfo)  # PNG iTXt values are a str subclass

    if "exif" in items:
        comment = _user_comment_from_exif(items["exif"])
        if comment:
            geninfo = comment
    elif "comment" in items:  # GIF
        comment = items["comment"]
        geninfo = comment.decode("utf8", errors="ignore") if isinstance(comment, bytes) else str(comment)

    for key in IGNORED_INFO_KEYS:
        items.pop(key, None)

    if items.get("Software") == "NovelAI":
        try:
            geninfo = novelai_to_infotext(items, image.width, image.height)
        except ValueError as error:
            logger.warning("%s", error)

    return geninfo, items
