"""One generation, top to bottom, in numbered steps (as diffusers pipelines read).

    1. check inputs            2. seeds and prompts         3. extra networks and hooks
    4. per batch: encode prompts (scheduled), prepare noise, denoise with our loop
    5. decode (NaN -> retry in float32)    6. infotext, save, grid

The caller (the job worker) owns the model and hands in an immutable settings snapshot, so
nothing here reads or writes global state.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from PIL import Image

from modules import extra_networks, images, infotext, rng, samplers
from modules.conditioning import PromptEncoder, schedule_multicond, schedule_prompt
from modules.hooks import BeforeImageSavedParams, BeforePromptParseParams, HookRegistry, ImageSavedParams
from modules.request import GenerationRequest
from modules.sampling import CFGDenoiser, JobControl, latent_preview_cheap, run_sampler

log = logging.getLogger("athanor.processing")

VERSION = "athanor-0.1.0"


@dataclass(frozen=True)
class ModelRef:
    """What processing needs to know about the loaded checkpoint for infotext."""

    name: str  # A1111's model_name (file stem)
    shorthash: str | None  # 10 hex chars, or None when hashing is off / built-in model
    sha256: str | None = None


@dataclass
class Progress:
    """Per-job progress, written by processing and read by the queue's status routes."""

    job_no: int = 0
    job_count: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    started: float = field(default_factory=time.time)
    preview: Image.Image | None = None
    preview_step: int = -1
    textinfo: str = ""

    @property
    def fraction(self) -> float:
        if self.job_count == 0:
            return 0.0
        done = self.job_no / self.job_count
        if self.sampling_steps:
            done += self.sampling_step / self.sampling_steps / self.job_count
        return min(done, 1.0)

    @property
    def eta_seconds(self) -> float:
        frac = self.fraction
        if frac <= 0:
            return 0.0
        elapsed = time.time() - self.started
        return max(0.0, elapsed / frac - elapsed)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    subseeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    paths: list[str]
    grid: Image.Image | None = None
    grid_path: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False


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


def _check_inputs(req: GenerationRequest, ctx: ProcessingContext) -> None:
    latent_channels = ctx.model.unet.config.in_channels
    if ctx.model.family.is_inpaint and req.kind == "txt2img" and latent_channels != 9:
        raise ValueError("This inpainting checkpoint has an unexpected UNet input size")
    if req.width < 64 or req.height < 64:
        # Smaller images give latents under 8x8, which the UNet's down-sampling cannot handle.
        raise ValueError(f"Width and height must be at least 64 (got {req.width}x{req.height})")


def build_infotext(req: GenerationRequest, ctx: ProcessingContext, *, prompt: str, negative: str, seed: int,
                   subseed: int, sampler: samplers.SamplerInfo, schedule_label: str,
                   extra: Mapping[str, Any] | None = None) -> str:
    opts = ctx.opts
    ensd = int(opts.get("eta_noise_seed_delta", 0))
    clip_skip = int(opts.get("CLIP_stop_at_last_layers", 1))
    fields: dict[str, Any] = {
        "Steps": req.steps,
        "Sampler": sampler.name,
        "Schedule type": schedule_label,
        "CFG scale": req.cfg_scale,
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
    }
    emphasis = opts.get("emphasis", "Original")
    if emphasis != "Original" and ("(" in prompt or "[" in prompt):
        fields["Emphasis"] = emphasis
    fields.update(extra or {})
    if opts.get("add_version_to_infotext", True):
        fields["Version"] = VERSION
    return infotext.create_infotext(prompt, negative, fields)


def decode_latents(model, latents: torch.Tensor, *, warn: Callable[[str], None] = log.warning,
                   retry_fp32: bool = True) -> torch.Tensor:
    """Latents -> images in 0..1 ([B,3,H,W], float32, CPU). A NaN decode is retried in float32."""
    vae = model.vae
    scaled = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        scaled = scaled + shift
    with torch.inference_mode():
        decoded = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
        if torch.isnan(decoded).any() and retry_fp32 and vae.dtype != torch.float32:
            warn(f"VAE produced NaNs in {vae.dtype}; decoding again in float32")
            original = vae.dtype
            vae.to(torch.float32)
            try:
                decoded = vae.decode(scaled.float(), return_dict=False)[0]
            finally:
                vae.to(original)
    return ((decoded.float() + 1) / 2).clamp(0, 1).cpu()


def to_pil(batch: torch.Tensor) -> list[Image.Image]:
    arr = (batch.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def sdxl_time_ids(req: GenerationRequest, batch: int) -> torch.Tensor:
    # original size, crop top-left, target size (A1111 uses the image size for both sizes, no crop)
    ids = torch.tensor([req.height, req.width, 0, 0, req.height, req.width], dtype=torch.float32)
    return ids.unsqueeze(0).repeat(batch, 1)


def process_txt2img(req: GenerationRequest, ctx: ProcessingContext) -> GenerationResult:
    # 1. check inputs
    _check_inputs(req, ctx)
    opts = ctx.opts
    model = ctx.model
    sampler, schedule = samplers.resolve_sampler(req.sampler_name, req.scheduler)

    # 2. seeds and prompts
    seed = rng.get_fixed_seed(req.seed)
    subseed = rng.get_fixed_seed(req.subseed)
    total = req.total_images
    all_seeds, all_subseeds = rng.seeds_for_job(seed, subseed, req.subseed_strength, total)
    all_prompts = [req.prompt] * total
    all_negative = [req.negative_prompt] * total

    # 3. hooks may rewrite prompts; extra-network tags are stripped before encoding
    if ctx.hooks is not None and ctx.hooks.has("before_prompt_parse"):
        params = ctx.hooks.run("before_prompt_parse", BeforePromptParseParams(all_prompts, all_negative, req))
        all_prompts, all_negative = list(params.prompts), list(params.negative_prompts)

    encoder = PromptEncoder(model, opts, device=ctx.device, dtype=ctx.dtype, embedding_lookup=ctx.embedding_lookup)
    latent_channels = 4
    shape = (latent_channels, req.height // 8, req.width // 8)
    result = GenerationResult([], [], [], [], [], [], [])
    progress = ctx.progress
    progress.job_count = req.n_iter
    every = max(1, int(opts.get("show_progress_every_n_steps", 5)))
    previews = bool(opts.get("live_previews_enable", True))
    warned_networks: set[str] = set()
    schedule_label = samplers.effective_schedule_label(sampler, schedule, req.scheduler)
    samplers.check_steps(sampler, req.steps)
    # A1111 computes prompt schedules over its own count of steps (2x for second-order samplers).
    schedule_steps = samplers.total_steps(sampler, req.steps)
    ensd = int(opts.get("eta_noise_seed_delta", 0)) if sampler.uses_ensd else 0

    for batch_no in range(req.n_iter):
        if ctx.control.interrupted.is_set():
            result.interrupted = True
            break
        ctx.control.skipped.clear()
        progress.job_no = batch_no
        lo, hi = batch_no * req.batch_size, (batch_no + 1) * req.batch_size
        seeds, subseeds = all_seeds[lo:hi], all_subseeds[lo:hi]
        prompts, negatives = all_prompts[lo:hi], all_negative[lo:hi]

        stripped, networks = extra_networks.parse_prompts(prompts)
        for name in networks:
            if name not in ctx.known_networks and name not in warned_networks:
                warned_networks.add(name)
                ctx.warn(f"Skipping unknown extra network: {name}")

        # 4. scheduler, conditioning over the steps the loop will run, noise
        scheduler = samplers.build_scheduler(sampler, schedule, model.scheduler_config, seeds=seeds)
        scheduler.set_timesteps(req.steps, device=ctx.device)
        steps_run = len(scheduler.timesteps)
        with torch.inference_mode():
            conds = [schedule_multicond(encoder, p, schedule_steps) for p in stripped]
            unconds = [schedule_prompt(encoder, n, schedule_steps) for n in negatives]

        noise_rng = rng.ImageRNG(shape, seeds, subseeds=subseeds, subseed_strength=req.subseed_strength,
                                 seed_resize_from_h=req.seed_resize_from_h, seed_resize_from_w=req.seed_resize_from_w,
                                 source=opts.get("randn_source", "GPU"), device=ctx.device,
                                 eta_noise_seed_delta=ensd)
        x = noise_rng.first().float() * scheduler.init_noise_sigma
        denoiser = CFGDenoiser(
            unet=model.unet, conds=conds, unconds=unconds, cfg_scale=req.cfg_scale,
            time_ids=sdxl_time_ids(req, len(seeds)).to(ctx.device) if model.family.is_sdxl else None,
            empty=encoder.empty_chunk() if opts.get("pad_cond_uncond") else None,
            pad_cond_uncond=bool(opts.get("pad_cond_uncond")), hooks=ctx.hooks)

        def on_step(i, n, latent, denoised, _batch=batch_no):
            progress.sampling_step, progress.sampling_steps = i + 1, n
            if previews and ((i + 1) % every == 0 or i + 1 == n):
                shown = denoised if denoised is not None else latent
                progress.preview = to_pil(latent_preview_cheap(shown, model.family.is_sdxl))[0]
                progress.preview_step = i + 1

        progress.sampling_step, progress.sampling_steps = 0, steps_run
        eta = opts.get("eta_ddim") if sampler.name == "DDIM" else None
        with torch.inference_mode():
            x = run_sampler(scheduler, x, denoiser, generator=noise_rng.step_generators(sampler.draws_noise), eta=eta,
                            control=ctx.control, callback=on_step)

        # 5. decode
        decoded = decode_latents(model, x, warn=ctx.warn, retry_fp32=bool(opts.get("auto_vae_precision", True)))
        batch_images = to_pil(decoded)

        # 6. infotext and save
        for i, image in enumerate(batch_images):
            text = build_infotext(req, ctx, prompt=prompts[i], negative=negatives[i], seed=seeds[i],
                                  subseed=subseeds[i], sampler=sampler, schedule_label=schedule_label)
            path = None
            if req.save_images and opts.get("samples_save", True):
                if ctx.hooks is not None and ctx.hooks.has("before_image_saved"):
                    p = ctx.hooks.run("before_image_saved", BeforeImageSavedParams(image, text, seeds[i], req.kind))
                    image, text = p.image, p.infotext
                folder = images.date_folder(ctx.outputs_dir, req.kind)
                path = images.save_image(image, folder, seed=seeds[i],
                                         infotext=text if opts.get("enable_pnginfo", True) else None,
                                         extension=opts.get("samples_format", "png"))
                if ctx.hooks is not None and ctx.hooks.has("image_saved"):
                    ctx.hooks.run("image_saved", ImageSavedParams(image, str(path), text))
            result.images.append(image)
            result.infotexts.append(text)
            result.paths.append(str(path) if path else None)
        result.seeds += seeds
        result.subseeds += subseeds
        result.prompts += prompts
        result.negative_prompts += negatives
        if ctx.control.interrupted.is_set():
            result.interrupted = True
            break
    progress.job_no = progress.job_count

    if len(result.images) > 1 and opts.get("return_grid", True):
        result.grid = images.image_grid(result.images)
        if req.save_images and req.save_grid and opts.get("grid_save", True):
            folder = images.date_folder(ctx.outputs_dir, req.kind + "-grids")
            result.grid_path = str(images.save_grid(result.grid, folder, infotext=result.infotexts[0]))

    result.info = info_dict(req, ctx, result, sampler, schedule_label, seed, subseed)
    return result


def info_dict(req: GenerationRequest, ctx: ProcessingContext, result: GenerationResult,
              sampler: samplers.SamplerInfo, schedule_label: str, seed: int, subseed: int) -> dict[str, Any]:
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
        "batch_size": req.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": ctx.model_ref.name,
        "sd_model_hash": ctx.model_ref.shorthash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": req.seed_resize_from_w,
        "seed_resize_from_h": req.seed_resize_from_h,
        "denoising_strength": None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": result.infotexts,
        "styles": req.styles,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": int(ctx.opts.get("CLIP_stop_at_last_layers", 1)),
        "is_using_inpainting_conditioning": False,
        "version": VERSION,
    }
