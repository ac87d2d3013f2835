"""What both APIs share: the caller, errors in A1111's shape, uploads, waiting for jobs, output files."""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, NoReturn, Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from modules.api import ApiProviders
from modules.gate import RequestError, RequestLimits
from modules.auth import USER_STATE_KEY, AuthConfig, auth_config_from_args, owner_for

log = logging.getLogger("athanor.api")

_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w.+-]+=[\w.+-]+)*;base64,", re.IGNORECASE)
_BASE64_CHARS = re.compile(r"^[A-Za-z0-9+/_\-]*={0,2}$")

# Magic numbers of the image types accepted for upload, checked before Pillow sees a byte.
_IMAGE_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"WEBP", 8, "WEBP"),  # RIFF....WEBP
)
ACCEPTED_IMAGE_FORMATS = frozenset(fmt for _, _, fmt in _IMAGE_SIGNATURES)

# Files /outputs/ serves (what Athanor writes there).
SERVED_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".avif", ".gif", ".txt"})


@dataclass
class ApiContext:
    """The services the routes use, handed over by the App once per server (not the App itself)."""

    submit_job: Callable[[Any, str], Any]  # App.submit: the request gate, then the queue
    queue: Any  # modules.jobs.JobQueue
    registry: Any  # modules.model_registry.ModelRegistry
    models: Any  # modules.model_manager.ModelManager
    opts: Any  # modules.options.Options
    styles: Any  # modules.styles.StyleDatabase (the page and the gate use the same one)
    outputs_dir: Path
    flags: Any  # the parsed command line (cmd-flags, listening)
    auth: AuthConfig
    limits: RequestLimits
    providers: ApiProviders

    @classmethod
    def for_app(cls, app: Any) -> "ApiContext":
        return cls(submit_job=app.submit, queue=app.queue, registry=app.registry, models=app.models, opts=app.opts,
                   styles=app.styles, outputs_dir=Path(app.paths.outputs_dir), flags=app.args,
                   auth=auth_config_from_args(app.args, app.logins), limits=app.gate.limits,
                   providers=app.api_providers)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the login name (None without logins), the job owner and admin rights."""

    user: str | None
    owner: str
    admin: bool


# ---------------------------------------------------------------------------------------------
# Errors: A1111's JSON shape {error, detail, body, errors}

class ApiError(Exception):
    """An error for the client. `field` (a dotted path) makes it a validation-style error naming it."""

    def __init__(self, status: int, detail: str, *, field: str | Sequence[str | int] | None = None,
                 error: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.error = error
        self.headers = headers


def field_loc(field: str | Sequence[str | int]) -> list[str | int]:
    parts: list[str | int] = [field] if isinstance(field, str) else list(field)
    return ["body", *parts]


def _loc_text(loc: Iterable[Any]) -> str:
    return ".".join(str(p) for p in loc)


def json_safe(value: Any) -> Any:
    """`value` with what JSON (as UTF-8, without NaN) cannot carry made printable: lone surrogates (a client
    may send "\\ud800" and see it quoted back in a message) become backslash escapes, non-finite floats
    their names. Without this the error response itself would fail to render: a 500 for bad input."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def error_response(status: int, error: str, detail: Any, errors: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    content = {"error": error, "detail": detail, "body": "",
               "errors": errors if errors is not None else (detail if isinstance(detail, str) else str(detail))}
    return JSONResponse(status_code=status, content=json_safe(jsonable_encoder(content)), headers=headers)


def validation_details(errors: Iterable[dict]) -> list[dict[str, Any]]:
    """Pydantic errors without the offending input (which may be megabytes of base64)."""
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in errors]


def validation_error_response(details: list[dict[str, Any]], status: int = 422) -> JSONResponse:
    text = "; ".join(f"{_loc_text(d['loc'])}: {d['msg']}" for d in details)
    return error_response(status, "RequestValidationError", details, text)


def raise_pydantic(exc: ValidationError, *, prefix: Sequence[str | int] = ()) -> NoReturn:
    """Re-raise a pydantic error met while converting a request as a 422 naming the fields."""
    details = [{"loc": ["body", *prefix, *d["loc"]], "msg": d["msg"], "type": d["type"]}
               for d in validation_details(exc.errors())]
    raise ApiValidationError(details)


class ApiValidationError(Exception):
    def __init__(self, details: list[dict[str, Any]], status: int = 422):
        super().__init__("; ".join(f"{_loc_text(d['loc'])}: {d['msg']}" for d in details))
        self.details = details
        self.status = status


def invalid(field: str | Sequence[str | int], message: str, status: int = 422) -> ApiValidationError:
    return ApiValidationError([{"loc": field_loc(field), "msg": message, "type": "value_error"}], status)


def install_error_handlers(server: FastAPI) -> None:
    """Every error from our routes comes back as JSON in A1111's shape; never a bare 500 for bad input."""

    async def on_api_error(_request: Request, exc: ApiError):
        if exc.field is not None:
            details = [{"loc": field_loc(exc.field), "msg": exc.detail, "type": "value_error"}]
            return validation_error_response(details, exc.status)
        return error_response(exc.status, exc.error or _status_name(exc.status), exc.detail, headers=exc.headers)

    async def on_validation(_request: Request, exc: ApiValidationError):
        return validation_error_response(exc.details, exc.status)

    async def on_request_validation(_request: Request, exc: RequestValidationError):
        return validation_error_response(validation_details(exc.errors()))

    async def on_request_error(_request: Request, exc: RequestError):
        # the gate refused the request (limits, sampler, scripts and their planned requests): 422 naming each field
        details = [{"loc": field_loc(loc), "msg": text, "type": "value_error"} for loc, text in exc.problems]
        return validation_error_response(details or [{"loc": ["body"], "msg": str(exc), "type": "value_error"}])

    async def on_http(_request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, "HTTPException", exc.detail, headers=getattr(exc, "headers", None))

    async def on_unexpected(request: Request, exc: Exception):
        log.exception("API error: %s %s", request.method, request.url.path)
        return error_response(500, type(exc).__name__, "Internal server error; the server log has the details",
                              str(exc))

    server.add_exception_handler(ApiError, on_api_error)
    server.add_exception_handler(ApiValidationError, on_validation)
    server.add_exception_handler(RequestValidationError, on_request_validation)
    server.add_exception_handler(RequestError, on_request_error)
    server.add_exception_handler(StarletteHTTPException, on_http)
    server.add_exception_handler(Exception, on_unexpected)


def _status_name(status: int) -> str:
    return {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
            413: "PayloadTooLarge", 422: "UnprocessableEntity", 429: "TooManyRequests",
            500: "InternalServerError", 501: "NotImplemented"}.get(status, "HTTPError")


# ---------------------------------------------------------------------------------------------
# The caller

_basic = HTTPBasic(auto_error=False, realm="Athanor")


def caller_dependency(context: ApiContext):
    """A FastAPI dependency giving the Caller; 401 with `WWW-Authenticate: Basic` when logins are on
    and the request has no valid Basic credentials (checked here too, not only in the middleware)."""

    def caller(request: Request, credentials: HTTPBasicCredentials | None = Depends(_basic)) -> Caller:
        auth = context.auth
        if not auth.enabled:
            return Caller(None, owner_for(None), True)
        if credentials is None or not auth.verify(credentials.username, credentials.password):
            raise ApiError(401, "Incorrect username or password", error="Unauthorized",
                           headers={"WWW-Authenticate": 'Basic realm="Athanor"'})
        request.scope.setdefault("state", {})[USER_STATE_KEY] = credentials.username
        return Caller(credentials.username, owner_for(credentials.username), auth.is_admin(credentials.username))

    return caller


# ---------------------------------------------------------------------------------------------
# Uploads

def decode_upload(data: Any, field: str | Sequence[str | int], limits: RequestLimits) -> Image.Image:
    """A base64 image (raw or data: URL) -> a loaded PIL image, checked before decoding.

    Refused with 422/413 naming `field`: http(s) URLs (never fetched), text over the size limit, invalid
    base64, bytes that are not PNG/JPEG/WEBP/GIF/BMP, and images over the pixel limit (checked from the
    header, before the pixels are decompressed).
    """
    if not isinstance(data, str):
        raise invalid(field, f"expected a base64 image string, got {type(data).__name__}")
    text = data.strip()
    if not text:
        raise invalid(field, "the image is empty")
    if text[:8].lower().startswith(("http://", "https://")):
        raise invalid(field, "URL images are not fetched: send the image itself, base64-encoded")
    if len(text) > limits.max_base64_length:
        raise invalid(field, f"the image is larger than the {limits.max_upload_bytes // (1024 * 1024)} MB this "
                             f"server accepts", status=413)
    if text[:5].lower() == "data:":
        prefix = _DATA_URL.match(text)
        if prefix is None:
            raise invalid(field, "a data URL must look like data:image/png;base64,<data>")
        media = (prefix.group(1) or "").lower()
        if media and not media.startswith("image/"):
            raise invalid(field, f"expected an image, the data URL says {media}")
        text = text[prefix.end():]
    text = re.sub(r"\s+", "", text)
    if not _BASE64_CHARS.match(text):
        raise invalid(field, "the image is not valid base64")
    text = text.translate(str.maketrans("-_", "+/"))
    text += "=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, "the image is not valid base64") from None
    if not raw:
        raise invalid(field, "the image is empty")
    if len(raw) > limits.max_upload_bytes:
        raise invalid(field, f"the image is larger than the {limits.max_upload_bytes} bytes this server accepts",
                      status=413)
    kind = sniff_image_type(raw)
    if kind is None:
        raise invalid(field, "the data is not a PNG, JPEG, WEBP, GIF or BMP image")
    try:
        image = Image.open(io.BytesIO(raw), formats=[kind])
        width, height = image.size
        if width * height > limits.max_decoded_pixels or width <= 0 or height <= 0:
            raise invalid(field, f"the image is {width}x{height}; this server opens images up to "
                                 f"{limits.max_decoded_pixels} pixels", status=413)
        image.load()
    except ApiValidationError:
        raise
    except Image.DecompressionBombError:
        raise invalid(field, "the image is too large to open safely", status=413) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning):
        raise invalid(field, "the image is damaged or cut short and cannot be read") from None
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError):
        pass  # unreadable orientation: keep the pixels as stored
    return image


def sniff_image_type(raw: bytes) -> str | None:
    for signature, offset, kind in _IMAGE_SIGNATURES:
        if raw[offset:offset + len(signature)] == signature:
            if kind == "WEBP" and raw[:4] != b"RIFF":
                continue
            return kind
    return None


def encode_png_base64(image: Image.Image, infotext: str | None = None, fmt: str = "png") -> str:
    from modules.images import encode_image_base64

    return encode_image_base64(image, fmt, infotext=infotext)


# ---------------------------------------------------------------------------------------------
# Jobs

async def wait_for_job(job: Any, *, poll_from: float = 0.005, poll_to: float = 0.05) -> None:
    """Wait for a job without holding a thread: poll its event, quickly at first."""
    delay = poll_from
    while not job.done.is_set():
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, poll_to)


def validate_api_settings(opts: Any, values: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """Settings sent over the API, coerced; 403 for those the API may not set (paths, code), 422 naming the
    setting (under `prefix`) for unknown ones or bad values."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        try:
            out.update(opts.validate({key: value}, is_api=True))
        except PermissionError as exc:
            raise ApiError(403, str(exc), error="Forbidden") from None
        except ValueError as exc:
            raise invalid((*prefix, key), str(exc)) from None
    return out


def check_override_settings(context: ApiContext, overrides: dict[str, Any]) -> dict[str, Any]:
    """Coerced overrides; 403 for settings the API may not set, 422 for unknown ones or bad values."""
    registry = context.registry
    out = validate_api_settings(context.opts, overrides, ("override_settings",))
    checkpoint = out.get("sd_model_checkpoint")
    if checkpoint:
        info = registry.find_checkpoint(checkpoint)
        if info is None:
            registry.refresh()
            info = registry.find_checkpoint(checkpoint)
        if info is None:
            raise invalid(("override_settings", "sd_model_checkpoint"), f"Checkpoint {checkpoint!r} not found; "
                          f"GET /sdapi/v1/sd-models lists the titles")
        out["sd_model_checkpoint"] = info.title
    vae = out.get("sd_vae")
    if vae and vae not in ("Automatic", "None") and registry.find_vae(vae) is None:
        raise invalid(("override_settings", "sd_vae"), f"VAE {vae!r} not found; GET /sdapi/v1/sd-vae lists them")
    return out


def submit(context: ApiContext, request: Any, caller: Caller) -> Any:
    from modules.jobs import QueueFullError

    try:
        return context.submit_job(request, caller.owner)
    except QueueFullError as exc:
        raise ApiError(429, str(exc), error="QueueFull") from None


def visible_job(context: ApiContext, job_id: str, caller: Caller) -> Any:
    """The job if it exists and the caller may see it; 404 otherwise (the same answer either way)."""
    from modules.jobs import JobNotFound

    try:
        job = context.queue.get(job_id)
    except (JobNotFound, KeyError):
        job = None
    if job is None or not (caller.admin or job.owner == caller.owner):
        raise ApiError(404, f"Job {job_id!r} not found", error="NotFound")
    return job


def current_job_of(queue: Any, owner: str) -> Any | None:
    """The caller's job A1111's /progress, /interrupt and /skip act on: the running one, else the next queued."""
    running = queue.running()
    if running is not None and running.owner == owner:
        return running
    for job in queue.order():
        if job.owner == owner:
            return job
    return None


# ---------------------------------------------------------------------------------------------
# Output files

def safe_output_path(outputs_dir: Path, requested: str) -> Path | None:
    """The file under `outputs_dir` that `requested` names, or None for anything else: `..` segments,
    absolute or drive paths, backslashes, NUL, links that lead outside, folders, and other file types."""
    if not requested or "\x00" in requested or "\\" in requested or ":" in requested:
        return None
    pure = PurePosixPath(requested)
    if pure.is_absolute() or any(part in ("..", ".") for part in pure.parts) or requested.startswith("~"):
        return None
    base = outputs_dir.resolve()
    try:
        candidate = (base / pure).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not candidate.is_relative_to(base) or not candidate.is_file():
        return None
    if candidate.suffix.lower() not in SERVED_SUFFIXES:
        return None
    return candidate


def dumps_info(info: dict[str, Any]) -> str:
    return json.dumps(info, default=str, ensure_ascii=False)
