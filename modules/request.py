"""GenerationRequest: the one request model behind the UI, the A1111 API and the native job API.

Defaults and limits live here so bad input becomes a 422 naming the field, never a 500.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

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
    clip_skip: int | None = Field(None, ge=1, le=12)
    eta: float | None = Field(None, ge=0.0, le=1.0)

    override_settings: dict[str, Any] = Field(default_factory=dict)
    save_images: bool = True
    save_grid: bool = True
    checkpoint: str | None = None  # title, name or hash; None = the loaded one

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

    @property
    def total_images(self) -> int:
        return self.batch_size * self.n_iter
