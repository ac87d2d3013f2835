"""The request gate: every generation request passes here before it is queued, whoever sent it.

The page, the A1111 API, the native job API and the requests scripts make (X/Y/Z plot cells, SD upscale
tiles) all meet the same checks, in one place:

- the server's limits (`--max-steps`, `--max-images`, `--max-pixels`, `--max-prompt-length`): `RequestLimits`;
- the sampler and schedule type (and the hires. fix pass's), and a step count the sampler can run: resolved
  once into the request's `GenerationPlan` (modules/plan.py), which the job then runs;
- the scripts the request names and their arguments; a selectable script that knows which requests it will
  run (`Script.planned_requests`) has every one of them checked too, and their total work, before the job
  is queued; a request a script changes is checked again when it runs (`Gate.plan_running`).

A failure is a `RequestError(field, message)`: the APIs answer 422 naming the field, the page shows the
message, and nothing is queued.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modules.plan import GenerationPlan, make_plan
from modules.request import GenerationRequest, RequestError

__all__ = ["Gate", "GenerationPlan", "RequestError", "RequestLimits", "check_request"]


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for (flags `--max-steps`, `--max-images`, `--max-pixels`,
    `--max-prompt-length`, `--max-upload-mb`)."""

    max_steps: int = 150
    max_images: int = 100  # batch_size * n_iter
    max_pixels: int = 2048 * 2048  # width * height, also of the hires. fix target
    max_prompt_length: int = 20_000  # characters, per prompt field
    max_upload_bytes: int = 20 * 1024 * 1024  # one decoded image file
    min_side: int = 64  # smaller latents cannot pass the UNet's down-sampling

    @classmethod
    def from_args(cls, args: Any) -> "RequestLimits":
        defaults = cls()
        upload_mb = getattr(args, "max_upload_mb", None)
        return cls(
            max_steps=int(getattr(args, "max_steps", None) or defaults.max_steps),
            max_images=int(getattr(args, "max_images", None) or defaults.max_images),
            max_pixels=int(getattr(args, "max_pixels", None) or defaults.max_pixels),
            max_prompt_length=int(getattr(args, "max_prompt_length", None) or defaults.max_prompt_length),
            max_upload_bytes=int(float(upload_mb) * 1024 * 1024) if upload_mb else defaults.max_upload_bytes,
        )

    @property
    def max_base64_length(self) -> int:
        # base64 is 4 characters per 3 bytes; a data: URL prefix and line breaks add a little
        return self.max_upload_bytes * 4 // 3 + 1024

    @property
    def max_decoded_pixels(self) -> int:
        """Largest input image (pixels) opened: uploads may be larger than outputs, but not unboundedly."""
        return max(self.max_pixels * 4, 4096 * 4096)

    def violations(self, fields: dict[str, Any]) -> list[tuple[str, str]]:
        """(field, message) for every limit the request's values break; `fields` are GenerationRequest
        names and values (img2img and hires. fix fields are used when present)."""
        out: list[tuple[str, str]] = []
        steps = int(fields.get("steps", 0) or 0)
        if steps > self.max_steps:
            out.append(("steps", f"at most {self.max_steps} steps per image on this server (got {steps})"))
        hr_steps = int(fields.get("hr_second_pass_steps", 0) or 0)
        if fields.get("enable_hr") and hr_steps > self.max_steps:
            out.append(("hr_second_pass_steps", f"at most {self.max_steps} steps (got {hr_steps})"))
        batch, count = int(fields.get("batch_size", 1) or 1), int(fields.get("n_iter", 1) or 1)
        batch = max(batch, len(fields.get("init_images") or ()))  # several init images make the batch
        if batch * count > self.max_images:
            out.append(("batch_size", f"batch_size x n_iter must be at most {self.max_images} images per "
                                      f"request on this server (got {batch} x {count})"))
        width, height = int(fields.get("width", 0) or 0), int(fields.get("height", 0) or 0)
        if width * height > self.max_pixels:
            out.append(("width", f"width x height must be at most {self.max_pixels} pixels on this server "
                                 f"(got {width}x{height})"))
        elif min(width, height) < self.min_side:
            name = "width" if width < self.min_side else "height"
            out.append((name, f"width and height must be at least {self.min_side} (got {width}x{height})"))
        if fields.get("enable_hr") and width > 0 and height > 0:
            from modules.hires_geometry import hires_target

            field = "hr_resize_x" if fields.get("hr_resize_x") or fields.get("hr_resize_y") else "hr_scale"
            target = hires_target(width, height, float(fields.get("hr_scale") or 0),
                                  int(fields.get("hr_resize_x") or 0), int(fields.get("hr_resize_y") or 0))
            final_w, final_h = target.final_size
            if max(target.width * target.height, final_w * final_h) > self.max_pixels:
                out.append((field, f"the hires. fix size {target.width}x{target.height} is over the "
                                   f"{self.max_pixels} pixels this server allows"))
            elif min(final_w, final_h) < self.min_side:
                out.append((field, f"the hires. fix would make a {final_w}x{final_h} image; each side must be at "
                                   f"least {self.min_side}"))
        for name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
            text = fields.get(name)
            if isinstance(text, str) and len(text) > self.max_prompt_length:
                out.append((name, f"at most {self.max_prompt_length} characters on this server (got {len(text)})"))
        return out


_IMAGE_FIELDS = frozenset({"init_images", "mask"})


def check_request(request: GenerationRequest, limits: RequestLimits) -> GenerationPlan:
    """The checks one request needs on its own (the limits, every limit it breaks at once), then its plan
    (samplers, steps, hires. fix geometry). RequestError naming the fields."""
    fields = {name: getattr(request, name) for name in type(request).model_fields if name not in _IMAGE_FIELDS}
    fields["init_images"] = request.init_images or ()
    problems = [((name,), message) for name, message in limits.violations(fields)]
    if problems:
        raise RequestError("", problems=problems)
    return make_plan(request)


class Gate:
    """The queue's door: `admit(request)` before a job is queued; `plan_running(request)` for a generation a
    job runs from a request a script changed (`p.request`) since it was admitted."""

    def __init__(self, limits: RequestLimits, scripts: Any = None, styles: Any = None):
        self.limits = limits
        self.scripts = scripts  # modules.scripts.ScriptRegistry (None: no scripts)
        self.styles = styles  # modules.styles.StyleDatabase (None: requests may name no styles)

    def admit(self, request: GenerationRequest) -> GenerationPlan:
        """The plan of the request as it will run (styles applied), or RequestError; nothing invalid gets past."""
        request = self.apply_styles(request)
        plan = check_request(request, self.limits)
        if self.scripts is None:
            return plan
        try:
            run = self.scripts.resolve(request)
        except RequestError:
            raise
        except ValueError as exc:
            field = "alwayson_scripts" if request.alwayson_scripts and not request.script_name else "script_name"
            raise RequestError(field, str(exc)) from None
        if run.selectable is not None:
            script, args = run.selectable
            self._check_planned(script, request, args)
        return plan

    def apply_styles(self, request: GenerationRequest) -> GenerationRequest:
        """A1111's rule, the same for the page and both APIs: the named styles wrap the prompt, the negative
        prompt and the hires. fix prompts (an empty hires prompt stays empty: it means "the styled prompt").
        The infotext then shows the styled prompts, as A1111's does."""
        if not request.styles:
            return request
        if self.styles is None:
            raise RequestError("styles", "this server has no styles")
        try:
            prompt, negative = self.styles.apply(request.styles, request.prompt, request.negative_prompt)
            hr_prompt, hr_negative = self.styles.apply(request.styles, request.hr_prompt, request.hr_negative_prompt)
        except ValueError as exc:
            raise RequestError("styles", f"{exc}; GET /sdapi/v1/prompt-styles lists the styles") from None
        update = {"prompt": prompt, "negative_prompt": negative}
        if request.hr_prompt:
            update["hr_prompt"] = hr_prompt
        if request.hr_negative_prompt:
            update["hr_negative_prompt"] = hr_negative
        return request.model_copy(update=update)

    def plan_running(self, request: GenerationRequest) -> GenerationPlan:
        """The plan for a generation a job runs that differs from the one admitted (a script changed it)."""
        return check_request(request, self.limits)

    def _check_planned(self, script: Any, request: GenerationRequest, args: dict[str, Any]) -> None:
        planner = getattr(script, "planned_requests", None)
        if planner is None:
            return
        title = script.title()
        try:
            planned = list(planner(request, **args) or ())
        except RequestError as exc:
            raise RequestError("", problems=[(("script_args", *loc), f"{title}: {text}")
                                             for loc, text in exc.problems]) from None
        except ValueError as exc:  # an argument the script cannot use: the user's input
            raise RequestError("script_args", f"{title}: {exc}") from None
        total = 0
        generations = 0
        for index, item in enumerate(planned):
            cell, where, sources = _planned_parts(item, index)
            if not getattr(item, "generates", True):
                pixels = cell.width * cell.height
                if pixels > self.limits.max_pixels:
                    arg, what = next(iter(sources.values()), ("", where))
                    raise RequestError(("script_args", arg) if arg else "script_args",
                                       f"{title}: {what}: {cell.width}x{cell.height} is over the "
                                       f"{self.limits.max_pixels} pixels this server allows")
                continue
            generations += 1
            try:
                check_request(cell, self.limits)
            except RequestError as exc:
                problems = []
                for loc, text in exc.problems:
                    source = sources.get(loc[0]) if loc else None
                    arg = ("script_args", source[0]) if source else ("script_args",)
                    what = source[1] if source else f"{where}, {'.'.join(map(str, loc))}"
                    problems.append((arg, f"{title}: {what}: {text}"))
                raise RequestError("", problems=problems) from None
            total += cell.total_images
        if total > self.limits.max_images:
            raise RequestError("script_args", f"{title} would make {total} images in {generations} generations; "
                                              f"at most {self.limits.max_images} images per request on this server")


def _planned_parts(item: Any, index: int) -> tuple[GenerationRequest, str, dict[str, tuple[str, str]]]:
    """(request, where, sources) from a `PlannedRequest` or a bare request."""
    if isinstance(item, GenerationRequest):
        return item, f"generation {index + 1}", {}
    return item.request, item.where or f"generation {index + 1}", dict(item.sources or {})

