"""Helpers for the extension tests: an in-process App on the built-in tiny model, and built-in extension modules."""
from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType

import app as app_module
from modules.extensions import BUILTIN_DIR, import_extension_module
from modules.jobs import DONE
from modules.request import GenerationRequest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_EXTENSION = REPO / "tests" / "extensions" / "example"

FAST = dict(width=64, height=64, steps=2, sampler_name="Euler", seed=1234, cfg_scale=7.0, save_images=False)


def make_app(data_dir: Path, *flags: str, extensions: tuple[Path, ...] = ()) -> app_module.App:
    """An App as `python app.py --data-dir DATA_DIR` builds it (built-in tiny model), with `extensions` copied
    into DATA_DIR/extensions like a user installs them. Its queue is started."""
    for folder in extensions:
        shutil.copytree(folder, data_dir / "extensions" / folder.name, dirs_exist_ok=True)
    args = app_module.build_parser().parse_args(["--data-dir", str(data_dir), *flags])
    app = app_module.App(args=args, paths=app_module.Paths.from_args(args))
    app.load_initial_model()
    app.queue.start()
    return app


def submit(app: app_module.App, **fields):
    """Queue a job and wait for it; returns the Job (check .status / .error / .result)."""
    job = app.submit(GenerationRequest(**{**FAST, **fields}), owner="tests")
    assert job.wait(120), "job did not finish"
    return job


def generate(app: app_module.App, **fields):
    job = submit(app, **fields)
    assert job.status == DONE, job.error
    return job.result


def builtin_module(extension: str, module: str) -> ModuleType:
    """A library module of a built-in extension, e.g. ("lora", "lora_model"); the one a loaded App uses, if any."""
    import sys

    from modules.extensions import PACKAGE_ROOT

    loaded = sys.modules.get(f"{PACKAGE_ROOT}.{extension.replace('-', '_')}.{module}")
    if loaded is not None and Path(loaded.__file__) == BUILTIN_DIR / extension / f"{module}.py":
        return loaded
    return import_extension_module(BUILTIN_DIR / extension, module, name=extension)


def model_weights(model) -> dict[str, object]:
    """Every parameter of the UNet and text encoders, cloned."""
    out = {f"unet.{k}": v.detach().clone() for k, v in model.unet.state_dict().items()}
    for index, encoder in enumerate(model.text_encoders):
        out.update({f"te{index}.{k}": v.detach().clone() for k, v in encoder.state_dict().items()})
    return out
