"""GenerationPlan: what a request resolves to before it runs, made once at the queue's door.

`make_plan(request)` resolves the sampler and schedule type of each sampling pass (the first, and the hires.
fix pass's), checks the step counts they can run, and works out the hires. fix geometry. Processing then
reads the plan top to bottom and never looks a name up again. A request that cannot be planned is a
`RequestError` naming the field. Pure: no torch, no model, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

from modules import samplers
from modules.hires_geometry import HiresTarget, hires_target
from modules.request import GenerationRequest, RequestError

MIN_SIDE, MAX_SIDE = 64, 16384  # latents under 8x8 cannot pass the UNet's down-sampling


@dataclass(frozen=True)
class SamplingPass:
    """One sampling pass: the sampler, its schedule, the name the infotext gives the schedule, and the steps."""

    sampler: samplers.SamplerInfo
    schedule: samplers.ScheduleType
    schedule_label: str
    steps: int


@dataclass(frozen=True)
class GenerationPlan:
    """A request (styles applied, validated) with everything resolved that its job needs."""

    request: GenerationRequest
    first_pass: SamplingPass
    hires_pass: SamplingPass | None = None  # txt2img with enable_hr
    hires_target: HiresTarget | None = None

    @property
    def kind(self) -> str:
        return self.request.kind


def sampling_pass(field: str, name: str | None, schedule: str | None, steps: int, *,
                  steps_field: str = "steps") -> SamplingPass:
    """The pass for these names and steps; RequestError naming the field for an unknown sampler or schedule
    type, or a step count the sampler cannot run."""
    try:
        sampler, resolved = samplers.resolve_sampler(name, schedule)
    except samplers.UnsupportedScheduleError as exc:
        raise RequestError("scheduler" if field == "sampler_name" else "hr_scheduler", str(exc)) from None
    except ValueError as exc:
        raise RequestError(field, str(exc)) from None
    try:
        samplers.check_steps(sampler, steps)
    except ValueError as exc:
        raise RequestError(steps_field, str(exc)) from None
    return SamplingPass(sampler, resolved, samplers.effective_schedule_label(sampler, resolved, schedule), steps)


def make_plan(request: GenerationRequest) -> GenerationPlan:
    """Resolve `request` into its plan; RequestError naming the field when it cannot run as given."""
    first = sampling_pass("sampler_name", request.sampler_name, request.scheduler, request.steps)
    if request.kind != "txt2img" or not request.enable_hr:
        return GenerationPlan(request, first)
    hires = sampling_pass("hr_sampler_name", request.hr_sampler_name or request.sampler_name,
                          request.hr_scheduler or request.scheduler, request.hr_second_pass_steps or request.steps,
                          steps_field="hr_second_pass_steps")
    target = hires_target(request.width, request.height, request.hr_scale, request.hr_resize_x, request.hr_resize_y)
    final_w, final_h = target.final_size
    if min(final_w, final_h) < MIN_SIDE or max(target.width, target.height) > MAX_SIDE:
        field = "hr_resize_x" if request.hr_resize_x or request.hr_resize_y else "hr_scale"
        raise RequestError(field, f"The hires fix would make a {final_w}x{final_h} image; each side must be between "
                                  f"{MIN_SIDE} and {MAX_SIDE} pixels")
    return GenerationPlan(request, first, hires, target)
