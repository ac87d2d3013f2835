"""One generation, top to bottom, in numbered steps (as diffusers pipelines read).

    1. check inputs            2. seeds and prompts         3. extra networks and hooks
    4. per batch: encode prompts (scheduled), prepare noise, denoise with our loop
       (txt2img: from noise, then the hires pass if asked; img2img: from the encoded init image)
    5. decode (NaN -> retry in float32), put inpainting results back over the original
    6. infotext, save, grid

txt2img, img2img and the hires pass share one batch loop (`_run_batches`) and one sampling function
(`sample_latents`); they differ only in where the starting latent comes from and in a few infotext fields.
The caller (the job worker) owns the model and hands in an immutable settings snapshot, so nothing here
reads or writes global state.

How many steps run (A1111's `setup_img2img_steps`, see `img2img_plan`):
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
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_pndm import PNDMScheduler
from PIL import Image

from modules import extra_networks, images, infotext, masking, prompt_parser, rng, samplers
from modules.conditioning import PromptEncoder, schedule_multicond, schedule_prompt
from modules.hooks import BeforeImageSavedParams, BeforePromptParseParams, HookRegistry, ImageSavedParams
from modules.model_manager import ModelRef
from modules.request import GenerationRequest
from modules.sampling import CFGDenoiser, JobControl, latent_preview_cheap, run_sampler

log = logging.getLogger("athanor.processing")

VERSION = "athanor-0.1.0"
LATENT_FACTOR = 8  # pixels per latent cell


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
    comments: list[str] = field(default_factory=list)


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


# -- step plans ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepPlan:
    """The scheduler is set to `total` steps and the last `run` of them are sampled."""

    total: int
    run: int

    @property
    def t_start(self) -> int:
        """Index of the first step that runs (0 for txt2img)."""
        return self.total - self.run


def txt2img_plan(steps: int) -> StepPlan:
    return StepPlan(steps, steps)


def img2img_plan(steps: int, denoising_strength: float, fix_steps: bool) -> StepPlan:
    """A1111's `setup_img2img_steps` (`t_enc + 1` steps run from `sigmas[steps - t_enc - 1]`).

    Normal: `steps` steps, of which the last `int(min(d, 0.999) * steps) + 1` run. `fix_steps` (the option
    `img2img_fix_steps`, and always for the hires pass): `int(steps / min(d, 0.999))` steps, the last `steps`
    run, so exactly `steps` steps are sampled. Denoising 0 runs no step at all.
    """
    if denoising_strength <= 0:
        return StepPlan(steps, 0)
    strength = min(denoising_strength, 0.999)
    if fix_steps:
        return StepPlan(int(steps / strength), steps)
    return StepPlan(steps, int(strength * steps) + 1)


# -- checks, infotext, VAE ----------------------------------------------------------------------

def _check_inputs(req: GenerationRequest, ctx: ProcessingContext) -> None:
    in_channels = ctx.model.unet.config.in_channels
    if in_channels not in (4, 9):
        raise ValueError(f"This checkpoint's UNet takes {in_channels} input channels; only 4 (ordinary) and "
                         "9 (inpainting) are supported")
    if req.width < 64 or req.height < 64:
        # Smaller images give latents under 8x8, which the UNet's down-sampling cannot handle.
        raise ValueError(f"Width and height must be at least 64 (got {req.width}x{req.height})")


def _uses_inpainting_conditioning(model) -> bool:
    return model.unet.config.in_channels == 9


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


def encode_pixels(model, pixels: torch.Tensor, *, warn: Callable[[str], None] = log.warning,
                  retry_fp32: bool = True) -> torch.Tensor:
    """Images in 0..1 ([B,3,H,W]) -> latents (float32), scaled as the UNet expects.

    The mean of the VAE's latent distribution is used (A1111 samples from it): the same image always gives
    the same latent, and the difference is far below what the sampler adds. NaNs are retried in float32.
    """
    vae = model.vae
    x = (pixels.float() * 2 - 1).to(vae.device)
    with torch.inference_mode():
        latent = vae.encode(x.to(vae.dtype)).latent_dist.mean
        if torch.isnan(latent).any() and retry_fp32 and vae.dtype != torch.float32:
            warn(f"VAE produced NaNs in {vae.dtype} while encoding; encoding again in float32")
            original = vae.dtype
            vae.to(torch.float32)
            try:
                latent = vae.encode(x.float()).latent_dist.mean
            finally:
                vae.to(original)
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        latent = latent - shift
    return latent.float() * vae.config.scaling_factor


def to_pil(batch: torch.Tensor) -> list[Image.Image]:
    arr = (batch.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def pil_to_tensor(images_: Sequence[Image.Image]) -> torch.Tensor:
    """RGB images of one size -> [B,3,H,W] float32 in 0..1."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images_])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _time_ids(width: int, height: int, batch: int) -> torch.Tensor:
    # original size, crop top-left, target size (A1111 uses the image size for both sizes, no crop)
    ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)
    return ids.unsqueeze(0).repeat(batch, 1)


# -- image conditioning for 9-channel (inpainting) UNets -----------------------------------------

def txt2img_image_conditioning(model, batch: int, height: int, width: int, device: torch.device,
                               warn: Callable[[str], None] = log.warning) -> torch.Tensor:
    """What an inpainting UNet gets in txt2img (A1111): mask all ones (paint everything) and the latent
    of a plain mid-grey image. [B, 5, H/8, W/8]."""
    grey = torch.full((1, 3, height, width), 0.5, device=device)
    latent = encode_pixels(model, grey, warn=warn).to(device)
    ones = torch.ones(1, 1, *latent.shape[-2:], device=device)
    return torch.cat([ones, latent], dim=1).expand(batch, -1, -1, -1)


def inpainting_image_conditioning(model, pixels: torch.Tensor, mask: Image.Image | None, latent_size: tuple[int, int],
                                  *, weight: float, round_mask: bool, device: torch.device,
                                  warn: Callable[[str], None] = log.warning) -> torch.Tensor:
    """A1111's `inpainting_image_conditioning`: [mask, latent of the masked image], [B, 5, h, w].

    pixels: the prepared init images in 0..1, [B,3,H,W]. The masked image is `lerp(image, image * (1 - mask),
    weight)` (the option "Conditional mask weight": 1 blanks the masked area, 0 keeps the whole image). No
    mask means everything is masked.
    """
    pixels = pixels.to(device)
    if mask is None:
        cond_mask = torch.ones(1, 1, *pixels.shape[-2:], device=device)
    else:
        cond_mask = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None].to(device)
        if round_mask:
            cond_mask = torch.round(cond_mask)
        if cond_mask.shape[-2:] != pixels.shape[-2:]:
            cond_mask = F.interpolate(cond_mask, size=pixels.shape[-2:])
    source = pixels * 2 - 1
    masked = torch.lerp(source, source * (1.0 - cond_mask), float(weight))
    latent = encode_pixels(model, (masked + 1) / 2, warn=warn).to(device)
    latent_mask = F.interpolate(cond_mask, size=latent_size).expand(latent.shape[0], -1, -1, -1)
    return torch.cat([latent_mask, latent], dim=1)


# -- sampling one batch -------------------------------------------------------------------------

@dataclass(frozen=True)
class LatentMask:
    """Latent inpainting mask: `mask` is 1 where the init latent is kept, `nmask` (= 1 - mask) where the
    sampler paints."""

    mask: torch.Tensor
    nmask: torch.Tensor

    def blend(self, init_latent: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return init_latent * self.mask + x * self.nmask


def latent_mask_from_image(mask: Image.Image, latent_shape: Sequence[int], round_mask: bool,
                           device: torch.device) -> LatentMask:
    """A1111's latent mask: the processing-size mask scaled (bicubic) to the latent size, rounded to 0/1
    when `mask_round` is on."""
    channels, height, width = latent_shape[-3:]
    small = mask.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    values = np.asarray(small, dtype=np.float32)[..., 0] / 255.0
    if round_mask:
        values = np.around(values)
    paint = torch.from_numpy(values)[None, None].expand(1, channels, -1, -1).to(device)
    return LatentMask(mask=1.0 - paint, nmask=paint)


def timesteps_to_run(scheduler, plan: StepPlan) -> torch.Tensor:
    """The timesteps of the last `plan.run` steps of a scheduler set to `plan.total` steps.

    diffusers lists second-order schedulers' steps `order` entries apiece, so the tail starts at
    `t_start * order` (as its img2img pipelines do). PLMS repeats its second timestep for its warm-up step;
    the tail gets the same repetition.
    """
    timesteps = scheduler.timesteps
    if plan.t_start == 0:
        return timesteps
    if isinstance(scheduler, PNDMScheduler):
        plain = torch.unique_consecutive(timesteps)[plan.t_start:]
        if len(plain) < 2:
            return plain
        return torch.cat([plain[:2], plain[1:2], plain[2:]])
    return timesteps[plan.t_start * scheduler.order:]


def _blending_model(denoiser: Callable, scheduler, init_latent: torch.Tensor, noise: torch.Tensor,
                    latent_mask: LatentMask) -> Callable:
    """The denoiser, seeing the init latent (noised to the current level with the starting noise) wherever
    the mask keeps the original. For Euler this is exactly A1111's blend of the denoised prediction; the
    sampler's own values outside the mask are replaced at the end."""

    def model(x_in: torch.Tensor, t: torch.Tensor, step: int, total: int) -> torch.Tensor:
        noised = scheduler.add_noise(init_latent, noise, t.reshape(1))
        kept = scheduler.scale_model_input(noised, t)
        return denoiser(x_in * latent_mask.nmask + kept * latent_mask.mask, t, step, total)

    return model


StepProgress = Callable[[int, int, torch.Tensor, torch.Tensor | None], None]


def sample_latents(ctx: ProcessingContext, *, sampler: samplers.SamplerInfo, schedule: samplers.ScheduleType,
                   plan: StepPlan, noise: torch.Tensor, denoiser: Callable, seeds: Sequence[int],
                   generators: Sequence[torch.Generator] | None, init_latent: torch.Tensor | None = None,
                   latent_mask: LatentMask | None = None, callback: StepProgress | None = None) -> torch.Tensor:
    """Sample one batch with our loop: from pure noise (txt2img) or from `init_latent` noised to the level
    where `plan` starts (img2img, hires pass), optionally keeping the init latent outside `latent_mask`.

    The noise is added by the scheduler's own `add_noise` (k-diffusion style schedulers: `init + noise *
    sigma_start`; DDIM/PLMS/LCM/DPM-Solver: `sqrt(alpha) * init + sqrt(1 - alpha) * noise`).
    """
    if init_latent is not None and plan.run == 0:
        return init_latent
    scheduler = samplers.build_scheduler(sampler, schedule, ctx.model.scheduler_config, seeds=seeds)
    scheduler.set_timesteps(plan.total, device=ctx.device)
    timesteps = timesteps_to_run(scheduler, plan)
    model = denoiser
    if init_latent is None:
        x = noise * scheduler.init_noise_sigma
    else:
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(plan.t_start * scheduler.order)
        x = scheduler.add_noise(init_latent, noise, timesteps[:1])
        if latent_mask is not None:
            model = _blending_model(denoiser, scheduler, init_latent, noise, latent_mask)
    eta = ctx.opts.get("eta_ddim") if sampler.name == "DDIM" else None
    with torch.inference_mode():
        x = run_sampler(scheduler, x, model, generator=generators, eta=eta, control=ctx.control, callback=callback,
                        timesteps=timesteps)
    if latent_mask is not None and init_latent is not None:
        x = latent_mask.blend(init_latent, x)
    return x


# -- the batch loop shared by txt2img and img2img --------------------------------------------------

@dataclass
class _Batch:
    number: int
    first_index: int  # index of its first image in the job
    seeds: list[int]
    subseeds: list[int]
    prompts: list[str]  # as written into infotexts
    negatives: list[str]
    conds: list  # first pass: MultiCondSchedule per image
    unconds: list  # PromptSchedule per image
    encoder: PromptEncoder


@dataclass
class _BatchOutput:
    latents: torch.Tensor | None = None  # decoded by the loop
    images: list[Image.Image] | None = None  # pixel-exact results (img2img with no step run)


@dataclass
class _Job:
    """What differs between txt2img and img2img; `_run_batches` does the rest."""

    sampler: samplers.SamplerInfo
    schedule: samplers.ScheduleType
    schedule_label: str
    batch_size: int
    passes: int  # sampling passes per batch (2 with hires fix), for the progress bar
    sample: Callable[[_Batch], _BatchOutput]
    fields: Callable[[int, str, str], dict[str, Any]]  # (image index in job, prompt, negative) -> extra fields
    late_fields: dict[str, Any] = field(default_factory=dict)
    finish: Callable[[int, Image.Image], Image.Image] = lambda _i, image: image  # (index in batch, image)
    inpainting_conditioning: bool = False
    extra_params: dict[str, Any] = field(default_factory=dict)  # A1111's extra_generation_params, for `info`
    comments: list[str] = field(default_factory=list)


@dataclass
class _JobPrompts:
    seed: int
    subseed: int
    seeds: list[int]
    subseeds: list[int]
    prompts: list[str]
    negatives: list[str]


def _job_prompts(req: GenerationRequest, ctx: ProcessingContext, total: int) -> _JobPrompts:
    seed = rng.get_fixed_seed(req.seed)
    subseed = rng.get_fixed_seed(req.subseed)
    all_seeds, all_subseeds = rng.seeds_for_job(seed, subseed, req.subseed_strength, total)
    prompts = [req.prompt] * total
    negatives = [req.negative_prompt] * total
    # hooks may rewrite prompts; extra-network tags are stripped before encoding
    if ctx.hooks is not None and ctx.hooks.has("before_prompt_parse"):
        params = ctx.hooks.run("before_prompt_parse", BeforePromptParseParams(prompts, negatives, req))
        prompts, negatives = list(params.prompts), list(params.negative_prompts)
    return _JobPrompts(seed, subseed, all_seeds, all_subseeds, prompts, negatives)


def _strip_networks(ctx: ProcessingContext, prompts: list[str], warned: set[str]) -> list[str]:
    stripped, networks = extra_networks.parse_prompts(prompts)
    for name in networks:
        if name not in ctx.known_networks and name not in warned:
            warned.add(name)
            ctx.warn(f"Skipping unknown extra network: {name}")
    return stripped


def _encode_schedules(encoder: PromptEncoder, prompts: Sequence[str], negatives: Sequence[str], steps: int,
                      hires_steps: int | None = None) -> tuple[list, list]:
    with torch.inference_mode():
        conds = [schedule_multicond(encoder, p, steps, hires_steps) for p in prompts]
        unconds = [schedule_prompt(encoder, n, steps, hires_steps) for n in negatives]
    return conds, unconds


def _make_denoiser(ctx: ProcessingContext, encoder: PromptEncoder, conds: list, unconds: list, cfg_scale: float,
                   width: int, height: int, image_cond: torch.Tensor | None) -> CFGDenoiser:
    opts = ctx.opts
    return CFGDenoiser(
        unet=ctx.model.unet, conds=conds, unconds=unconds, cfg_scale=cfg_scale,
        time_ids=_time_ids(width, height, len(conds)).to(ctx.device) if ctx.model.family.is_sdxl else None,
        image_cond=image_cond,
        empty=encoder.empty_chunk() if opts.get("pad_cond_uncond") else None,
        pad_cond_uncond=bool(opts.get("pad_cond_uncond")), hooks=ctx.hooks)


def _image_rng(req: GenerationRequest, ctx: ProcessingContext, shape: Sequence[int], seeds: list[int],
               subseeds: list[int], sampler: samplers.SamplerInfo) -> rng.ImageRNG:
    ensd = int(ctx.opts.get("eta_noise_seed_delta", 0)) if sampler.uses_ensd else 0
    return rng.ImageRNG(shape, seeds, subseeds=subseeds, subseed_strength=req.subseed_strength,
                        seed_resize_from_h=req.seed_resize_from_h, seed_resize_from_w=req.seed_resize_from_w,
                        source=ctx.opts.get("randn_source", "GPU"), device=ctx.device, eta_noise_seed_delta=ensd)


def _step_callback(ctx: ProcessingContext, pass_index: int, passes: int, batch_number: int,
                   shown: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> StepProgress:
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


def _run_batches(req: GenerationRequest, ctx: ProcessingContext, job: _Job, jp: _JobPrompts) -> GenerationResult:
    opts = ctx.opts
    encoder = PromptEncoder(ctx.model, opts, device=ctx.device, dtype=ctx.dtype,
                            embedding_lookup=ctx.embedding_lookup, hooks=ctx.hooks)
    result = GenerationResult([], [], [], [], [], [], [], comments=list(job.comments))
    progress = ctx.progress
    progress.job_count = req.n_iter * job.passes
    warned: set[str] = set()
    # A1111 computes prompt schedules over its own count of steps (2x for second-order samplers), and over
    # `steps` in img2img too, however many of them run.
    schedule_steps = samplers.total_steps(job.sampler, req.steps)

    for batch_no in range(req.n_iter):
        if ctx.control.interrupted.is_set():
            result.interrupted = True
            break
        ctx.control.skipped.clear()
        progress.job_no = batch_no * job.passes
        lo, hi = batch_no * job.batch_size, (batch_no + 1) * job.batch_size
        prompts, negatives = jp.prompts[lo:hi], jp.negatives[lo:hi]
        if ctx.job_session is not None:  # extensions: batch hooks, scripts, extra networks, weight/attention patches
            setup = ctx.job_session.begin_batch(batch_no, prompts, negatives, jp.seeds[lo:hi], jp.subseeds[lo:hi])
            prompts, negatives = setup.prompts, setup.negative_prompts
            if setup.weights_changed:
                encoder.clear_cache()
        conds, unconds = _encode_schedules(encoder, _strip_networks(ctx, prompts, warned), negatives, schedule_steps)
        batch = _Batch(batch_no, lo, jp.seeds[lo:hi], jp.subseeds[lo:hi], prompts, negatives, conds, unconds, encoder)

        # 4. sample, 5. decode
        output = job.sample(batch)
        if output.images is not None:
            batch_images = output.images
        else:
            decoded = decode_latents(ctx.model, output.latents, warn=ctx.warn,
                                     retry_fp32=bool(opts.get("auto_vae_precision", True)))
            batch_images = to_pil(decoded)

        # 6. infotext and save
        for i, image in enumerate(batch_images):
            image = job.finish(i, image)
            if ctx.job_session is not None:
                image = ctx.job_session.postprocess_image(batch_no, i, image)
            text = build_infotext(req, ctx, prompt=prompts[i], negative=negatives[i], seed=batch.seeds[i],
                                  subseed=batch.subseeds[i], sampler=job.sampler, schedule_label=job.schedule_label,
                                  extra=job.fields(lo + i, prompts[i], negatives[i]), extra_late=job.late_fields)
            path = None
            if req.save_images and opts.get("samples_save", True):
                if ctx.hooks is not None and ctx.hooks.has("before_image_saved"):
                    p = ctx.hooks.run("before_image_saved",
                                      BeforeImageSavedParams(image, text, batch.seeds[i], req.kind))
                    image, text = p.image, p.infotext
                folder = images.date_folder(ctx.outputs_dir, req.kind)
                path = images.save_image(image, folder, seed=batch.seeds[i],
                                         infotext=text if opts.get("enable_pnginfo", True) else None,
                                         extension=opts.get("samples_format", "png"))
                if ctx.hooks is not None and ctx.hooks.has("image_saved"):
                    ctx.hooks.run("image_saved", ImageSavedParams(image, str(path), text))
            result.images.append(image)
            result.infotexts.append(text)
            result.paths.append(str(path) if path else None)
        result.seeds += batch.seeds
        result.subseeds += batch.subseeds
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

    result.info = info_dict(req, ctx, result, job.sampler, job.schedule_label, jp.seed, jp.subseed,
                            extra_params={**job.extra_params, **ctx.extra_generation_params},
                            inpainting_conditioning=job.inpainting_conditioning)
    return result


# -- txt2img and the hires pass -----------------------------------------------------------------

@dataclass(frozen=True)
class HiresTarget:
    """Where the hires pass goes: the upscaled size and how much of the latent to cut off afterwards."""

    width: int  # A1111's hr_upscale_to_x
    height: int
    truncate_x: int  # latent cells cut off (half on each side) for "resize to" with another aspect
    truncate_y: int

    @property
    def final_size(self) -> tuple[int, int]:
        lw = self.width // LATENT_FACTOR - self.truncate_x // 2 - (self.truncate_x + 1) // 2
        lh = self.height // LATENT_FACTOR - self.truncate_y // 2 - (self.truncate_y + 1) // 2
        return lw * LATENT_FACTOR, lh * LATENT_FACTOR


def hires_target(width: int, height: int, hr_scale: float, hr_resize_x: int, hr_resize_y: int) -> HiresTarget:
    """A1111's `calculate_target_resolution`: by factor, or to a size (one side 0: keep the aspect; both
    set: scale to cover, then cut the latent to the requested size)."""
    if hr_resize_x == 0 and hr_resize_y == 0:
        return HiresTarget(int(width * hr_scale), int(height * hr_scale), 0, 0)
    if hr_resize_y == 0:
        return HiresTarget(hr_resize_x, hr_resize_x * height // width, 0, 0)
    if hr_resize_x == 0:
        return HiresTarget(hr_resize_y * width // height, hr_resize_y, 0, 0)
    if width / height < hr_resize_x / hr_resize_y:
        up_w, up_h = hr_resize_x, hr_resize_x * height // width
    else:
        up_w, up_h = hr_resize_y * width // height, hr_resize_y
    return HiresTarget(up_w, up_h, (up_w - hr_resize_x) // LATENT_FACTOR, (up_h - hr_resize_y) // LATENT_FACTOR)


@dataclass
class _HiresSetup:
    target: HiresTarget
    sampler: samplers.SamplerInfo
    schedule: samplers.ScheduleType
    steps: int
    prompts: list[str]
    negatives: list[str]


def _hires_setup(req: GenerationRequest, ctx: ProcessingContext, sampler: samplers.SamplerInfo,
                 schedule_label: str, jp: _JobPrompts, fields: dict[str, Any]) -> _HiresSetup:
    """Resolve the hires pass and record its infotext fields in A1111's order."""
    target = hires_target(req.width, req.height, req.hr_scale, req.hr_resize_x, req.hr_resize_y)
    final_w, final_h = target.final_size
    if min(final_w, final_h) < 64 or max(target.width, target.height) > 16384:
        raise ValueError(f"The hires fix would make a {final_w}x{final_h} image; each side must be between 64 "
                         "and 16384 pixels")
    hr_sampler, hr_schedule = samplers.resolve_sampler(req.hr_sampler_name or req.sampler_name,
                                                       req.hr_scheduler or req.scheduler)
    steps = req.hr_second_pass_steps or req.steps
    samplers.check_steps(hr_sampler, steps)
    fields["Denoising strength"] = req.denoising_strength
    if req.hr_sampler_name is not None and hr_sampler.name != sampler.name:
        fields["Hires sampler"] = hr_sampler.name
    fields["Hires prompt"] = None  # per image, see `_txt2img_fields`; the key keeps A1111's position
    fields["Hires negative prompt"] = None
    hr_label = samplers.effective_schedule_label(hr_sampler, hr_schedule, req.hr_scheduler or req.scheduler)
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
    hr_prompts = [req.hr_prompt] * len(jp.prompts) if req.hr_prompt else list(jp.prompts)
    hr_negatives = [req.hr_negative_prompt] * len(jp.negatives) if req.hr_negative_prompt else list(jp.negatives)
    return _HiresSetup(target, hr_sampler, hr_schedule, steps, hr_prompts, hr_negatives)


def _hires_pass(req: GenerationRequest, ctx: ProcessingContext, hr: _HiresSetup, batch: _Batch,
                samples: torch.Tensor, first_schedule_steps: int, passes: int, warned: set[str]) -> torch.Tensor:
    """A1111's `sample_hr_pass`: upscale the first pass (in latent space, or decoded and resized in pixels),
    then sample it again as img2img with the hires steps, denoising, sampler and prompts."""
    model = ctx.model
    target = hr.target
    inpainting = _uses_inpainting_conditioning(model)
    latent_mode = masking.LATENT_UPSCALE_MODES.get(req.hr_upscaler or "Latent")
    weight = float(ctx.opts.get("inpainting_mask_weight", 1.0))
    image_cond = None
    if latent_mode is not None:
        mode, antialias = latent_mode
        size = (target.height // LATENT_FACTOR, target.width // LATENT_FACTOR)
        samples = F.interpolate(samples, size=size, mode=mode, antialias=antialias)
        if inpainting:
            if weight < 1.0:
                pixels = decode_latents(model, samples, warn=ctx.warn)
                image_cond = inpainting_image_conditioning(model, pixels, None, samples.shape[-2:], weight=weight,
                                                           round_mask=True, device=ctx.device, warn=ctx.warn)
            else:
                image_cond = txt2img_image_conditioning(model, samples.shape[0], target.height, target.width,
                                                        ctx.device, ctx.warn)
    else:
        lowres = to_pil(decode_latents(model, samples, warn=ctx.warn))
        upscaled = [masking.resize_image(0, im, target.width, target.height, upscaler=req.hr_upscaler)
                    for im in lowres]
        pixels = pil_to_tensor(upscaled).to(ctx.device)
        samples = encode_pixels(model, pixels, warn=ctx.warn).to(ctx.device)
        if inpainting:
            image_cond = inpainting_image_conditioning(model, pixels, None, samples.shape[-2:], weight=weight,
                                                       round_mask=True, device=ctx.device, warn=ctx.warn)

    ty, tx = target.truncate_y, target.truncate_x
    samples = samples[:, :, ty // 2:samples.shape[2] - (ty + 1) // 2, tx // 2:samples.shape[3] - (tx + 1) // 2]
    if image_cond is not None:
        image_cond = image_cond[:, :, ty // 2:image_cond.shape[2] - (ty + 1) // 2,
                                tx // 2:image_cond.shape[3] - (tx + 1) // 2]

    noise_rng = _image_rng(req, ctx, samples.shape[1:], batch.seeds, batch.subseeds, hr.sampler)
    noise = noise_rng.first().float()

    lo, hi = batch.first_index, batch.first_index + len(batch.seeds)
    hr_prompts = _strip_networks(ctx, hr.prompts[lo:hi], warned)
    # A1111's hires schedule: over the first pass's steps, with the hires pass's own count as hires_steps
    conds, unconds = _encode_schedules(batch.encoder, hr_prompts, hr.negatives[lo:hi], first_schedule_steps,
                                       hires_steps=samplers.total_steps(hr.sampler, hr.steps))
    denoiser = _make_denoiser(ctx, batch.encoder, conds, unconds, req.cfg_scale, target.width, target.height,
                              image_cond)
    plan = img2img_plan(hr.steps, req.denoising_strength, fix_steps=True)
    if plan.run:
        samplers.check_steps(hr.sampler, plan.total)
    return sample_latents(ctx, sampler=hr.sampler, schedule=hr.schedule, plan=plan, noise=noise, denoiser=denoiser,
                          seeds=batch.seeds, generators=noise_rng.step_generators(hr.sampler.draws_noise),
                          init_latent=samples, callback=_step_callback(ctx, 1, passes, batch.number))


def process_txt2img(req: GenerationRequest, ctx: ProcessingContext) -> GenerationResult:
    """txt2img, with the hires fix when `req.enable_hr`."""
    # 1. check inputs
    _check_inputs(req, ctx)
    model = ctx.model
    sampler, schedule = samplers.resolve_sampler(req.sampler_name, req.scheduler)
    samplers.check_steps(sampler, req.steps)
    schedule_label = samplers.effective_schedule_label(sampler, schedule, req.scheduler)

    # 2. seeds and prompts
    jp = _job_prompts(req, ctx, req.total_images)
    fields: dict[str, Any] = {}
    inpainting = _uses_inpainting_conditioning(model)
    if inpainting:
        fields["Conditional mask weight"] = float(ctx.opts.get("inpainting_mask_weight", 1.0))
    hr = _hires_setup(req, ctx, sampler, schedule_label, jp, fields) if req.enable_hr else None
    passes = 2 if hr is not None else 1
    channels = model.vae.config.latent_channels
    shape = (channels, req.height // LATENT_FACTOR, req.width // LATENT_FACTOR)
    schedule_steps = samplers.total_steps(sampler, req.steps)
    warned: set[str] = set()
    txt2img_cond: dict[int, torch.Tensor] = {}  # per batch size: the same every batch

    def sample(batch: _Batch) -> _BatchOutput:
        image_cond = None
        if inpainting:
            if len(batch.seeds) not in txt2img_cond:
                txt2img_cond[len(batch.seeds)] = txt2img_image_conditioning(model, len(batch.seeds), req.height,
                                                                            req.width, ctx.device, ctx.warn)
            image_cond = txt2img_cond[len(batch.seeds)]
        noise_rng = _image_rng(req, ctx, shape, batch.seeds, batch.subseeds, sampler)
        denoiser = _make_denoiser(ctx, batch.encoder, batch.conds, batch.unconds, req.cfg_scale, req.width,
                                  req.height, image_cond)
        latents = sample_latents(ctx, sampler=sampler, schedule=schedule, plan=txt2img_plan(req.steps),
                                 noise=noise_rng.first().float(), denoiser=denoiser, seeds=batch.seeds,
                                 generators=noise_rng.step_generators(sampler.draws_noise),
                                 callback=_step_callback(ctx, 0, passes, batch.number))
        if hr is not None and not ctx.control.should_stop_sampling():
            latents = _hires_pass(req, ctx, hr, batch, latents, schedule_steps, passes, warned)
        return _BatchOutput(latents=latents)

    def image_fields(index: int, prompt: str, negative: str) -> dict[str, Any]:
        out = dict(fields)
        if hr is not None:
            out["Hires prompt"] = hr.prompts[index] if hr.prompts[index] != prompt else None
            out["Hires negative prompt"] = hr.negatives[index] if hr.negatives[index] != negative else None
        return out

    job = _Job(sampler=sampler, schedule=schedule, schedule_label=schedule_label, batch_size=req.batch_size,
               passes=passes, sample=sample, fields=image_fields, inpainting_conditioning=inpainting,
               extra_params={k: v for k, v in fields.items() if v is not None})
    return _run_batches(req, ctx, job, jp)


# -- img2img ------------------------------------------------------------------------------------

@dataclass
class Img2ImgInit:
    """img2img's starting point, shared by every batch of the job."""

    prepared: masking.PreparedInit  # pixel side: prepared images, mask, overlays, crop box
    pixels: torch.Tensor  # [B,3,H,W] in 0..1: what was encoded (B = images per batch)
    init_latent: torch.Tensor  # [B,C,h,w]: the encoding, scaled (resize mode 3) and with masked content applied
    latent_mask: LatentMask | None
    image_cond: torch.Tensor | None  # 9-channel UNets: mask + masked-image latent
    pixels_exact: bool  # init_latent is the plain encoding of `pixels` (no latent upscale, no latent fill)
    fields: dict[str, Any]  # infotext: Denoising strength, Conditional mask weight, Mask blur, ...


def prepare_img2img(req: GenerationRequest, ctx: ProcessingContext, seeds: Sequence[int]) -> Img2ImgInit:
    """A1111's img2img `init()`: prepare the init images and mask, encode them, apply masked content
    (fill and original in pixels; latent noise from the first images' `seeds`, latent nothing) and build
    the inpainting conditioning."""
    opts = ctx.opts
    model = ctx.model
    batch_size = req.effective_batch_size
    blur_x, blur_y = req.mask_blur_xy
    inpaint = masking.InpaintSettings(mask_blur_x=blur_x, mask_blur_y=blur_y, mask_round=req.mask_round,
                                      invert=bool(req.inpainting_mask_invert), inpainting_fill=req.inpainting_fill,
                                      full_res=req.inpaint_full_res, padding=req.inpaint_full_res_padding)
    prepared = masking.prepare_init_images(req.init_images, req.width, req.height, req.resize_mode, req.mask,
                                           inpaint, background=str(opts.get("img2img_background_color", "#ffffff")))
    fields: dict[str, Any] = {"Denoising strength": req.denoising_strength}
    inpainting = _uses_inpainting_conditioning(model)
    weight = float(opts.get("inpainting_mask_weight", 1.0))
    if inpainting:
        fields["Conditional mask weight"] = weight
    fields.update(prepared.infotext)

    pixels = pil_to_tensor(prepared.images)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(batch_size, -1, -1, -1)
    pixels = pixels.to(ctx.device)
    init_latent = encode_pixels(model, pixels, warn=ctx.warn).to(ctx.device)
    if req.resize_mode == 3:
        size = (req.height // LATENT_FACTOR, req.width // LATENT_FACTOR)
        init_latent = F.interpolate(init_latent, size=size, mode="bilinear")
    pixels_exact = req.resize_mode != 3
    latent_mask = None
    if prepared.mask is not None:
        latent_mask = latent_mask_from_image(prepared.mask, init_latent.shape, req.mask_round, ctx.device)
        if req.inpainting_fill == 2:
            # A1111 draws this noise once, from the first images' seeds, for every batch
            fill_rng = rng.ImageRNG(init_latent.shape[1:], list(seeds[:init_latent.shape[0]]),
                                    source=opts.get("randn_source", "GPU"), device=ctx.device)
            init_latent = latent_mask.blend(init_latent, fill_rng.first().float())
            pixels_exact = False
        elif req.inpainting_fill == 3:
            init_latent = init_latent * latent_mask.mask
            pixels_exact = False
    image_cond = None
    if inpainting:
        cond_pixels = pixels
        if cond_pixels.shape[-2:] != (req.height, req.width):  # resize mode 3: the latent was scaled instead
            cond_pixels = F.interpolate(cond_pixels, size=(req.height, req.width), mode="bilinear")
        image_cond = inpainting_image_conditioning(model, cond_pixels, prepared.mask, init_latent.shape[-2:],
                                                   weight=weight, round_mask=req.mask_round, device=ctx.device,
                                                   warn=ctx.warn)
    return Img2ImgInit(prepared, pixels, init_latent, latent_mask, image_cond, pixels_exact, fields)


def process_img2img(req: GenerationRequest, ctx: ProcessingContext) -> GenerationResult:
    """img2img and inpainting (A1111's `StableDiffusionProcessingImg2Img`)."""
    # 1. check inputs
    _check_inputs(req, ctx)
    if not req.init_images:
        raise ValueError("img2img needs at least one init image")
    opts = ctx.opts
    sampler, schedule = samplers.resolve_sampler(req.sampler_name, req.scheduler)
    samplers.check_steps(sampler, req.steps)
    schedule_label = samplers.effective_schedule_label(sampler, schedule, req.scheduler)
    plan = img2img_plan(req.steps, req.denoising_strength, bool(opts.get("img2img_fix_steps", False)))
    if plan.run:
        samplers.check_steps(sampler, plan.total)
    batch_size = req.effective_batch_size

    # 2. seeds and prompts; 3. init images, mask, masked content, inpainting conditioning
    jp = _job_prompts(req, ctx, batch_size * req.n_iter)
    init = prepare_img2img(req, ctx, jp.seeds)
    prepared, init_latent, latent_mask, fields = init.prepared, init.init_latent, init.latent_mask, init.fields

    multiplier = req.initial_noise_multiplier
    if multiplier is None:
        multiplier = float(opts.get("initial_noise_multiplier", 1.0))
    late_fields = {"Noise multiplier": multiplier} if multiplier != 1.0 else {}
    shape = tuple(init_latent.shape[1:])

    # 4. per batch: sample from the init latent
    def sample(batch: _Batch) -> _BatchOutput:
        if plan.run == 0 and init.pixels_exact:
            return _BatchOutput(images=list(prepared.images) * (batch_size // len(prepared.images)))
        noise_rng = _image_rng(req, ctx, shape, batch.seeds, batch.subseeds, sampler)
        noise = noise_rng.first().float() * multiplier
        denoiser = _make_denoiser(ctx, batch.encoder, batch.conds, batch.unconds, req.cfg_scale, req.width,
                                  req.height, init.image_cond)
        shown = (lambda x: latent_mask.blend(init_latent, x)) if latent_mask is not None else (lambda x: x)
        latents = sample_latents(ctx, sampler=sampler, schedule=schedule, plan=plan, noise=noise, denoiser=denoiser,
                                 seeds=batch.seeds, generators=noise_rng.step_generators(sampler.draws_noise),
                                 init_latent=init_latent, latent_mask=latent_mask,
                                 callback=_step_callback(ctx, 0, 1, batch.number, shown))
        return _BatchOutput(latents=latents)

    # 5. put the result back over the original
    overlay_on = bool(opts.get("overlay_inpaint", True))

    def finish(index: int, image: Image.Image) -> Image.Image:
        overlay = prepared.overlays[index % len(prepared.overlays)] if prepared.overlays and overlay_on else None
        return masking.apply_overlay(image, prepared.paste_to, overlay)

    job = _Job(sampler=sampler, schedule=schedule, schedule_label=schedule_label, batch_size=batch_size, passes=1,
               sample=sample, fields=lambda _i, _p, _n: fields, late_fields=late_fields, finish=finish,
               inpainting_conditioning=init.image_cond is not None, extra_params={**fields, **late_fields},
               comments=list(prepared.comments))
    return _run_batches(req, ctx, job, jp)


def process(req: GenerationRequest, ctx: ProcessingContext) -> GenerationResult:
    """Run a request of either kind."""
    with circular_padding(ctx.model, req.tiling):
        return process_img2img(req, ctx) if req.kind == "img2img" else process_txt2img(req, ctx)


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
