"""What a generation says about itself, in A1111's shapes.

- `build_infotext`: one image's infotext (the PNG ``parameters`` text), with A1111's fields in A1111's order.
- `info_dict`: the job's `info` (A1111's `Processed.js()`), which the A1111 API returns as a JSON string, the
  native job API as an object, and scripts (X/Y/Z plot, SD upscale) copy into the results they assemble.

Processing fills both for every job, so they live below the API layer (which may not be imported from here).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Mapping

from modules import infotext, prompt_parser, samplers
from modules.job_state import GenerationResult
from modules.request import GenerationRequest

if TYPE_CHECKING:
    from modules.processing import ProcessingContext

VERSION = "athanor-0.1.0"


def build_infotext(req: GenerationRequest, ctx: ProcessingContext, *, prompt: str, negative: str, seed: int,
                   subseed: int, sampler: samplers.SamplerInfo, schedule_label: str,
                   extra: Mapping[str, Any] | None = None, extra_late: Mapping[str, Any] | None = None) -> str:
    """A1111's infotext for one image. `extra` holds the job's extra fields (Denoising strength, Mask blur,
    Hires upscale, ...), `extra_late` those A1111 adds while sampling, after Emphasis (Noise multiplier)."""
    opts = ctx.opts
    ensd = int(opts.get("eta_noise_seed_delta", 0))
    clip_skip = int(opts.get("CLIP_stop_at_last_layers", 1))
    fields: dict[str, Any] = {
        "Steps": req.steps,
        "Sampler": sampler.name,
        "Schedule type": schedule_label,
        # A1111's page writes a whole-number scale as "7", not "7.0"
        "CFG scale": int(req.cfg_scale) if float(req.cfg_scale).is_integer() else req.cfg_scale,
        "Seed": seed,
        "Size": f"{req.width}x{req.height}",
        "Model hash": ctx.model_ref.shorthash if opts.get("add_model_hash_to_info", True) else None,
        "Model": ctx.model_ref.name if opts.get("add_model_name_to_info", True) else None,
        "Variation seed": subseed if req.subseed_strength > 0 else None,
        "Variation seed strength": req.subseed_strength if req.subseed_strength > 0 else None,
        "Seed resize from": (f"{req.seed_resize_from_w}x{req.seed_resize_from_h}"
                             if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0 else None),
        "Clip skip": clip_skip if clip_skip > 1 else None,
        "ENSD": ensd if ensd != 0 and sampler.uses_ensd else None,
        "RNG": opts.get("randn_source") if opts.get("randn_source", "GPU") != "GPU" else None,
        "Tiling": True if req.tiling else None,
    }
    fields.update(extra or {})
    fields.update(ctx.extra_generation_params)
    emphasis = opts.get("emphasis", "Original")
    if emphasis != "Original" and ("(" in prompt or "[" in prompt):
        fields["Emphasis"] = emphasis
    if opts.get("use_old_scheduling", False) and prompt_parser.scheduling_modes_differ([prompt], req.steps):
        fields["Old prompt editing timelines"] = True
    fields.update(extra_late or {})
    if opts.get("add_version_to_infotext", True):
        fields["Version"] = VERSION
    return infotext.create_infotext(prompt, negative, fields)


def info_dict(req: GenerationRequest, ctx: ProcessingContext, result: GenerationResult,
              sampler: samplers.SamplerInfo, schedule_label: str, seed: int, subseed: int, *,
              extra_params: Mapping[str, Any] | None = None, inpainting_conditioning: bool = False) -> dict[str, Any]:
    """A1111's `Processed.js()` fields, returned by the API as the `info` JSON string."""
    return {
        "prompt": req.prompt,
        "all_prompts": result.prompts,
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": result.negative_prompts,
        "seed": seed,
        "all_seeds": result.seeds,
        "subseed": subseed,
        "all_subseeds": result.subseeds,
        "subseed_strength": req.subseed_strength,
        "width": req.width,
        "height": req.height,
        "sampler_name": sampler.name,
        "scheduler": schedule_label,
        "cfg_scale": req.cfg_scale,
        "steps": req.steps,
        "batch_size": req.effective_batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": ctx.model_ref.name,
        "sd_model_hash": ctx.model_ref.shorthash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": req.seed_resize_from_w,
        "seed_resize_from_h": req.seed_resize_from_h,
        # A1111 reports the request's value for both kinds (txt2img's is the hires fix's)
        "denoising_strength": req.denoising_strength,
        "extra_generation_params": dict(extra_params or {}),
        "index_of_first_image": 0,
        "infotexts": result.infotexts,
        "styles": req.styles,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": int(ctx.opts.get("CLIP_stop_at_last_layers", 1)),
        "is_using_inpainting_conditioning": inpainting_conditioning,
        "version": VERSION,
    }
