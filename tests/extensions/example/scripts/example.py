"""An example third-party extension: a tab, an API route, a per-step hook, an extra network and a script.

Copy this folder to DATA_DIR/extensions/ and start Athanor. EXTENSIONS.md walks through it.
"""
from __future__ import annotations

from modules.hooks import CFGDenoiserParams, ExtraNetwork, UiTab
from modules.scripts import AlwaysVisible, Checkbox, Script, Slider


class Counter:
    """What the extension has seen. State lives on objects made in setup(), not in module globals."""

    def __init__(self) -> None:
        self.steps = 0
        self.strengths: list[float] = []


class ExampleNetwork(ExtraNetwork):
    """`<example:strength>`: remembers the strength and writes it into the infotext."""

    def __init__(self, counter: Counter):
        super().__init__("example")
        self.counter = counter

    def activate(self, job, params_list) -> None:
        if not params_list:
            return  # not in this batch's prompt
        items = params_list[0].items
        strength = float(items[0]) if items else 1.0
        self.counter.strengths.append(strength)
        job.extra_generation_params["Example strength"] = strength


class BrightnessScript(Script):
    """An always-on script with two named arguments; found in this module without registering it."""

    def title(self) -> str:
        return "Example brightness"

    def show(self, is_img2img: bool):
        return AlwaysVisible

    def ui(self, is_img2img: bool):
        return [Checkbox("Enabled", False), Slider("Brightness", -100, 100, 0, name="amount")]

    def postprocess_image(self, p, pp, enabled=False, amount=0, **_):
        if enabled and amount:
            pp.image = pp.image.point(lambda v: max(0, min(255, v + int(amount))))
            p.extra_generation_params["Example brightness"] = int(amount)


def setup(api) -> None:
    counter = Counter()
    api.register_extra_network(ExampleNetwork(counter))

    @api.on("cfg_denoiser")
    def count_step(params: CFGDenoiserParams) -> None:
        counter.steps += 1

    def build_tab() -> None:
        import gradio as gr

        gr.Markdown("Hello from the example extension", elem_id="example_tab_text")

    @api.on("ui_tabs")
    def add_tab(params) -> None:
        params.tabs.append(UiTab("Example", build_tab, elem_id="tab_example"))

    @api.on("app_started")
    def add_routes(params) -> None:
        @params.server.get("/example/status")
        def status() -> dict:
            return {"steps": counter.steps, "strengths": counter.strengths}
