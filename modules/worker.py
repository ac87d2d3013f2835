"""The worker body: what runs one queued job on this process's device.

For each job: the settings snapshot with the request's overrides, the checkpoint and VAE it needs (a
per-request checkpoint lasts for that job only), the extension session (scripts, extra networks, weight
patches, all undone at the end), then `processing.process` over the job's GenerationPlan. A generation a
script makes with `p.process_images()` from a changed request is planned and checked by the gate again.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modules.extension_runtime import start_job
from modules.gate import Gate
from modules.processing import ProcessingContext, process


@dataclass
class LocalWorker:
    """Runs jobs in this process. The queue calls `run(job)` from its worker thread."""

    opts: Any  # modules.options.Options
    registry: Any  # modules.model_registry.ModelRegistry
    models: Any  # modules.model_manager.ModelManager
    device: Any  # modules.devices.DeviceChoice
    hooks: Any  # modules.hooks.HookRegistry
    extensions: Any  # modules.extensions.ExtensionManager: its hook and script registries
    gate: Gate
    outputs_dir: Path

    def run(self, job):
        request = job.request
        overrides = dict(request.override_settings)
        if request.clip_skip is not None:
            overrides["CLIP_stop_at_last_layers"] = request.clip_skip
        opts = self.opts.snapshot(overrides)
        with self.models.lock:
            active = self.models.ensure(self._checkpoint_for(request, overrides), opts.get("sd_vae", "Automatic"))
            ctx = ProcessingContext(model=active.model, model_ref=active.ref, opts=opts,
                                    device=self.device.device, dtype=self.device.dtype,
                                    outputs_dir=self.outputs_dir, hooks=self.hooks,
                                    control=job.control, progress=job.progress)
            # scripts, extra networks, patches: undone at the end
            session = start_job(self.extensions.hooks, self.extensions.scripts, request, ctx)

            def generate():
                current = session.job.request  # a script may have changed it: then it is planned (and checked) again
                plan = job.plan if job.plan is not None and current == job.plan.request else \
                    self.gate.plan_running(current)
                return process(plan, ctx)  # txt2img or img2img, by request.kind

            with session:
                return session.run(generate)

    def _checkpoint_for(self, request, overrides: dict[str, Any]) -> str | None:
        # A per-request checkpoint override lasts for this job only (A1111's restore-afterwards): a job
        # without one uses the configured checkpoint, so the override is undone lazily by the next job.
        configured = self.opts.get("sd_model_checkpoint") or None
        if configured and self.registry.find_checkpoint(configured) is None:
            configured = None
        return request.checkpoint or overrides.get("sd_model_checkpoint") or configured
