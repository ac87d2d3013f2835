"""The Gradio page. It is a client of the App's job service, never a second generation path."""
from __future__ import annotations

import html
import time

import gradio as gr
from pydantic import ValidationError

from modules import samplers
from modules.request import GenerationRequest

PROGRESS_POLL_SECONDS = 0.25


def ui_theme():
    # System fonts only: the page must not fetch anything (Google Fonts included) from the network.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def owner_of(request: gr.Request | None) -> str:
    """Whose job this is: the logged-in user, or this browser session."""
    if request is None:
        return "local"
    if getattr(request, "username", None):
        return f"user:{request.username}"
    return f"session:{request.session_hash}"


def validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "request"
        parts.append(f"{field}: {err.get('msg', '')}")
    return "; ".join(parts)


def progress_html(job, position: int = 0) -> str:
    if job.status == "queued":
        return f"<div class='athanor-progress'>In queue: {position}</div>"
    p = job.progress
    pct = int(p.fraction * 100)
    eta = p.eta_seconds
    text = f"{pct}%"
    if p.sampling_steps:
        text += f" · step {p.sampling_step}/{p.sampling_steps}"
    if p.job_count > 1:
        text += f" · batch {min(p.job_no + 1, p.job_count)}/{p.job_count}"
    if eta:
        text += f" · ETA {eta:.0f}s"
    return (f"<div class='athanor-progress'><div class='athanor-progress-bar' style='width:{pct}%'></div>"
            f"<span>{html.escape(text)}</span></div>")


def infotext_html(text: str) -> str:
    return f"<pre class='athanor-infotext'>{html.escape(text)}</pre>"


CSS = """
.athanor-progress { position: relative; border: 1px solid var(--border-color-primary); border-radius: 6px;
                    height: 1.6em; overflow: hidden; }
.athanor-progress-bar { position: absolute; left: 0; top: 0; bottom: 0; background: var(--color-accent); opacity: .35; }
.athanor-progress span { position: relative; padding-left: .5em; }
.athanor-infotext { white-space: pre-wrap; word-break: break-word; font-size: .85em; }
.athanor-notice { border-left: 4px solid #d97706; padding: .4em .8em; }
"""


def build_ui(app) -> gr.Blocks:
    sampler_names = [s.name for s in samplers.SAMPLERS]
    schedule_names = [s.label for s in samplers.SCHEDULE_TYPES]

    def checkpoint_choices():
        titles = [c.title for c in app.registry.checkpoints]
        active = app.models.active
        if active is not None and active.title not in titles:
            titles.insert(0, active.title)
        return titles

    def current_checkpoint():
        active = app.models.active
        return active.title if active else None

    def notice_md():
        if app.models.is_builtin:
            return (f"<div class='athanor-notice'><b>Built-in tiny model with random weights</b> — for trying the "
                    f"interface only; its images are noise. Put a checkpoint (.safetensors) in "
                    f"<code>{html.escape(str(app.registry.ckpt_dir))}</code>, then press 🔄.</div>")
        return ""

    with gr.Blocks(title="Athanor", analytics_enabled=False) as demo:
        with gr.Row(elem_id="quicksettings"):
            ckpt = gr.Dropdown(checkpoint_choices(), value=current_checkpoint(), label="Stable Diffusion checkpoint",
                               elem_id="setting_sd_model_checkpoint", interactive=True, scale=4)
            refresh = gr.Button("🔄", elem_id="refresh_sd_model_checkpoint", scale=0, min_width=40)
        notice = gr.HTML(notice_md(), elem_id="athanor_notice")

        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
                with gr.Row():
                    with gr.Column(scale=6):
                        prompt = gr.Textbox(label="Prompt", lines=3, elem_id="txt2img_prompt",
                                            placeholder="Prompt (A1111 syntax: (word:1.2), [from:to:when], [a|b], AND, BREAK)")
                        negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="txt2img_neg_prompt")
                    with gr.Column(scale=1, min_width=160):
                        generate = gr.Button("Generate", variant="primary", elem_id="txt2img_generate")
                        with gr.Row():
                            interrupt = gr.Button("Interrupt", elem_id="txt2img_interrupt", min_width=60)
                            skip = gr.Button("Skip", elem_id="txt2img_skip", min_width=60)
                with gr.Row():
                    with gr.Column(scale=1):
                        with gr.Row():
                            sampler = gr.Dropdown(sampler_names, value="DPM++ 2M", label="Sampling method",
                                                  elem_id="txt2img_sampling")
                            schedule = gr.Dropdown(schedule_names, value="Automatic", label="Schedule type",
                                                   elem_id="txt2img_scheduler")
                        steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id="txt2img_steps")
                        with gr.Row():
                            width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="txt2img_width")
                            height = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="txt2img_height")
                        with gr.Row():
                            batch_count = gr.Slider(1, 100, value=1, step=1, label="Batch count",
                                                    elem_id="txt2img_batch_count")
                            batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size",
                                                   elem_id="txt2img_batch_size")
                        cfg = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id="txt2img_cfg_scale")
                        with gr.Row():
                            seed = gr.Number(value=-1, precision=0, label="Seed", elem_id="txt2img_seed")
                            random_seed = gr.Button("🎲", elem_id="txt2img_random_seed", scale=0, min_width=40)
                            reuse_seed = gr.Button("♻️", elem_id="txt2img_reuse_seed", scale=0, min_width=40)
                        clip_skip = gr.Slider(1, 12, value=1, step=1, label="Clip skip", elem_id="txt2img_clip_skip")
                    with gr.Column(scale=1):
                        progress = gr.HTML("", elem_id="txt2img_progress")
                        gallery = gr.Gallery(label="Output", elem_id="txt2img_gallery", columns=2, height="auto",
                                             format="png", interactive=False)
                        info = gr.HTML("", elem_id="txt2img_generation_info")
                job_state = gr.State(None)
                infotexts_state = gr.State([])
                seeds_state = gr.State([])

        def on_generate(prompt_v, negative_v, sampler_v, schedule_v, steps_v, width_v, height_v, count_v, size_v,
                        cfg_v, seed_v, clip_v, ckpt_v, request: gr.Request):
            try:
                req = GenerationRequest(
                    prompt=prompt_v or "", negative_prompt=negative_v or "", sampler_name=sampler_v,
                    scheduler=schedule_v, steps=int(steps_v), width=int(width_v), height=int(height_v),
                    n_iter=int(count_v), batch_size=int(size_v), cfg_scale=float(cfg_v),
                    seed=int(seed_v if seed_v is not None else -1), clip_skip=int(clip_v),
                    checkpoint=ckpt_v if ckpt_v and not app.models.is_builtin else None)
            except ValidationError as exc:
                raise gr.Error(validation_message(exc))
            job = app.submit(req, owner_of(request))
            yield progress_html(job, app.queue.position(job)), gr.skip(), gr.skip(), job.id, gr.skip(), gr.skip()
            last_preview_step = -1
            while not job.done.wait(PROGRESS_POLL_SECONDS):
                preview = gr.skip()
                if job.progress.preview is not None and job.progress.preview_step != last_preview_step:
                    last_preview_step = job.progress.preview_step
                    preview = [job.progress.preview]
                yield progress_html(job, app.queue.position(job)), preview, gr.skip(), job.id, gr.skip(), gr.skip()
            if job.status == "failed":
                yield f"<div class='athanor-progress'>Error: {html.escape(job.error or '')}</div>", gr.skip(), \
                    gr.skip(), None, gr.skip(), gr.skip()
                raise gr.Error(job.error or "Generation failed")
            result = job.result
            if result is None:
                yield "<div class='athanor-progress'>Cancelled</div>", gr.skip(), gr.skip(), None, gr.skip(), gr.skip()
                return
            shown = ([result.grid] if result.grid is not None else []) + result.images
            texts = ([result.infotexts[0]] if result.grid is not None else []) + result.infotexts
            elapsed = (job.finished or time.time()) - (job.started or job.created)
            status = "Interrupted" if result.interrupted else "Done"
            yield (f"<div class='athanor-progress'>{status} in {elapsed:.1f}s</div>", shown,
                   infotext_html(texts[0] if texts else ""), None, texts, result.seeds)

        outputs = [progress, gallery, info, job_state, infotexts_state, seeds_state]
        generate.click(on_generate, inputs=[prompt, negative, sampler, schedule, steps, width, height, batch_count,
                                            batch_size, cfg, seed, clip_skip, ckpt],
                       outputs=outputs, concurrency_limit=None)

        def own_job(job_id, request: gr.Request):
            if not job_id:
                return None
            try:
                job = app.queue.get(job_id)
            except KeyError:
                return None
            return job if job.owner == owner_of(request) else None

        def on_interrupt(job_id, request: gr.Request):
            job = own_job(job_id, request)
            if job is not None:
                app.queue.cancel(job)

        def on_skip(job_id, request: gr.Request):
            job = own_job(job_id, request)
            if job is not None:
                job.control.skip()

        interrupt.click(on_interrupt, inputs=[job_state], outputs=[], concurrency_limit=None)
        skip.click(on_skip, inputs=[job_state], outputs=[], concurrency_limit=None)

        def on_select(texts, evt: gr.SelectData):
            if texts and evt.index is not None and evt.index < len(texts):
                return infotext_html(texts[evt.index])
            return gr.skip()

        gallery.select(on_select, inputs=[infotexts_state], outputs=[info])
        random_seed.click(lambda: -1, outputs=[seed])
        reuse_seed.click(lambda seeds: seeds[0] if seeds else -1, inputs=[seeds_state], outputs=[seed])

        def on_refresh():
            app.registry.refresh()
            return gr.update(choices=checkpoint_choices(), value=current_checkpoint()), notice_md()

        refresh.click(on_refresh, outputs=[ckpt, notice])

        def on_checkpoint(title):
            if not title or (app.models.active and title == app.models.active.title):
                return gr.skip(), notice_md()
            try:
                with app.models.lock:
                    app.models.ensure(title, app.opts.get("sd_vae"))
                app.opts.set("sd_model_checkpoint", title)
            except ValueError as exc:
                raise gr.Error(str(exc))
            return gr.update(value=current_checkpoint()), notice_md()

        ckpt.input(on_checkpoint, inputs=[ckpt], outputs=[ckpt, notice])
    return demo
