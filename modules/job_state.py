"""What a running job shares with the rest of the App: its control flags, its progress and its result.

The queue creates `JobControl` and `Progress` for every job; processing reads the flags before each step and
writes the progress; the status routes and the UI read it. `GenerationResult` is what a job returns (also
what a script's `p.process_images()` returns). None of this needs torch or a model.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class JobControl:
    """Interrupt (stop the job) and skip (stop this batch, go on with the next) flags of one job."""

    interrupted: threading.Event = field(default_factory=threading.Event)
    skipped: threading.Event = field(default_factory=threading.Event)

    def interrupt(self) -> None:
        self.interrupted.set()

    def skip(self) -> None:
        self.skipped.set()

    def should_stop_sampling(self) -> bool:
        return self.interrupted.is_set() or self.skipped.is_set()


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
    """A job's images, one entry per image in every list; `info` is A1111's `Processed.js()` dict."""

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
