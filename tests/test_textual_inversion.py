"""Textual inversion (built-in extension): A1111's file layouts, vectors at the right token positions, TI hashes."""
from __future__ import annotations

import hashlib
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modules.conditioning import PromptEncoder
from modules.extension_runtime import JobSession
from modules.extensions import ExtensionManager
from modules.hooks import HookRegistry, JobContext
from modules.options import Options
from modules.scripts import ScriptRegistry
from tests.extension_helpers import builtin_module, generate, make_app
from tests.tiny_checkpoints import tiny_loaded_model

WIDTH = 64  # the tiny SD1 text encoder's width (768 in SD1, 1024 in SD2)


def vectors(n: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.3


def write_reference_files(folder):
    """One file per layout A1111 reads, written as the tools that make them write them."""
    folder.mkdir(parents=True, exist_ok=True)
    # A1111's own `Embedding.save`
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors(3, seed=1)}, "name": "a1111-style",
                "step": 500, "sd_checkpoint": "abcdef01", "sd_checkpoint_name": "some-model"},
               folder / "a1111-style.pt")
    # the original textual_inversion code: the vectors sit in an nn.ParameterDict
    torch.save({"string_to_token": {"*": 265},
                "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors(1, seed=2))})},
               folder / "old-format.pt")
    # diffusers' learned_embeds.bin: {token: [width]}
    torch.save({"<cat-toy>": vectors(1, seed=3)[0]}, folder / "concept.bin")
    # kohya sd-scripts: {"emb_params": [n, width]}
    save_file({"emb_params": vectors(2, seed=4)}, str(folder / "kohyaemb.safetensors"))
    # SDXL: {"clip_l": [n, 768], "clip_g": [n, 1280]}: does not fit an SD1 model
    save_file({"clip_l": vectors(2, 64, seed=5), "clip_g": vectors(2, 128, seed=6)}, str(folder / "xl-style.safetensors"))
    # an SD2-sized embedding on an SD1 model: skipped
    save_file({"emb_params": vectors(1, 1024, seed=7)}, str(folder / "too-wide.safetensors"))
    (folder / "sub").mkdir(exist_ok=True)
    save_file({"emb_params": vectors(1, seed=8)}, str(folder / "sub" / "nested.safetensors"))
    (folder / "broken.pt").write_bytes(b"not a torch file at all")
    # A1111's "save images with embedding in PNG chunks": base64 JSON in the sd-ti-embedding chunk; the
    # embedding's name comes from the data, not the file name
    from PIL import Image, PngImagePlugin
    chunk = builtin_module("textual-inversion", "ti_embeddings").embedding_to_png_chunk(
        {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors(2, seed=9)}, "name": "png-style",
         "step": 100, "sd_checkpoint": None, "sd_checkpoint_name": None})
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", chunk)
    Image.new("RGB", (32, 32), "gray").save(folder / "my-picture.png", pnginfo=info)
    # preview pictures beside embeddings are not embeddings (and not errors)
    Image.new("RGB", (8, 8)).save(folder / "concept.preview.png")
    Image.new("RGB", (8, 8)).save(folder / "just-a-picture.png")


@pytest.fixture(scope="module")
def sd1():
    return tiny_loaded_model("sd1")


@pytest.fixture(scope="module")
def ti_hooks(tmp_path_factory):
    """The built-in extensions loaded into a fresh registry, reading embeddings from a test folder."""
    folder = tmp_path_factory.mktemp("embeddings")
    write_reference_files(folder)
    hooks = HookRegistry()
    paths = SimpleNamespace(embeddings_dir=folder, hypernetwork_dir=folder / "none", lora_dir=folder / "none")
    manager = ExtensionManager(hooks=hooks, scripts=ScriptRegistry(), opts=Options(None), paths=paths,
                               hashing=False)
    manager.load_all()
    assert manager.get("textual-inversion").status == "loaded"
    return hooks, folder


def lookup_for(hooks, model):
    job = JobContext(request=None, model=model, opts=Options(None).snapshot())
    return JobSession(hooks, job).embedding_lookup(), job


def record_token_embeddings(hooks):
    records = []
    hooks.register("token_embeddings", lambda p: records.append((p.slot_index, p.embeddings[0].clone())),
                   extension="test-recorder")
    return records


def test_reads_every_a1111_layout_and_lists_what_does_not_fit(ti_hooks, sd1):
    hooks, _ = ti_hooks
    data = hooks.provide("embeddings")  # what /sdapi/v1/embeddings shows before any model is seen
    assert "kohyaemb" in data["loaded"]
    ti = hooks.provide("textual-inversion")
    data = ti.db.api_data(sd1)
    assert set(data["loaded"]) == {"a1111-style", "old-format", "concept", "kohyaemb", "nested", "png-style"}
    assert data["loaded"]["png-style"]["vectors"] == 2 and data["loaded"]["png-style"]["step"] == 100
    assert set(data["skipped"]) == {"xl-style", "too-wide"}
    assert data["loaded"]["a1111-style"] == {"step": 500, "sd_checkpoint": "abcdef01",
                                             "sd_checkpoint_name": "some-model", "shape": WIDTH, "vectors": 3}
    assert data["loaded"]["concept"]["vectors"] == 1  # a single [width] vector counts as one
    assert data["loaded"]["kohyaemb"]["vectors"] == 2
    assert data["skipped"]["xl-style"]["shape"] == 64 + 128
    assert data["skipped"]["too-wide"]["shape"] == 1024


def test_vectors_reach_the_text_encoder_at_the_embeddings_positions_only(ti_hooks, sd1):
    hooks, _ = ti_hooks
    lookup, _ = lookup_for(hooks, sd1)
    opts = Options(None).snapshot()
    recorder = HookRegistry()
    with_ti = record_token_embeddings(recorder)
    encoder = PromptEncoder(sd1, opts, device=torch.device("cpu"), dtype=torch.float32, embedding_lookup=lookup,
                            hooks=recorder)
    z = encoder.encode("a photo of kohyaemb").context

    plain_registry = HookRegistry()
    plain = record_token_embeddings(plain_registry)
    baseline = PromptEncoder(sd1, opts, device=torch.device("cpu"), dtype=torch.float32, hooks=plain_registry)
    z_plain = baseline.encode("a photo of kohyaemb").context

    expected = vectors(2, seed=4)
    got = with_ti[0][1]
    # BOS + "a photo of" = positions 0..3; the embedding's two vectors take positions 4 and 5
    assert torch.equal(got[4:6], expected)
    assert torch.equal(got[:4], plain[0][1][:4])
    token_table = sd1.text_encoders[0].get_input_embeddings().weight
    assert not any(torch.equal(got[4], row) for row in token_table[:1000])
    # what the encoder makes of it: unchanged before the embedding (causal attention), changed from there on
    assert torch.equal(z[0, :4], z_plain[0, :4])
    assert not torch.allclose(z[0, 4:6], z_plain[0, 4:6])


def test_a_multi_vector_embedding_never_straddles_two_chunks(ti_hooks, sd1):
    hooks, _ = ti_hooks
    lookup, _ = lookup_for(hooks, sd1)
    recorder = HookRegistry()
    records = record_token_embeddings(recorder)
    encoder = PromptEncoder(sd1, Options(None).snapshot(), device=torch.device("cpu"), dtype=torch.float32,
                            embedding_lookup=lookup, hooks=recorder)
    chunks, count = encoder.tokenize_line("word " * 74 + "a1111-style")
    assert len(chunks) == 2 and count == 75 + 3
    assert chunks[1].fixes[0].offset == 0 and not chunks[0].fixes
    encoder.encode("word " * 74 + "a1111-style")
    first, second = records[0][1], records[1][1]
    assert torch.equal(second[1:4], vectors(3, seed=1))  # all three vectors open the second chunk
    assert not torch.equal(first[75], vectors(3, seed=1)[0])


def test_sdxl_embedding_gives_each_text_encoder_its_own_vectors(tmp_path):
    model = tiny_loaded_model("sdxl")
    save_file({"clip_l": vectors(2, 64, seed=5), "clip_g": vectors(2, 128, seed=6)}, str(tmp_path / "xlemb.safetensors"))
    save_file({"emb_params": vectors(1, 64, seed=9)}, str(tmp_path / "sd1only.safetensors"))
    hooks = HookRegistry()
    ExtensionManager(hooks=hooks, scripts=ScriptRegistry(), opts=Options(None), hashing=False,
                     paths=SimpleNamespace(embeddings_dir=tmp_path, hypernetwork_dir=tmp_path, lora_dir=tmp_path)
                     ).load_all()
    lookup, _ = lookup_for(hooks, model)
    data = hooks.provide("textual-inversion").db.api_data(model)
    assert set(data["loaded"]) == {"xlemb"} and set(data["skipped"]) == {"sd1only"}
    recorder = HookRegistry()
    records = record_token_embeddings(recorder)
    PromptEncoder(model, Options(None).snapshot(), device=torch.device("cpu"), dtype=torch.float32,
                  embedding_lookup=lookup, hooks=recorder).encode("xlemb")
    by_slot = {slot: emb for slot, emb in records}
    assert torch.equal(by_slot[0][1:3], vectors(2, 64, seed=5))
    assert torch.equal(by_slot[1][1:3], vectors(2, 128, seed=6))


def test_generation_adds_ti_hashes_and_follows_file_changes(tmp_path):
    app = make_app(tmp_path)
    try:
        folder = app.paths.embeddings_dir
        path = folder / "myemb.safetensors"
        save_file({"emb_params": vectors(2, seed=11)}, str(path))
        first = generate(app, prompt="a photo of myemb")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert f'TI hashes: "myemb: {digest[:12]}"' in first.infotexts[0]
        assert app.api_providers.embeddings()["loaded"]["myemb"]["vectors"] == 2

        # the file changes: the next job uses the new vectors
        save_file({"emb_params": vectors(2, seed=12)}, str(path))
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
        second = generate(app, prompt="a photo of myemb")
        assert not np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))

        # the file is gone: the word is plain text again and no hash is written
        path.unlink()
        third = generate(app, prompt="a photo of myemb")
        assert "TI hashes" not in third.infotexts[0]
        assert app.api_providers.embeddings() == {"loaded": {}, "skipped": {}}
    finally:
        app.queue.shutdown(wait=10)


def test_embeddings_module_rejects_a_file_with_several_terms(tmp_path):
    ti = builtin_module("textual-inversion", "ti_embeddings")
    path = tmp_path / "two.pt"
    torch.save({"string_to_param": {"*": vectors(1), "+": vectors(1)}}, path)
    with pytest.raises(ValueError, match="multiple terms"):
        ti.load_embedding(path)
