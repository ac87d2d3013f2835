"""Live progress of one browser session's job: bar, step, ETA, queue position, preview.

The page streams from a generator that only knows its own job, so one user never sees (or stops) another's:
the job handle lives in that session's state, and Interrupt/Skip check the owner again before acting.
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from modules.jobs import CANCELLED, FAILED, QUEUED, Job

POLL_SECONDS = 0.05  # how often a running job is looked at; a message goes out only when something changed


def progress_html(job: Job, position: int = 0, queued: int = 0) -> str:
    """The progress bar and its text for the job's current state."""
    if job.status == QUEUED:
        where = f"{position}/{queued}" if queued >= position > 0 else str(position or "…")
        return (f"<div class='athanor-progress athanor-queued' data-status='queued'>"
                f"<span>In queue: {where}</span></div>")
    p = job.progress
    pct = int(p.fraction * 100)
    parts = [f"{pct}%"]
    if p.sampling_steps:
        parts.append(f"step {p.sampling_step}/{p.sampling_steps}")
    if p.job_count > 1:
        parts.append(f"batch {min(p.job_no + 1, p.job_count)}/{p.job_count}")
    eta = p.eta_seconds
    if eta and pct < 100:
        parts.append(f"ETA {format_seconds(eta)}")
    text = " · ".join(parts)
    return (f"<div class='athanor-progress' data-status='running' role='progressbar' aria-valuenow='{pct}' "
            f"aria-valuemin='0' aria-valuemax='100'><div class='athanor-progress-bar' style='width:{pct}%'></div>"
            f"<span>{html.escape(text)}</span></div>")


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds}s"


def finished_html(job: Job) -> str:
    """The line left in place of the bar once the job ended."""
    elapsed = (job.finished or time.time()) - (job.started or job.created)
    if job.status == FAILED:
        return f"<div class='athanor-progress athanor-failed' data-status='failed'>Error: {html.escape(job.error or '')}</div>"
    if job.status == CANCELLED or job.result is None:
        return "<div class='athanor-progress' data-status='cancelled'>Cancelled</div>"
    what = "Interrupted" if job.result.interrupted else "Done"
    count = len(job.result.images)
    return (f"<div class='athanor-progress athanor-done' data-status='done'>{what}: {count} image"
            f"{'s' if count != 1 else ''} in {elapsed:.1f}s</div>")


@dataclass
class ProgressUpdate:
    """One step of the stream: what changed since the last one."""

    html: str
    preview: Any = None  # a PIL image when there is a new preview
    done: bool = False
    job: Job | None = None
    extra: dict = field(default_factory=dict)


def follow_job(queue: Any, job: Job, *, previews: bool = True, poll: float = POLL_SECONDS) -> Iterator[ProgressUpdate]:
    """Progress updates until the job ends. Yields at least once before waiting and once at the end."""
    last_preview = -1
    last_html = None
    while True:
        finished = job.done.wait(0 if last_html is None else poll)
        if finished:
            yield ProgressUpdate(finished_html(job), done=True, job=job)
            return
        position = queue.position(job) if job.status == QUEUED else 0
        queued = len(queue.order()) if job.status == QUEUED else 0
        text = progress_html(job, position, queued)
        preview = None
        p = job.progress
        if previews and p.preview is not None and p.preview_step != last_preview:
            last_preview = p.preview_step
            preview = p.preview
        if text != last_html or preview is not None:
            last_html = text
            yield ProgressUpdate(text, preview=preview, job=job)
