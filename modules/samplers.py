"""Samplers and schedule types by A1111's names, built on diffusers' scheduler classes.

The sampling loop (`modules.sampling.run_sampler`) drives a diffusers scheduler step by step. This module
says which scheduler class and options stand for each A1111 sampler ("DPM++ 2M", "Euler a", ...) and each
A1111 schedule type ("Karras", "Exponential", ...), resolves the names users and API clients send
(aliases such as `k_euler_a`, legacy names such as "DPM++ 2M Karras"), and builds a fresh scheduler per job.

Conventions kept from A1111 / k-diffusion where diffusers allows it:
- k-diffusion samplers discretize uniformly over the training timesteps (diffusers `timestep_spacing="linspace"`),
  start from noise scaled by sigma_max, end at sigma 0, and take sigma_min/sigma_max for Karras, Exponential and
  Beta from the model's training sigmas.
- DDIM and PLMS use A1111's timesteps `range(0, 1000, 1000 // steps) + 1` (diffusers "leading", steps_offset 1,
  final alpha = alphas_cumprod[0]); UniPC uses A1111's defaults (variant bh1, order 3, time-uniform, lower order
  final, ending at sigma_min).
- The model's `prediction_type` (epsilon or v_prediction), betas and zero-SNR flag are kept.

What diffusers cannot express, and what happens then:
- Timestep samplers (DDIM, PLMS, UniPC; LCM too) have a fixed discretization; as A1111 does for DDIM/PLMS/UniPC,
  any schedule type is ignored and `resolve_sampler` reports the schedule actually used (DDIM/PLMS: "DDIM",
  UniPC/LCM: "Uniform"). A1111 lets LCM take a schedule type; diffusers' LCMScheduler cannot.
- Polyexponential, KL Optimal and Align Your Steps need custom sigma lists: `UnsupportedScheduleError`.
- DPM++ 2S a (diffusers' single-step solver) has no SGM Uniform, Simple or DDIM spacing: `UnsupportedScheduleError`.
- A1111 samplers without a faithful diffusers counterpart are not offered: DPM fast, DPM adaptive, Restart,
  DDIM CFG++.
- Smaller differences (same schedule, slightly different numbers) are listed per sampler in `SamplerInfo.note`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_dpmsolver_sde import DPMSolverSDEScheduler
from diffusers.schedulers.scheduling_dpmsolver_singlestep import DPMSolverSinglestepScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteScheduler
from diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete import KDPM2AncestralDiscreteScheduler
from diffusers.schedulers.scheduling_k_dpm_2_discrete import KDPM2DiscreteScheduler
from diffusers.schedulers.scheduling_lcm import LCMScheduler
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler
from diffusers.schedulers.scheduling_pndm import PNDMScheduler
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin


class UnsupportedScheduleError(ValueError):
    """A known A1111 schedule type that Athanor cannot build for the chosen sampler."""


# -- schedule types ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ScheduleType:
    """One of A1111's schedule types (`modules/sd_schedulers.py`), and how diffusers expresses it."""

    name: str  # A1111's name, e.g. "karras"
    label: str  # A1111's label, e.g. "Karras"
    aliases: tuple[str, ...] = ()
    default_rho: float = -1.0
    need_inner_model: bool = False
    supported: bool = True  # False: A1111 has it, Athanor cannot build it on diffusers
    note: str = ""  # how our version differs from A1111's, if it does


_A1111_SCHEDULE_TYPES = (
    ScheduleType("automatic", "Automatic", note="the sampler's default schedule"),
    ScheduleType("uniform", "Uniform", need_inner_model=True),
    ScheduleType("karras", "Karras", default_rho=7.0),
    ScheduleType("exponential", "Exponential"),
    ScheduleType("polyexponential", "Polyexponential", default_rho=1.0, supported=False),
    ScheduleType("sgm_uniform", "SGM Uniform", aliases=("SGMUniform",), need_inner_model=True,
                 note="diffusers 'trailing' spacing: integer timesteps 999 - k*1000/n instead of 999 - k*999/n"),
    ScheduleType("kl_optimal", "KL Optimal", supported=False),
    ScheduleType("align_your_steps", "Align Your Steps", supported=False),
    ScheduleType("simple", "Simple", need_inner_model=True,
                 note="diffusers 'trailing' spacing: rounds where A1111 floors (identical when steps divides 1000)"),
    ScheduleType("normal", "Normal", need_inner_model=True, note="the same sigmas as Uniform, as in A1111"),
    ScheduleType("ddim", "DDIM", need_inner_model=True,
                 note="diffusers 'leading' spacing with offset 1: A1111's grid when steps divides 1000"),
    ScheduleType("beta", "Beta", need_inner_model=True, note="alpha = beta = 0.6, A1111's default options"),
)

#: The schedule types Athanor offers (UI dropdown, /sdapi/v1/schedulers), in A1111's order.
SCHEDULE_TYPES: tuple[ScheduleType, ...] = tuple(s for s in _A1111_SCHEDULE_TYPES if s.supported)
AUTOMATIC: ScheduleType = _A1111_SCHEDULE_TYPES[0]

_SCHEDULE_BY_NAME: Mapping[str, ScheduleType] = MappingProxyType({s.name: s for s in _A1111_SCHEDULE_TYPES})

# diffusers options per schedule type, for the scheduler classes that take them
_SCHEDULE_OPTIONS: Mapping[str, Mapping[str, Any]] = MappingProxyType({name: MappingProxyType(opts) for name, opts in {
    "uniform": {"timestep_spacing": "linspace"},
    "normal": {"timestep_spacing": "linspace"},
    "karras": {"timestep_spacing": "linspace", "use_karras_sigmas": True},
    "exponential": {"timestep_spacing": "linspace", "use_exponential_sigmas": True},
    "beta": {"timestep_spacing": "linspace", "use_beta_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
    "simple": {"timestep_spacing": "trailing"},
    "ddim": {"timestep_spacing": "leading", "steps_offset": 1},
}.items()})

_ALL_SPACINGS = ("uniform", "normal", "karras", "exponential", "beta", "sgm_uniform", "simple", "ddim")


def find_schedule(name: str | None) -> ScheduleType:
    """The A1111 schedule type with this name (`karras`), label (`Karras`) or alias (`SGMUniform`), any case.

    None or "" means Automatic. An unknown name raises ValueError; a known type that Athanor cannot build
    (e.g. "Align Your Steps") is returned with `supported=False`.
    """
    if name is None or not str(name).strip():
        return AUTOMATIC
    key = str(name).strip().lower()
    for schedule in _A1111_SCHEDULE_TYPES:
        if key in (schedule.name, schedule.label.lower(), *(a.lower() for a in schedule.aliases)):
            return schedule
    valid = ", ".join(s.label for s in SCHEDULE_TYPES)
    raise ValueError(f"Unknown schedule type {name!r}. Valid schedule types: {valid}.")


# -- samplers ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplerInfo:
    """One A1111 sampler and the diffusers scheduler that stands for it."""

    name: str  # A1111's label, e.g. "DPM++ 2M"
    aliases: tuple[str, ...]
    scheduler_class: type[SchedulerMixin]
    scheduler_kwargs: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    default_schedule: str = "uniform"  # what Automatic means for this sampler (A1111's `scheduler` option)
    schedules: tuple[str, ...] = _ALL_SPACINGS  # schedule types diffusers can build for this sampler
    supports_schedules: bool = True  # False: timestep sampler, the schedule type is ignored (as in A1111)
    uses_ensd: bool = False  # A1111's flag: ancestral noise comes from seed+ENSD; infotext writes ENSD
    second_order: bool = False  # two denoiser calls per step (A1111 counts prompt schedules over 2*steps)
    draws_noise: bool = False  # the scheduler draws fresh noise while sampling (pass the per-image generators)
    brownian_noise: bool = False  # A1111 draws this noise from a Brownian tree seeded by the image seeds
    discard_next_to_last_sigma: bool = False  # A1111's option (shown in the API); diffusers cannot do it
    solver_type: str | None = None  # A1111's option for DPM++ 2M SDE Heun (shown in the API)
    max_steps: int | None = None  # diffusers refuses more steps (LCM: its 50 distilled timesteps)
    note: str = ""  # how the diffusers version differs from A1111's

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheduler_kwargs", MappingProxyType(dict(self.scheduler_kwargs)))

    @property
    def a1111_options(self) -> dict[str, str]:
        """A1111's sampler options dict as `/sdapi/v1/samplers` shows it (values are strings there)."""
        options: dict[str, str] = {}
        if self.supports_schedules and self.default_schedule != "uniform":
            options["scheduler"] = self.default_schedule
        for key in ("discard_next_to_last_sigma", "uses_ensd", "second_order", "brownian_noise"):
            if getattr(self, key):
                options[key] = "True"
        if self.solver_type:
            options["solver_type"] = self.solver_type
        return options


class EulerAncestralScheduler(EulerAncestralDiscreteScheduler):
    """diffusers' Euler ancestral step, plus the Karras, Exponential and Beta sigma schedules.

    diffusers' class only spaces timesteps, while A1111 lets "Euler a" take any schedule type. The sigmas
    follow k-diffusion's formulas between the model's smallest and largest training sigma; each sigma's
    timestep for the UNet comes from log-linear interpolation, as in k-diffusion's `sigma_to_t`.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: np.ndarray | list[float] | None = None,
                 prediction_type: str = "epsilon", timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False) -> None:
        if sum((use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)) > 1:
            raise ValueError("Only one of Karras, Exponential and Beta sigmas can be used.")
        super().__init__(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                         beta_schedule=beta_schedule, trained_betas=trained_betas, prediction_type=prediction_type,
                         timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                         rescale_betas_zero_snr=rescale_betas_zero_snr)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device=device)
        kind = ("karras" if self.config.use_karras_sigmas else "exponential" if self.config.use_exponential_sigmas
                else "beta" if self.config.use_beta_sigmas else None)
        if kind is None:
            return
        alphas_cumprod = self.alphas_cumprod.double().numpy()
        train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # ascending in t
        sigmas = sigma_schedule(kind, num_inference_steps, float(train_sigmas[0]), float(train_sigmas[-1]))
        log_train = np.log(train_sigmas)
        timesteps = np.interp(np.log(sigmas), log_train, np.arange(len(train_sigmas), dtype=np.float64))
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))  # stays on CPU, as in diffusers
        self.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(device=device)


def sigma_schedule(kind: str, n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """k-diffusion's n descending sigmas from sigma_max to sigma_min (no trailing zero).

    karras: (max^(1/rho) + i/(n-1) * (min^(1/rho) - max^(1/rho)))^rho
    exponential: exp(linspace(log max, log min, n))
    beta: min + ppf_Beta(0.6, 0.6)(1 - i/(n-1)) * (max - min)   (A1111's default alpha = beta = 0.6)
    """
    ramp = np.linspace(0.0, 1.0, n)
    if kind == "karras":
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (hi + ramp * (lo - hi)) ** rho
    if kind == "exponential":
        return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), n))
    if kind == "beta":
        from scipy import stats  # scipy is only needed for this schedule

        return sigma_min + stats.beta.ppf(1.0 - ramp, 0.6, 0.6) * (sigma_max - sigma_min)
    raise ValueError(f"Unknown sigma schedule {kind!r}")


_DPMPP_MULTISTEP: Mapping[str, Any] = MappingProxyType({
    "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True,
    "euler_at_final": False, "final_sigmas_type": "zero"})
_TIMESTEP_SAMPLER_NOTE = "ignores the schedule type (as A1111's timestep samplers do)"
_DISCARD_NOTE = "A1111 drops the next-to-last sigma for this sampler; diffusers cannot, so the last steps differ"
_UNIFORM_MULTISTEP_NOTE = ("with Uniform/Normal diffusers spaces n+1 timesteps and drops t=0, where k-diffusion "
                           "ends its grid at sigma_min")

#: Athanor's samplers, in A1111's order (k-diffusion ones, then timestep ones, then LCM).
SAMPLERS: tuple[SamplerInfo, ...] = (
    SamplerInfo("DPM++ 2M", ("k_dpmpp_2m",), DPMSolverMultistepScheduler, _DPMPP_MULTISTEP,
                default_schedule="karras", note=_UNIFORM_MULTISTEP_NOTE),
    SamplerInfo("DPM++ SDE", ("k_dpmpp_sde",), DPMSolverSDEScheduler, {},
                default_schedule="karras", second_order=True, draws_noise=True, brownian_noise=True,
                note="Brownian-tree noise seeded by the image seeds, as in A1111 (pass seeds to build_scheduler)"),
    SamplerInfo("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), DPMSolverMultistepScheduler,
                {**_DPMPP_MULTISTEP, "algorithm_type": "sde-dpmsolver++"},
                default_schedule="exponential", draws_noise=True, brownian_noise=True,
                note="noise is drawn per step from the image generators, not from A1111's Brownian tree; "
                     + _UNIFORM_MULTISTEP_NOTE),
    SamplerInfo("DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",), DPMSolverMultistepScheduler,
                {**_DPMPP_MULTISTEP, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
                default_schedule="exponential", draws_noise=True, brownian_noise=True, solver_type="heun",
                note="noise is drawn per step from the image generators, not from A1111's Brownian tree; "
                     + _UNIFORM_MULTISTEP_NOTE),
    SamplerInfo("DPM++ 2S a", ("k_dpmpp_2s_a",), DPMSolverSinglestepScheduler,
                {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "lower_order_final": True,
                 "final_sigmas_type": "zero"},
                default_schedule="karras", schedules=("uniform", "normal", "karras", "exponential", "beta"),
                uses_ensd=True, draws_noise=True,
                note="diffusers' single-step DPM-Solver++(2S) SDE: one denoiser call per step where A1111's "
                     "ancestral 2S makes two, so it needs about twice the steps for the same result"),
    SamplerInfo("DPM++ 3M SDE", ("k_dpmpp_3m_sde",), DPMSolverMultistepScheduler,
                {**_DPMPP_MULTISTEP, "algorithm_type": "sde-dpmsolver++", "solver_order": 3},
                default_schedule="exponential", draws_noise=True, brownian_noise=True,
                discard_next_to_last_sigma=True,
                note="diffusers' third-order multistep SDE solver, noise per step from the image generators; "
                     + _DISCARD_NOTE),
    SamplerInfo("Euler a", ("k_euler_a", "k_euler_ancestral"), EulerAncestralScheduler, {},
                uses_ensd=True, draws_noise=True),
    SamplerInfo("Euler", ("k_euler",), EulerDiscreteScheduler,
                {"interpolation_type": "linear", "final_sigmas_type": "zero"}),
    SamplerInfo("LMS", ("k_lms",), LMSDiscreteScheduler, {}),
    SamplerInfo("Heun", ("k_heun",), HeunDiscreteScheduler, {"clip_sample": False}, second_order=True),
    SamplerInfo("DPM2", ("k_dpm_2",), KDPM2DiscreteScheduler, {},
                default_schedule="karras", second_order=True, discard_next_to_last_sigma=True, note=_DISCARD_NOTE),
    SamplerInfo("DPM2 a", ("k_dpm_2_a",), KDPM2AncestralDiscreteScheduler, {},
                default_schedule="karras", uses_ensd=True, second_order=True, draws_noise=True,
                discard_next_to_last_sigma=True, note=_DISCARD_NOTE),
    SamplerInfo("DDIM", ("ddim",), DDIMScheduler,
                {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
                 "thresholding": False},
                default_schedule="ddim", schedules=("ddim",), supports_schedules=False,
                note=_TIMESTEP_SAMPLER_NOTE + "; diffusers also evaluates t=1, which A1111 skips, and always makes "
                     "exactly `steps` steps where A1111 makes one more when steps does not divide 1000"),
    SamplerInfo("PLMS", ("plms",), PNDMScheduler,
                {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, "skip_prk_steps": True},
                default_schedule="ddim", schedules=("ddim",), supports_schedules=False,
                note=_TIMESTEP_SAMPLER_NOTE + "; diffusers' PLMS warm-up makes steps+1 denoiser calls"),
    SamplerInfo("UniPC", ("unipc",), UniPCMultistepScheduler,
                {"solver_type": "bh1", "solver_order": 3, "lower_order_final": True, "predict_x0": True,
                 "timestep_spacing": "linspace", "final_sigmas_type": "sigma_min", "thresholding": False},
                schedules=("uniform",), supports_schedules=False, note=_TIMESTEP_SAMPLER_NOTE),
    SamplerInfo("LCM", ("k_lcm",), LCMScheduler, {"timestep_spacing": "leading", "original_inference_steps": 50},
                schedules=("uniform",), supports_schedules=False, draws_noise=True, max_steps=50,
                note="diffusers' LCMScheduler: its own spacing over the 50 LCM timesteps; the schedule type is "
                     "ignored (A1111 accepts one for LCM); at most 50 steps"),
)

DEFAULT_SAMPLER = "DPM++ 2M"  # what A1111 v1.10 uses when no sampler name is given

# Pre-1.9 aliases that named a sampler together with Karras/Exponential (A1111 dropped them with the
# separate schedule type; old API clients and scripts still send them).
_LEGACY_ALIASES: Mapping[str, tuple[str, str]] = MappingProxyType({
    "k_lms_ka": ("LMS", "karras"),
    "k_dpm_2_ka": ("DPM2", "karras"),
    "k_dpm_2_a_ka": ("DPM2 a", "karras"),
    "k_dpmpp_2s_a_ka": ("DPM++ 2S a", "karras"),
    "k_dpmpp_2m_ka": ("DPM++ 2M", "karras"),
    "k_dpmpp_sde_ka": ("DPM++ SDE", "karras"),
    "k_dpmpp_2m_sde_ka": ("DPM++ 2M SDE", "karras"),
    "k_dpmpp_2m_sde_exp": ("DPM++ 2M SDE", "exponential"),
    "k_dpmpp_2m_sde_heun_ka": ("DPM++ 2M SDE Heun", "karras"),
    "k_dpmpp_2m_sde_heun_exp": ("DPM++ 2M SDE Heun", "exponential"),
    "k_dpmpp_3m_sde_ka": ("DPM++ 3M SDE", "karras"),
    "k_dpmpp_3m_sde_exp": ("DPM++ 3M SDE", "exponential"),
})


def _find_sampler_exact(name: str) -> SamplerInfo | None:
    key = name.strip().lower()
    for sampler in SAMPLERS:
        if key == sampler.name.lower() or key in (a.lower() for a in sampler.aliases):
            return sampler
    return None


def find_sampler(name: str) -> SamplerInfo:
    """The sampler with this name or alias (any case); ValueError listing the valid names otherwise."""
    sampler = _find_sampler_exact(name)
    if sampler is None:
        raise ValueError(f"Unknown sampler {name!r}. Valid samplers: {', '.join(s.name for s in SAMPLERS)}.")
    return sampler


def _split_name(name: str | None, schedule: str | None) -> tuple[SamplerInfo, ScheduleType]:
    """Sampler and requested schedule type (possibly Automatic), A1111's `get_sampler_and_scheduler` way:
    a schedule named at the end of the sampler name ("DPM++ 2M Karras") wins over the `schedule` argument."""
    text = (name or "").strip() or DEFAULT_SAMPLER
    sampler = _find_sampler_exact(text)
    if sampler is not None:
        return sampler, find_schedule(schedule)
    legacy = _LEGACY_ALIASES.get(text.lower())
    if legacy is not None:
        return find_sampler(legacy[0]), _SCHEDULE_BY_NAME[legacy[1]]
    lowered = text.lower()
    for candidate in _A1111_SCHEDULE_TYPES:
        for option in (candidate.label, candidate.name, *candidate.aliases):
            if lowered.endswith(" " + option.lower()):
                sampler = _find_sampler_exact(text[: -len(option) - 1])
                if sampler is not None:
                    return sampler, candidate
    return find_sampler(text), AUTOMATIC  # raises with the list of valid names


def effective_schedule(sampler: SamplerInfo, requested: ScheduleType) -> ScheduleType:
    """The schedule type a job with this sampler will really use.

    Automatic gives the sampler's default. Timestep samplers (DDIM, PLMS, UniPC, LCM) ignore the request, as
    A1111 does. A type diffusers cannot build for this sampler raises UnsupportedScheduleError.
    """
    if not sampler.supports_schedules or requested.name == "automatic":
        return _SCHEDULE_BY_NAME[sampler.default_schedule]
    if requested.name not in sampler.schedules:
        usable = ", ".join(["Automatic", *(_SCHEDULE_BY_NAME[n].label for n in sampler.schedules)])
        reason = ("Athanor cannot build it on diffusers" if not requested.supported
                  else f"diffusers' scheduler for {sampler.name} has no such option")
        raise UnsupportedScheduleError(
            f"The {requested.label} schedule type is not available with {sampler.name} ({reason}). "
            f"Choose one of: {usable}.")
    return requested


def resolve_sampler(name: str | None, schedule: str | None = None) -> tuple[SamplerInfo, ScheduleType]:
    """Sampler and effective schedule type for a request's `sampler_name` and `scheduler`.

    Names and aliases match in any case; legacy names such as "DPM++ 2M Karras" or "DPM++ 2M SDE Exponential"
    are split into sampler and schedule (the suffix wins over `schedule`). None or "" means "DPM++ 2M".
    The schedule type is looked up by name, label or alias; None, "" and Automatic give the sampler's default
    (e.g. DPM++ 2M -> Karras, Euler -> Uniform). Unknown names raise ValueError listing the valid ones.
    """
    sampler, requested = _split_name(name, schedule)
    return sampler, effective_schedule(sampler, requested)


def effective_schedule_label(sampler: SamplerInfo, schedule: ScheduleType, requested: str | None = None) -> str:
    """The "Schedule type" A1111 writes into the infotext for this sampler and resolved schedule.

    k-diffusion samplers: the schedule used, except "Automatic" when Automatic was asked and the sampler has no
    default of its own (Euler, LMS, ...). Timestep samplers: the requested label (they ignore it), "Automatic"
    by default. `requested` is the request's raw `scheduler` field.
    """
    try:
        asked = find_schedule(requested)
    except ValueError:
        asked = AUTOMATIC
    if not sampler.supports_schedules:
        return asked.label
    if asked.name == "automatic" and sampler.default_schedule == "uniform" and schedule.name == "uniform":
        return AUTOMATIC.label
    return schedule.label


def split_sampler_name(name: str | None, schedule: str | None = None, *,
                       convert_automatic: bool = True) -> tuple[str, str]:
    """(sampler name, schedule label) as A1111's `get_sampler_and_scheduler` gives them, for infotext paste.

    Lenient like A1111: an unknown sampler gives the default sampler, an unknown schedule gives Automatic.
    With `convert_automatic`, a schedule equal to the sampler's own default becomes "Automatic".
    """
    try:
        sampler, requested = _split_name(name, None)
    except ValueError:
        sampler, requested = find_sampler(DEFAULT_SAMPLER), AUTOMATIC
    if requested.name == "automatic":
        try:
            requested = find_schedule(schedule)
        except ValueError:
            requested = AUTOMATIC
    has_own_default = sampler.supports_schedules and sampler.default_schedule != "uniform"
    if convert_automatic and has_own_default and requested.name == sampler.default_schedule:
        requested = AUTOMATIC
    return sampler.name, requested.label


# -- building schedulers ----------------------------------------------------------------------

# Keys of a model's scheduler config that describe the model (its noise schedule and output), not the sampler.
_MODEL_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
               "prediction_type", "rescale_betas_zero_snr")

SD_SCHEDULER_CONFIG: Mapping[str, Any] = MappingProxyType({
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
})


def _init_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__init__).parameters) - {"self"}


def build_scheduler(sampler: SamplerInfo, schedule: ScheduleType, base_config: Mapping[str, Any], *,
                    seeds: Sequence[int] | None = None) -> SchedulerMixin:
    """A new scheduler object for one job (schedulers keep state between steps; jobs must not share one).

    `base_config` is the model's scheduler config (diffusers' scheduler_config.json); only the model's noise
    schedule and prediction type are taken from it, the rest follows the sampler and schedule type.
    `seeds` (one per image of the batch) seed the Brownian-tree noise of DPM++ SDE as A1111 does; that
    sampler needs them (TypeError without), so that its results are reproducible.
    """
    schedule = effective_schedule(sampler, schedule)
    kwargs: dict[str, Any] = {k: base_config[k] for k in _MODEL_KEYS if base_config.get(k) is not None}
    kwargs.update(sampler.scheduler_kwargs)
    if sampler.supports_schedules:
        kwargs.update(_SCHEDULE_OPTIONS[schedule.name])
    if sampler.scheduler_class is DPMSolverSDEScheduler:
        if not seeds:
            raise TypeError(f"build_scheduler() needs seeds= (one per image) for {sampler.name}'s Brownian noise.")
        kwargs["noise_sampler_seed"] = [int(s) for s in seeds]
    accepted = _init_parameters(sampler.scheduler_class)
    return sampler.scheduler_class(**{k: v for k, v in kwargs.items() if k in accepted})


def check_steps(sampler: SamplerInfo, steps: int) -> None:
    """ValueError with a user-facing sentence if the sampler cannot run this many steps."""
    if steps < 1:
        raise ValueError(f"Steps must be at least 1; got {steps}.")
    if sampler.max_steps is not None and steps > sampler.max_steps:
        raise ValueError(f"{sampler.name} can run at most {sampler.max_steps} steps; got {steps}.")


def total_steps(sampler: SamplerInfo, steps: int) -> int:
    """The step count A1111 computes prompt schedules over (`SamplerData.total_steps`): 2*steps for
    second-order samplers, whose denoiser runs about twice per step."""
    return steps * 2 if sampler.second_order else steps


def denoiser_calls(sampler: SamplerInfo, steps: int, schedule: ScheduleType | None = None,
                   base_config: Mapping[str, Any] | None = None) -> int:
    """How many times the loop will call the denoiser: `len(scheduler.timesteps)` after `set_timesteps(steps)`
    (diffusers repeats timesteps for second-order samplers: Heun makes 2*steps-1 calls, PLMS steps+1)."""
    scheduler = build_scheduler(sampler, schedule or AUTOMATIC, base_config or SD_SCHEDULER_CONFIG, seeds=[0])
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


# -- API listings -----------------------------------------------------------------------------

def sampler_list_for_api() -> list[dict[str, Any]]:
    """GET /sdapi/v1/samplers: `[{name, aliases, options}]`, options as A1111 shows them."""
    return [{"name": s.name, "aliases": list(s.aliases), "options": s.a1111_options} for s in SAMPLERS]


def schedule_list_for_api() -> list[dict[str, Any]]:
    """GET /sdapi/v1/schedulers: `[{name, label, aliases, default_rho, need_inner_model}]` (aliases null when
    there are none, as in A1111)."""
    return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None, "default_rho": s.default_rho,
             "need_inner_model": s.need_inner_model} for s in SCHEDULE_TYPES]
