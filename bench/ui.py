"""The web page in a real browser (Debian's Chromium via playwright): page load and click-to-first-preview.

1. Page load to interactive: navigation start until txt2img's Generate button is on screen and enabled,
   against a bare Gradio page (one textbox, one button, the same theme) served in this process: the ratio
   is what our page costs over Gradio's own minimum.
2. Click to first preview: Generate clicked until the live preview image is in the page (tiny model, 128x128,
   a preview every step), against the same request run straight on a JobQueue in this process until its
   first preview exists: the ratio (and the difference) is what the page adds on top of the work.
   Click to finished image is printed the same way.

Runs alternate between the two sides; medians are printed. Both torch processes use OMP_WAIT_POLICY=PASSIVE so
the idle one does not spin on the cores the other needs.

    .venv/bin/python bench/ui.py [--runs 7] [--steps 20] [--size 128]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Both sides run torch on the same few cores: idle OpenMP threads must not spin and steal them from the other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"app.py exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer")


def start_baseline_page() -> str:
    """A bare Gradio page with our theme, served by uvicorn in a thread."""
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    from modules.ui.theme import ui_theme

    with gr.Blocks(title="baseline", analytics_enabled=False) as demo:
        gr.Textbox(label="Prompt", elem_id="baseline_prompt")
        gr.Button("Generate", elem_id="baseline_generate").click(lambda: None)
    server = FastAPI()
    gr.mount_gradio_app(server, demo, path="/", theme=ui_theme(), footer_links=[])
    port = free_port()
    config = uvicorn.Config(server, host="127.0.0.1", port=port, log_level="warning")
    threading.Thread(target=uvicorn.Server(config).run, daemon=True).start()
    url = f"http://127.0.0.1:{port}/"
    wait_http(url)
    return url


def start_app(data: Path) -> tuple[subprocess.Popen, str]:
    from modules import tiny_models

    ckpt_dir = data / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    tiny_models.write_tiny_checkpoint("sd1", ckpt_dir / "tiny.safetensors", seed=0)
    (data / "config.json").write_text(json.dumps({"show_progress_every_n_steps": 1, "samples_save": False,
                                                  "grid_save": False}))
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--data-dir", str(data), "--port", str(port)],
                            stdout=(data / "app.log").open("w"), stderr=subprocess.STDOUT, cwd=data)
    url = f"http://127.0.0.1:{port}/"
    wait_http(url, proc=proc)
    return proc, url


def load_time(browser, url: str, selector: str) -> float:
    """Seconds from navigation start until `selector` is visible and enabled."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(url, wait_until="commit")
    page.wait_for_selector(f"{selector}:not([disabled])", state="visible", timeout=60_000)
    elapsed = page.evaluate("performance.now()") / 1000
    context.close()
    return elapsed


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def page_generation(page, steps: int) -> tuple[float, float]:
    """(click -> first preview, click -> image in the gallery), seconds, measured inside the page."""
    page.evaluate("""() => {
        window.__bench = {};
        const t0 = performance.now();
        window.__bench.t0 = t0;
        const seen = () => {
            if (!window.__bench.preview && document.querySelector('#txt2img_preview img[src]'))
                window.__bench.preview = performance.now();
            // The last run's "done" line stays until this job's first update replaces it.
            if (document.querySelector("#txt2img_progress [data-status='queued'], #txt2img_progress [data-status='running']"))
                window.__bench.started = true;
            if (window.__bench.started && !window.__bench.done
                    && document.querySelector("#txt2img_progress [data-status='done']"))
                window.__bench.done = performance.now();
        };
        window.__bench.observer = new MutationObserver(seen);
        window.__bench.observer.observe(document.body, {childList: true, subtree: true, attributes: true});
        document.querySelector('#txt2img_generate').click();
        window.__bench.t0 = performance.now();
    }""")
    try:
        page.wait_for_function("window.__bench.preview && window.__bench.done", timeout=60_000)
    except Exception:
        state = page.evaluate("JSON.stringify(window.__bench)")
        raise SystemExit(f"no preview or result in the page: {state}; progress: "
                         f"{page.locator('#txt2img_progress').inner_text()!r}") from None
    t = page.evaluate("() => { window.__bench.observer.disconnect(); return window.__bench; }")
    return (t["preview"] - t["t0"]) / 1000, (t["done"] - t["t0"]) / 1000


def backend_generation(steps: int, size: int) -> Callable[[], tuple[float, float]]:
    """A function that runs the same request on a JobQueue here and returns (first preview, done) seconds."""
    import torch

    from modules import model_loader, tiny_models
    from modules.jobs import JobQueue
    from modules.model_manager import ModelRef
    from modules.options import Options
    from modules.processing import ProcessingContext, process_txt2img
    from modules.plan import make_plan
    from modules.request import GenerationRequest

    tmp = Path(tempfile.mkdtemp(prefix="athanor-bench-"))
    tiny_models.write_tiny_checkpoint("sd1", tmp / "tiny.safetensors", seed=0)
    model = model_loader.load_checkpoint(tmp / "tiny.safetensors")
    opts = Options(None).snapshot({"show_progress_every_n_steps": 1})

    def runner(job):
        ctx = ProcessingContext(model=model, model_ref=ModelRef("tiny", None), opts=opts, device=torch.device("cpu"),
                                dtype=torch.float32, outputs_dir=tmp, control=job.control, progress=job.progress)
        return process_txt2img(make_plan(job.request), ctx)

    queue = JobQueue(runner)
    queue.start()

    def run() -> tuple[float, float]:
        request = GenerationRequest(prompt="a lighthouse", steps=steps, width=size, height=size, save_images=False)
        start = time.perf_counter()
        job = queue.submit(request, "bench")
        first = None
        while not job.done.is_set():
            if first is None and job.progress.preview is not None:
                first = time.perf_counter() - start
            time.sleep(0.001)
        done = time.perf_counter() - start
        return (first if first is not None else done), done

    return run


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128, help="image width and height")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is missing")

    from playwright.sync_api import sync_playwright

    data = Path(tempfile.mkdtemp(prefix="athanor-bench-ui-"))
    proc, app_url = start_app(data)
    try:
        baseline_url = start_baseline_page()
        backend = backend_generation(args.steps, args.size)
        backend()  # warm up
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            load_time(browser, app_url, "#txt2img_generate")  # warm up both servers and the browser cache
            load_time(browser, baseline_url, "#baseline_generate")
            ours, bare = [], []
            for _ in range(args.runs):
                ours.append(load_time(browser, app_url, "#txt2img_generate"))
                bare.append(load_time(browser, baseline_url, "#baseline_generate"))

            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.goto(app_url)
            page.wait_for_selector("#txt2img_generate")
            page.locator("#txt2img_prompt textarea").fill("a lighthouse")
            set_number(page, "txt2img_steps", args.steps)
            set_number(page, "txt2img_width", args.size)
            set_number(page, "txt2img_height", args.size)
            page_generation(page, args.steps)  # warm up
            ui_preview, ui_done, be_preview, be_done = [], [], [], []
            for _ in range(args.runs):
                preview, done = page_generation(page, args.steps)
                ui_preview.append(preview)
                ui_done.append(done)
                preview, done = backend()
                be_preview.append(preview)
                be_done.append(done)
            context.close()
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(data, ignore_errors=True)

    print(f"runs: {args.runs}, tiny SD1 model, {args.size}x{args.size}, {args.steps} steps, preview every step (CPU)")
    print(f"page load to interactive: ours {median(ours) * 1000:.0f} ms, bare Gradio page "
          f"{median(bare) * 1000:.0f} ms, ratio {median(ours) / median(bare):.2f}")
    print(f"click to first preview:   page {median(ui_preview) * 1000:.0f} ms, job alone "
          f"{median(be_preview) * 1000:.0f} ms, ratio {median(ui_preview) / median(be_preview):.2f} "
          f"(+{(median(ui_preview) - median(be_preview)) * 1000:.0f} ms)")
    print(f"click to finished image:  page {median(ui_done) * 1000:.0f} ms, job alone "
          f"{median(be_done) * 1000:.0f} ms, ratio {median(ui_done) / median(be_done):.2f} "
          f"(+{(median(ui_done) - median(be_done)) * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
