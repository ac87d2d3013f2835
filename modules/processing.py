"""One generation, top to bottom, in numbered steps (as diffusers pipelines read).

`process_txt2img` and `process_img2img` both go:

    1. check inputs                  2. seeds and prompts (`before_prompt_parse` hooks may rewrite them)
    3. what every batch shares (txt2img: the hires pass's settings; img2img: the init images, the mask and
       their latent)
    then per batch (after the extensions' batch hooks; an interrupt stops before the next batch):
    4. encode prompts (as schedules: prompt editing, alternation, AND)
    5. prepare latents (the seeds' noise)
    6. denoise with our loop (txt2img: from noise, then the hires pass if asked; img2img: from the init latent)
    7. decode (NaN -> retry in float32)
    8. post-process (img2img: paste back over the original; extensions' `postprocess_image`), infotext, save
    and after the last batch:
    9. the grid (saved when asked) and the job's `info`

The caller (the job worker) owns the model and hands in the request's `GenerationPlan` (modules/plan.py:
the request with its samplers, steps and hires geometry resolved once, at the queue's door) and an immutable
settings snapshot, so nothing here looks a name up again or reads or writes global state. What the steps use lives in modules with one job each: `vae_codec` (pixels
<-> latents), `image_conditioning` (inpainting channels, latent masks, img2img's init), `sampling` (which
steps run and the loop), `hires_geometry`, `generation_info` (infotext and `info`), `images.save_output`
(the one save path) and `job_state` (progress, interrupt, result).

How many steps run (A1111's `setup_img2img_steps`, see `sampling.img2img_plan`):
- txt2img: `steps`.
- img2img: the scheduler is set to `steps` and the last `int(min(denoising, 0.999) * steps) + 1` of them run;
  with the option `img2img_fix_steps` it is set to `int(steps / min(denoising, 0.999))` and the last `steps` run.
- hires pass: like `img2img_fix_steps`, with `hr_second_pass_steps or steps`.
- denoising 0: no step runs (A1111 runs one step at the smallest noise level); img2img then returns the
  prepared init image itself, pixel for pixel, where the starting latent is its plain encoding.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from modules import extra_networks, images, masking, rng, samplers, sampling
from modules.conditioning import PromptEncoder, schedule_multicond, schedule_prompt
from modules.generation_info import build_infotext, info_dict
from modules.hires_geometry import HiresTarget
from modules.plan import GenerationPlan
from modules.hooks import BeforePromptParseParams, HookRegistry
from modules.image_conditioning import (LatentMask, inpainting_image_conditioning, prepare_img2img, sdxl_time_ids,
                                        txt2img_image_conditioning, uses_inpainting_conditioning)
from modules.job_state import GenerationResult, JobControl, Progress
from modules.model_manager import ModelRef
from modules.request import GenerationRequest
from modules.sampling import CFGDenoiser, StepPlan, img2img_plan, latent_preview_cheap, txt2img_plan
from modules.vae_codec import LATENT_FACTOR, decode_latents, encode_pixels, pil_to_tensor, to_pil

log = logging.getLogger("athanor.processing")


@dataclass
class ProcessingContext:
    """Everything one job needs besides its request."""

    model: Any  # LoadedModel
    model_ref: ModelRef
    opts: Mapping[str, Any]
    device: torch.device
    dtype: torch.dtype
    outputs_dir: Any  # pathlib.Path: base of outputs/<kind>-images/DATE
    hooks: HookRegistry | None = None
    control: JobControl = field(default_factory=JobControl)
    progress: Progress = field(default_factory=Progress)
    embedding_lookup: Any = None
    known_networks: frozenset[str] = frozenset()
    warn: Callable[[str], None] = log.warning
    # extensions: infotext fields they add (A1111's p.extra_generation_params), and their per-batch calls
    extra_generation_params: dict[str, Any] = field(default_factory=dict)
    job_session: Any = None  # modules.extension_runtime.JobSession


def process(plan: GenerationPlan, ctx: ProcessingContext) -> GenerationResult:
    """Run a planned request of either kind."""
    with circular_padding(ctx.model, plan.request.tiling):
        return process_img2img(plan, ctx) if plan.kind == "img2img" else process_txt2img(plan, ctx)


# -- txt2img ------------------------------------------------------------------------------------

def process_txt2img(plan: GenerationPlan, ctx: ProcessingContext) -> GenerationResult:
    """txt2img, with the hires fix when the request enables it."""
    # 1. check inputs (the request gate resolved samplers, steps and the hires geometry into the plan)
    req = plan.request
    _check_inputs(req, ctx)
    sampler, schedule, schedule_label = plan.first_pass.sampler, plan.first_pass.schedule, plan.first_pass.schedule_label
    model = ctx.model
    inpainting = uses_inpainting_conditioning(model)

    # 2. seeds and prompts
    job = _start_job(req, ctx, sampler, schedule_label, batch_size=req.batch_size, total=req.total_images)

    # 3. what every batch shares: the job's infotext fields, the hires pass, the latent's shape
    fields: dict[str, Any] = {}
    if inpainting:
        fields["Conditional mask weight"] = float(ctx.opts.get("inpainting_mask_weight", 1.0))
    hr = _hires_setup(plan, job, fields) if plan.hires_pass is not None else None
    passes = 2 if hr is not None else 1
    shape = (model.vae.config.latent_channels, req.height // LATENT_FACTOR, req.width // LATENT_FACTOR)
    # A1111 computes prompt schedules over its own count of steps (2x for second-order samplers)
    schedule_steps = samplers.total_steps(sampler, req.steps)
    paint_everything: dict[int, torch.Tensor] = {}  # inpainting UNets' conditioning, per batch size

    for batch in _batches(req, ctx, job, passes):
        # 4. encode prompts
        conds, unconds = _encode_prompts(ctx, job.encoder, batch.prompts, batch.negatives, job.warned,
                                         schedule_steps)

        # 5. prepare latents: the seeds' noise (an inpainting UNet is told to paint everything)
        image_cond = None
        if inpainting:
            count = len(batch.seeds)
            if count not in paint_everything:
                paint_everything[count] = txt2img_image_conditioning(model, count, req.height, req.width,
                                                                     ctx.device, ctx.warn)
            image_cond = paint_everything[count]
        noise_rng = _image_rng(req, ctx, shape, batch.seeds, batch.subseeds, sampler)
        noise = noise_rng.first().float()

        # 6. denoise from pure noise, then the hires pass
        denoiser = _make_denoiser(ctx, job.encoder, conds, unconds, req.cfg_scale, req.width, req.height,
                                  image_cond)
        latents = _denoise(ctx, sampler, schedule, txt2img_plan(req.steps), noise=noise, noise_rng=noise_rng,
                           denoiser=denoiser, seeds=batch.seeds,
                           callback=_step_callback(ctx, 0, passes, batch.number))
        if hr is not None and not ctx.control.should_stop_sampling():
            latents = _hires_pass(req, ctx, job, hr, batch, latents, schedule_steps, passes)

        # 7. decode
        decoded = _decode(ctx, latents)

        # 8. post-process, infotext, save
        per_image = [_txt2img_fields(fields, hr, batch.first_index + i, batch.prompts[i], batch.negatives[i])
                     for i in range(len(decoded))]
        _postprocess_and_save(req, ctx, job, batch, decoded, per_image)

    # 9. grid and the job's info
    return _finish_job(req, ctx, job, extra_params={k: v for k, v in fields.items() if v is not None},
                       inpainting_conditioning=inpainting)


def _txt2img_fields(fields: dict[str, Any], hr: _HiresSetup | None, index: int, prompt: str,
                    negative: str) -> dict[str, Any]:
    """One image's extra infotext fields: the hires prompts appear only where they differ from the image's."""
    out = dict(fields)
    if hr is not None:
        out["Hires prompt"] = hr.prompts[index] if hr.prompts[index] != prompt else None
        out["Hires negative prompt"] = hr.negatives[index] if hr.negatives[index] != negative else None
    return out


# -- img2img ------------------------------------------------------------------------------------

def process_img2img(plan: GenerationPlan, ctx: ProcessingContext) -> GenerationResult:
    """img2img and inpainting (A1111's `StableDiffusionProcessingImg2Img`)."""
    # 1. check inputs
    req = plan.request
    _check_inputs(req, ctx)
    if not req.init_images:
        raise ValueError("img2img needs at least one init image")
    opts = ctx.opts
    sampler, schedule, schedule_label = plan.first_pass.sampler, plan.first_pass.schedule, plan.first_pass.schedule_label
    plan = img2img_plan(req.steps, req.denoising_strength, bool(opts.get("img2img_fix_steps", False)))
    if plan.run:
        samplers.check_steps(sampler, plan.total)
    batch_size = req.effective_batch_size

    # 2. seeds and prompts
    job = _start_job(req, ctx, sampler, schedule_label, batch_size=batch_size, total=batch_size * req.n_iter)

    # 3. what every batch shares: init images, mask, masked content, their latent, the inpainting conditioning
    init = prepare_img2img(req, ctx, job.seeds)
    prepared, init_latent, latent_mask = init.prepared, init.init_latent, init.latent_mask
    job.result.comments = list(prepared.comments)
    multiplier = req.initial_noise_multiplier
    if multiplier is None:
        multiplier = float(opts.get("initial_noise_multiplier", 1.0))
    late_fields = {"Noise multiplier": multiplier} if multiplier != 1.0 else {}
    shape = tuple(init_latent.shape[1:])
    # prompt schedules run over `steps`, however many of them run (A1111)
    schedule_steps = samplers.total_steps(sampler, req.steps)
    # previews show the original outside the mask, as the result will
    shown = (lambda x: latent_mask.blend(init_latent, x)) if latent_mask is not None else (lambda x: x)
    overlays = prepared.overlays if opts.get("overlay_inpaint", True) else []

    for batch in _batches(req, ctx, job, passes=1):
        # 4. encode prompts
        conds, unconds = _encode_prompts(ctx, job.encoder, batch.prompts, batch.negatives, job.warned,
                                         schedule_steps)
        if plan.run == 0 and init.pixels_exact:
            # denoising 0 runs no step: the prepared images themselves, pixel for pixel
            decoded = list(prepared.images) * (batch_size // len(prepared.images))
        else:
            # 5. prepare latents: the noise the init latent is noised with
            noise_rng = _image_rng(req, ctx, shape, batch.seeds, batch.subseeds, sampler)
            noise = noise_rng.first().float() * multiplier

            # 6. denoise from the init latent, keeping it outside the mask
            denoiser = _make_denoiser(ctx, job.encoder, conds, unconds, req.cfg_scale, req.width, req.height,
                                      init.image_cond)
            latents = _denoise(ctx, sampler, schedule, plan, noise=noise, noise_rng=noise_rng, denoiser=denoiser,
                               seeds=batch.seeds, init_latent=init_latent, latent_mask=latent_mask,
                               callback=_step_callback(ctx, 0, 1, batch.number, shown))

            # 7. decode
            decoded = _decode(ctx, latents)

        # 8. post-process (the result pasted back over the original), infotext, save
        pasted = [masking.apply_overlay(image, prepared.paste_to, overlays[i % len(overlays)] if overlays else None)
                  for i, image in enumerate(decoded)]
        _postprocess_and_save(req, ctx, job, batch, pasted, [init.fields] * len(pasted), late_fields)

    # 9. grid and the job's info
    return _finish_job(req, ctx, job, extra_params={**init.fields, **late_fields},
                       inpainting_conditioning=init.image_cond is not None)


# -- the hires pass (txt2img) -------------------------------------------------------------------

@dataclass
class _HiresSetup:
    target: HiresTarget
    sampler: samplers.SamplerInfo
    schedule: samplers.ScheduleType
    steps: int
    prompts: list[str]  # one per image of the job
    negatives: list[str]
    warned: set[str] = field(default_factory=set)  # unknown extra networks in these prompts, reported once


def _hires_setup(plan: GenerationPlan, job: _Job, fields: dict[str, Any]) -> _HiresSetup:
    """The planned hires pass, with its infotext fields recorded in A1111's order."""
    req, target, hires = plan.request, plan.hires_target, plan.hires_pass
    sampler, schedule_label = plan.first_pass.sampler, plan.first_pass.schedule_label
    hr_sampler, hr_schedule, steps = hires.sampler, hires.schedule, hires.steps
    fields["Denoising strength"] = req.denoising_strength
    if req.hr_sampler_name is not None and hr_sampler.name != sampler.name:
        fields["Hires sampler"] = hr_sampler.name
    fields["Hires prompt"] = None  # per image, see `_txt2img_fields`; the key keeps A1111's position
    fields["Hires negative prompt"] = None
    hr_label = hires.schedule_label
    # A1111 notes the hires schedule type only when its k-diffusion sampler builds one the first pass did not use
    if hr_sampler.supports_schedules and hr_label != samplers.AUTOMATIC.label and hr_label != schedule_label:
        fields["Hires schedule type"] = hr_label
    if req.hr_resize_x == 0 and req.hr_resize_y == 0:
        fields["Hires upscale"] = req.hr_scale
    else:
        fields["Hires resize"] = f"{req.hr_resize_x}x{req.hr_resize_y}"
    if req.hr_second_pass_steps:
        fields["Hires steps"] = req.hr_second_pass_steps
    if req.hr_upscaler is not None:
        fields["Hires upscaler"] = req.hr_upscaler
    # an empty hires prompt means the prompt (A1111 fills it in before styles and scripts)
    hr_prompts = [req.hr_prompt] * len(job.prompts) if req.hr_prompt else list(job.prompts)
    hr_negatives = [req.hr_negative_prompt] * len(job.negatives) if req.hr_negative_prompt else list(job.negatives)
    return _HiresSetup(target, hr_sampler, hr_schedule, steps, hr_prompts, hr_negatives)


def _hires_pass(req: GenerationRequest, ctx: ProcessingContext, job: _Job, hr: _HiresSetup, batch: _Batch,
                samples: torch.Tensor, first_schedule_steps: int, passes: int) -> torch.Tensor:
    """A1111's `sample_hr_pass`: upscale the first pass, then sample it again as img2img with the hires steps,
    denoising, sampler and prompts."""
    target = hr.target
    samples, image_cond = _upscale_first_pass(req, ctx, target, samples)
    samples = _cut_to_target(samples, target)
    if image_cond is not None:
        image_cond = _cut_to_target(image_cond, target)

    noise_rng = _image_rng(req, ctx, samples.shape[1:], batch.seeds, batch.subseeds, hr.sampler)
    noise = noise_rng.first().float()
    lo, hi = batch.first_index, batch.first_index + len(batch.seeds)
    # A1111's hires schedule: over the first pass's steps, with the hires pass's own count as hires_steps
    conds, unconds = _encode_prompts(ctx, job.encoder, hr.prompts[lo:hi], hr.negatives[lo:hi], hr.warned,
                                     first_schedule_steps, hires_steps=samplers.total_steps(hr.sampler, hr.steps))
    denoiser = _make_denoiser(ctx, job.encoder, conds, unconds, req.cfg_scale, target.width, target.height,
                              image_cond)
    plan = img2img_plan(hr.steps, req.denoising_strength, fix_steps=True)
    if plan.run:
        samplers.check_steps(hr.sampler, plan.total)
    return _denoise(ctx, hr.sampler, hr.schedule, plan, noise=noise, noise_rng=noise_rng, denoiser=denoiser,
                    seeds=batch.seeds, init_latent=samples, callback=_step_callback(ctx, 1, passes, batch.number))


def _upscale_first_pass(req: GenerationRequest, ctx: ProcessingContext, target: HiresTarget,
                        samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first pass's latents at the hires size, and an inpainting UNet's conditioning for them."""
    model = ctx.model
    latent_mode = masking.LATENT_UPSCALE_MODES.get(req.hr_upscaler or "Latent")
    pixels = None
    if latent_mode is not None:  # the "Latent ..." upscalers interpolate the latent itself
        mode, antialias = latent_mode
        size = (target.height // LATENT_FACTOR, target.width // LATENT_FACTOR)
        samples = F.interpolate(samples, size=size, mode=mode, antialias=antialias)
    else:  # the others decode, resize the pixels and encode again
        lowres = to_pil(decode_latents(model, samples, warn=ctx.warn))
        upscaled = [masking.resize_image(0, im, target.width, target.height, upscaler=req.hr_upscaler)
                    for im in lowres]
        pixels = pil_to_tensor(upscaled).to(ctx.device)
        samples = encode_pixels(model, pixels, warn=ctx.warn).to(ctx.device)
    if not uses_inpainting_conditioning(model):
        return samples, None
    weight = float(ctx.opts.get("inpainting_mask_weight", 1.0))
    if pixels is None and weight < 1.0:  # the masked image keeps some of the picture: it needs the pixels
        pixels = decode_latents(model, samples, warn=ctx.warn)
    if pixels is None:  # weight 1 blanks the whole picture: txt2img's conditioning
        return samples, txt2img_image_conditioning(model, samples.shape[0], target.height, target.width,
                                                   ctx.device, ctx.warn)
    return samples, inpainting_image_conditioning(model, pixels, None, samples.shape[-2:], weight=weight,
                                                  round_mask=True, device=ctx.device, warn=ctx.warn)


def _cut_to_target(latent: torch.Tensor, target: HiresTarget) -> torch.Tensor:
    """"Resize to" with another aspect: cut the covering latent to the requested size, half on each side."""
    ty, tx = target.truncate_y, target.truncate_x
    return latent[:, :, ty // 2:latent.shape[2] - (ty + 1) // 2, tx // 2:latent.shape[3] - (tx + 1) // 2]


# -- steps both kinds share ---------------------------------------------------------------------

@dataclass
class _Job:
    """One job's first-pass sampler, every image's seeds and prompts, its prompt encoder and its result."""

    sampler: samplers.SamplerInfo
    schedule_label: str
    batch_size: int
    seed: int
    subseed: int
    seeds: list[int]
    subseeds: list[int]
    prompts: list[str]
    negatives: list[str]
    encoder: PromptEncoder
    result: GenerationResult
    warned: set[str] = field(default_factory=set)  # unknown extra networks, reported once


@dataclass
class _Batch:
    number: int
    first_index: int  # index of its first image in the job
    seeds: list[int]
    subseeds: list[int]
    prompts: list[str]  # after the extensions' batch hooks, as written into infotexts
    negatives: list[str]


def _check_inputs(req: GenerationRequest, ctx: ProcessingContext) -> None:
    in_channels = ctx.model.unet.config.in_channels
    if in_channels not in (4, 9):
        raise ValueError(f"This checkpoint's UNet takes {in_channels} input channels; only 4 (ordinary) and "
                         "9 (inpainting) are supported")
    if req.width < 64 or req.height < 64:
        # Smaller images give latents under 8x8, which the UNet's down-sampling cannot handle.
        raise ValueError(f"Width and height must be at least 64 (got {req.width}x{req.height})")


def _start_job(req: GenerationRequest, ctx: ProcessingContext, sampler: samplers.SamplerInfo, schedule_label: str,
               *, batch_size: int, total: int) -> _Job:
    """Step 2: every image's seed, subseed and prompts (`before_prompt_parse` hooks may rewrite the prompts)."""
    seed = rng.get_fixed_seed(req.seed)
    subseed = rng.get_fixed_seed(req.subseed)
    seeds, subseeds = rng.seeds_for_job(seed, subseed, req.subseed_strength, total)
    prompts = [req.prompt] * total
    negatives = [req.negative_prompt] * total
    if ctx.hooks is not None and ctx.hooks.has("before_prompt_parse"):
        params = ctx.hooks.run("before_prompt_parse", BeforePromptParseParams(prompts, negatives, req))
        prompts, negatives = list(params.prompts), list(params.negative_prompts)
    encoder = PromptEncoder(ctx.model, ctx.opts, device=ctx.device, dtype=ctx.dtype,
                            embedding_lookup=ctx.embedding_lookup, hooks=ctx.hooks)
    result = GenerationResult([], [], [], [], [], [], [])
    return _Job(sampler, schedule_label, batch_size, seed, subseed, seeds, subseeds, prompts, negatives, encoder,
                result)


def _batches(req: GenerationRequest, ctx: ProcessingContext, job: _Job, passes: int) -> Iterator[_Batch]:
    """The job's batches in order, each after the extensions' batch hooks (scripts, extra networks, weight and
    attention patches; they may rewrite the batch's prompts). An interrupt stops before the next batch; a
    skip ends only the current one. `passes`: sampling passes per batch (2 with the hires fix), for progress."""
    progress = ctx.progress
    progress.job_count = req.n_iter * passes
    for number in range(req.n_iter):
        if ctx.control.interrupted.is_set():
            break
        ctx.control.skipped.clear()
        progress.job_no = number * passes
        lo, hi = number * job.batch_size, (number + 1) * job.batch_size
        prompts, negatives = job.prompts[lo:hi], job.negatives[lo:hi]
        if ctx.job_session is not None:
            setup = ctx.job_session.begin_batch(number, prompts, negatives, job.seeds[lo:hi], job.subseeds[lo:hi])
            prompts, negatives = setup.prompts, setup.negative_prompts
            if setup.weights_changed:  # the text encoders changed: cached encodings are stale
                job.encoder.clear_cache()
        yield _Batch(number, lo, job.seeds[lo:hi], job.subseeds[lo:hi], prompts, negatives)
    job.result.interrupted = ctx.control.interrupted.is_set()
    progress.job_no = progress.job_count


def _encode_prompts(ctx: ProcessingContext, encoder: PromptEncoder, prompts: Sequence[str], negatives: Sequence[str],
                    warned: set[str], steps: int, hires_steps: int | None = None) -> tuple[list, list]:
    """Step 4: each image's prompt as a schedule over `steps` (MultiCondSchedule) and its negative prompt
    (PromptSchedule). Extra-network tags are stripped first; unknown ones are reported once per `warned`."""
    stripped, networks = extra_networks.parse_prompts(list(prompts))
    for name in networks:
        if name not in ctx.known_networks and name not in warned:
            warned.add(name)
            ctx.warn(f"Skipping unknown extra network: {name}")
    with torch.inference_mode():
        conds = [schedule_multicond(encoder, p, steps, hires_steps) for p in stripped]
        unconds = [schedule_prompt(encoder, n, steps, hires_steps) for n in negatives]
    return conds, unconds


def _image_rng(req: GenerationRequest, ctx: ProcessingContext, shape: Sequence[int], seeds: list[int],
               subseeds: list[int], sampler: samplers.SamplerInfo) -> rng.ImageRNG:
    """Step 5: the batch's noise, A1111's way (variation seeds, seed resize, ENSD, the RNG source)."""
    ensd = int(ctx.opts.get("eta_noise_seed_delta", 0)) if sampler.uses_ensd else 0
    return rng.ImageRNG(shape, seeds, subseeds=subseeds, subseed_strength=req.subseed_strength,
                        seed_resize_from_h=req.seed_resize_from_h, seed_resize_from_w=req.seed_resize_from_w,
                        source=ctx.opts.get("randn_source", "GPU"), device=ctx.device, eta_noise_seed_delta=ensd)


def _make_denoiser(ctx: ProcessingContext, encoder: PromptEncoder, conds: list, unconds: list, cfg_scale: float,
                   width: int, height: int, image_cond: torch.Tensor | None) -> CFGDenoiser:
    """The guided UNet for one batch (classifier-free guidance, per-step conditioning, the cfg hooks)."""
    opts = ctx.opts
    return CFGDenoiser(
        unet=ctx.model.unet, conds=conds, unconds=unconds, cfg_scale=cfg_scale,
        time_ids=sdxl_time_ids(width, height, len(conds)).to(ctx.device) if ctx.model.family.is_sdxl else None,
        image_cond=image_cond,
        empty=encoder.empty_chunk() if opts.get("pad_cond_uncond") else None,
        pad_cond_uncond=bool(opts.get("pad_cond_uncond")), hooks=ctx.hooks)


def _denoise(ctx: ProcessingContext, sampler: samplers.SamplerInfo, schedule: samplers.ScheduleType,
             plan: StepPlan, *, noise: torch.Tensor, noise_rng: rng.ImageRNG, denoiser: CFGDenoiser,
             seeds: Sequence[int], callback: sampling.StepCallback, init_latent: torch.Tensor | None = None,
             latent_mask: LatentMask | None = None) -> torch.Tensor:
    """Step 6: our sampling loop over `plan`, with the job's scheduler config, device, eta and stop flags."""
    return sampling.sample_latents(
        sampler, schedule, plan, scheduler_config=ctx.model.scheduler_config, device=ctx.device, noise=noise,
        denoiser=denoiser, seeds=seeds, generators=noise_rng.step_generators(sampler.draws_noise),
        eta=ctx.opts.get("eta_ddim") if sampler.name == "DDIM" else None, control=ctx.control,
        init_latent=init_latent, latent_mask=latent_mask, callback=callback)


def _step_callback(ctx: ProcessingContext, pass_index: int, passes: int, batch_number: int,
                   shown: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> sampling.StepCallback:
    """Progress and live previews, every `show_progress_every_n_steps` steps."""
    progress = ctx.progress
    every = max(1, int(ctx.opts.get("show_progress_every_n_steps", 5)))
    previews = bool(ctx.opts.get("live_previews_enable", True))
    full_previews = ctx.opts.get("show_progress_type") == "Full"  # a VAE decode: exact, but slower
    progress.job_no = batch_number * passes + pass_index
    progress.sampling_step, progress.sampling_steps = 0, 0

    def on_step(i: int, n: int, latent: torch.Tensor, denoised: torch.Tensor | None) -> None:
        progress.sampling_step, progress.sampling_steps = i + 1, n
        if previews and ((i + 1) % every == 0 or i + 1 == n):
            preview = shown(denoised if denoised is not None else latent)
            if full_previews:
                progress.preview = to_pil(decode_latents(ctx.model, preview[:1], warn=ctx.warn))[0]
            else:
                progress.preview = to_pil(latent_preview_cheap(preview, ctx.model.family.is_sdxl))[0]
            progress.preview_step = i + 1

    return on_step


def _decode(ctx: ProcessingContext, latents: torch.Tensor) -> list[Image.Image]:
    """Step 7: the VAE decode; NaNs are retried in float32 unless `auto_vae_precision` is off."""
    retry = bool(ctx.opts.get("auto_vae_precision", True))
    return to_pil(decode_latents(ctx.model, latents, warn=ctx.warn, retry_fp32=retry))


def _postprocess_and_save(req: GenerationRequest, ctx: ProcessingContext, job: _Job, batch: _Batch,
                          decoded: Sequence[Image.Image], fields: Sequence[Mapping[str, Any]],
                          late_fields: Mapping[str, Any] | None = None) -> None:
    """Step 8: each image through the extensions' `postprocess_image`, its infotext (`fields`: its extra
    fields), its file when the request saves; the batch joins the job's result."""
    result = job.result
    saving = req.save_images and ctx.opts.get("samples_save", True)
    for i, image in enumerate(decoded):
        if ctx.job_session is not None:
            image = ctx.job_session.postprocess_image(batch.number, i, image)
        # built after postprocess_image: scripts may add infotext fields there
        text = build_infotext(req, ctx, prompt=batch.prompts[i], negative=batch.negatives[i], seed=batch.seeds[i],
                              subseed=batch.subseeds[i], sampler=job.sampler, schedule_label=job.schedule_label,
                              extra=fields[i], extra_late=late_fields)
        path = None
        if saving:
            saved = images.save_output(image, ctx.outputs_dir, req.kind, seed=batch.seeds[i], infotext=text,
                                       opts=ctx.opts, hooks=ctx.hooks)
            image, text, path = saved.image, saved.infotext, str(saved.path)
        result.images.append(image)
        result.infotexts.append(text)
        result.paths.append(path)
    result.seeds += batch.seeds
    result.subseeds += batch.subseeds
    result.prompts += batch.prompts
    result.negative_prompts += batch.negatives


def _finish_job(req: GenerationRequest, ctx: ProcessingContext, job: _Job, *, extra_params: Mapping[str, Any],
                inpainting_conditioning: bool) -> GenerationResult:
    """Step 9: the grid of a job with several images (saved when asked) and the job's `info`."""
    result = job.result
    opts = ctx.opts
    if len(result.images) > 1 and opts.get("return_grid", True):
        result.grid = images.image_grid(result.images)
        if req.save_images and req.save_grid and opts.get("grid_save", True):
            saved = images.save_output(result.grid, ctx.outputs_dir, req.kind, seed=result.seeds[0],
                                       infotext=result.infotexts[0], opts=opts, hooks=ctx.hooks, grid=True)
            result.grid, result.grid_path = saved.image, str(saved.path)
    result.info = info_dict(req, ctx, result, job.sampler, job.schedule_label, job.seed, job.subseed,
                            extra_params={**extra_params, **ctx.extra_generation_params},
                            inpainting_conditioning=inpainting_conditioning)
    return result


@contextlib.contextmanager
def circular_padding(model, enabled: bool):
    """Tiling (A1111): every Conv2d of the UNet and VAE pads by wrapping around, for seamless textures.

    Conv2d keeps its padding amounts whatever the mode, so switching `padding_mode` for the job and
    back afterwards is enough; the weights are untouched.
    """
    if not enabled:
        yield
        return
    convs = [m for part in (model.unet, model.vae) for m in part.modules() if isinstance(m, torch.nn.Conv2d)]
    saved = [(conv, conv.padding_mode) for conv in convs]
    for conv in convs:
        conv.padding_mode = "circular"
    try:
        yield
    finally:
        for conv, mode in saved:
            conv.padding_mode = mode
