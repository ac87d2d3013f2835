"""Prompt text -> conditioning, and what the UNet receives at each step (A1111 semantics)."""
from __future__ import annotations

import pytest
import torch

from modules.conditioning import CHUNK_LENGTH, PromptEncoder
from modules.model_manager import ModelRef
from modules.options import Options
from modules.processing import ProcessingContext, process_txt2img
from modules.plan import make_plan
from modules.request import GenerationRequest
from modules.sampling import CFGDenoiser
from modules.conditioning import Conditioning, MultiCondSchedule, PromptSchedule, ScheduledConditioning

from tests.tiny_checkpoints import tiny_loaded_model


@pytest.fixture(scope="module")
def sd1():
    return tiny_loaded_model("sd1")


def encoder_for(model, **opts):
    return PromptEncoder(model, Options(None).snapshot(opts), device=torch.device("cpu"), dtype=torch.float32)


def token_id(model, word):
    return model.tokenizers[0](word, add_special_tokens=False)["input_ids"][0]


def test_short_prompt_is_one_padded_chunk(sd1):
    enc = encoder_for(sd1)
    chunks, count = enc.tokenize_line("a photo of a cat")
    assert count == 5 and len(chunks) == 1
    tokens = chunks[0].tokens
    assert len(tokens) == 77
    assert tokens[0] == enc.id_start and tokens[1:6] == [320, 1125, 539, 320, 2368]
    assert tokens[6:] == [enc.id_end] * 71  # SD1 pads with EOS
    assert enc.token_count("a photo of a cat") == (5, 75)


def test_comma_backoff_moves_the_tail_to_the_next_chunk(sd1):
    enc = encoder_for(sd1)
    cat, dog, comma = token_id(sd1, "cat"), token_id(sd1, "dog"), token_id(sd1, ",")
    prompt = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    chunks, count = enc.tokenize_line(prompt)
    assert len(chunks) == 2
    first = chunks[0].tokens[1:-1]
    # the chunk was full at the 5th dog; the comma was 5 tokens back (<= 20): the 4 dogs moved on
    assert first[:70] == [cat] * 70 and first[70] == comma and first[71:] == [enc.id_end] * 4
    assert chunks[1].tokens[1:11] == [dog] * 10
    # without back-off the dogs stay where they fall
    chunks, _ = encoder_for(sd1, comma_padding_backtrack=0).tokenize_line(prompt)
    assert chunks[0].tokens[72:76] == [dog] * 4


def test_200_token_prompt_makes_three_chunks(sd1):
    enc = encoder_for(sd1)
    words = []
    for _ in range(29):
        words.append("red cat sitting on a mat,")
    prompt = " ".join(words)  # 7 tokens per phrase including its comma: 203 tokens
    raw = len(sd1.tokenizers[0](prompt, add_special_tokens=False)["input_ids"])
    assert raw == 203
    chunks, count = enc.tokenize_line(prompt)
    assert len(chunks) == 3
    assert count >= raw  # A1111 counts a closed chunk as 75 tokens, padding included
    assert enc.token_count(prompt) == (count, 225)
    comma = token_id(sd1, ",")
    for chunk in chunks[:2]:
        body = chunk.tokens[1:-1]
        real = [t for t in body if t != enc.id_end]
        # back-off observed: each full chunk ends right after a comma, padded with EOS
        assert real[-1] == comma and len(real) < CHUNK_LENGTH
    cond = enc.encode(prompt)
    assert cond.context.shape == (1, 77 * 3, sd1.text_encoders[0].config.hidden_size)


def test_break_closes_a_chunk(sd1):
    enc = encoder_for(sd1)
    chunks, _ = enc.tokenize_line("cat BREAK dog")
    assert len(chunks) == 2
    assert chunks[0].tokens[1] == token_id(sd1, "cat") and chunks[0].tokens[2] == enc.id_end
    assert chunks[1].tokens[1] == token_id(sd1, "dog")


def test_weights_scale_the_embedding_as_the_modes_define(sd1):
    plain = encoder_for(sd1, emphasis="No norm").encode("cat dog").context
    no_norm = encoder_for(sd1, emphasis="No norm").encode("(cat:1.5) dog").context
    # token 1 (cat) scaled by 1.5, every other position untouched
    assert torch.allclose(no_norm[0, 1], plain[0, 1] * 1.5, atol=1e-6)
    assert torch.allclose(no_norm[0, 2:], plain[0, 2:], atol=1e-6)
    original = encoder_for(sd1).encode("(cat:1.5) dog").context
    # Original: the same scaling, then the whole chunk rescaled so its mean is the unweighted mean
    assert torch.allclose(original, no_norm * (plain.mean() / no_norm.mean()), atol=1e-6)
    assert torch.allclose(original.mean(), plain.mean(), atol=1e-6)
    ignore = encoder_for(sd1, emphasis="Ignore").encode("(cat:1.5) dog").context
    assert torch.allclose(ignore, plain, atol=1e-6)
    # "None": brackets are literal text
    chunks, _ = encoder_for(sd1, emphasis="None").tokenize_line("(cat:1.5)")
    assert token_id(sd1, "(") in chunks[0].tokens


def test_clip_skip_uses_an_earlier_layer(sd1):
    one = encoder_for(sd1).encode("cat").context
    two = encoder_for(sd1, CLIP_stop_at_last_layers=2).encode("cat").context
    assert not torch.allclose(one, two)
    enc = sd1.text_encoders[0]
    ids = torch.tensor([encoder_for(sd1).tokenize_line("cat")[0][0].tokens])
    with torch.no_grad():
        hidden = enc(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        expected = enc.final_layer_norm(hidden)
    assert torch.allclose(two, expected * (expected.mean() / expected.mean()), atol=1e-6)


def test_sd2_pads_with_zero_after_eos_and_sdxl_has_pooled():
    sd2 = tiny_loaded_model("sd2-v")
    enc = encoder_for(sd2)
    assert enc.slots[0].pad_id == 0
    cond = enc.encode("cat")
    assert cond.pooled is None and cond.length == 77
    sdxl = tiny_loaded_model("sdxl")
    enc = encoder_for(sdxl)
    cond = enc.encode("cat")
    widths = [e.config.hidden_size for e in sdxl.text_encoders]
    assert cond.context.shape == (1, 77, sum(widths))
    assert cond.pooled is not None and cond.pooled.shape[0] == 1


def recorded_contexts(model, prompt, steps, tmp_path, **fields):
    seen = []

    def record(_module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"][0].clone())

    handle = model.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        ctx = ProcessingContext(model=model, model_ref=ModelRef("tiny", None), opts=Options(None).snapshot(),
                                device=torch.device("cpu"), dtype=torch.float32, outputs_dir=tmp_path)
        req = GenerationRequest(prompt=prompt, width=64, height=64, steps=steps, seed=3, sampler_name="Euler",
                                save_images=False, **fields)
        process_txt2img(make_plan(req), ctx)
    finally:
        handle.remove()
    return seen


def which(context, candidates):
    dists = {name: (context - c.context[0]).abs().max().item() for name, c in candidates.items()}
    best = min(dists, key=dists.get)
    assert dists[best] < 1e-5, dists
    return best


def test_prompt_editing_switches_where_a1111_switches(sd1, tmp_path):
    enc = encoder_for(sd1)
    words = {"cat": enc.encode("cat"), "dog": enc.encode("dog")}
    seen = recorded_contexts(sd1, "[cat:dog:0.5]", 10, tmp_path)
    assert len(seen) == 10  # cond and uncond share one batch: one UNet call per step
    assert [which(c, words) for c in seen] == ["cat"] * 6 + ["dog"] * 4
    seen = recorded_contexts(sd1, "[cat:dog:3]", 10, tmp_path)
    assert [which(c, words) for c in seen] == ["cat"] * 4 + ["dog"] * 6


def test_alternation_alternates_every_step(sd1, tmp_path):
    enc = encoder_for(sd1)
    words = {"cat": enc.encode("cat"), "dog": enc.encode("dog")}
    seen = recorded_contexts(sd1, "[cat|dog]", 6, tmp_path)
    assert [which(c, words) for c in seen] == ["cat", "cat", "dog", "cat", "dog", "cat"]


def test_and_is_composable_diffusion():
    class Echo(torch.nn.Module):
        """A fake UNet whose output is the mean of its context, so the combination is visible."""
        dtype = torch.float32

        def forward(self, x, t, encoder_hidden_states, return_dict=False):
            return (x * 0 + encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1),)

    def const(v):
        return PromptSchedule((ScheduledConditioning(10, Conditioning(torch.full((1, 77, 4), float(v)))),))

    den = CFGDenoiser(Echo(), conds=[MultiCondSchedule(((const(2), 1.0), (const(5), -0.5)))],
                      unconds=[const(1)], cfg_scale=3.0)
    out = den(torch.zeros(1, 4, 2, 2), torch.tensor(1), 0, 10)
    # uncond + sum w_i * cfg * (cond_i - uncond) = 1 + 3*(2-1) - 0.5*3*(5-1) = -2
    assert torch.allclose(out, torch.full_like(out, -2.0))
