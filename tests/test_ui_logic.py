"""The page's logic without a browser: styles, paste parameters, token counts, settings changes, progress text."""
from __future__ import annotations

import shutil
import time
from types import SimpleNamespace

import pytest
from PIL import Image

from modules.job_state import GenerationResult
from modules.jobs import Job
from modules.model_registry import HashCache, ModelRegistry
from modules.options import Options, OptionInfo
from modules.request import GenerationRequest
from modules import styles
from modules.ui import paste, tokens
from modules.ui.extensions_tab import extensions_table, folder_rows
from modules.ui.generation import build_request, request_values
from modules.ui.pnginfo import read_image_file
from modules.ui.progress import progress_html
from modules.ui.results import info_html, shown_from_result
from modules.ui.settings import compute_changes, option_component
from tests.tiny_checkpoints import tiny_checkpoint_path, tiny_loaded_model

A1111_EXAMPLE = ("a cat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
                 "Seed: 1, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1")


# -- styles -------------------------------------------------------------------------------------------------------

def test_style_with_placeholder_wraps_the_prompt_and_plain_style_is_appended():
    assert styles.merge_prompts("{prompt}, oil painting", "a cat") == "a cat, oil painting"
    assert styles.merge_prompts("masterpiece, {prompt}", "a cat") == "masterpiece, a cat"
    assert styles.merge_prompts("oil painting", "a cat ") == "a cat, oil painting"
    assert styles.merge_prompts("oil painting", "") == "oil painting"
    # Later styles wrap the earlier result, as A1111 applies them in order.
    assert styles.apply_styles("cat", ["{prompt} A", "B {prompt}"]) == "B cat A"


def test_styles_come_back_out_of_a_pasted_prompt():
    known = [styles.PromptStyle("oil", "{prompt}, oil painting", "photo"), styles.PromptStyle("hq", "masterpiece", "")]
    prompt = styles.apply_styles("a cat", ["{prompt}, oil painting", "masterpiece"])
    negative = styles.apply_styles("blurry", ["photo", ""])
    found, p, n = styles.extract_styles(known, prompt, negative)
    assert found == ["oil", "hq"]
    assert (p, n) == ("a cat", "blurry")
    # A style whose negative part is missing is not taken out (both halves must match).
    assert styles.extract_styles(known, "a cat, oil painting", "")[0] == []


def test_styles_csv_reads_a1111_files_and_saves_atomically(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text('name,text,negative_prompt\n"comma, style","a, b",c\n,skipped,row\n', encoding="utf-8")
    db = styles.StyleDatabase(path)
    assert [(s.name, s.prompt, s.negative_prompt) for s in db.all()] == [("comma, style", "a, b", "c")]
    db.save(styles.PromptStyle("night", "{prompt} at night", ""))
    db.save(styles.PromptStyle("comma, style", "x", "y"))  # replaced in place
    assert db.names() == ["comma, style", "night"]
    assert db.apply(["night"], "a fox", "") == ("a fox at night", "")
    reread = styles.StyleDatabase(path)
    assert reread.get("comma, style").prompt == "x"
    db.delete("night")
    time.sleep(0.01)
    path.write_text(path.read_text(encoding="utf-8") + "hand,edited,\n", encoding="utf-8")  # edited outside
    assert "hand" in db.names()
    with pytest.raises(ValueError, match="no style"):
        db.delete("missing")
    with pytest.raises(ValueError, match="not in styles.csv"):
        db.apply(["missing"], "a", "")


# -- paste parameters ----------------------------------------------------------------------------------------------

def test_paste_fills_fields_from_a1111_infotext():
    values = paste.paste_values(A1111_EXAMPLE, paste.TXT2IMG_FIELDS).values
    assert values["prompt"] == "a cat" and values["negative_prompt"] == "blurry"
    assert values["steps"] == 20 and values["cfg_scale"] == 7.0 and values["seed"] == 1
    assert (values["width"], values["height"]) == (512, 768)
    # DPM++ 2M's own default schedule (Karras) shows as Automatic, as A1111's paste does.
    assert (values["sampler_name"], values["scheduler"]) == ("DPM++ 2M", "Automatic")
    assert values["clip_skip"] == 1  # a missing Clip skip means 1
    assert values["enable_hr"] is False
    assert "subseed" not in values and "batch_size" not in values  # unmentioned fields stay as they are


def test_paste_reads_legacy_sampler_names_variation_seed_and_hires():
    text = ("x\nSteps: 30, Sampler: DPM++ 2M SDE Karras, CFG scale: 5.5, Seed: 7, Size: 64x96, Variation seed: 9, "
            "Variation seed strength: 0.25, Seed resize from: 128x128, Denoising strength: 0.4, Hires upscale: 1.5, "
            "Hires upscaler: Latent, Hires steps: 12, Clip skip: 2")
    values = paste.paste_values(text, paste.TXT2IMG_FIELDS).values
    assert (values["sampler_name"], values["scheduler"]) == ("DPM++ 2M SDE", "Karras")
    assert (values["subseed"], values["subseed_strength"]) == (9, 0.25)
    assert (values["seed_resize_from_w"], values["seed_resize_from_h"]) == (128, 128)
    assert values["show_extras"] is True
    assert values["enable_hr"] is True and values["hr_scale"] == 1.5 and values["hr_second_pass_steps"] == 12
    assert values["denoising_strength"] == 0.4 and values["clip_skip"] == 2


def test_paste_finds_the_local_checkpoint_by_model_hash(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(tiny_checkpoint_path("sd1"), folder / "mine.safetensors")
    registry = ModelRegistry(folder, None, HashCache(tmp_path / "hashes.json"))
    info = registry.checkpoints[0]
    text = f"a\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Model hash: {info.shorthash}, Model: x"
    result = paste.paste_values(text, paste.TXT2IMG_FIELDS, registry=registry)
    assert result.values["checkpoint"] == info.title and result.notes == []
    missing = paste.paste_values(A1111_EXAMPLE, paste.TXT2IMG_FIELDS, registry=registry)
    assert "checkpoint" not in missing.values
    assert "v1-5-pruned-emaonly [6ce0161689]" in missing.notes[0]


def test_paste_respects_wanted_and_skip():
    result = paste.paste_values(A1111_EXAMPLE, paste.TXT2IMG_FIELDS, wanted=["prompt", "seed", "steps"], skip=["seed"])
    assert set(result.values) == {"prompt", "steps"}


def test_request_from_controls_names_styles_and_checkpoint(tmp_path):
    values = request_values(["prompt", "negative_prompt", "steps", "seed", "seed_resize_from_w", "hr_prompt"],
                            ["a cat", "", 4.0, None, 0, None])
    req = build_request("txt2img", values, style_names=["oil"], checkpoint="mine [abc]", builtin=False)
    assert isinstance(req, GenerationRequest)
    assert (req.prompt, req.negative_prompt, req.styles) == ("a cat", "", ["oil"])  # the gate applies them
    assert req.steps == 4 and req.seed == -1 and req.seed_resize_from_w == -1 and req.checkpoint == "mine [abc]"
    assert build_request("txt2img", values, style_names=[], checkpoint="x", builtin=True).checkpoint is None


def test_styles_apply_the_same_way_from_every_entry_point(tmp_path):
    from modules.gate import Gate, RequestLimits
    from modules.request import RequestError

    db = styles.StyleDatabase(tmp_path / "styles.csv")
    db.save(styles.PromptStyle("oil", "{prompt}, oil painting", "photo"))
    gate = Gate(RequestLimits(), None, db)
    page = build_request("txt2img", request_values(["prompt", "hr_prompt"], ["a cat", "a big cat"]),
                         style_names=["oil"], checkpoint=None, builtin=True)
    native = GenerationRequest(prompt="a cat", hr_prompt="a big cat", styles=["oil"])  # what /api/v1/jobs builds
    for request in (page, native):
        styled = gate.admit(request).request  # the plan carries the request as it will run
        assert (styled.prompt, styled.negative_prompt) == ("a cat, oil painting", "photo")
        assert styled.hr_prompt == "a big cat, oil painting" and styled.hr_negative_prompt == ""
        assert styled.styles == ["oil"]
    with pytest.raises(RequestError, match="Style 'nope'") as refused:
        gate.admit(GenerationRequest(prompt="x", styles=["nope"]))
    assert refused.value.field == ("styles",)


# -- token counter -------------------------------------------------------------------------------------------------

def test_token_counter_counts_like_a1111():
    model = tiny_loaded_model("sd1")
    counter = tokens.TokenCounter(SimpleNamespace(active=SimpleNamespace(model=model)), Options(None))
    assert counter("") == "0/75"
    assert counter("cat " * 75) == "75/75"
    assert counter("cat " * 76) == "76/150"
    # Extra-network tags are not counted; emphasis brackets are not tokens.
    assert counter("<lora:x:1> cat") == counter("cat") == "1/75"
    assert counter("(cat:1.3)") == "1/75"
    # The longest text any step sees counts: prompt editing and AND parts are counted separately.
    assert counter("[cat:dog dog dog:5]", 20) == "3/75"
    assert counter("cat AND dog dog", 20) == "2/75"
    # The negative prompt is not split on AND.
    assert counter("cat AND dog dog", 20, is_positive=False) == "4/75"


# -- settings ------------------------------------------------------------------------------------------------------

def test_settings_changes_are_validated_and_paths_always_locked(tmp_path):
    opts = Options(tmp_path / "config.json")
    keys = ["eta_noise_seed_delta", "CLIP_stop_at_last_layers", "outdir_txt2img_samples", "emphasis"]
    unchanged = [0, 1.0, "outputs/txt2img-images", "Original"]
    assert compute_changes(opts, keys, unchanged) == ({}, [])
    changes, errors = compute_changes(opts, keys[:2] + keys[3:], [31337.0, 2.0, "No norm"])
    assert errors == [] and changes == {"eta_noise_seed_delta": 31337, "CLIP_stop_at_last_layers": 2,
                                        "emphasis": "No norm"}
    assert all(type(changes[k]) is int for k in ("eta_noise_seed_delta", "CLIP_stop_at_last_layers"))
    # a path never changes from the page, listening or not (a rebinding page could point outputs anywhere)
    changes, errors = compute_changes(opts, keys, [0, 1, "/tmp/elsewhere", "Original"])
    assert changes == {} and any("Output directory for txt2img images" in e and "locked" in e.lower() for e in errors)
    changes, errors = compute_changes(opts, keys, [-5, 13, "elsewhere", "Original"])
    assert "Eta noise seed delta (ENSD): must be at least 0 (got -5)." in errors
    assert any("Clip skip" in e and "between 1 and 12" in e for e in errors)
    assert any("Output directory for txt2img images" in e and "locked" in e for e in errors)


def test_settings_controls_follow_option_types():
    import gradio as gr

    with gr.Blocks():
        assert isinstance(option_component("a", OptionInfo(True, "A"), True, locked=False), gr.Checkbox)
        radio = option_component("b", OptionInfo("GPU", "B", choices=("GPU", "CPU")), "CPU", locked=False)
        assert isinstance(radio, gr.Radio) and radio.elem_id == "setting_b"
        slider = option_component("c", OptionInfo(5, "C", minimum=1, maximum=32), 5, locked=False)
        assert isinstance(slider, gr.Slider) and slider.step == 1
        path = option_component("d", OptionInfo("out", "D", restrict_api=True), "out", locked=True)
        assert path.interactive is False


# -- progress, results, PNG Info, extensions ---------------------------------------------------------------------

def test_progress_text_shows_queue_position_then_steps_and_eta():
    job = Job(request=GenerationRequest(), owner="session:a")
    assert "In queue: 2/3" in progress_html(job, 2, 3)
    job.status = "running"
    job.progress.job_count, job.progress.job_no = 4, 1
    job.progress.sampling_steps, job.progress.sampling_step = 10, 5
    job.progress.started = time.time() - 10
    text = progress_html(job, 0, 0)
    assert "37%" in text and "step 5/10" in text and "batch 2/4" in text and "ETA 17s" in text
    assert "width:37%" in text


def test_results_show_grid_first_with_first_image_infotext():
    images = [Image.new("RGB", (8, 8)) for _ in range(2)]
    result = GenerationResult(images=images, infotexts=["one\nSeed: 1", "two\nSeed: 2"], seeds=[1, 2], subseeds=[5, 6],
                              prompts=["a", "a"], negative_prompts=["", ""], paths=["/x/1.png", None],
                              grid=Image.new("RGB", (16, 8)), grid_path="/x/grid.png")
    shown = shown_from_result(result)
    assert shown.items[0] == "/x/grid.png" and shown.items[1] == "/x/1.png" and shown.items[2] is images[1]
    assert shown.seeds == [1, 1, 2] and shown.subseeds == [5, 5, 6]
    assert shown.path(2) is None and shown.at(7) == 0
    html = info_html(shown, 2)
    assert "Seed: <b>2</b>" in html and "two" in html


def test_pnginfo_reads_parameters_and_other_metadata(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_EXAMPLE)
    info.add_text("Comment", "<hello>")
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    params, listing = read_image_file(str(path))
    assert params == A1111_EXAMPLE
    assert "&lt;hello&gt;" in listing and "parameters" in listing
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert read_image_file(str(bad))[0] == "" and "Could not read" in read_image_file(str(bad))[1]


def test_extensions_listed_from_folders_when_there_is_no_loader(tmp_path):
    (tmp_path / "ext" / "zeta").mkdir(parents=True)
    (tmp_path / "ext" / "alpha").mkdir()
    (tmp_path / "ext" / ".hidden").mkdir()
    rows = folder_rows([tmp_path / "ext", tmp_path / "missing"])
    assert [r.name for r in rows] == ["alpha", "zeta"]
    table = extensions_table(rows, from_loader=False)
    assert "not loaded yet" in table and "alpha" in table


def test_mount_options_serve_outputs_and_inline_assets(tmp_path):
    from modules.ui import mount_options

    app = SimpleNamespace(paths=SimpleNamespace(outputs_dir=tmp_path / "outputs"),
                          ui_assets=lambda: (".x{}", "console.log('ext')"))
    options = mount_options(app)
    assert options["allowed_paths"] == [str(tmp_path / "outputs")]
    assert ".x{}" in options["css"] and "console.log('ext')" in options["head"]
    assert "://" not in options["head"]  # nothing fetched from anywhere



@pytest.mark.parametrize("method, size", [("Approx cheap", 8), ("Full", 64)])
def test_live_preview_method_setting(method, size, tmp_path):
    """"Approx cheap" previews the latent (1/8 size, no VAE); "Full" decodes it with the VAE at full size."""
    import torch

    from modules.model_manager import ModelRef
    from modules.processing import ProcessingContext, process_txt2img
    from modules.plan import make_plan

    opts = Options(None).snapshot({"show_progress_type": method, "show_progress_every_n_steps": 1})
    ctx = ProcessingContext(model=tiny_loaded_model("sd1"), model_ref=ModelRef("tiny", None), opts=opts,
                            device=torch.device("cpu"), dtype=torch.float32, outputs_dir=tmp_path)
    process_txt2img(make_plan(GenerationRequest(prompt="a", steps=2, width=64, height=64, save_images=False)), ctx)
    assert ctx.progress.preview_step == 2
    assert ctx.progress.preview.size == (size, size)


def _page_for(tmp_path, *flags):
    from app import App, Paths, build_parser
    from modules.ui import build_ui

    args = build_parser().parse_args(["--data-dir", str(tmp_path), *flags])
    app = App(args=args, paths=Paths.from_args(args), logins={"a": "b"} if "--listen" in flags else {})
    demo = build_ui(app)
    return {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}


def test_listening_server_locks_paths_and_extension_installs(tmp_path):
    page = _page_for(tmp_path / "listen", "--listen", "--auth", "a:b")
    assert page["setting_outdir_txt2img_samples"].interactive is False
    assert page["setting_outdir_samples"].interactive is False
    assert page["setting_eta_noise_seed_delta"].interactive is not False  # ordinary settings stay editable
    assert page["install_url"].visible is False and page["install_button"].visible is False
    assert "extensions_install_disabled" in page
    assert page["extensions_enabled"].interactive is False

    local = _page_for(tmp_path / "local")
    assert local["setting_outdir_txt2img_samples"].interactive is False  # paths: config.json, never the page
    assert local["setting_eta_noise_seed_delta"].interactive is not False
    assert "extensions_install_disabled" not in local


def test_the_page_disables_extensions_but_never_enables_one(tmp_path):
    from app import App, Paths, build_parser
    from modules.ui.extensions_tab import apply_enabled

    user_ext = tmp_path / "extensions" / "dropped-in"
    (user_ext / "scripts").mkdir(parents=True)
    (user_ext / "scripts" / "marker.py").write_text("def setup(api):\n    pass\n")
    args = build_parser().parse_args(["--data-dir", str(tmp_path)])
    app = App(args=args, paths=Paths.from_args(args))
    enabled = [info.name for info in app.extensions.all() if info.enabled]
    assert "dropped-in" in enabled
    # untick: disabled at the next start
    notice, table = apply_enabled(app, [n for n in enabled if n != "dropped-in"], listening=False)
    assert "Saved" in notice and "dropped-in" in Options(tmp_path / "config.json").get("disabled_extensions")
    # tick it again from the page: refused, nothing written, the console command named
    notice, table = apply_enabled(app, enabled, listening=False)
    assert "--enable-extension dropped-in" in notice and "Nothing was changed" in notice
    assert "dropped-in" in Options(tmp_path / "config.json").get("disabled_extensions")
    # the Settings page cannot clear the list either: it is a locked setting
    changes, errors = compute_changes(app.opts, ["disabled_extensions"], [""])
    assert changes == {} and errors and "locked" in errors[0].lower()
    with pytest.raises(PermissionError):
        app.opts.set_many({"disabled_extensions": []}, is_api=True)


def test_installing_from_the_page_needs_an_admin_login(tmp_path):
    from app import App, Paths, build_parser
    from modules.ui.extensions_tab import page_may_install

    local = _page_for(tmp_path / "local")  # no logins: the console does it
    assert "extensions_install_console" in local and local["install_button"].interactive is False
    args = build_parser().parse_args(["--data-dir", str(tmp_path / "admins"), "--auth", "boss:pw,guest:pw",
                                      "--admin-users", "boss"])
    app = App(args=args, paths=Paths.from_args(args), logins={"boss": "pw", "guest": "pw"})
    assert page_may_install(app, "boss") and not page_may_install(app, "guest") and not page_may_install(app, None)
