"""Native jobs: `/api/v1/jobs`. Submit returns at once with a job id; status, server-sent progress
events (with live previews), result, cancel and listing, each limited to the caller's own jobs
(admins see every job). Someone else's job id answers 404, exactly like an id that does not exist.

The request body is a `GenerationRequest` (the model the page uses too); images for img2img are
base64 strings (raw or data: URLs) in `init_images` and `mask`.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import Body, Depends, FastAPI, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from modules.api.common import (ApiContext, ApiError, Caller, caller_dependency, check_override_settings,
                                decode_upload, encode_png_base64,
                                invalid, raise_pydantic, safe_output_path, submit, visible_job)
from modules.api.models import JobResult, JobStatus, JobSubmitted

PREFIX = "/api/v1/jobs"
EVENT_POLL_SECONDS = 0.1
HEARTBEAT_SECONDS = 15.0
_IMAGE_LIST_FIELDS = ("init_images",)
_IMAGE_FIELDS = ("mask", "latent_mask", "firstpass_image")


def build_native_request(body: dict[str, Any], context: ApiContext):
    """A native job body -> GenerationRequest (422 naming the field when it does not fit)."""
    from modules.request import GenerationRequest

    if not isinstance(body, dict):
        raise invalid((), "the body must be a JSON object of GenerationRequest fields")
    values = dict(body)
    model_fields = GenerationRequest.model_fields
    for name in _IMAGE_LIST_FIELDS:
        if values.get(name) is not None:
            items = values[name]
            if not isinstance(items, list):
                raise invalid(name, "expected a list of base64 images")
            values[name] = [decode_upload(item, (name, i), context.limits) for i, item in enumerate(items)]
    for name in _IMAGE_FIELDS:
        if values.get(name) is not None:
            values[name] = decode_upload(values[name], name, context.limits)
    unknown = sorted(set(values) - set(model_fields))
    if unknown:
        raise invalid(unknown[0], "unknown field (GET /openapi.json shows GenerationRequest's fields)")
    try:
        request = GenerationRequest(**values)
    except ValidationError as exc:
        raise_pydantic(exc)
    if getattr(request, "mask", None) is not None and len({im.size for im in request.init_images or ()}) > 1:
        raise invalid("init_images", "with a mask, all init images must have the same size")
    overrides = check_override_settings(context, dict(request.override_settings))
    if overrides != request.override_settings:
        request = request.model_copy(update={"override_settings": overrides})
    return request


def job_status(job: Any, queue: Any, *, with_preview: bool = False) -> dict[str, Any]:
    p = job.progress
    finished = job.status in ("done", "failed", "cancelled")
    running = job.status == "running"
    progress = 1.0 if job.status == "done" else (p.fraction if running else 0.0)
    preview = encode_png_base64(p.preview) if with_preview and p.preview is not None else None
    return {
        "id": job.id, "owner": job.owner, "kind": job.request.kind, "status": job.status,
        "position": queue.position(job) if not finished else 0,
        "created": job.created, "started": job.started, "finished": job.finished,
        "job_no": p.job_no, "job_count": p.job_count, "step": p.sampling_step, "steps": p.sampling_steps,
        "progress": progress, "eta": p.eta_seconds if running else None, "error": job.error,
        "error_kind": job.error_kind,
        "interrupted": bool(job.result is not None and job.result.interrupted) or job.control.interrupted.is_set(),
        "preview": preview,
    }


def job_result(job: Any) -> dict[str, Any]:
    result = job.result
    if result is None:
        return {"id": job.id, "status": job.status, "images": [], "infotexts": [], "seeds": [], "info": {},
                "interrupted": job.status == "cancelled", "error": job.error}
    return {"id": job.id, "status": job.status,
            "images": [encode_png_base64(img, text) for img, text in zip(result.images, result.infotexts)],
            "infotexts": list(result.infotexts), "seeds": list(result.seeds), "info": dict(result.info),
            "interrupted": result.interrupted, "error": job.error}


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode("utf-8")


def add_job_routes(server: FastAPI, context: ApiContext) -> None:
    caller = caller_dependency(context)
    tags = ["Jobs"]

    from modules.request import GenerationRequest

    body_schema = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": GenerationRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}}

    @server.post(PREFIX, response_model=JobSubmitted, status_code=202, tags=tags, openapi_extra=body_schema)
    async def submit_job(body: dict[str, Any] = Body(..., description="GenerationRequest fields; images as base64"),
                         who: Caller = Depends(caller)):
        """Queue a generation; returns its id and place in the queue at once."""
        request = await run_in_threadpool(build_native_request, body, context)
        job = submit(context, request, who)
        return {"id": job.id, "status": job.status, "position": context.queue.position(job)}

    @server.get(PREFIX, response_model=list[JobStatus], tags=tags)
    def list_jobs(all_users: bool = Query(False, alias="all", description="admins: every user's jobs"),
                  who: Caller = Depends(caller)):
        """The caller's jobs, oldest first (admins may pass ?all=true)."""
        found = _every_job(context.queue) if all_users and who.admin else context.queue.jobs_of(who.owner)
        jobs = sorted(found, key=lambda j: (j.created, j.seq))
        return [job_status(j, context.queue) for j in jobs]

    @server.get(PREFIX + "/{job_id}", response_model=JobStatus, tags=tags)
    def get_job(job_id: str, preview: bool = Query(False, description="include the latest live preview"),
                who: Caller = Depends(caller)):
        """Status: queue position, step, steps, progress, ETA, error."""
        job = visible_job(context, job_id, who)
        return job_status(job, context.queue, with_preview=preview)

    @server.get(PREFIX + "/{job_id}/events", tags=tags,
                responses={200: {"content": {"text/event-stream": {}},
                                 "description": "`progress` events (JSON status, `preview` when a new live "
                                                "preview exists), then one `end` event"}})
    async def job_events(job_id: str, previews: bool = Query(True), who: Caller = Depends(caller)):
        """Progress as server-sent events until the job ends."""
        job = visible_job(context, job_id, who)

        async def stream():
            last_key = None
            last_preview_step = -1
            last_sent = time.monotonic()
            while True:
                p = job.progress
                new_preview = previews and p.preview is not None and p.preview_step != last_preview_step
                key = (job.status, p.job_no, p.sampling_step, p.sampling_steps, context.queue.position(job))
                if key != last_key or new_preview:
                    status = await run_in_threadpool(job_status, job, context.queue, with_preview=new_preview)
                    if new_preview:
                        last_preview_step = p.preview_step
                    last_key = key
                    last_sent = time.monotonic()
                    yield _sse("progress", status)
                if job.done.is_set():
                    yield _sse("end", job_status(job, context.queue))
                    return
                if time.monotonic() - last_sent > HEARTBEAT_SECONDS:
                    last_sent = time.monotonic()
                    yield b": keep-alive\n\n"
                await asyncio.sleep(EVENT_POLL_SECONDS)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @server.get(PREFIX + "/{job_id}/result", response_model=JobResult, tags=tags)
    async def get_result(job_id: str, who: Caller = Depends(caller)):
        """Images (base64 PNG with infotext), infotexts, seeds and info of a finished job; 409 while it runs."""
        job = visible_job(context, job_id, who)
        if not job.done.is_set():
            raise ApiError(409, f"Job {job_id} is {job.status}; the result exists once it has finished",
                           error="Conflict")
        return await run_in_threadpool(job_result, job)

    @server.get(PREFIX + "/{job_id}/images/{index}", tags=tags,
                responses={200: {"content": {"image/png": {}}}})
    def get_image(job_id: str, index: int, who: Caller = Depends(caller)):
        """One image of a finished job as a PNG file (with its infotext)."""
        from modules.images import encode_image

        job = visible_job(context, job_id, who)
        result = job.result
        if result is None or not 0 <= index < len(result.images):
            raise ApiError(404, f"Job {job_id} has no image {index}", error="NotFound")
        data = encode_image(result.images[index], "png", infotext=result.infotexts[index])
        return Response(content=data, media_type="image/png")

    @server.delete(PREFIX + "/{job_id}", response_model=JobStatus, tags=tags)
    def cancel_job(job_id: str, who: Caller = Depends(caller)):
        """Cancel a queued job, or interrupt a running one (its images so far are kept)."""
        job = visible_job(context, job_id, who)
        if not job.done.is_set():
            context.queue.cancel(job)
        return job_status(job, context.queue)

    @server.get("/outputs/{path:path}", tags=["Files"], responses={200: {"content": {"image/png": {}}}})
    def output_file(path: str, who: Caller = Depends(caller)):
        """A file from the outputs folder (admins only when logins are on: outputs hold every user's images).
        Anything outside it, or not an image or text file, is 404."""
        from fastapi.responses import FileResponse

        if not who.admin:
            raise ApiError(404, "Not found", error="NotFound")
        found = safe_output_path(context.outputs_dir, path)
        if found is None:
            raise ApiError(404, "Not found", error="NotFound")
        return FileResponse(found)


def _every_job(queue: Any) -> list[Any]:
    return list(queue.all_jobs())