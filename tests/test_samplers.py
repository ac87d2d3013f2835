"""The sampler / schedule table: A1111's names, diffusers' schedulers, and a toy model they must solve."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from modules import samplers as S
from modules.rng import ImageRNG

# torchsde notes float rounding at the ends of the Brownian interval (diffusers' DPM++ SDE); harmless here
pytestmark = pytest.mark.filterwarnings("ignore:Should have ta>=t0:UserWarning")

SD1 = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
       "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True,
       "steps_offset": 1, "trained_betas": None}
SDXL = {**SD1, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading", "interpolation_type": "linear",
        "use_karras_sigmas": False, "prediction_type": "epsilon"}

# training noise levels of the SD schedule, for the toy model
_BETAS = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
_ALPHAS_CUMPROD = np.cumprod(1 - _BETAS)
_LOG_SIGMAS = np.log(((1 - _ALPHAS_CUMPROD) / _ALPHAS_CUMPROD) ** 0.5)


class PointMassModel:
    """The exact noise/velocity predictor for data that is always `x0`.

    The UNet sees x_t = sqrt(a) x0 + sqrt(1-a) eps (a = alphas_cumprod at t, read between training steps by
    log-sigma interpolation, as diffusers maps sigmas to timesteps). Solving for the noise gives
    eps = (x_t - sqrt(a) x0) / sqrt(1-a); a v-prediction model returns v = sqrt(a) eps - sqrt(1-a) x0.
    """

    def __init__(self, x0: torch.Tensor, prediction_type: str = "epsilon") -> None:
        self.x0, self.prediction_type, self.calls = x0, prediction_type, 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        t = float(t)
        sigma = float(np.exp(np.interp(t, np.arange(1000), _LOG_SIGMAS)))
        alpha_bar = 1.0 / (1.0 + sigma ** 2)
        eps = (x_t - alpha_bar ** 0.5 * self.x0) / (1 - alpha_bar) ** 0.5
        if self.prediction_type == "v_prediction":
            return alpha_bar ** 0.5 * eps - (1 - alpha_bar) ** 0.5 * self.x0
        return eps


def run_loop(scheduler, noise: torch.Tensor, model, steps: int, generators=None) -> torch.Tensor:
    """The loop modules/sampling.py runs: set_timesteps, then scale_model_input / model / step."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        kwargs = {"generator": generators if len(generators) > 1 else generators[0]} \
            if generators is not None and takes_generator else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


# A1111's timestep samplers stop at the smallest training noise level (DDIM/PLMS at alphas_cumprod[1],
# UniPC at t=0), not at sigma 0, so a little noise (sigma ~0.03) is left; the others end at sigma 0.
_ENDS_AT_SIGMA_MIN = {"DDIM", "PLMS", "UniPC"}


def _tolerance(sampler_name: str) -> float:
    return 0.05 if sampler_name in _ENDS_AT_SIGMA_MIN else 1e-3


def _x0() -> torch.Tensor:
    return torch.linspace(-1, 1, 2 * 4 * 6 * 6).reshape(2, 4, 6, 6)


def _noise(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randn((batch, 4, 6, 6), generator=torch.Generator().manual_seed(seed))


def _sigmas(sampler_name: str, schedule: str, steps: int = 10, config=SD1) -> np.ndarray:
    sampler, sched = S.resolve_sampler(sampler_name, schedule)
    scheduler = S.build_scheduler(sampler, sched, config, seeds=[0])
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.double().numpy()


# -- names -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("Euler a", "Euler a"), ("euler A", "Euler a"), ("k_euler_a", "Euler a"), ("k_euler_ancestral", "Euler a"),
    ("k_euler", "Euler"), ("k_lms", "LMS"), ("k_heun", "Heun"), ("k_dpm_2", "DPM2"), ("k_dpm_2_a", "DPM2 a"),
    ("k_dpmpp_2s_a", "DPM++ 2S a"), ("K_DPMPP_2M", "DPM++ 2M"), ("k_dpmpp_sde", "DPM++ SDE"),
    ("k_dpmpp_2m_sde", "DPM++ 2M SDE"), ("ddim", "DDIM"), ("PLMS", "PLMS"), ("unipc", "UniPC"), ("LCM", "LCM"),
    ("DPM++ 2M SDE Heun", "DPM++ 2M SDE Heun"), ("DPM++ 3M SDE", "DPM++ 3M SDE"),
])
def test_names_and_aliases_resolve_in_any_case(name, expected):
    assert S.resolve_sampler(name)[0].name == expected


@pytest.mark.parametrize("legacy,sampler,schedule", [
    ("DPM++ 2M Karras", "DPM++ 2M", "karras"),
    ("DPM++ SDE Karras", "DPM++ SDE", "karras"),
    ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "exponential"),
    ("DPM++ 2M SDE Karras", "DPM++ 2M SDE", "karras"),
    ("DPM++ 2M SDE Heun Exponential", "DPM++ 2M SDE Heun", "exponential"),
    ("LMS Karras", "LMS", "karras"),
    ("DPM2 a Karras", "DPM2 a", "karras"),
    ("Euler SGM Uniform", "Euler", "sgm_uniform"),
    ("Euler SGMUniform", "Euler", "sgm_uniform"),
    ("k_dpmpp_2m_ka", "DPM++ 2M", "karras"),
    ("k_lms_ka", "LMS", "karras"),
])
def test_legacy_names_split_into_sampler_and_schedule(legacy, sampler, schedule):
    resolved, sched = S.resolve_sampler(legacy)
    assert (resolved.name, sched.name) == (sampler, schedule)


def test_schedule_in_the_name_wins_over_the_schedule_field_as_in_a1111():
    assert S.resolve_sampler("DPM++ 2M Karras", "Exponential")[1].name == "karras"


def test_no_name_means_dpmpp_2m_with_its_default_karras():
    sampler, schedule = S.resolve_sampler(None)
    assert (sampler.name, schedule.label) == ("DPM++ 2M", "Karras")
    assert S.resolve_sampler("", "")[0].name == "DPM++ 2M"


@pytest.mark.parametrize("sampler,default", [
    ("DPM++ 2M", "Karras"), ("DPM++ SDE", "Karras"), ("DPM++ 2M SDE", "Exponential"),
    ("DPM++ 2M SDE Heun", "Exponential"), ("DPM++ 2S a", "Karras"), ("DPM++ 3M SDE", "Exponential"),
    ("DPM2", "Karras"), ("DPM2 a", "Karras"), ("Euler a", "Uniform"), ("Euler", "Uniform"), ("LMS", "Uniform"),
    ("Heun", "Uniform"),
])
def test_automatic_gives_a1111_default_schedule(sampler, default):
    assert S.resolve_sampler(sampler, "Automatic")[1].label == default
    assert S.resolve_sampler(sampler, "automatic")[1].label == default
    assert S.resolve_sampler(sampler)[1].label == default


@pytest.mark.parametrize("given,name", [
    ("karras", "karras"), ("Karras", "karras"), ("KARRAS", "karras"), ("SGM Uniform", "sgm_uniform"),
    ("sgm_uniform", "sgm_uniform"), ("SGMUniform", "sgm_uniform"), ("Exponential", "exponential"),
    ("Beta", "beta"), ("Normal", "normal"), ("Simple", "simple"), ("DDIM", "ddim"), ("uniform", "uniform"),
])
def test_schedule_found_by_name_label_or_alias(given, name):
    assert S.resolve_sampler("Euler", given)[1].name == name


def test_unknown_sampler_lists_the_valid_names():
    with pytest.raises(ValueError) as err:
        S.resolve_sampler("Euler b")
    assert "Euler a" in str(err.value) and "DPM++ 2M" in str(err.value)


def test_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        S.resolve_sampler("Euler", "Wobbly")
    assert "Karras" in str(err.value)


@pytest.mark.parametrize("sampler,schedule", [
    ("DPM++ 2M", "Align Your Steps"), ("Euler", "KL Optimal"), ("Euler a", "Polyexponential"),
    ("DPM++ 2S a", "SGM Uniform"),
])
def test_schedules_diffusers_cannot_build_are_refused_clearly(sampler, schedule):
    with pytest.raises(S.UnsupportedScheduleError) as err:
        S.resolve_sampler(sampler, schedule)
    assert isinstance(err.value, ValueError) and "Choose one of" in str(err.value)


@pytest.mark.parametrize("sampler,effective", [("DDIM", "ddim"), ("PLMS", "ddim"), ("UniPC", "uniform"),
                                               ("LCM", "uniform")])
def test_timestep_samplers_ignore_the_schedule_and_report_the_one_they_use(sampler, effective):
    for asked in ("Karras", "Exponential", "Align Your Steps", None):
        info, schedule = S.resolve_sampler(sampler, asked)
        assert schedule.name == effective
        karras = S.build_scheduler(info, S.find_schedule("Karras"), SD1, seeds=[0])
        plain = S.build_scheduler(info, S.AUTOMATIC, SD1, seeds=[0])
        karras.set_timesteps(8)
        plain.set_timesteps(8)
        assert torch.equal(karras.timesteps, plain.timesteps)


def test_infotext_schedule_label_follows_a1111():
    def label(name, sched):
        sampler, schedule = S.resolve_sampler(name, sched)
        return S.effective_schedule_label(sampler, schedule, sched)

    assert label("DPM++ 2M", "Automatic") == "Karras"  # k-diffusion sampler: the schedule it used
    assert label("DPM++ 2M", "Exponential") == "Exponential"
    assert label("Euler", "Automatic") == "Automatic"  # no default of its own
    assert label("Euler", "Uniform") == "Uniform"
    assert label("Euler a", "Karras") == "Karras"
    assert label("DDIM", None) == "Automatic"
    assert label("DPM++ 2M Karras", "Automatic") == "Karras"


def test_split_sampler_name_is_lenient_like_a1111_for_pasted_infotext():
    assert S.split_sampler_name("DPM++ 2M Karras", "Automatic") == ("DPM++ 2M", "Automatic")
    assert S.split_sampler_name("DPM++ 2M Karras", "Automatic", convert_automatic=False) == ("DPM++ 2M", "Karras")
    assert S.split_sampler_name("Euler a", "Karras") == ("Euler a", "Karras")
    assert S.split_sampler_name("No Such Sampler", "No Such Schedule") == ("DPM++ 2M", "Automatic")


# -- API lists ---------------------------------------------------------------------------------

def test_sampler_list_has_a1111_shape_and_options():
    listing = S.sampler_list_for_api()
    by_name = {item["name"]: item for item in listing}
    assert listing[0]["name"] == "DPM++ 2M"
    assert set(listing[0]) == {"name", "aliases", "options"}
    assert by_name["DPM++ 2M"]["options"] == {"scheduler": "karras"}
    assert by_name["Euler a"]["aliases"] == ["k_euler_a", "k_euler_ancestral"]
    assert by_name["Euler a"]["options"] == {"uses_ensd": "True"}
    assert by_name["DPM2 a"]["options"] == {"scheduler": "karras", "discard_next_to_last_sigma": "True",
                                            "uses_ensd": "True", "second_order": "True"}
    assert by_name["DPM++ 2M SDE Heun"]["options"]["solver_type"] == "heun"
    for item in listing:  # every listed name and alias resolves back to itself
        assert all(S.resolve_sampler(n)[0].name == item["name"] for n in [item["name"], *item["aliases"]])


def test_schedule_list_has_a1111_shape_and_only_buildable_types():
    listing = S.schedule_list_for_api()
    by_name = {item["name"]: item for item in listing}
    assert listing[0] == {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0,
                          "need_inner_model": False}
    assert by_name["karras"]["default_rho"] == 7.0
    assert by_name["sgm_uniform"] == {"name": "sgm_uniform", "label": "SGM Uniform", "aliases": ["SGMUniform"],
                                      "default_rho": -1.0, "need_inner_model": True}
    assert "align_your_steps" not in by_name and "kl_optimal" not in by_name
    for item in listing:
        assert S.find_schedule(item["label"]).name == item["name"]


# -- building and running ----------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", S.SAMPLERS, ids=lambda s: s.name)
def test_every_sampler_denoises_a_toy_model_to_its_data(sampler, prediction_type):
    config = {**SD1, "prediction_type": prediction_type}
    x0, noise = _x0(), _noise(1)
    _, schedule = S.resolve_sampler(sampler.name)
    scheduler = S.build_scheduler(sampler, schedule, config, seeds=[11, 12])
    assert scheduler.config.prediction_type == prediction_type
    rng = ImageRNG((4, 6, 6), [11, 12], source="CPU")
    rng.first()
    model = PointMassModel(x0, prediction_type)
    out = run_loop(scheduler, noise, model, steps=6, generators=rng.generators)
    assert model.calls == len(scheduler.timesteps) >= 6
    assert (noise * scheduler.init_noise_sigma - x0).abs().mean() > 0.5  # it started far away
    error = float((out - x0).abs().mean())
    assert error < _tolerance(sampler.name), f"{sampler.name} ended {error:.4f} from x0"


@pytest.mark.parametrize("sampler_name", ["Euler a", "Euler", "DPM++ 2M", "DPM2", "LMS", "DPM++ 2M SDE"])
@pytest.mark.parametrize("schedule", ["Uniform", "Karras", "Exponential", "SGM Uniform", "Simple", "DDIM", "Beta"])
def test_k_samplers_run_with_every_schedule(sampler_name, schedule):
    sampler, sched = S.resolve_sampler(sampler_name, schedule)
    scheduler = S.build_scheduler(sampler, sched, SD1, seeds=[0, 1])
    rng = ImageRNG((4, 6, 6), [0, 1], source="CPU")
    rng.first()
    out = run_loop(scheduler, _noise(2), PointMassModel(_x0()), steps=6, generators=rng.generators)
    assert (out - _x0()).abs().mean() < _tolerance(sampler_name)


@pytest.mark.parametrize("sampler_name", ["Euler", "Euler a", "DPM++ 2M", "Heun", "DPM++ SDE"])
def test_karras_exponential_and_sgm_uniform_change_the_noise_levels(sampler_name):
    uniform = _sigmas(sampler_name, "Uniform")
    for schedule in ("Karras", "Exponential", "SGM Uniform"):
        other = _sigmas(sampler_name, schedule)
        assert other.shape != uniform.shape or not np.allclose(other, uniform, rtol=1e-3), schedule
    # Karras and Exponential spend more steps at low noise than Uniform
    assert np.median(_sigmas(sampler_name, "Karras")) < np.median(uniform)
    assert np.median(_sigmas(sampler_name, "Exponential")) < np.median(uniform)


@pytest.mark.parametrize("sampler_name", ["Euler", "Euler a", "LMS", "DPM++ 2M"])
def test_karras_and_exponential_sigmas_follow_k_diffusion(sampler_name):
    train_sigmas = np.exp(_LOG_SIGMAS)
    smin, smax, n, rho = train_sigmas[0], train_sigmas[-1], 10, 7.0
    ramp = np.linspace(0, 1, n)
    karras = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    exponential = np.exp(np.linspace(np.log(smax), np.log(smin), n))
    np.testing.assert_allclose(_sigmas(sampler_name, "Karras", n)[:n], karras, rtol=2e-4)
    np.testing.assert_allclose(_sigmas(sampler_name, "Exponential", n)[:n], exponential, rtol=2e-4)
    assert _sigmas(sampler_name, "Karras", n)[-1] == 0.0


def test_uniform_k_diffusion_grid_and_sdxl_leading_spacing_is_overridden():
    # k-diffusion's uniform grid: timesteps linspace(999, 0, n), whatever the model's config says
    for config in (SD1, SDXL):
        sampler, schedule = S.resolve_sampler("Euler")
        scheduler = S.build_scheduler(sampler, schedule, config)
        scheduler.set_timesteps(5)
        np.testing.assert_allclose(scheduler.timesteps.numpy(), np.linspace(999, 0, 5), atol=1e-3)
        assert float(scheduler.init_noise_sigma) == pytest.approx(np.exp(_LOG_SIGMAS[-1]), rel=1e-4)


def test_ddim_uses_a1111_timesteps():
    # A1111: range(0, 1000, 1000 // steps) + 1, run from the top
    sampler, schedule = S.resolve_sampler("DDIM", "Karras")
    scheduler = S.build_scheduler(sampler, schedule, SD1)
    scheduler.set_timesteps(20)
    assert scheduler.timesteps.tolist() == list(range(1, 1000, 50))[::-1]


def test_prediction_type_and_zero_snr_come_from_the_model_config():
    config = {**SD1, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    for sampler in S.SAMPLERS:
        scheduler = S.build_scheduler(sampler, S.AUTOMATIC, config, seeds=[0])
        assert scheduler.config.prediction_type == "v_prediction"
        assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.beta_end == 0.012


def test_every_call_builds_an_independent_scheduler():
    sampler, schedule = S.resolve_sampler("DPM++ 2M")
    first = S.build_scheduler(sampler, schedule, SD1)
    second = S.build_scheduler(sampler, schedule, SD1)
    assert first is not second
    first.set_timesteps(5)
    second.set_timesteps(12)
    x = _noise(3)
    first.step(PointMassModel(_x0())(x, first.timesteps[0]), first.timesteps[0], x)
    assert len(first.timesteps) == 5 and len(second.timesteps) == 12
    assert first.step_index == 1 and second.step_index is None


def test_step_counts():
    euler, heun, ddim = S.find_sampler("Euler"), S.find_sampler("Heun"), S.find_sampler("DDIM")
    # A1111 computes prompt schedules over 2*steps for second-order samplers
    assert S.total_steps(euler, 20) == 20 and S.total_steps(heun, 20) == 40 and S.total_steps(ddim, 20) == 20
    # diffusers' Heun repeats all but the first timestep; its last step is a plain Euler step
    assert S.denoiser_calls(heun, 20) == 39 and S.denoiser_calls(euler, 20) == 20
    assert S.denoiser_calls(S.find_sampler("DPM++ SDE"), 10) == 19


def test_step_limits_are_checked_before_sampling():
    lcm, euler = S.find_sampler("LCM"), S.find_sampler("Euler")
    S.check_steps(lcm, 50)
    S.check_steps(euler, 150)
    with pytest.raises(ValueError, match="at most 50 steps"):
        S.check_steps(lcm, 51)
    with pytest.raises(ValueError):
        S.check_steps(euler, 0)


def test_dpmpp_sde_brownian_noise_is_seeded_by_the_image_seeds():
    sampler, schedule = S.resolve_sampler("DPM++ SDE")
    with pytest.raises(TypeError):
        S.build_scheduler(sampler, schedule, SD1)

    def run(seeds):
        scheduler = S.build_scheduler(sampler, schedule, SD1, seeds=seeds)
        return run_loop(scheduler, _noise(4, len(seeds)), _ScaledModel(), steps=5)

    assert torch.equal(run([5, 6]), run([5, 6]))
    assert not torch.equal(run([5, 6]), run([7, 8]))


class _ScaledModel:
    """A model that is not exact, so the injected noise shows in the result."""

    def __call__(self, x_t, t):
        return 0.5 * x_t


@pytest.mark.parametrize("sampler", [s for s in S.SAMPLERS if s.draws_noise], ids=lambda s: s.name)
def test_noise_drawn_while_sampling_is_per_image_so_a_batch_equals_single_runs(sampler):
    """diffusers' randn_tensor with a list of generators draws image i's noise from generator i only."""
    _, schedule = S.resolve_sampler(sampler.name)
    seeds = [100, 200]
    noise = ImageRNG((4, 6, 6), seeds, source="CPU").first()

    def run(batch_seeds, batch_noise):
        rng = ImageRNG((4, 6, 6), batch_seeds, source="CPU", eta_noise_seed_delta=31337)
        rng.first()
        scheduler = S.build_scheduler(sampler, schedule, SD1, seeds=batch_seeds)
        return run_loop(scheduler, batch_noise, _ScaledModel(), steps=6, generators=rng.generators)

    batch = run(seeds, noise)
    singles = torch.cat([run([seeds[i]], noise[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(batch, singles, rtol=1e-5, atol=1e-5)
    # and the noise matters: other seeds for the sampling noise give another result
    assert not torch.allclose(batch, run([300, 400], noise), atol=1e-3)
