"""Every family generates through the same txt2img path: SD2 v-prediction and SDXL's extra conditions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modules.model_manager import ModelRef
from modules.options import Options
from modules.processing import ProcessingContext, process_txt2img
from modules.plan import make_plan
from modules.request import GenerationRequest

from tests.tiny_checkpoints import tiny_loaded_model


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
def test_family_generates_reproducibly(family, tmp_path):
    model = tiny_loaded_model(family)
    seen = {}

    def record(_module, args, kwargs):
        seen.setdefault("context", kwargs["encoder_hidden_states"].shape)
        seen.setdefault("added", kwargs.get("added_cond_kwargs"))

    handle = model.unet.register_forward_pre_hook(record, with_kwargs=True)
    ctx = ProcessingContext(model=model, model_ref=ModelRef(f"tiny-{family}", None), opts=Options(None).snapshot(),
                            device=torch.device("cpu"), dtype=torch.float32, outputs_dir=tmp_path)
    req = GenerationRequest(prompt="a cat", width=64, height=64, steps=3, seed=9, sampler_name="Euler a")
    try:
        first = process_txt2img(make_plan(req), ctx)
        second = process_txt2img(make_plan(req), ctx)
    finally:
        handle.remove()
    a, b = np.asarray(first.images[0]), np.asarray(second.images[0])
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    assert model.scheduler_config["prediction_type"] == ("v_prediction" if family == "sd2-v" else "epsilon")
    width = sum(e.config.hidden_size for e in model.text_encoders)
    assert seen["context"][-1] == width
    if family == "sdxl":
        added = seen["added"]
        # SDXL's size/crop conditions: original size, crop top-left, target size
        assert added["time_ids"][0].tolist() == [64, 64, 0, 0, 64, 64]
        assert added["text_embeds"].shape[0] == seen["context"][0]
    else:
        assert seen["added"] is None
    assert (tmp_path / "txt2img-images").exists()
