"""GenerationRequest: the one request model behind the UI, the A1111 API and the native job API.

Defaults and limits live here so bad input becomes a 422 naming the field, never a 500.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator, model_validator

from modules.masking import DEFAULT_MAX_IMAGE_SIDE, HIRES_UPSCALERS, check_image

#: A decoded image (the UI hands PIL images in; the API layer decodes base64 first).
RequestImage = Annotated[Image.Image, WithJsonSchema({"type": "string", "format": "binary",
                                                       "description": "an image (base64 over HTTP)"})]

class RequestError(ValueError):
    """A request that cannot run as given: one or more (field, message) problems. The APIs answer 422 with
    each field named (`loc` is a field name or a path such as ("script_args", "x_values")); the page shows
    the messages as a notice. Raised before the request is queued, never half-way through it."""

    def __init__(self, field: str | tuple | list, message: str = "", *,
                 problems: list[tuple[tuple, str]] | None = None):
        if problems is None:
            loc = tuple(field) if isinstance(field, (tuple, list)) else (field,) if field else ()
            problems = [(loc, message)]
        self.problems = [(tuple(loc), str(text)) for loc, text in problems]
        super().__init__("; ".join(_problem_text(loc, text) for loc, text in self.problems))

    @property
    def field(self) -> tuple:
        return self.problems[0][0]


def _problem_text(loc: tuple, message: str) -> str:
    name = ".".join(str(part) for part in loc)
    return f"{name}: {message}" if name else message


USE_SAME_SAMPLER = "Use same sampler"
USE_SAME_SCHEDULER = "Use same scheduler"


class GenerationRequest(BaseModel):
    """One txt2img or img2img job. Field names and meanings are A1111's; defaults are its UI's.

    Images are PIL images. Their size limit is `DEFAULT_MAX_IMAGE_SIDE` per side, or the `max_image_side`
    given in the validation context (`GenerationRequest.model_validate(data, context={...})`).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)

    kind: Literal["txt2img", "img2img"] = "txt2img"
    prompt: str = Field("", max_length=100_000)
    negative_prompt: str = Field("", max_length=100_000)
    styles: list[str] = Field(default_factory=list)

    seed: int = Field(-1, ge=-1, le=2**32 - 1)
    subseed: int = Field(-1, ge=-1, le=2**32 - 1)
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0)
    seed_resize_from_h: int = Field(-1, ge=-1, le=16384)
    seed_resize_from_w: int = Field(-1, ge=-1, le=16384)

    sampler_name: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    steps: int = Field(20, ge=1, le=1000)
    cfg_scale: float = Field(7.0, ge=0.0, le=100.0)
    width: int = Field(512, ge=8, le=16384)
    height: int = Field(512, ge=8, le=16384)
    batch_size: int = Field(1, ge=1, le=64)
    n_iter: int = Field(1, ge=1, le=1000)
    tiling: bool = False  # seamless textures: the UNet's and VAE's convolutions wrap around the edges
    clip_skip: int | None = Field(None, ge=1, le=12)
    eta: float | None = Field(None, ge=0.0, le=1.0)

    override_settings: dict[str, Any] = Field(default_factory=dict)
    save_images: bool = True
    save_grid: bool = True
    checkpoint: str | None = None  # title, name or hash; None = the loaded one

    # scripts (modules.scripts): a dropdown script by title with its arguments (by name, or A1111's positional
    # list), and always-on scripts' arguments as {"Title": {"args": {...} or [...]}}
    script_name: str | None = None
    script_args: list[Any] | dict[str, Any] = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)

    # img2img and inpainting (kind="img2img")
    init_images: list[RequestImage] | None = Field(None, max_length=64)
    resize_mode: int = Field(0, ge=0, le=3)  # 0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)  # img2img, and the hires pass of txt2img
    image_cfg_scale: float | None = Field(None, ge=0.0, le=100.0)  # instruct-pix2pix models only (not supported)
    mask: RequestImage | None = None  # white (or opaque, for an RGBA brush layer) = repaint
    mask_blur: int | None = Field(None, ge=0, le=256)  # sets both mask_blur_x and mask_blur_y when given
    mask_blur_x: int = Field(4, ge=0, le=256)
    mask_blur_y: int = Field(4, ge=0, le=256)
    mask_round: bool = True
    inpainting_fill: int = Field(1, ge=0, le=3)  # masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = False  # inpaint area: False whole picture, True only masked
    inpaint_full_res_padding: int = Field(32, ge=0, le=4096)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)  # 1 = "Inpaint not masked"
    initial_noise_multiplier: float | None = Field(None, ge=0.0, le=10.0)  # None: the option's value

    # hires fix (kind="txt2img")
    enable_hr: bool = False
    hr_scale: float = Field(2.0, gt=0.0, le=16.0)
    hr_upscaler: str | None = "Latent"
    hr_second_pass_steps: int = Field(0, ge=0, le=1000)  # 0 = the same as steps
    hr_resize_x: int = Field(0, ge=0, le=16384)
    hr_resize_y: int = Field(0, ge=0, le=16384)
    hr_sampler_name: str | None = None  # None = the first pass's sampler
    hr_scheduler: str | None = None  # None = the first pass's schedule type
    hr_prompt: str = Field("", max_length=100_000)  # "" = the prompt
    hr_negative_prompt: str = Field("", max_length=100_000)

    @field_validator("init_images", mode="before")
    @classmethod
    def _init_images_are_images(cls, value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, Image.Image):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"init_images must be a list of images, not {type(value).__name__}")
        for index, image in enumerate(value):
            check_image(image, f"init_images[{index}]", max_side=10**9)  # type first; the size limit below
        return list(value)

    @field_validator("mask", mode="before")
    @classmethod
    def _mask_is_image(cls, value: Any) -> Any:
        if value is not None:
            check_image(value, "mask", max_side=10**9)
        return value

    @field_validator("init_images", "mask")
    @classmethod
    def _image_size_limit(cls, value: Any, info: ValidationInfo) -> Any:
        limit = int((info.context or {}).get("max_image_side", DEFAULT_MAX_IMAGE_SIDE))
        for index, image in enumerate(value if isinstance(value, list) else [value] if value is not None else []):
            name = f"{info.field_name}[{index}]" if isinstance(value, list) else info.field_name
            check_image(image, name, max_side=limit)
        return value

    @field_validator("hr_sampler_name", "hr_scheduler", mode="before")
    @classmethod
    def _use_same(cls, value: Any) -> Any:
        # The UI's "Use same sampler" / "Use same scheduler" (and an empty string) mean "as the first pass".
        if value is None or (isinstance(value, str) and value.strip() in ("", USE_SAME_SAMPLER, USE_SAME_SCHEDULER)):
            return None
        return value

    @field_validator("hr_upscaler")
    @classmethod
    def _known_upscaler(cls, value: str | None) -> str | None:
        if value is not None and value not in HIRES_UPSCALERS:
            raise ValueError(f"unknown hires upscaler {value!r}; available: {', '.join(HIRES_UPSCALERS)}")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int, info) -> int:
        if value % 8:
            raise ValueError(f"{info.field_name} must be a multiple of 8 (got {value}); try {value - value % 8 or 8}")
        return value

    @model_validator(mode="after")
    def _check_resize_seed(self):
        for name in ("seed_resize_from_h", "seed_resize_from_w"):
            value = getattr(self, name)
            if value > 0 and value % 8:
                raise ValueError(f"{name} must be a multiple of 8 or -1/0 to disable (got {value})")
        return self

    @model_validator(mode="after")
    def _images_match_kind(self):
        if self.kind == "img2img" and not self.init_images:
            raise ValueError("img2img needs at least one image in init_images")
        if self.kind == "txt2img" and (self.init_images or self.mask is not None):
            raise ValueError("init_images and mask are only used by img2img (kind='img2img')")
        if self.init_images and len(self.init_images) > 1 and len(self.init_images) > self.batch_size:
            raise ValueError(f"{len(self.init_images)} init images were sent for a batch size of {self.batch_size}; "
                             "send one image, or at most batch_size images")
        return self

    @property
    def effective_batch_size(self) -> int:
        """Images per batch: several init images make the batch (A1111), otherwise batch_size."""
        if self.kind == "img2img" and self.init_images and len(self.init_images) > 1:
            return len(self.init_images)
        return self.batch_size

    @property
    def total_images(self) -> int:
        return self.effective_batch_size * self.n_iter

    @property
    def mask_blur_xy(self) -> tuple[int, int]:
        """The mask blur across and down: `mask_blur` for both when it is set (A1111's setter)."""
        if self.mask_blur is not None:
            return self.mask_blur, self.mask_blur
        return self.mask_blur_x, self.mask_blur_y
