"""The sampling loop: diffusers' scheduler math, our control of every step.

`run_sampler` is the whole loop (k-diffusion style: a small function of the scheduler, the latent,
the guided model and a callback). `CFGDenoiser` is the guided model: per step it picks each
image's scheduled conditioning (prompt editing, alternation), runs the UNet on the conds and
unconds, and combines them as composable diffusion:

    out = uncond + sum_i( w_i * cfg * (cond_i - uncond) )

which for a single cond with weight 1 is ordinary classifier-free guidance. It is linear in the
model output, so it is the same whether the UNet predicts noise (epsilon) or velocity (v).

`sample_latents` sets the loop up for one batch: which steps run (`StepPlan`, A1111's img2img step counts),
the starting latent (pure noise, or the init latent noised to where the plan starts) and, for inpainting,
the blend that keeps the original outside the mask.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from diffusers.schedulers.scheduling_pndm import PNDMScheduler

from modules import samplers
from modules.conditioning import Conditioning, MultiCondSchedule, PromptSchedule, pad_to_length
from modules.hooks import AfterCFGParams, CFGDenoiserParams, HookRegistry
from modules.job_state import JobControl

if TYPE_CHECKING:
    from modules.image_conditioning import LatentMask

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor | None], None]


@lru_cache(maxsize=64)
def _step_accepts(scheduler_cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(scheduler_cls.step).parameters)


def run_sampler(scheduler, x: torch.Tensor, model: Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor], *,
                generator: Sequence[torch.Generator] | None = None, eta: float | None = None,
                control: JobControl | None = None, callback: StepCallback | None = None,
                timesteps: Sequence | None = None) -> torch.Tensor:
    """Denoise `x` over `timesteps`, by default all of `scheduler.timesteps` (already set).

    img2img passes the tail it runs and leaves `scheduler.timesteps` whole, with `set_begin_index` called:
    several diffusers schedulers compare their step index against the full list (lower-order final steps).

    model(x_scaled, t, step_index, total_steps) -> guided model output.
    Interrupt and skip are checked before every step; the latent reached so far is returned.
    """
    accepts = _step_accepts(type(scheduler))
    step_kwargs = {}
    if generator is not None and "generator" in accepts:
        step_kwargs["generator"] = list(generator) if len(generator) > 1 else generator[0]
    if eta is not None and "eta" in accepts:
        step_kwargs["eta"] = eta
    if timesteps is None:
        timesteps = scheduler.timesteps
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        if control is not None and control.should_stop_sampling():
            break
        model_input = scheduler.scale_model_input(x, t)
        output = model(model_input, t, i, total)
        result = scheduler.step(output, t, x, return_dict=True, **step_kwargs)
        x = result.prev_sample
        if callback is not None:
            callback(i, total, x, getattr(result, "pred_original_sample", None))
    return x


# -- one batch: which steps run, where the loop starts ------------------------------------------------

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


def sample_latents(sampler: samplers.SamplerInfo, schedule: samplers.ScheduleType, plan: StepPlan, *,
                   scheduler_config: Mapping[str, Any], device: torch.device, noise: torch.Tensor,
                   denoiser: Callable, seeds: Sequence[int], generators: Sequence[torch.Generator] | None,
                   eta: float | None = None, control: JobControl | None = None,
                   init_latent: torch.Tensor | None = None, latent_mask: LatentMask | None = None,
                   callback: StepCallback | None = None) -> torch.Tensor:
    """Sample one batch with our loop: from pure noise (txt2img) or from `init_latent` noised to the level
    where `plan` starts (img2img, hires pass), optionally keeping the init latent outside `latent_mask`.

    The noise is added by the scheduler's own `add_noise` (k-diffusion style schedulers: `init + noise *
    sigma_start`; DDIM/PLMS/LCM/DPM-Solver: `sqrt(alpha) * init + sqrt(1 - alpha) * noise`).
    """
    if init_latent is not None and plan.run == 0:
        return init_latent
    scheduler = samplers.build_scheduler(sampler, schedule, scheduler_config, seeds=seeds)
    scheduler.set_timesteps(plan.total, device=device)
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
    with torch.inference_mode():
        x = run_sampler(scheduler, x, model, generator=generators, eta=eta, control=control, callback=callback,
                        timesteps=timesteps)
    if latent_mask is not None and init_latent is not None:
        x = latent_mask.blend(init_latent, x)
    return x


# -- the guided model -----------------------------------------------------------------------------

@dataclass
class CFGDenoiser:
    """The UNet with per-step conditioning and classifier-free guidance for a batch of images."""

    unet: torch.nn.Module
    conds: Sequence[MultiCondSchedule]  # one per image
    unconds: Sequence[PromptSchedule]  # one per image
    cfg_scale: float
    time_ids: torch.Tensor | None = None  # SDXL size/crop conditions, [B, 6]
    image_cond: torch.Tensor | None = None  # inpainting models: mask + masked-image latents, [B, 5, h, w]
    empty: Conditioning | None = None  # for pad_cond_uncond
    pad_cond_uncond: bool = False
    hooks: HookRegistry | None = None
    calls: int = 0  # UNet evaluations, for tests and benchmarks

    def _unet(self, x: torch.Tensor, t: torch.Tensor, conds: list[Conditioning], rows: list[int],
              image_cond: torch.Tensor | None) -> torch.Tensor:
        dtype = self.unet.dtype
        length = max(c.length for c in conds)
        context = torch.cat([pad_to_length(c.context, length) for c in conds]).to(dtype)
        x_rows = x[rows]
        if image_cond is not None:
            x_rows = torch.cat([x_rows, image_cond[rows].to(x_rows)], dim=1)
        kwargs = {}
        if self.time_ids is not None:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.cat([c.pooled for c in conds]).to(dtype),
                "time_ids": self.time_ids[rows].to(dtype),
            }
        self.calls += 1
        out = self.unet(x_rows.to(dtype), t, encoder_hidden_states=context, return_dict=False, **kwargs)[0]
        return out.float()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int, total: int) -> torch.Tensor:
        batch = x.shape[0]
        cond_lists = [[(sched.at_step(step), weight) for sched, weight in self.conds[b].parts] for b in range(batch)]
        unconds = [self.unconds[b].at_step(step) for b in range(batch)]
        image_cond = self.image_cond
        if self.hooks is not None and self.hooks.has("cfg_denoiser"):
            params = self.hooks.run("cfg_denoiser", CFGDenoiserParams(
                x=x, image_cond=image_cond, timestep=t, sampling_step=step, total_sampling_steps=total,
                text_cond=cond_lists, text_uncond=unconds))
            x, image_cond, cond_lists, unconds = params.x, params.image_cond, params.text_cond, params.text_uncond

        cond_rows = [b for b in range(batch) for _ in cond_lists[b]]
        conds = [c for b in range(batch) for c, _ in cond_lists[b]]
        weights = [w for b in range(batch) for _, w in cond_lists[b]]
        skip_uncond = self.cfg_scale == 1 and all(len(cl) == 1 and cl[0][1] == 1 for cl in cond_lists)

        cond_len = max(c.length for c in conds)
        uncond_len = max(u.length for u in unconds)
        if skip_uncond:
            cond_out = self._unet(x, t, conds, cond_rows, image_cond)
            uncond_out = None
        elif cond_len == uncond_len or self.pad_cond_uncond:
            if cond_len != uncond_len:
                conds = [self._pad_with_empty(c, max(cond_len, uncond_len)) for c in conds]
                unconds = [self._pad_with_empty(u, max(cond_len, uncond_len)) for u in unconds]
            out = self._unet(x, t, conds + unconds, cond_rows + list(range(batch)), image_cond)
            cond_out, uncond_out = out[: len(conds)], out[len(conds):]
        else:  # different lengths: A1111 runs conds and unconds as separate batches
            cond_out = self._unet(x, t, conds, cond_rows, image_cond)
            uncond_out = self._unet(x, t, unconds, list(range(batch)), image_cond)

        if uncond_out is None:
            guided = cond_out
        else:
            guided = uncond_out.clone()
            for row, (b, weight) in enumerate(zip(cond_rows, weights)):
                guided[b] += weight * self.cfg_scale * (cond_out[row] - uncond_out[b])

        if self.hooks is not None and self.hooks.has("cfg_after_cfg"):
            guided = self.hooks.run("cfg_after_cfg", AfterCFGParams(guided, step, total)).x
        return guided

    def _pad_with_empty(self, cond: Conditioning, length: int) -> Conditioning:
        if cond.length >= length or self.empty is None:
            return cond
        reps = (length - cond.length) // self.empty.length
        context = torch.cat([cond.context] + [self.empty.context] * reps, dim=1)
        return Conditioning(context, cond.pooled)


# -- live previews ----------------------------------------------------------------------------
# Linear latent -> RGB maps (A1111's "Approx cheap"): no extra weights, good enough for a preview.
_CHEAP_SD = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173],
                          [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]])
_CHEAP_SDXL = torch.tensor([[0.3448, 0.4168, 0.4395], [-0.1953, -0.0290, 0.0250],
                            [0.1074, 0.0886, -0.0163], [-0.3730, -0.2499, -0.2088]])
_CHEAP_SDXL_BIAS = torch.tensor([0.1381, 0.0679, 0.0396])


def latent_preview_cheap(latent: torch.Tensor, is_sdxl: bool) -> torch.Tensor:
    """[B,4,h,w] latent -> [B,3,h,w] RGB in 0..1 (eighth resolution)."""
    lat = latent[:, :4].float().cpu()
    if is_sdxl:
        rgb = torch.einsum("bchw,cr->brhw", lat, _CHEAP_SDXL) + _CHEAP_SDXL_BIAS.reshape(1, 3, 1, 1)
    else:
        rgb = torch.einsum("bchw,cr->brhw", lat, _CHEAP_SD)
    return ((rgb + 1) / 2).clamp(0, 1)
