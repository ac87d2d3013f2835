"""Seeds and noise as A1111 makes them: fixed seeds, batches, variation seeds, seed resize, ENSD, RNG sources."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modules import rng
from modules.rng import ImageRNG

SHAPE = (4, 8, 6)  # latent (C, H, W) of a 48x64 image


def cpu_noise(seed: int, shape=SHAPE) -> torch.Tensor:
    """What A1111's CPU source gives for a seed: torch.randn from a CPU generator seeded with it."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def cpu_draws(seed: int, count: int, shape=SHAPE) -> list[torch.Tensor]:
    generator = torch.Generator("cpu").manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


# -- seeds -------------------------------------------------------------------------------------

@pytest.mark.parametrize("unset", [-1, None, "", "-1", "not a number"])
def test_unset_seed_becomes_a_random_one(unset):
    seeds = {rng.get_fixed_seed(unset) for _ in range(5)}
    assert all(isinstance(s, int) and 0 <= s < 4294967294 for s in seeds)
    assert len(seeds) > 1


def test_given_seed_is_kept():
    assert rng.get_fixed_seed(1234) == 1234
    assert rng.get_fixed_seed("1234") == 1234
    assert rng.get_fixed_seed(0) == 0


def test_batch_images_get_consecutive_seeds():
    assert rng.seeds_for_job(100, 7, 0, 4) == ([100, 101, 102, 103], [7, 8, 9, 10])


def test_with_variation_strength_every_image_keeps_the_seed_and_the_subseed_varies():
    assert rng.seeds_for_job(100, 7, 0.3, 3) == ([100, 100, 100], [7, 8, 9])


def test_random_seed_is_drawn_once_per_job():
    seeds, subseeds = rng.seeds_for_job(-1, -1, 0, 5)
    assert seeds == list(range(seeds[0], seeds[0] + 5))
    assert subseeds == list(range(subseeds[0], subseeds[0] + 5))


def test_seed_lists_are_used_as_given():
    assert rng.seeds_for_job([5, 9], [1, 2], 0, 2) == ([5, 9], [1, 2])


# -- slerp -------------------------------------------------------------------------------------

def test_slerp_ends_are_the_two_noises():
    low, high = cpu_noise(1), cpu_noise(2)
    torch.testing.assert_close(rng.slerp(0.0, low, high), low)
    torch.testing.assert_close(rng.slerp(1.0, low, high), high, rtol=1e-5, atol=1e-5)


def test_slerp_moves_along_the_sphere_of_each_channel_row():
    # normalized over dim 1 of (C, H, W): for unit-length inputs every (channel, column) stays unit length
    low, high = cpu_noise(1), cpu_noise(2)
    low, high = low / low.norm(dim=1, keepdim=True), high / high.norm(dim=1, keepdim=True)
    mid = rng.slerp(0.5, low, high)
    torch.testing.assert_close(mid.norm(dim=1), torch.ones(SHAPE[0], SHAPE[2]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mid, low) and not torch.allclose(mid, high)


def test_slerp_of_nearly_parallel_noises_uses_a1111s_linear_fallback():
    low = cpu_noise(1)
    high = 2 * low  # same directions: A1111 returns low*val + high*(1-val), weights as written there
    torch.testing.assert_close(rng.slerp(0.25, low, high), 0.25 * low + 0.75 * high)


# -- ImageRNG ----------------------------------------------------------------------------------

def test_cpu_source_gives_the_seeds_noise_every_time():
    first = ImageRNG(SHAPE, [42], source="CPU").first()
    again = ImageRNG(SHAPE, [42], source="CPU").first()
    assert first.shape == (1, *SHAPE) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert torch.equal(first[0], cpu_noise(42))
    assert not torch.equal(first, ImageRNG(SHAPE, [43], source="CPU").first())


def test_gpu_source_without_cuda_draws_on_the_cpu():
    assert torch.equal(ImageRNG(SHAPE, [42], source="GPU", device="cpu").first(),
                       ImageRNG(SHAPE, [42], source="CPU").first())


def test_batch_image_noise_equals_the_single_image_noise_of_its_seed():
    seeds, _ = rng.seeds_for_job(1000, 0, 0, 3)
    batch = ImageRNG(SHAPE, seeds, source="CPU").first()
    for i, seed in enumerate(seeds):
        assert torch.equal(batch[i], ImageRNG(SHAPE, [seed], source="CPU").first()[0])


def test_variation_strength_zero_is_plain_seed_noise_and_one_is_the_subseed_noise():
    plain = ImageRNG(SHAPE, [42], source="CPU").first()
    zero = ImageRNG(SHAPE, [42], subseeds=[7], subseed_strength=0.0, source="CPU").first()
    one = ImageRNG(SHAPE, [42], subseeds=[7], subseed_strength=1.0, source="CPU").first()
    half = ImageRNG(SHAPE, [42], subseeds=[7], subseed_strength=0.5, source="CPU").first()
    assert torch.equal(zero, plain)
    torch.testing.assert_close(one[0], cpu_noise(7), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(half[0], rng.slerp(0.5, cpu_noise(42), cpu_noise(7)))
    assert not torch.allclose(half, plain, atol=1e-2) and not torch.allclose(half[0], cpu_noise(7), atol=1e-2)


def test_variation_keeps_image_noise_per_subseed_in_a_batch():
    seeds, subseeds = rng.seeds_for_job(42, 7, 0.4, 2)
    batch = ImageRNG(SHAPE, seeds, subseeds=subseeds, subseed_strength=0.4, source="CPU").first()
    for i in range(2):
        torch.testing.assert_close(batch[i], rng.slerp(0.4, cpu_noise(42), cpu_noise(7 + i)))


def test_seed_resize_from_smaller_size_puts_that_noise_in_the_centre():
    # target latent 8x6 (48x64 px); the seed's noise made at 32x32 px = 4x4 latent, pasted at rows 2..5, cols 1..4
    out = ImageRNG(SHAPE, [42], seed_resize_from_h=32, seed_resize_from_w=32, source="CPU").first()[0]
    small, full = cpu_noise(42, (4, 4, 4)), cpu_noise(42)
    assert torch.equal(out[:, 2:6, 1:5], small)
    outside = torch.ones(SHAPE, dtype=torch.bool)
    outside[:, 2:6, 1:5] = False
    assert torch.equal(out[outside], full[outside])


def test_seed_resize_from_larger_size_cuts_out_its_centre():
    # the seed's noise made at 96x128 px = 12x16 latent; the 8x6 target takes rows 2..9, cols 5..10
    out = ImageRNG(SHAPE, [42], seed_resize_from_h=96, seed_resize_from_w=128, source="CPU").first()[0]
    assert torch.equal(out, cpu_noise(42, (4, 12, 16))[:, 2:10, 5:11])


def test_seed_resize_works_with_variation_seeds():
    out = ImageRNG(SHAPE, [42], subseeds=[7], subseed_strength=0.3, seed_resize_from_h=32, seed_resize_from_w=32,
                   source="CPU").first()[0]
    mixed = rng.slerp(0.3, cpu_noise(42, (4, 4, 4)), cpu_noise(7, (4, 4, 4)))
    torch.testing.assert_close(out[:, 2:6, 1:5], mixed)


@pytest.mark.parametrize("off", [0, -1])
def test_seed_resize_off_gives_plain_noise(off):
    out = ImageRNG(SHAPE, [42], seed_resize_from_h=off, seed_resize_from_w=64, source="CPU").first()
    assert torch.equal(out[0], cpu_noise(42))


def test_later_noise_continues_each_images_generator():
    noise_rng = ImageRNG(SHAPE, [42, 43], source="CPU")
    first, second, third = noise_rng.next(), noise_rng.next(), noise_rng.next()
    for i, seed in enumerate([42, 43]):
        draws = cpu_draws(seed, 3)
        assert torch.equal(first[i], draws[0]) and torch.equal(second[i], draws[1]) and torch.equal(third[i], draws[2])


def test_ensd_changes_the_later_noise_but_not_the_first():
    plain = ImageRNG(SHAPE, [42], source="CPU")
    ensd = ImageRNG(SHAPE, [42], source="CPU", eta_noise_seed_delta=31337)
    assert torch.equal(plain.first(), ensd.first())
    later_plain, later_ensd = plain.next(), ensd.next()
    assert not torch.equal(later_plain, later_ensd)
    assert torch.equal(later_ensd[0], cpu_noise(42 + 31337))  # generators restart from seed + ENSD
    # the generators handed to the scheduler are those same streams
    fresh = ImageRNG(SHAPE, [42], source="CPU", eta_noise_seed_delta=31337)
    fresh.first()
    assert torch.equal(torch.randn(SHAPE, generator=fresh.generators[0]), cpu_noise(42 + 31337))


def test_generators_are_per_image_and_independent_of_the_batch():
    batch = ImageRNG(SHAPE, [42, 43], source="CPU")
    batch.first()
    single = ImageRNG(SHAPE, [43], source="CPU")
    single.first()
    assert len(batch.generators) == 2
    assert torch.equal(torch.randn(SHAPE, generator=batch.generators[1]),
                       torch.randn(SHAPE, generator=single.generators[0]))


# -- NV: CUDA's Philox on the CPU -------------------------------------------------------------

def test_nv_source_reproduces_torch_cuda_randn():
    # torch.manual_seed(0); torch.randn(3, 4, device="cuda") (values as documented in A1111's rng_philox.py)
    cuda = np.array([[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                     [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                     [-1.07454231, -0.36314407, -1.67105067, 2.26550497]])
    np.testing.assert_allclose(rng.PhiloxGenerator(0).randn((3, 4)), cuda, atol=1e-6)


def test_nv_image_noise_and_later_draws_follow_the_philox_offsets():
    noise_rng = ImageRNG(SHAPE, [5, 6], source="nv", eta_noise_seed_delta=0)
    first, later = noise_rng.next(), noise_rng.next()
    for i, seed in enumerate([5, 6]):
        philox = rng.PhiloxGenerator(seed)
        assert np.array_equal(first[i].numpy(), philox.randn(SHAPE))
        assert np.array_equal(later[i].numpy(), philox.randn(SHAPE))
    values = first.flatten()
    assert abs(float(values.mean())) < 0.2 and abs(float(values.std()) - 1) < 0.2


def test_nv_source_cannot_feed_diffusers_step_noise():
    noise_rng = ImageRNG(SHAPE, [5], source="NV")
    noise_rng.first()
    with pytest.raises(rng.RNGSourceError) as err:
        noise_rng.generators
    assert isinstance(err.value, ValueError) and "CPU or GPU" in str(err.value)
    assert noise_rng.step_generators(draws_noise=False) is None
    cpu_rng = ImageRNG(SHAPE, [5], source="CPU")
    assert len(cpu_rng.step_generators(draws_noise=True)) == 1


def test_unknown_rng_source_is_refused():
    with pytest.raises(ValueError):
        ImageRNG(SHAPE, [5], source="TPU")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sources():
    gpu = ImageRNG(SHAPE, [42], source="GPU", device="cuda").first()
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu[0].cpu(), torch.randn(SHAPE, device="cuda",
                                                 generator=torch.Generator("cuda").manual_seed(42)).cpu())
    cpu = ImageRNG(SHAPE, [42], source="CPU", device="cuda").first()
    assert cpu.device.type == "cuda" and torch.equal(cpu[0].cpu(), cpu_noise(42))
    nv = ImageRNG(SHAPE, [42], source="NV", device="cuda").first()
    torch.testing.assert_close(nv, gpu, rtol=0, atol=1e-5)
