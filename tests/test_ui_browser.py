"""The web page in a real browser: Debian's Chromium driven by playwright, against app.py started as a user starts it.

One server (tiny SD1 checkpoint, 64x64 images, a few steps) is shared by the whole module. Screenshots of
every tab, light, dark and at phone width, are written to tests/artifacts/ for people to look at.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image

from modules import infotext
from tests.test_app_start import start_app, stop, wait_for
from tests.tiny_checkpoints import tiny_checkpoint_path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"
STYLE_NAME = "watercolour"
STYLE_PROMPT = "{prompt}, watercolour painting"
STYLE_NEGATIVE = "photo"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} is missing (install Debian's chromium package)")


# -- the server ------------------------------------------------------------------------------------------------

class Server:
    def __init__(self, data_dir: Path, port: int, proc: subprocess.Popen, log: Path):
        self.data_dir, self.port, self.proc, self.log = data_dir, port, proc, log
        self.url = f"http://127.0.0.1:{port}/"

    def saved_images(self) -> list[Path]:
        return sorted((self.data_dir / "outputs").rglob("*.png"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("athanor-ui")
    ckpt_dir = data / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    shutil.copy(tiny_checkpoint_path("sd1"), ckpt_dir / "tiny.safetensors")
    (ckpt_dir / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      not a model")
    (data / "styles.csv").write_text(f'name,prompt,negative_prompt\n{STYLE_NAME},"{STYLE_PROMPT}",{STYLE_NEGATIVE}\n',
                                     encoding="utf-8")
    # the request limits the page must obey like the API (the long job below is 256x256, 20 images)
    proc, port, log = start_app(data, "--ckpt", "tiny.safetensors", "--max-pixels", str(256 * 256),
                                "--max-images", "20")
    try:
        wait_for(port, proc, log)
        yield Server(data, port, proc, log)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Recorder:
    """Every URL a browser context asks for."""

    def __init__(self, context):
        self.urls: list[str] = []
        context.on("request", lambda request: self.urls.append(request.url))

    def off_loopback(self) -> list[str]:
        bad = []
        for url in self.urls:
            parsed = urlparse(url)
            if parsed.scheme in ("data", "blob", "about"):
                continue
            if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
                bad.append(url)
        return bad


def open_page(browser, server, *, width: int = 1280, query: str = ""):
    context = browser.new_context(viewport={"width": width, "height": 900}, accept_downloads=True)
    recorder = Recorder(context)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(server.url + query)
    page.wait_for_selector("#txt2img_generate")
    return context, page, recorder


@pytest.fixture
def page(browser, server):
    context, page, _ = open_page(browser, server)
    yield page
    context.close()


# -- small helpers for Gradio controls -----------------------------------------------------------------------

def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def number(page, elem_id: str) -> float:
    return float(page.locator(f"#{elem_id} input[type=number]").first.input_value())


def text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def small_job(page, prompt: str, *, steps: int = 2, count: int = 1) -> None:
    page.locator("#txt2img_prompt textarea").fill(prompt)
    set_number(page, "txt2img_steps", steps)
    set_number(page, "txt2img_width", 64)
    set_number(page, "txt2img_height", 64)
    set_number(page, "txt2img_batch_count", count)


def wait_status(page, status: str, timeout: float = 30_000) -> str:
    page.wait_for_selector(f"#txt2img_progress [data-status='{status}']", timeout=timeout)
    return page.locator("#txt2img_progress").inner_text()


def start_long_job(page, prompt: str) -> None:
    # 150 steps x 20 images at 256x256: about ten seconds an image on a CPU, so it is surely still running.
    small_job(page, prompt, steps=150, count=20)
    set_number(page, "txt2img_width", 256)
    set_number(page, "txt2img_height", 256)
    page.click("#txt2img_generate")


# -- tests ------------------------------------------------------------------------------------------------------

def test_page_loads_without_leaving_loopback_and_every_tab_renders(browser, server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for theme, query in (("light", "?__theme=light"), ("dark", "?__theme=dark")):
        context, page, recorder = open_page(browser, server, query=query)
        tabs = [t.strip() for t in page.locator("#tabs > .tab-wrapper button[role=tab], #tabs button[role=tab]")
                .all_inner_texts()]
        for name in ("txt2img", "PNG Info", "Settings", "Extensions"):
            assert name in tabs
        assert tabs.index("txt2img") < tabs.index("PNG Info") < tabs.index("Settings") < tabs.index("Extensions")
        for elem_id in ("txt2img_prompt", "txt2img_neg_prompt", "txt2img_generate", "txt2img_gallery",
                        "txt2img_steps", "txt2img_seed", "txt2img_cfg_scale", "txt2img_width", "txt2img_height",
                        "txt2img_batch_count", "txt2img_batch_size", "txt2img_sampling", "txt2img_scheduler",
                        "txt2img_interrupt", "txt2img_skip", "txt2img_token_counter", "paste", "tab_txt2img",
                        "setting_sd_model_checkpoint", "setting_sd_vae", "txt2img_styles", "txt2img_random_seed",
                        "txt2img_reuse_seed", "tab_txt2img-button", "tab_pnginfo-button", "tab_settings-button",
                        "tab_extensions-button"):
            # Gradio renders the page's components progressively: on a loaded machine some come a moment later
            page.wait_for_selector(f"#{elem_id}", state="attached", timeout=15_000)
            assert page.locator(f"#{elem_id}").count() == 1, elem_id
        # Gradio 6 renders a tab's and an accordion's contents when they are first opened.
        page.click("#txt2img_seed_extras button, #txt2img_seed_extras .label-wrap")
        for elem_id in ("txt2img_subseed", "txt2img_subseed_strength", "txt2img_seed_resize_from_w"):
            page.wait_for_selector(f"#{elem_id}", state="visible")
        if theme == "dark":
            assert page.evaluate("document.body.classList.contains('dark')")
        page.screenshot(path=str(ARTIFACTS / f"tab_txt2img_{theme}.png"), full_page=True)
        tab_contents = {"img2img": ("img2img_prompt", "img2img_generate", "img2img_gallery", "img2img_steps",
                                    "img2img_denoising_strength", "img2img_image"),
                        "pnginfo": ("pnginfo_image", "pnginfo_generation_info", "pnginfo_send_to_txt2img"),
                        "settings": ("settings_submit", "setting_eta_noise_seed_delta", "setting_CLIP_stop_at_last_layers",
                                     "setting_randn_source", "setting_emphasis"),
                        "extensions": ("extensions_installed_html",)}
        if "img2img" not in tabs:
            del tab_contents["img2img"]
        for tab_id, elem_ids in tab_contents.items():
            page.click(f"#tab_{tab_id}-button")
            page.wait_for_selector(f"#tab_{tab_id}", state="visible")
            for elem_id in elem_ids:
                assert page.locator(f"#{elem_id}").count() == 1, elem_id
            page.wait_for_timeout(200)
            page.screenshot(path=str(ARTIFACTS / f"tab_{tab_id}_{theme}.png"), full_page=True)
        page.wait_for_timeout(300)
        assert recorder.urls, "the recorder saw no requests at all"
        assert recorder.off_loopback() == [], recorder.off_loopback()
        context.close()

    # A phone: nothing is wider than the screen, and the main controls are there.
    context, page, recorder = open_page(browser, server, width=390)
    page.wait_for_timeout(300)
    page.screenshot(path=str(ARTIFACTS / "tab_txt2img_phone.png"), full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390 + 2
    box = page.locator("#txt2img_prompt textarea").bounding_box()
    assert box["width"] > 250  # the prompt uses the screen's width
    assert page.locator("#txt2img_generate").is_visible()
    assert recorder.off_loopback() == []
    context.close()


def test_generate_shows_image_infotext_and_download_keeps_parameters(page, server, tmp_path):
    # The token counter counts as A1111 does: 75 tokens per chunk.
    page.locator("#txt2img_prompt textarea").fill("cat " * 80)
    page.wait_for_function("document.querySelector('#txt2img_token_counter').innerText.trim() === '80/150'")
    page.locator("#txt2img_neg_prompt textarea").fill("dog, dog")
    page.wait_for_function("document.querySelector('#txt2img_negative_token_counter').innerText.trim() === '3/75'")
    small_job(page, "a lighthouse at dusk")
    page.click("#txt2img_generate")
    wait_status(page, "done")
    page.wait_for_selector("#txt2img_gallery img")
    info = page.locator("#html_info_txt2img").inner_text()
    assert "a lighthouse at dusk" in info
    assert "Steps: 2" in info and "Size: 64x64" in info
    seed = int(info.split("Seed: ")[1].split(",")[0].split()[0])
    saved = [p for p in server.saved_images() if Image.open(p).info.get("parameters", "").startswith("a lighthouse")]
    assert saved, "the image was not saved with its infotext"
    assert f"Seed: {seed}" in Image.open(saved[-1]).info["parameters"]
    # Download gives the saved file itself, parameters included.
    with page.expect_download() as download_info:
        page.click("#txt2img_download")
    target = tmp_path / "download.png"
    download_info.value.save_as(target)
    assert Image.open(target).info["parameters"] == Image.open(saved[-1]).info["parameters"]
    # ♻ reuses the seed of the shown image.
    page.click("#txt2img_reuse_seed")
    page.wait_for_function(f"document.querySelector('#txt2img_seed input').value === '{seed}'")


def test_pnginfo_round_trip_and_send_to_txt2img(page, server):
    small_job(page, "pnginfo (round:1.1) trip")
    set_number(page, "txt2img_steps", 3)
    page.click("#txt2img_generate")
    wait_status(page, "done")
    path = page.locator("#html_info_txt2img .athanor-path").inner_text().strip()
    written = Image.open(path).info["parameters"]
    page.locator("#txt2img_prompt textarea").fill("something else")
    set_number(page, "txt2img_steps", 20)

    page.click("#tab_pnginfo-button")
    page.locator("#pnginfo_image input[type=file]").set_input_files(path)
    page.wait_for_function("document.querySelector('#pnginfo_generation_info textarea').value.length > 0")
    assert text(page, "pnginfo_generation_info") == written
    assert "parameters" in page.locator("#pnginfo_html").inner_text()

    page.click("#pnginfo_send_to_txt2img")
    page.wait_for_selector("#tab_txt2img", state="visible")
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value === 'pnginfo (round:1.1) trip'")
    params = infotext.parse_generation_parameters(written)
    assert number(page, "txt2img_steps") == 3
    assert number(page, "txt2img_seed") == int(params["Seed"])
    assert number(page, "txt2img_width") == 64


def test_paste_parameters_fills_every_field(page, server):
    tiny_hash = page.locator("#setting_sd_model_checkpoint input").input_value().split("[")[1].rstrip("]")
    pasted = ("a castle, watercolour painting\n"
              "Negative prompt: photo\n"
              "Steps: 7, Sampler: Euler a, Schedule type: Karras, CFG scale: 4.5, Seed: 1234, Size: 96x128, "
              f"Model hash: {tiny_hash}, Model: tiny, Variation seed: 99, Variation seed strength: 0.3, "
              "Clip skip: 2, Version: v1.10.1")
    page.locator("#txt2img_prompt textarea").fill(pasted)
    page.click("#paste")
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value === 'a castle'")
    assert text(page, "txt2img_neg_prompt") == ""  # the style's negative was taken out with it
    assert page.locator("#txt2img_styles").inner_text().count(STYLE_NAME) == 1
    assert number(page, "txt2img_steps") == 7
    assert text(page, "txt2img_sampling") == "Euler a"
    assert text(page, "txt2img_scheduler") == "Karras"
    assert number(page, "txt2img_cfg_scale") == 4.5
    assert number(page, "txt2img_seed") == 1234
    assert number(page, "txt2img_width") == 96 and number(page, "txt2img_height") == 128
    assert number(page, "txt2img_subseed") == 99
    assert number(page, "txt2img_subseed_strength") == 0.3
    assert number(page, "txt2img_clip_skip") == 2
    assert tiny_hash in text(page, "setting_sd_model_checkpoint")

    # A legacy sampler name carries its schedule (A1111 shows a sampler's own default as Automatic);
    # an unknown checkpoint is reported and the selection kept.
    page.locator("#txt2img_prompt textarea").fill("x\nSteps: 5, Sampler: DPM++ 2M SDE Karras, CFG scale: 7, Seed: 5, "
                                                  "Size: 64x64, Model hash: 0123456789")
    page.click("#paste")
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value === 'x'")
    assert text(page, "txt2img_sampling") == "DPM++ 2M SDE"
    assert text(page, "txt2img_scheduler") == "Karras"
    page.locator("#txt2img_prompt textarea").fill("y\nSteps: 5, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 5, "
                                                  "Size: 64x64, Model hash: 0123456789")
    page.click("#paste")
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value === 'y'")
    assert text(page, "txt2img_sampling") == "DPM++ 2M"
    assert text(page, "txt2img_scheduler") == "Automatic"
    assert "0123456789" in page.locator("#txt2img_progress").inner_text()
    assert tiny_hash in text(page, "setting_sd_model_checkpoint")


def test_interrupt_stops_a_long_job(page, server):
    before = len(server.saved_images())
    start_long_job(page, "interrupt me")
    wait_status(page, "running")
    page.wait_for_selector("#txt2img_preview img")  # a live preview arrives while it runs
    # Skip abandons the current image and goes on with the next one, long before its 150 steps are done.
    page.click("#txt2img_skip")
    page.wait_for_function("document.querySelector('#txt2img_progress').innerText.includes('batch 2/20')",
                           timeout=4_000)
    started = time.time()
    page.click("#txt2img_interrupt")
    status = wait_status(page, "done", timeout=15_000)
    assert time.time() - started < 10
    assert "Interrupted" in status
    assert len(server.saved_images()) - before < 20


def test_two_browser_sessions_see_only_their_own_job(browser, server):
    ctx_a, page_a, _ = open_page(browser, server)
    ctx_b, page_b, _ = open_page(browser, server)
    try:
        start_long_job(page_a, "job of A")
        wait_status(page_a, "running")
        small_job(page_b, "job of B")
        page_b.click("#txt2img_generate")
        queued = wait_status(page_b, "queued")
        assert "In queue: 1" in queued
        page_b.wait_for_timeout(600)
        assert "step" not in page_b.locator("#txt2img_progress").inner_text()  # A's steps never show in B
        assert page_b.locator("#txt2img_preview img").count() == 0  # nor A's preview
        # B's Interrupt cancels B's queued job only; A keeps running.
        page_b.click("#txt2img_interrupt")
        assert "Cancelled" in wait_status(page_b, "cancelled")
        step_before = page_a.locator("#txt2img_progress").inner_text()
        page_a.wait_for_function(
            f"document.querySelector('#txt2img_progress').innerText !== {step_before!r}", timeout=10_000)
        assert page_a.locator("#txt2img_progress [data-status='running']").count() == 1
        page_a.click("#txt2img_interrupt")
        assert "Interrupted" in wait_status(page_a, "done")
    finally:
        ctx_a.close()
        ctx_b.close()


def test_styles_apply_and_save(page, server):
    page.locator("#txt2img_prompt textarea").fill("a fox")
    page.locator("#txt2img_styles input").click()
    page.get_by_role("option", name=STYLE_NAME).click()
    page.keyboard.press("Escape")
    page.click("#txt2img_style_apply")
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value === 'a fox, watercolour painting'")
    assert text(page, "txt2img_neg_prompt") == STYLE_NEGATIVE

    page.click("#txt2img_style_create")
    page.wait_for_selector("#txt2img_edit_style_name", state="visible")
    page.locator("#txt2img_edit_style_name input, #txt2img_edit_style_name textarea").first.fill("night")
    page.locator("#txt2img_edit_style_prompt textarea").fill("{prompt} at night")
    page.click("#txt2img_edit_style_save")
    page.wait_for_function("document.querySelector('#txt2img_edit_style_note').innerText.includes('Saved')")
    assert "night,{prompt} at night," in (server.data_dir / "styles.csv").read_text(encoding="utf-8")


def test_settings_apply_persists_and_rejects_bad_values(page, server):
    page.click("#tab_settings-button")
    set_number(page, "setting_eta_noise_seed_delta", 31337)
    page.click("#settings_submit")
    page.wait_for_function("document.querySelector('#settings_result').innerText.includes('changed')")
    assert '"eta_noise_seed_delta": 31337' in (server.data_dir / "config.json").read_text()
    set_number(page, "setting_eta_noise_seed_delta", -5)
    page.click("#settings_submit")
    page.wait_for_function("document.querySelector('#settings_result').innerText.includes('Nothing was applied')")
    assert '"eta_noise_seed_delta": 31337' in (server.data_dir / "config.json").read_text()
    set_number(page, "setting_eta_noise_seed_delta", 0)
    page.click("#settings_submit")
    page.wait_for_function("document.querySelector('#settings_result').innerText.includes('changed')")


def test_broken_checkpoint_shows_an_error_and_keeps_the_model(page, server):
    before = text(page, "setting_sd_model_checkpoint")
    page.locator("#setting_sd_model_checkpoint input").click()
    page.get_by_role("option", name="broken.safetensors").click()
    page.wait_for_function("document.querySelector('#athanor_notice').innerText.includes('Could not load')")
    page.wait_for_function(f"document.querySelector('#setting_sd_model_checkpoint input').value === {before!r}")
    small_job(page, "still works")
    page.click("#txt2img_generate")
    assert "Done" in wait_status(page, "done")


def test_inpaint_mask_drawn_with_the_mouse_changes_only_the_masked_pixels(page, server, tmp_path):
    import numpy as np

    if page.locator("#tab_img2img-button").count() == 0:
        pytest.skip("this build has no img2img tab")
    y, x = np.mgrid[0:256, 0:256]
    original = np.stack([x, y, (x + y) // 2], -1).astype("uint8")
    source = tmp_path / "gradient.png"
    Image.fromarray(original).save(source)

    page.click("#tab_img2img-button")
    page.click("#img2img_inpaint_tab-button")
    page.wait_for_selector("#img2maskimg", state="visible")
    with page.expect_file_chooser() as chooser:
        page.locator("#img2maskimg button[aria-label='Upload']").click()
    chooser.value.set_files(str(source))
    page.wait_for_function("document.querySelector('#img2maskimg [aria-label=\"Brush\"]') !== null")
    page.wait_for_timeout(300)
    # A short stroke across the middle of the picture, with the editor's brush.
    box = page.locator("#img2maskimg canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 30, cy)
    page.mouse.down()
    page.mouse.move(cx, cy, steps=5)
    page.mouse.move(cx + 30, cy, steps=5)
    page.mouse.up()
    page.locator("#img2img_prompt textarea").fill("repaint the middle")
    set_number(page, "img2img_steps", 2)
    set_number(page, "img2img_width", 256)
    set_number(page, "img2img_height", 256)
    page.click("#img2img_generate")
    page.wait_for_selector("#img2img_progress [data-status='done']")
    path = page.locator("#html_info_img2img .athanor-path").inner_text().strip()
    result = np.asarray(Image.open(path).convert("RGB"))
    changed = np.abs(result.astype(int) - original.astype(int)).sum(-1) > 0
    assert changed.sum() > 500, "the masked middle was not repainted"
    rows, cols = np.nonzero(changed)
    # Everything outside the stroke (and its blur) is exactly the original: the outer frame in particular.
    assert rows.min() > 32 and rows.max() < 224 and cols.min() > 32 and cols.max() < 224
    assert "repaint the middle" in Image.open(path).info["parameters"]
    assert "Mask blur: 4" in Image.open(path).info["parameters"]


def test_send_a_result_to_inpaint_with_its_parameters(page, server):
    if page.locator("#tab_img2img-button").count() == 0:
        pytest.skip("this build has no img2img tab")
    small_job(page, "send me over")
    set_number(page, "txt2img_cfg_scale", 5)
    page.locator("#txt2img_prompt textarea").press("Control+Enter")  # A1111's shortcut for Generate
    wait_status(page, "done")
    page.click("#txt2img_send_to_inpaint")
    page.wait_for_selector("#tab_img2img", state="visible")
    page.wait_for_selector("#img2img_inpaint_tab", state="visible")
    page.wait_for_function("document.querySelector('#img2img_prompt textarea').value === 'send me over'")
    assert number(page, "img2img_cfg_scale") == 5
    assert number(page, "img2img_width") == 64
    # The picture is in the inpaint editor, ready for a mask.
    page.wait_for_function("!document.querySelector('#img2maskimg').innerText.includes('Upload an image')")


def test_selecting_an_image_shows_its_own_infotext_and_seed(page, server):
    small_job(page, "a pair")
    set_number(page, "txt2img_batch_size", 2)
    set_number(page, "txt2img_seed", 4242)
    page.click("#txt2img_generate")
    assert "2 images" in wait_status(page, "done")
    page.wait_for_selector("#txt2img_gallery button[aria-label='Thumbnail 3 of 3']")
    assert "Seed: 4242" in page.locator("#html_info_txt2img").inner_text()  # the grid: the first image's text
    page.click("#txt2img_gallery button[aria-label='Thumbnail 3 of 3']")
    page.wait_for_function("document.querySelector('#html_info_txt2img').innerText.includes('Seed: 4243')")
    set_number(page, "txt2img_seed", -1)
    page.click("#txt2img_reuse_seed")
    page.wait_for_function("document.querySelector('#txt2img_seed input').value === '4243'")


def test_a_request_over_the_servers_limits_is_refused_in_the_page_and_never_queued(page, server):
    before = len(server.saved_images())
    small_job(page, "too big")
    set_number(page, "txt2img_width", 512)
    set_number(page, "txt2img_height", 512)
    page.click("#txt2img_generate")
    page.wait_for_function("document.querySelector('#txt2img_progress').innerText.includes('65536 pixels')")
    message = page.locator("#txt2img_progress").inner_text()
    assert "width" in message and "512x512" in message
    time.sleep(1.0)
    assert len(server.saved_images()) == before  # nothing ran
    small_job(page, "fits")  # the page still works, and the next request runs
    page.click("#txt2img_generate")
    assert "Done" in wait_status(page, "done")
