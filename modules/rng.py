"""Seeds and initial noise, exactly as A1111 defines them (`modules/rng.py`, `processing.py`).

- `get_fixed_seed`: -1, None or '' becomes a random seed.
- `seeds_for_job`: image i of a job gets seed+i, or, with a variation strength, the same seed and subseed+i.
- `ImageRNG`: per image, noise from its seed, mixed with the subseed's noise by `slerp(strength, ...)`,
  generated at the "resize seed from" size and pasted centered; then per-image generators for the noise
  that ancestral/SDE samplers draw later, re-seeded with seed+ENSD when ENSD is set.

RNG sources (A1111's `randn_source` option): "GPU" draws on the CUDA device (CPU elsewhere), "CPU" draws on the
CPU and moves the noise (same images on every device), "NV" emulates CUDA's Philox generator on the CPU (the
GPU source's numbers on any hardware). Noise is float32.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch

RNG_SOURCES = ("GPU", "CPU", "NV")
LATENT_FACTOR = 8  # pixels per latent cell (A1111 divides "resize seed from" sizes by 8)
_SEED_LIMIT = 4294967294  # A1111: random.randrange(4294967294)


def get_fixed_seed(seed: int | float | str | None) -> int:
    """A concrete seed: -1, None and '' (or text that is not a number) give a random one, as in A1111."""
    if isinstance(seed, str):
        try:
            seed = int(seed.strip())
        except ValueError:
            seed = -1
    if seed is None or seed == -1:
        return random.randrange(_SEED_LIMIT)
    return int(seed)


def seeds_for_job(seed: int | str | None | Sequence[int], subseed: int | str | None | Sequence[int],
                  subseed_strength: float, n: int) -> tuple[list[int], list[int]]:
    """Seeds and subseeds of the n images of a job (batch count x batch size).

    Image i gets seed+i when subseed_strength is 0; with a variation strength every image keeps the seed
    and gets subseed+i. -1 is resolved once for the whole job; lists are taken as given.
    """
    if isinstance(seed, (list, tuple)):
        all_seeds = [int(s) for s in seed]
    else:
        base = get_fixed_seed(seed)
        all_seeds = [base + (i if subseed_strength == 0 else 0) for i in range(n)]
    if isinstance(subseed, (list, tuple)):
        all_subseeds = [int(s) for s in subseed]
    else:
        base_sub = get_fixed_seed(subseed)
        all_subseeds = [base_sub + i for i in range(n)]
    return all_seeds, all_subseeds


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical interpolation of two (C, H, W) noises, val 0 -> low, val 1 -> high.

    Directions are normalized along dim 1 (rows of each channel); when they are nearly parallel
    (mean cosine > 0.9995) A1111 falls back to `low*val + high*(1-val)`, and so do we.
    """
    low_dir = low / torch.norm(low, dim=1, keepdim=True)
    high_dir = high / torch.norm(high, dim=1, keepdim=True)
    cos = (low_dir * high_dir).sum(1)
    if cos.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(cos)
    sin_omega = torch.sin(omega)
    weight_low = (torch.sin((1.0 - val) * omega) / sin_omega).unsqueeze(1)
    weight_high = (torch.sin(val * omega) / sin_omega).unsqueeze(1)
    return weight_low * low + weight_high * high


# -- "NV": CUDA's Philox4x32-10 + Box-Muller on the CPU ------------------------------------------

_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_W = (np.uint32(0x9E3779B9), np.uint32(0xBB67AE85))
_LOW32 = np.uint64(0xFFFFFFFF)
_TWO_POW_M32 = np.float32(2.3283064e-10)  # 2^-32 as CUDA's curand spells it
_TWO_POW_M32_2PI = np.float32(2.3283064e-10 * 6.2831855)


class PhiloxGenerator:
    """Normal numbers as `torch.randn(..., device="cuda")` gives them for a seed, computed with numpy.

    Each `randn` call is one Philox "offset" (CUDA advances the offset per kernel launch); element k of the
    call uses counter (offset, 0, k, 0) and key (seed low 32 bits, seed high 32 bits), 10 rounds, and the
    first Box-Muller output of the first two words.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.offset = 0

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        n = int(np.prod(shape))
        c0 = np.full(n, self.offset, dtype=np.uint32)
        c1 = np.zeros(n, dtype=np.uint32)
        c2 = np.arange(n, dtype=np.uint32)
        c3 = np.zeros(n, dtype=np.uint32)
        k0 = np.full(n, self.seed & 0xFFFFFFFF, dtype=np.uint32)
        k1 = np.full(n, (self.seed >> 32) & 0xFFFFFFFF, dtype=np.uint32)
        self.offset += 1
        for round_no in range(10):
            if round_no:
                k0 = k0 + _PHILOX_W[0]  # uint32 arithmetic wraps, as on the GPU
                k1 = k1 + _PHILOX_W[1]
            prod0 = c0.astype(np.uint64) * _PHILOX_M[0]
            prod1 = c2.astype(np.uint64) * _PHILOX_M[1]
            hi0, lo0 = (prod0 >> np.uint64(32)).astype(np.uint32), (prod0 & _LOW32).astype(np.uint32)
            hi1, lo1 = (prod1 >> np.uint64(32)).astype(np.uint32), (prod1 & _LOW32).astype(np.uint32)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        # Box-Muller in double precision from float32 constants, then rounded to float32 (as A1111 does)
        u = c0.astype(np.float64) * _TWO_POW_M32 + np.float64(_TWO_POW_M32 / np.float32(2))
        v = c1.astype(np.float64) * _TWO_POW_M32_2PI + np.float64(_TWO_POW_M32_2PI / np.float32(2))
        normal = np.sqrt(-2.0 * np.log(u)) * np.sin(v)
        return normal.astype(np.float32).reshape(tuple(shape))


# -- per-image noise ------------------------------------------------------------------------------

class RNGSourceError(ValueError):
    """The RNG source cannot do what was asked (an unknown source, or NV noise for a diffusers step)."""


class ImageRNG:
    """Noise for one batch of images, following A1111's `rng.ImageRNG`.

    shape: latent shape of one image (C, H, W). seeds/subseeds: one per image. seed_resize_from_h/w: pixel
    size the seed's noise is made at (0 or -1: off). source: "GPU", "CPU" or "NV". device: where the noise
    goes. eta_noise_seed_delta (ENSD): after `first()`, the per-image generators restart from seed+ENSD.
    """

    def __init__(self, shape: Sequence[int], seeds: Sequence[int], subseeds: Sequence[int] | None = None,
                 subseed_strength: float = 0.0, seed_resize_from_h: int = 0, seed_resize_from_w: int = 0,
                 source: str = "GPU", device: str | torch.device = "cpu", eta_noise_seed_delta: int = 0,
                 latent_factor: int = LATENT_FACTOR) -> None:
        self.source = str(source).strip().upper()
        if self.source not in RNG_SOURCES:
            raise RNGSourceError(f"Unknown RNG source {source!r}; choose one of {', '.join(RNG_SOURCES)}.")
        self.shape = tuple(int(d) for d in shape)
        self.seeds = [int(s) for s in seeds]
        self.subseeds = None if subseeds is None else [int(s) for s in subseeds]
        self.subseed_strength = float(subseed_strength or 0.0)
        self.seed_resize_from_h = int(seed_resize_from_h or 0)
        self.seed_resize_from_w = int(seed_resize_from_w or 0)
        self.device = torch.device(device)
        self.eta_noise_seed_delta = int(eta_noise_seed_delta or 0)
        self.latent_factor = latent_factor
        # GPU source draws on CUDA only; elsewhere (CPU, MPS) it draws on the CPU, as A1111 does for MPS
        self._draw_device = self.device if self.source == "GPU" and self.device.type == "cuda" else torch.device("cpu")
        self._generators = [self._new_generator(s) for s in self.seeds]
        self._is_first = True

    def _new_generator(self, seed: int) -> torch.Generator | PhiloxGenerator:
        if self.source == "NV":
            return PhiloxGenerator(seed)
        return torch.Generator(self._draw_device).manual_seed(int(seed))

    def _draw(self, generator: torch.Generator | PhiloxGenerator, shape: Sequence[int]) -> torch.Tensor:
        if isinstance(generator, PhiloxGenerator):
            return torch.from_numpy(generator.randn(shape)).to(self.device)
        return torch.randn(tuple(shape), generator=generator, device=self._draw_device,
                           dtype=torch.float32).to(self.device)

    def _fresh(self, seed: int, shape: Sequence[int]) -> torch.Tensor:
        """The first tensor a seed gives (A1111's `randn(seed, shape)`), leaving the generators alone."""
        return self._draw(self._new_generator(seed), shape)

    @property
    def generators(self) -> list[torch.Generator]:
        """One torch.Generator per image, for the noise ancestral/SDE schedulers draw while sampling
        (pass as `generator=` to diffusers' `scheduler.step`). NV has no torch generator: RNGSourceError."""
        if self.source == "NV":
            raise RNGSourceError("The NV RNG source makes the starting noise, but cannot feed the noise that "
                                 "ancestral and SDE samplers draw while sampling; choose RNG source CPU or GPU, "
                                 "or a sampler that draws no noise.")
        return list(self._generators)

    def step_generators(self, draws_noise: bool) -> list[torch.Generator] | None:
        """The generators to pass to `scheduler.step`: None when the sampler draws no noise (so any source,
        NV included, works), else `generators`."""
        return self.generators if draws_noise else None

    def first(self) -> torch.Tensor:
        """Starting noise [B, C, H, W]: the seed's noise, slerped toward the subseed's noise by the variation
        strength, made at the "resize seed from" size and pasted centered into noise of the target size.
        Afterwards the generators restart from seed+ENSD if ENSD is set."""
        channels = self.shape[0]
        resize = self.seed_resize_from_h > 0 and self.seed_resize_from_w > 0
        noise_shape = (channels, self.seed_resize_from_h // self.latent_factor,
                       self.seed_resize_from_w // self.latent_factor) if resize else self.shape
        resized = noise_shape != self.shape
        use_subseed = self.subseeds is not None and self.subseed_strength != 0

        images = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self._generators)):
            subnoise = None
            if use_subseed:
                subseed = self.subseeds[i] if i < len(self.subseeds) else 0
                subnoise = self._fresh(subseed, noise_shape)
            noise = self._fresh(seed, noise_shape) if resized else self._draw(generator, self.shape)
            if subnoise is not None:
                noise = slerp(self.subseed_strength, noise, subnoise)
            if resized:
                noise = self._paste_centered(noise, self._draw(generator, self.shape))
            images.append(noise)

        if self.eta_noise_seed_delta:
            self._generators = [self._new_generator(seed + self.eta_noise_seed_delta) for seed in self.seeds]
        self._is_first = False
        return torch.stack(images).to(self.device)

    def _paste_centered(self, small: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Put `small` (the seed's noise at the old size) in the middle of `target` (noise at the new size);
        when the old size is larger, its middle is cut out. A1111's dx/dy/tx/ty arithmetic."""
        dx = (self.shape[2] - small.shape[2]) // 2
        dy = (self.shape[1] - small.shape[1]) // 2
        width = small.shape[2] if dx >= 0 else small.shape[2] + 2 * dx
        height = small.shape[1] if dy >= 0 else small.shape[1] + 2 * dy
        tx, ty = max(dx, 0), max(dy, 0)  # where it lands in target
        sx, sy = max(-dx, 0), max(-dy, 0)  # where it comes from in small
        target[:, ty:ty + height, tx:tx + width] = small[:, sy:sy + height, sx:sx + width]
        return target

    def next(self) -> torch.Tensor:
        """The next noise tensor [B, C, H, W]: `first()` on the first call, then one draw per image from its
        generator (what A1111's samplers use for their ancestral noise)."""
        if self._is_first:
            return self.first()
        return torch.stack([self._draw(g, self.shape) for g in self._generators]).to(self.device)
