"""A1111's `/sdapi/v1` routes: the request and response shapes its clients (webuiapi, bots, Krita and
Photoshop plugins) depend on, on top of Athanor's queue.

Differences that make it safe to share (see README "API"): every generation goes through the fair
queue as a job owned by the caller; /progress, /interrupt and /skip see only the caller's job;
settings that change paths or enable code cannot be set, per request or with POST /options;
`override_settings` never touch the saved settings (each job takes a snapshot); image URLs are never
fetched; requests over the server's limits get a 422 naming the field.
"""
from __future__ import annotations

import os
import time
from typing import Any

from fastapi import Body, Depends, FastAPI, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from modules import samplers
from modules.api import ScriptEntry
from modules.api.common import (ApiContext, ApiError, Caller, caller_dependency, check_override_settings,
                                current_job_of, decode_upload, dumps_info, encode_png_base64, invalid, json_safe,
                                raise_pydantic, submit, validate_api_settings, wait_for_job)
from modules.api.models import (A1111ProcessingBase, Img2ImgRequest, ImagesResponse, PngInfoRequest,
                                PngInfoResponse, ProgressResponse, ProgressState, ScriptsList, Txt2ImgRequest)

PREFIX = "/sdapi/v1"

# Infotext key -> request field, for the `infotext` request field (A1111's paste fields of each tab).
_PASTE_COMMON = {
    "Prompt": "prompt", "Negative prompt": "negative_prompt", "Steps": "steps", "Sampler": "sampler_name",
    "Schedule type": "scheduler", "CFG scale": "cfg_scale", "Seed": "seed", "Size-1": "width", "Size-2": "height",
    "Batch size": "batch_size", "Variation seed": "subseed", "Variation seed strength": "subseed_strength",
    "Seed resize from-1": "seed_resize_from_w", "Seed resize from-2": "seed_resize_from_h",
    "Denoising strength": "denoising_strength",
}
_PASTE_TXT2IMG = {
    **_PASTE_COMMON, "Hires upscale": "hr_scale", "Hires upscaler": "hr_upscaler", "Hires steps": "hr_second_pass_steps",
    "Hires resize-1": "hr_resize_x", "Hires resize-2": "hr_resize_y", "Hires prompt": "hr_prompt",
    "Hires negative prompt": "hr_negative_prompt", "Hires sampler": "hr_sampler_name",
    "Hires schedule type": "hr_scheduler", "Hires checkpoint": "hr_checkpoint_name",
}
_PASTE_IMG2IMG = {
    **_PASTE_COMMON, "Mask blur": "mask_blur", "Image CFG scale": "image_cfg_scale",
    "Masked area padding": "inpaint_full_res_padding",
}
_SAME_AS_FIRST_PASS = frozenset({"Use same sampler", "Use same scheduler", "Use same checkpoint"})
_MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")

# Fields carrying images (base64 in, PIL to GenerationRequest when it has the field).
_IMAGE_LIST_FIELDS = ("init_images",)
_IMAGE_FIELDS = ("mask", "latent_mask", "firstpass_image")
# Fields converted by hand, never copied as they are.
_SPECIAL_FIELDS = frozenset({"sampler_name", "sampler_index", "scheduler", "styles", "override_settings",
                             "save_images", "send_images", "kind", "infotext", "force_task_id", "checkpoint",
                             *_IMAGE_LIST_FIELDS, *_IMAGE_FIELDS})

_REDACTED_FLAGS = frozenset({"auth"})


# ---------------------------------------------------------------------------------------------
# Request conversion

def apply_infotext(body: A1111ProcessingBase, kind: str, opts: Any) -> A1111ProcessingBase:
    """Fill the fields the request did not set from its `infotext`, plus `override_settings` for options
    with an infotext label whose value differs from the current one (as A1111's `apply_infotext`)."""
    if not body.infotext:
        return body
    from modules.infotext import parse_generation_parameters

    params = parse_generation_parameters(body.infotext)
    explicitly_set = body.model_fields_set
    updates: dict[str, Any] = {}
    table = _PASTE_TXT2IMG if kind == "txt2img" else _PASTE_IMG2IMG
    for key, name in table.items():
        value = params.get(key)
        if value is None or name in explicitly_set or value in _SAME_AS_FIRST_PASS:
            continue
        updates[name] = value
    if kind == "txt2img" and "enable_hr" not in explicitly_set:
        hires = "Denoising strength" in params and any(k in params for k in ("Hires upscale", "Hires upscaler",
                                                                              "Hires resize-1"))
        if hires:
            updates["enable_hr"] = True
    if kind == "img2img":
        if "Masked content" in params and "inpainting_fill" not in explicitly_set \
                and params["Masked content"] in _MASKED_CONTENT:
            updates["inpainting_fill"] = _MASKED_CONTENT.index(params["Masked content"])
        if "Inpaint area" in params and "inpaint_full_res" not in explicitly_set:
            updates["inpaint_full_res"] = params["Inpaint area"] == "Only masked"
        if "Mask mode" in params and "inpainting_mask_invert" not in explicitly_set:
            updates["inpainting_mask_invert"] = 1 if params["Mask mode"] == "Inpaint not masked" else 0

    overrides = dict(body.override_settings or {})
    for key in opts.as_dict():
        info = opts.info(key)
        label = getattr(info, "infotext", None)
        if not label or key in overrides or key == "sd_model_checkpoint" or params.get(label) is None:
            continue  # A1111 keeps the loaded checkpoint by default (disable_weights_auto_swap)
        try:
            value = opts.validate({key: params[label]})[key]
        except (ValueError, PermissionError):
            continue
        if value != opts.get(key):
            overrides[key] = value
    if overrides != (body.override_settings or {}):
        updates["override_settings"] = overrides

    merged = {**body.model_dump(exclude_unset=True), **updates}
    try:
        return type(body).model_validate(merged)
    except ValidationError as exc:
        raise_pydantic(exc, prefix=("infotext",))


def check_scripts(body: A1111ProcessingBase, is_img2img: bool, scripts: list[ScriptEntry]) -> None:
    """422 for an unknown `script_name`, an unknown always-on script, or a selectable one under
    `alwayson_scripts` (A1111's rules; titles match in any case)."""
    tab = {s.name.lower(): s for s in scripts if s.is_img2img == is_img2img}
    if body.script_name:
        found = tab.get(body.script_name.lower())
        if found is None or found.is_alwayson:
            raise invalid("script_name", f"Script '{body.script_name}' not found")
    for name, value in (body.alwayson_scripts or {}).items():
        found = tab.get(str(name).lower())
        if found is None:
            raise invalid(("alwayson_scripts", name), f"always on script {name} not found")
        if not found.is_alwayson:
            raise invalid(("alwayson_scripts", name), "Cannot have a selectable script in the always on scripts params")
        if not isinstance(value, dict) or not isinstance(value.get("args", []), (list, dict)):
            raise invalid(("alwayson_scripts", name), 'expected {"args": [...]} or {"args": {name: value}}')


def check_unsupported(body: A1111ProcessingBase, context: ApiContext) -> None:
    """422 for an A1111 field asking for something Athanor cannot do, rather than dropping it silently."""
    if body.restore_faces:
        restorers = list(context.providers.face_restorers())
        raise invalid("restore_faces", "face restoration is not available: no face restorer is installed"
                      if not restorers else "face restoration is not supported by this server yet"
                      f" (GET {PREFIX}/face-restorers lists {len(restorers)}); send restore_faces: false")
    if body.refiner_checkpoint and body.refiner_checkpoint.strip() not in ("", "None"):
        raise invalid("refiner_checkpoint", "the SDXL refiner is not supported yet; leave refiner_checkpoint empty")
    hires_checkpoint = getattr(body, "hr_checkpoint_name", None)
    if getattr(body, "enable_hr", False) and hires_checkpoint and hires_checkpoint not in _SAME_AS_FIRST_PASS:
        registry = context.registry
        wanted = registry.find_checkpoint(hires_checkpoint)
        first = (body.override_settings or {}).get("sd_model_checkpoint") or context.opts.get("sd_model_checkpoint")
        active = context.models.active
        first_info = registry.find_checkpoint(first) if first else (active.info if active is not None else None)
        if wanted is None or first_info is None or wanted.title != first_info.title:
            raise invalid("hr_checkpoint_name", "a different checkpoint for the hires. fix pass is not supported yet; "
                                                "send \"Use same checkpoint\"")


def build_generation_request(body: A1111ProcessingBase, kind: str, context: ApiContext):
    """An A1111 API request -> GenerationRequest, or a 4xx naming the field."""
    from modules.request import GenerationRequest

    model_fields = GenerationRequest.model_fields
    limits = context.limits
    check_scripts(body, kind == "img2img", list(context.providers.scripts()))
    check_unsupported(body, context)

    sampler_name = body.sampler_name or body.sampler_index  # sampler, schedule and steps: the request gate
    dumped = body.model_dump()
    overrides = check_override_settings(context, body.override_settings or {})

    values: dict[str, Any] = {k: v for k, v in dumped.items()
                              if k in model_fields and k not in _SPECIAL_FIELDS and v is not None}
    # styles are applied by the request gate, the same way for every entry point
    values.update(kind=kind, sampler_name=sampler_name, scheduler=body.scheduler or "Automatic",
                  styles=list(body.styles or []), override_settings=overrides, save_images=body.save_images)
    if "save_grid" in model_fields:
        values["save_grid"] = body.save_images
    for name in ("script_name", "script_args", "alwayson_scripts"):
        if name in model_fields:
            values[name] = dumped.get(name)

    for name in _IMAGE_LIST_FIELDS:
        items = dumped.get(name)
        if items is not None and name in model_fields:
            values[name] = [decode_upload(item, (name, i), limits) for i, item in enumerate(items)]
    if len({im.size for im in values.get("init_images") or ()}) > 1 and dumped.get("mask"):
        raise invalid("init_images", "with a mask, all init images must have the same size")
    for name in _IMAGE_FIELDS:
        item = dumped.get(name)
        if item and name in model_fields:
            values[name] = decode_upload(item, name, limits)
        elif item:
            decode_upload(item, name, limits)  # still refuse URLs and broken data, even where unused

    try:
        return GenerationRequest(**values)
    except ValidationError as exc:
        raise_pydantic(exc)


def images_response(job: Any, body: A1111ProcessingBase, context: ApiContext, echo: dict[str, Any]) -> dict[str, Any]:
    """A1111's {images, parameters, info} for a finished job."""
    if job.status == "failed":
        # a request the engine found invalid is the client's error (422), anything else is ours (500)
        status = 422 if job.error_kind == "input" else 500
        raise ApiError(status, job.error or "Generation failed", error="GenerationError")
    result = job.result
    if result is None:  # cancelled before it started
        info = {"infotexts": [], "all_seeds": [], "interrupted": True, "error": job.error or "cancelled"}
        return {"images": [], "parameters": echo, "info": dumps_info(info)}
    overrides = body.override_settings or {}
    fmt = str(overrides.get("samples_format") or context.opts.get("samples_format") or "png")
    images = list(result.images)
    infotexts = list(result.infotexts)
    info = dict(result.info)
    if result.grid is not None and body.save_images:
        # A1111 returns the grid first (with the first image's infotext, and says so in the info) only when it
        # may save grids: its API sets do_not_save_grid = not save_images
        images.insert(0, result.grid)
        infotexts.insert(0, infotexts[0] if infotexts else "")
        if len(info.get("infotexts", ())) == len(result.images):
            info["infotexts"] = infotexts
            info["index_of_first_image"] = 1
    encoded = [encode_png_base64(img, text, fmt) for img, text in zip(images, infotexts)] if body.send_images else []
    return {"images": encoded, "parameters": echo, "info": dumps_info(info)}


# ---------------------------------------------------------------------------------------------
# Routes

def add_a1111_routes(server: FastAPI, context: ApiContext) -> None:
    caller = caller_dependency(context)
    tags = ["A1111 API"]

    async def generate(body: A1111ProcessingBase, kind: str, who: Caller) -> dict[str, Any]:
        body = await run_in_threadpool(apply_infotext, body, kind, context.opts)
        request = await run_in_threadpool(build_generation_request, body, kind, context)
        job = submit(context, request, who)
        await wait_for_job(job)
        echo = json_safe(body.model_dump())  # a lone surrogate in a free-form field must not break the answer
        if kind == "img2img" and not getattr(body, "include_init_images", False):
            echo["init_images"] = None
            echo["mask"] = None
        return await run_in_threadpool(images_response, job, body, context, echo)

    @server.post(f"{PREFIX}/txt2img", response_model=ImagesResponse, tags=tags)
    async def txt2img(body: Txt2ImgRequest, who: Caller = Depends(caller)):
        """Text to image, with A1111's fields and API defaults; waits for the job and returns its images."""
        return await generate(body, "txt2img", who)

    @server.post(f"{PREFIX}/img2img", response_model=ImagesResponse, tags=tags)
    async def img2img(body: Img2ImgRequest, who: Caller = Depends(caller)):
        """Image to image and inpainting (`mask`), with A1111's API defaults (inpainting_fill 0,
        inpaint_full_res True, inpaint_full_res_padding 0)."""
        if not body.init_images:
            raise invalid("init_images", "at least one init image is required")
        return await generate(body, "img2img", who)

    @server.get(f"{PREFIX}/progress", response_model=ProgressResponse, tags=tags)
    def progress(skip_current_image: bool = Query(False), who: Caller = Depends(caller)):
        """Progress of the caller's own job (running, else next queued), with A1111's formula."""
        job = current_job_of(context.queue, who.owner)
        if job is None:
            return ProgressResponse(progress=0, eta_relative=0, state=ProgressState(), textinfo=None)
        p = job.progress
        job_count = max(p.job_count, 1)
        state = ProgressState(
            skipped=job.control.skipped.is_set(), interrupted=job.control.interrupted.is_set(),
            job=job.id, job_count=job_count, job_no=p.job_no, sampling_step=p.sampling_step,
            sampling_steps=p.sampling_steps,
            job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)))
        if job.status == "queued":
            position = context.queue.position(job)
            return ProgressResponse(progress=0.01, eta_relative=0, state=state, textinfo=f"In queue: {position}")
        value = 0.01 + p.job_no / job_count
        if p.sampling_steps > 0:
            value += p.sampling_step / p.sampling_steps / job_count
        elapsed = time.time() - (job.started or job.created)
        eta_relative = elapsed / value - elapsed
        image = None
        if not skip_current_image and p.preview is not None:
            image = encode_png_base64(p.preview)
        return ProgressResponse(progress=min(value, 1.0), eta_relative=eta_relative, state=state,
                                current_image=image, textinfo=p.textinfo or None)

    @server.post(f"{PREFIX}/interrupt", tags=tags)
    def interrupt(who: Caller = Depends(caller)):
        """Stop the caller's job (the running one, else the next queued one is cancelled)."""
        job = current_job_of(context.queue, who.owner)
        if job is not None:
            if job.status == "queued":
                context.queue.cancel(job)
            else:
                job.control.interrupt()
        return {}

    @server.post(f"{PREFIX}/skip", tags=tags)
    def skip(who: Caller = Depends(caller)):
        """Skip the current batch of the caller's running job."""
        job = current_job_of(context.queue, who.owner)
        if job is not None and job.status == "running":
            job.control.skip()
        return None

    @server.get(f"{PREFIX}/options", tags=tags)
    def get_options(who: Caller = Depends(caller)) -> dict[str, Any]:
        """Every setting under A1111's names, with the loaded checkpoint's title and sha256."""
        options = context.opts.as_dict()
        configured = context.registry.find_checkpoint(options.get("sd_model_checkpoint") or "")
        active = context.models.active
        if configured is not None:  # what the next job without an override will use
            options["sd_model_checkpoint"] = configured.title
            options["sd_checkpoint_hash"] = configured.sha256 or ""
        elif active is not None:
            options["sd_model_checkpoint"] = active.title
            options["sd_checkpoint_hash"] = (active.info.sha256 if active.info is not None else None) or ""
        return options

    @server.post(f"{PREFIX}/options", tags=tags)
    def set_options(body: dict[str, Any] = Body(...), who: Caller = Depends(caller)):
        """Change settings (saved to config.json). Paths and code switches are refused (403); a checkpoint
        must exist and is loaded before the call returns."""
        if context.auth.enabled and context.auth.admins and not who.admin:
            raise ApiError(403, "Only admins may change settings on this server", error="Forbidden")
        values = validate_api_settings(context.opts, body)
        checkpoint = values.get("sd_model_checkpoint")
        if checkpoint is not None:
            info = context.registry.find_checkpoint(checkpoint) if checkpoint else None
            if info is None:
                raise invalid("sd_model_checkpoint", f"model {checkpoint!r} not found; GET {PREFIX}/sd-models "
                                                     f"lists the titles")
            values["sd_model_checkpoint"] = info.title
        vae = values.get("sd_vae")
        if vae and vae not in ("Automatic", "None") and context.registry.find_vae(vae) is None:
            raise invalid("sd_vae", f"VAE {vae!r} not found; GET {PREFIX}/sd-vae lists them")
        if checkpoint is not None or vae is not None:
            try:
                with context.models.lock:
                    context.models.ensure(values.get("sd_model_checkpoint"), vae or context.opts.get("sd_vae"))
            except Exception as exc:  # noqa: BLE001 - a file that will not load is the caller's choice: 422
                field = "sd_model_checkpoint" if checkpoint is not None else "sd_vae"
                raise invalid(field, f"could not load it: {exc}") from None
        context.opts.set_many(values, is_api=True)
        return None

    @server.get(f"{PREFIX}/cmd-flags", tags=tags)
    def cmd_flags(who: Caller = Depends(caller)) -> dict[str, Any]:
        """The command-line flags (logins redacted)."""
        flags = dict(vars(context.flags))
        for key in _REDACTED_FLAGS:
            if flags.get(key):
                flags[key] = "<redacted>"
        return flags

    @server.get(f"{PREFIX}/samplers", tags=tags)
    def list_samplers(who: Caller = Depends(caller)):
        return samplers.sampler_list_for_api()

    @server.get(f"{PREFIX}/schedulers", tags=tags)
    def list_schedulers(who: Caller = Depends(caller)):
        return samplers.schedule_list_for_api()

    @server.get(f"{PREFIX}/upscalers", tags=tags)
    def upscalers(who: Caller = Depends(caller)):
        return list(context.providers.upscalers())

    @server.get(f"{PREFIX}/latent-upscale-modes", tags=tags)
    def latent_upscale_modes(who: Caller = Depends(caller)):
        return list(context.providers.latent_upscale_modes())

    @server.get(f"{PREFIX}/sd-models", tags=tags)
    def sd_models(who: Caller = Depends(caller)):
        """Checkpoints with A1111's titles (`file.safetensors [shorthash]`)."""
        return [{"title": c.title, "model_name": c.model_name, "hash": c.shorthash, "sha256": c.sha256,
                 "filename": c.filename, "config": None} for c in context.registry.checkpoints]

    @server.get(f"{PREFIX}/sd-vae", tags=tags)
    def sd_vae(who: Caller = Depends(caller)):
        return [{"model_name": v.model_name, "filename": v.filename} for v in context.registry.vaes]

    @server.post(f"{PREFIX}/refresh-checkpoints", tags=tags)
    def refresh_checkpoints(who: Caller = Depends(caller)):
        context.registry.refresh()
        return None

    @server.post(f"{PREFIX}/refresh-vae", tags=tags)
    def refresh_vae(who: Caller = Depends(caller)):
        context.registry.refresh()
        return None

    @server.post(f"{PREFIX}/refresh-embeddings", tags=tags)
    def refresh_embeddings(who: Caller = Depends(caller)):
        context.providers.refresh_embeddings()
        return None

    @server.post(f"{PREFIX}/refresh-loras", tags=tags)
    def refresh_loras(who: Caller = Depends(caller)):
        context.providers.refresh_loras()
        return None

    @server.get(f"{PREFIX}/embeddings", tags=tags)
    def embeddings(who: Caller = Depends(caller)):
        return dict(context.providers.embeddings())

    @server.get(f"{PREFIX}/hypernetworks", tags=tags)
    def hypernetworks(who: Caller = Depends(caller)):
        return list(context.providers.hypernetworks())

    @server.get(f"{PREFIX}/loras", tags=tags)
    def loras(who: Caller = Depends(caller)):
        return list(context.providers.loras())

    @server.get(f"{PREFIX}/face-restorers", tags=tags)
    def face_restorers(who: Caller = Depends(caller)):
        return list(context.providers.face_restorers())

    @server.get(f"{PREFIX}/realesrgan-models", tags=tags)
    def realesrgan_models(who: Caller = Depends(caller)):
        return list(context.providers.realesrgan_models())

    @server.get(f"{PREFIX}/prompt-styles", tags=tags)
    def prompt_styles(who: Caller = Depends(caller)):
        """Styles from styles.csv in the data dir (columns name, prompt, negative_prompt)."""
        try:
            styles = context.styles.all()
        except ValueError as exc:
            raise ApiError(500, str(exc), error="StylesFileError") from None
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in styles]

    @server.post(f"{PREFIX}/png-info", response_model=PngInfoResponse, tags=tags)
    def png_info(body: PngInfoRequest, who: Caller = Depends(caller)):
        """The infotext in an image (PNG chunk, EXIF, GIF comment or NovelAI) and its parsed values."""
        from modules.infotext import parse_generation_parameters, read_info_from_image

        image = decode_upload(body.image, "image", context.limits)
        geninfo, items = read_info_from_image(image)
        geninfo = geninfo or ""
        return PngInfoResponse(info=geninfo, items=_jsonable_items(items),
                               parameters=parse_generation_parameters(geninfo))

    @server.get(f"{PREFIX}/memory", tags=tags)
    def memory(who: Caller = Depends(caller)):
        return memory_report()

    @server.get(f"{PREFIX}/scripts", response_model=ScriptsList, tags=tags)
    def scripts(who: Caller = Depends(caller)):
        """Script names per tab (lowercased titles), as `script_name` and `alwayson_scripts` take them."""
        entries = list(context.providers.scripts())
        return ScriptsList(txt2img=[s.name for s in entries if not s.is_img2img],
                           img2img=[s.name for s in entries if s.is_img2img])

    @server.get(f"{PREFIX}/script-info", tags=tags)
    def script_info(who: Caller = Depends(caller)):
        return [{"name": s.name, "is_alwayson": s.is_alwayson, "is_img2img": s.is_img2img,
                 "args": [dict(a) for a in s.args]} for s in context.providers.scripts()]

    @server.get(f"{PREFIX}/extensions", tags=tags)
    def extensions(who: Caller = Depends(caller)):
        return list(context.providers.extensions())


def _jsonable_items(items: dict[str, Any]) -> dict[str, Any]:
    """Image metadata other than the infotext, without binary blobs (EXIF, ICC profiles)."""
    out: dict[str, Any] = {}
    for key, value in items.items():
        if isinstance(value, (bytes, bytearray)):
            continue
        if isinstance(value, tuple):
            value = [v for v in value if isinstance(v, (str, int, float, bool))]
        if isinstance(value, (str, int, float, bool, list)) or value is None:
            out[str(key)] = value
        else:
            out[str(key)] = str(value)
    return out


def memory_report() -> dict[str, Any]:
    """A1111's /memory: process RAM and, on CUDA, torch's allocator statistics."""
    import psutil
    import torch

    process = psutil.Process(os.getpid())
    rss = process.memory_info().rss
    total = psutil.virtual_memory().total
    ram = {"free": total - rss, "used": rss, "total": total}
    if torch.cuda.is_available():
        free, total_gpu = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()

        def pair(name: str) -> dict[str, int]:
            return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

        cuda: dict[str, Any] = {
            "system": {"free": free, "used": total_gpu - free, "total": total_gpu},
            "active": pair("active_bytes"), "allocated": pair("allocated_bytes"),
            "reserved": pair("reserved_bytes"), "inactive": pair("inactive_split_bytes"),
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
        }
    else:
        cuda = {"error": "unavailable"}
    return {"ram": ram, "cuda": cuda}
