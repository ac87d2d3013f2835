"""Request and response models of the HTTP APIs, and the request limits.

The A1111 models carry every field of A1111's `StableDiffusionProcessingTxt2Img/Img2Img` API models
with A1111's *API* defaults (steps 50, sampler_index "Euler", save_images False; for img2img
inpainting_fill 0, inpaint_full_res True, inpaint_full_res_padding 0, which differ from the UI's).
Like A1111 they ignore fields they do not know, so clients written for other versions keep working.
Floats must be finite; anything that does not fit its type is a 422 naming the field.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_NESTING = 32  # script_args, override_settings, comments: deeper is no real client, and cannot be echoed back


def _depth(value: Any, limit: int = MAX_NESTING + 1) -> int:
    """How deeply lists and objects nest in `value` (counting stops past `limit`)."""
    if limit <= 0 or not isinstance(value, (list, dict)):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(item, limit - 1) for item in items), default=0)


_A1111_CONFIG = ConfigDict(extra="ignore", allow_inf_nan=False, protected_namespaces=())


class A1111ProcessingBase(BaseModel):
    """The fields txt2img and img2img share (A1111's `StableDiffusionProcessing`)."""

    model_config = _A1111_CONFIG

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # A1111's API fields are all Optional: a client sending null gets the default
        if isinstance(data, dict):
            deepest = max((_depth(v) for v in data.values()), default=0)
            if deepest > MAX_NESTING:
                raise ValueError(f"the request nests lists or objects {deepest} levels deep; at most {MAX_NESTING}")
            return {k: v for k, v in data.items() if v is not None}
        return data

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None

    # API-only fields (A1111's `api/models.py` adds them to both requests)
    sampler_index: str = Field("Euler", description="Deprecated alias of sampler_name, used when it is empty")
    script_name: str | None = None
    script_args: list[Any] | dict[str, Any] = Field(default_factory=list, description="the script's arguments, "
                                                    "positional (A1111) or by name")
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = Field(None, description="An infotext whose values fill the fields this request "
                                                   "does not set")


class Txt2ImgRequest(A1111ProcessingBase):
    """POST /sdapi/v1/txt2img (A1111's `StableDiffusionTxt2ImgProcessingAPI`)."""

    denoising_strength: float | None = 0.75
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(A1111ProcessingBase):
    """POST /sdapi/v1/img2img (A1111's `StableDiffusionImg2ImgProcessingAPI`). Images are base64
    (raw or `data:image/...;base64,` URLs); http(s) URLs are refused."""

    init_images: list[str] | None = Field(None, description="base64 images (required)")
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = Field(False, description="echo init_images and mask back in `parameters`")


class ImagesResponse(BaseModel):
    images: list[str] | None = Field(None, description="base64 PNGs carrying their infotext (grid first)")
    parameters: dict[str, Any]
    info: str = Field(description="JSON string of the generation info (A1111's Processed.js())")


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str = Field(description="base64 image")


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ScriptsList(BaseModel):
    txt2img: list[str]
    img2img: list[str]


class JobSubmitted(BaseModel):
    id: str
    status: str
    position: int


class JobStatus(BaseModel):
    id: str
    owner: str
    kind: str
    status: str
    position: int = Field(description="place in the queue (1 = next); 0 once running or finished")
    created: float
    started: float | None
    finished: float | None
    job_no: int
    job_count: int
    step: int
    steps: int
    progress: float
    eta: float | None = Field(description="seconds left, when running")
    error: str | None
    interrupted: bool = False
    preview: str | None = Field(None, description="base64 PNG of the latest live preview (when asked for)")


class JobResult(BaseModel):
    id: str
    status: str
    images: list[str]
    infotexts: list[str]
    seeds: list[int]
    info: dict[str, Any]
    interrupted: bool
    error: str | None
