"""The extension system: loading and reporting, console commands, hook failures, scripts, and the example
third-party extension working through a live server."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from safetensors.torch import save_file

from modules.api.extension_providers import extensions_for_api
from modules.extension_commands import install_from_url
from modules.extensions import ExtensionManager
from modules.hooks import API_VERSION, HookRegistry
from modules.options import Options
from modules.request import GenerationRequest, RequestError
from modules.scripts import ScriptRegistry
from modules.ui.extension_page import extension_tabs, page_assets, ui_assets
from tests.extension_helpers import EXAMPLE_EXTENSION, REPO, generate, make_app, model_weights, submit
from tests.test_app_start import start_app, stop, wait_for
from tests.test_lora import kohya_lora


def write_extension(root: Path, folder: str, script: str = "", **files: str) -> Path:
    path = root / folder
    (path / "scripts").mkdir(parents=True, exist_ok=True)
    if script:
        (path / "scripts" / "main.py").write_text(textwrap.dedent(script), encoding="utf-8")
    for name, text in files.items():
        target = path / name.replace("__", "/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


REGISTER_HOOK = """
def setup(api):
    api.register("before_prompt_parse", lambda params: None)
"""


def manager_for(user_dir: Path, opts: Options | None = None) -> ExtensionManager:
    empty = user_dir.parent / "no-builtins"
    empty.mkdir(exist_ok=True)
    return ExtensionManager(hooks=HookRegistry(), scripts=ScriptRegistry(), opts=opts or Options(None),
                            paths=SimpleNamespace(), builtin_dir=empty, user_dir=user_dir)


def test_loader_orders_by_requirements_and_reports_broken_extensions(tmp_path):
    root = tmp_path / "extensions"
    # alphabetically first, but it requires the other one (A1111's metadata.ini)
    write_extension(root, "aaa-dependent", REGISTER_HOOK,
                    **{"metadata.ini": "[Extension]\nName = dependent\nRequires = zzz-base\n",
                       "javascript__dep.js": "window.dependentLoaded = true; // </script> is escaped\n",
                       "style.css": ".dependent { color: red; }\n"})
    write_extension(root, "zzz-base", REGISTER_HOOK, **{"extension.toml": 'name = "zzz-base"\nversion = "2.1"\n'})
    write_extension(root, "import-error", "import not_a_real_package_for_athanor\n",
                    **{"install.py": "print('installing')\n"})
    write_extension(root, "setup-error", """
        def setup(api):
            api.register("before_prompt_parse", lambda params: None)
            raise RuntimeError("setup went wrong")
    """, **{"javascript__never.js": "window.neverLoaded = true;\n"})
    write_extension(root, "from-the-future", REGISTER_HOOK,
                    **{"extension.toml": f'name = "from-the-future"\napi_version = {API_VERSION + 1}\n'})
    write_extension(root, "lonely", REGISTER_HOOK, **{"metadata.ini": "[Extension]\nRequires = not-installed\n"})
    write_extension(root, "switched-off", REGISTER_HOOK)
    manager = manager_for(root, Options(tmp_path / "config.json"))
    manager.set_enabled("switched-off", False)  # what the Extensions tab does; kept in config.json
    assert json.loads((tmp_path / "config.json").read_text())["disabled_extensions"] == ["switched-off"]
    manager.load_all()
    status = {i.name: (i.status, i.error or "") for i in manager.all()}
    assert status["dependent"][0] == "loaded" and status["zzz-base"][0] == "loaded"
    assert manager.hooks.extensions_at("before_prompt_parse") == ["zzz-base", "dependent"]
    assert status["import-error"][0] == "error"
    assert "not_a_real_package_for_athanor" in status["import-error"][1]
    assert "--enable-extension import-error" in status["import-error"][1]
    assert status["setup-error"] == ("error", "RuntimeError: setup went wrong")
    assert "setup-error" not in manager.hooks.extensions_at("before_prompt_parse")  # its hook was removed again
    assert status["from-the-future"][0] == "error" and f"version {API_VERSION + 1}" in status["from-the-future"][1]
    assert status["lonely"][0] == "error" and "not-installed" in status["lonely"][1]
    assert status["switched-off"][0] == "disabled"
    assert manager.get("zzz-base").version == "2.1"

    assets = page_assets(manager)
    assert [name for name, _ in assets.javascript] == ["dependent/javascript/dep.js"]  # not the broken one's
    assert [name for name, _ in assets.css] == ["dependent/style.css"]
    css, js = ui_assets(manager)
    assert "window.dependentLoaded" in js and "</script>" not in js and ".dependent" in css
    listed = {item["name"]: item for item in extensions_for_api(manager)}
    assert listed["switched-off"]["enabled"] is False and listed["zzz-base"]["version"] == "2.1"


def test_console_enables_runs_install_and_persists(tmp_path):
    ext = write_extension(tmp_path / "extensions", "needs-packages", REGISTER_HOOK,
                          **{"install.py": "import pathlib; pathlib.Path('installed.txt').write_text('yes')\n"})

    def run(*flags):
        return subprocess.run([sys.executable, str(REPO / "app.py"), "--data-dir", str(tmp_path), *flags],
                              capture_output=True, text=True, timeout=120)

    result = run("--disable-extension", "needs-packages")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "config.json").read_text())["disabled_extensions"] == ["needs-packages"]
    assert not (ext / "installed.txt").exists()
    result = run("--enable-extension", "needs-packages")
    assert result.returncode == 0, result.stderr
    assert (ext / "installed.txt").read_text() == "yes"
    assert json.loads((tmp_path / "config.json").read_text())["disabled_extensions"] == []
    listing = run("--list-extensions").stdout
    assert "needs-packages" in listing and "lora" in listing
    bad = run("--enable-extension", "no-such-thing")
    assert bad.returncode == 2 and "no-such-thing" in bad.stderr


EXPLOSIVE = """
from modules.hooks import ExtraNetwork

class Fuse:
    armed = False

def setup(api):
    fuse = Fuse()

    @api.on("before_process_batch")
    def arm(params):
        fuse.armed = "boom" in params.prompts[0]

    @api.on("cfg_denoiser")
    def explode(params):
        if fuse.armed and params.sampling_step == 1:
            raise RuntimeError("kaboom")
"""

SCRIPTS = """
from modules.scripts import AlwaysVisible, Checkbox, Script, Slider, Textbox


class Twice(Script):
    def title(self):
        return "Twice"

    def ui(self, is_img2img):
        return [Slider("Seed step", 1, 100, 7, name="seed_step"), Textbox("Note", "")]

    def run(self, p, seed_step=7, note="", **_):
        first = p.process_images()
        p.request.seed = p.request.seed + int(seed_step)
        second = p.process_images()
        first.images += second.images
        first.infotexts += second.infotexts
        return first


class Hidden(Script):
    def title(self):
        return "Only for img2img"

    def show(self, is_img2img):
        return is_img2img


class Recorder(Script):
    def title(self):
        return "Recorder"

    def show(self, is_img2img):
        return AlwaysVisible

    def ui(self, is_img2img):
        return [Checkbox("Active", False)]

    def process(self, p, active=False, **_):
        if active:
            p.extra_generation_params["Recorder"] = "on"

    def before_process_batch(self, p, batch, active=False, **_):
        if active:
            batch.prompts[:] = [prompt + " <example:2>" for prompt in batch.prompts]
"""


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    write_extension(data / "extensions", "explosive", EXPLOSIVE)
    write_extension(data / "extensions", "scripted", SCRIPTS)
    app = make_app(data, extensions=(EXAMPLE_EXTENSION,))
    save_file(kohya_lora(), str(app.paths.lora_dir / "style.safetensors"))
    yield app
    app.queue.shutdown(wait=10)


def test_hook_exception_fails_that_job_alone_and_names_the_extension(app):
    model = app.models.active.model
    before = model_weights(model)
    processors = dict(model.unet.attn_processors)
    failed = submit(app, prompt="boom <lora:style:1>", steps=3)
    fine = submit(app, prompt="a quiet field")
    assert failed.status == "failed"
    assert "explosive" in failed.error and "kaboom" in failed.error and "cfg_denoiser" in failed.error
    assert fine.status == "done" and len(fine.result.images) == 1
    after = model_weights(model)  # the LoRA applied before the failure was removed
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert dict(model.unet.attn_processors) == processors


def test_example_extension_in_process(app):
    status = {i.name: i.status for i in app.extensions.all()}
    assert status["example"] == "loaded" and status["lora"] == "loaded"
    result = generate(app, prompt="a cat <example:0.25>", n_iter=2)
    assert all("Example strength: 0.25" in text for text in result.infotexts)
    plain = generate(app, prompt="a cat")
    assert "Example strength" not in plain.infotexts[0]
    assert [tab.title for tab in extension_tabs(app.extensions)] == ["Example"]


def test_alwayson_script_takes_named_or_positional_arguments(app):
    plain = generate(app, prompt="a cat")
    named = generate(app, prompt="a cat",
                     alwayson_scripts={"Example brightness": {"args": {"enabled": True, "amount": 30}}})
    positional = generate(app, prompt="a cat", alwayson_scripts={"example BRIGHTNESS": {"args": [True, 30]}})
    a, b, c = (np.asarray(r.images[0]).astype(int) for r in (plain, named, positional))
    assert np.array_equal(b, c)
    assert np.array_equal(b, np.clip(a + 30, 0, 255))
    assert "Example brightness: 30" in named.infotexts[0]
    # an always-on script may add an extra network to the batch's prompt before it is parsed
    recorded = generate(app, prompt="a dog", alwayson_scripts={"Recorder": {"args": {"active": True}}})
    assert "Recorder: on" in recorded.infotexts[0] and "Example strength: 2" in recorded.infotexts[0]


def test_selectable_script_runs_the_generation_itself(app):
    result = generate(app, prompt="a cat", seed=100, script_name="twice", script_args={"seed_step": 5})
    assert len(result.images) == 2
    assert "Seed: 100," in result.infotexts[0] and "Seed: 105," in result.infotexts[1]
    positional = generate(app, prompt="a cat", seed=100, script_name="Twice", script_args=[5, "hello"])
    assert np.array_equal(np.asarray(positional.images[1]), np.asarray(result.images[1]))


def test_script_errors_and_api_shapes(app):
    scripts = app.scripts
    with pytest.raises(ValueError, match="Script 'nope' not found"):
        scripts.resolve(GenerationRequest(script_name="nope"))
    with pytest.raises(ValueError, match="selectable script in the always on"):
        scripts.resolve(GenerationRequest(alwayson_scripts={"Twice": {"args": []}}))
    with pytest.raises(ValueError, match="always on script missing not found"):
        scripts.resolve(GenerationRequest(alwayson_scripts={"missing": {"args": []}}))
    with pytest.raises(ValueError, match="no argument 'volume'"):
        scripts.resolve(GenerationRequest(alwayson_scripts={"Example brightness": {"args": {"volume": 3}}}))
    queued = len(app.queue.all_jobs())
    with pytest.raises(RequestError, match="not found") as refused:  # refused at the queue's door
        submit(app, prompt="x", script_name="nope")
    assert refused.value.field == ("script_name",) and len(app.queue.all_jobs()) == queued

    listed = scripts.scripts_for_api()
    assert {"twice", "recorder", "example brightness"} <= set(listed["txt2img"])
    assert "only for img2img" in listed["img2img"] and "only for img2img" not in listed["txt2img"]
    info = {(e["name"], e["is_img2img"]): e for e in scripts.script_info_for_api()}
    twice = info[("twice", False)]
    assert twice["is_alwayson"] is False
    assert twice["args"][0] == {"label": "Seed step", "value": 7, "minimum": 1, "maximum": 100, "step": 1,
                                "choices": None}
    assert info[("example brightness", True)]["is_alwayson"] is True
    entries = app.api_providers.scripts()
    assert any(e.name == "twice" and not e.is_alwayson for e in entries)


def test_example_extension_through_a_live_server(tmp_path):
    """Installed the way a user installs it (copied into DATA_DIR/extensions), with --api."""
    target = tmp_path / "extensions" / "example"
    shutil.copytree(EXAMPLE_EXTENSION, target)
    (target / "install.py").write_text("import pathlib; pathlib.Path('installed.txt').write_text('ran')\n")
    proc, port, log = start_app(tmp_path, "--api")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(port, proc, log, "/example/status")
        assert requests.get(f"{base}/example/status", timeout=10).json() == {"steps": 0, "strengths": []}
        config = requests.get(f"{base}/config", timeout=10).text
        assert '"Example"' in config and "tab_example" in config
        assert "Hello from the example extension" in config
        page = requests.get(f"{base}/", timeout=10).text
        assert "exampleExtension" in page  # javascript/example.js
        assert "#example_tab_text" in page or "#example_tab_text" in config  # style.css

        body = {"prompt": "a cat <example:0.5>", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler",
                "seed": 7, "alwayson_scripts": {"Example brightness": {"args": {"enabled": True, "amount": 40}}}}
        response = requests.post(f"{base}/sdapi/v1/txt2img", json=body, timeout=120)
        assert response.status_code == 200, response.text
        infotext = json.loads(response.json()["info"])["infotexts"][0]
        assert "Example strength: 0.5" in infotext and "Example brightness: 40" in infotext
        status = requests.get(f"{base}/example/status", timeout=10).json()
        assert status == {"steps": 2, "strengths": [0.5]}  # the per-step hook ran once per step
        assert "example brightness" in requests.get(f"{base}/sdapi/v1/scripts", timeout=10).json()["txt2img"]
        listed = {e["name"]: e for e in requests.get(f"{base}/sdapi/v1/extensions", timeout=10).json()}
        assert listed["example"]["enabled"] is True and listed["example"]["version"] == "0.1.0"
        assert not (target / "installed.txt").exists()  # install.py never runs while serving
    finally:
        stop(proc)


def _fake_remote(tmp_path, monkeypatch, name: str, extra_files: dict[str, str] | None = None) -> str:
    """A local git repository standing in for a remote one (no network in tests): git's own insteadOf maps the
    https:// URL a user types onto it, so the URL check and the clone run exactly as for a real remote."""
    source = tmp_path / "src" / name
    (source / "scripts").mkdir(parents=True)
    (source / "scripts" / "hello.py").write_text("def setup(api):\n    pass\n")
    for relative, text in (extra_files or {}).items():
        (source / relative).write_text(text)
    git = ["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q", str(source)], check=True)
    subprocess.run(git + ["-C", str(source), "add", "-A"], check=True)
    subprocess.run(git + ["-C", str(source), "commit", "-qm", "init"], check=True)
    gitconfig = tmp_path / "gitconfig"
    gitconfig.write_text(f'[url "{(tmp_path / "src").as_uri()}/"]\n\tinsteadOf = https://git.example.invalid/\n')
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(gitconfig))
    return f"https://git.example.invalid/{name}"


def test_install_from_url_clones_disabled_and_never_while_listening(tmp_path, monkeypatch):
    url = _fake_remote(tmp_path, monkeypatch, "my-ext", {"install.py": "raise SystemExit(3)\n"})

    user_dir = tmp_path / "extensions"
    manager = manager_for(user_dir)
    with pytest.raises(PermissionError):
        install_from_url(manager, url, listening=True)
    assert not (user_dir / "my-ext").exists()

    name = install_from_url(manager, url)
    assert name == "my-ext" and (user_dir / "my-ext" / "scripts" / "hello.py").is_file()
    assert "my-ext" in manager.disabled_names()  # install.py has not run: enabling is a console step
    with pytest.raises(ValueError, match="already exists"):
        install_from_url(manager, url)
    with pytest.raises(ValueError, match="git clone failed"):
        install_from_url(manager, "https://git.example.invalid/no-such-repo")
    assert not (user_dir / "no-such-repo").exists()


def test_install_from_the_console(tmp_path, monkeypatch, capsys):
    import app as appmod

    url = _fake_remote(tmp_path, monkeypatch, "console-ext")
    data = tmp_path / "data"
    assert appmod.main(["--data-dir", str(data), "--install-extension", url]) == 0
    assert (data / "extensions" / "console-ext" / "scripts" / "hello.py").is_file()
    assert "Installed console-ext (disabled)" in capsys.readouterr().out
    assert appmod.main(["--data-dir", str(data), "--install-extension", "file:///etc"]) == 2
    assert "https://" in capsys.readouterr().err


@pytest.mark.parametrize("url", [
    "file:///tmp/evil", "FILE:///tmp/evil", "/tmp/evil", "./evil", "../evil", "evil", "ext::sh -c touch% /tmp/pwn",
    "ext::sh", "git://example.com/x.git", "ssh://git@example.com/x.git", "git@example.com:x/y.git",
    "http://example.com/x.git", "--upload-pack=touch /tmp/x", "-c core.sshCommand=touch https://example.com/x",
    "https://example.com/x --upload-pack=touch", "https://example.com/x\n--config=a", "https://", "https:///x",
    "https://example.com", "https://example.com:99999/x", "", "   ", None, 12,
])
def test_install_refuses_anything_but_plain_https_urls(tmp_path, url):
    user_dir = tmp_path / "extensions"
    manager = manager_for(user_dir)
    with pytest.raises(ValueError):
        install_from_url(manager, url)
    assert not user_dir.exists() or not any(user_dir.iterdir())
