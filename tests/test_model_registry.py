"""The model registry: listing checkpoints and VAEs, A1111's hashes and names, the hash cache."""
import hashlib
import json
import os
import random
import struct
import threading
from pathlib import Path

import pytest

from modules import model_registry as mr
from modules.model_registry import (
    CheckpointInfo,
    HashCache,
    ModelRegistry,
    addnet_hash_safetensors,
    calculate_sha256,
    model_hash_old,
)

OLD_OFFSET, OLD_LENGTH = 0x100000, 0x10000
BIG = OLD_OFFSET + OLD_LENGTH + 12_345  # past the old-hash window


def write_random(path: Path, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def old_hash_of(data: bytes) -> str:
    return sha(data[OLD_OFFSET:OLD_OFFSET + OLD_LENGTH])[:8]


@pytest.fixture
def dirs(tmp_path):
    ckpt, vae = tmp_path / "Stable-diffusion", tmp_path / "VAE"
    ckpt.mkdir()
    vae.mkdir()
    return ckpt, vae, tmp_path / "cache" / "hashes.json"


@pytest.fixture
def count_hashing(monkeypatch):
    """Count full-file hashes by wrapping the module's calculate_sha256."""
    calls = []
    real = mr.calculate_sha256

    def counting(path):
        calls.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(mr, "calculate_sha256", counting)
    return calls


def make_registry(dirs, **kwargs) -> ModelRegistry:
    ckpt, vae, cache = dirs
    registry = ModelRegistry(ckpt, vae, HashCache(cache), **kwargs)
    registry.refresh()
    return registry


def make_diffusers_folder(folder: Path, seed: int) -> None:
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    write_random(folder / "unet" / "diffusion_pytorch_model.safetensors", 4096, seed)
    (folder / "unet" / "config.json").write_text("{}")


# --- hash functions ------------------------------------------------------------------------

def test_sha256_matches_hashlib_on_multi_block_file(tmp_path):
    data = write_random(tmp_path / "m.safetensors", 3 * 1024 * 1024 + 7, seed=1)
    assert calculate_sha256(tmp_path / "m.safetensors") == sha(data)


def test_old_hash_reads_only_the_64k_window_at_one_mib(tmp_path):
    window = bytes(range(256)) * (OLD_LENGTH // 256)
    a = b"\0" * OLD_OFFSET + window + b"tail A"
    b = b"\1" * OLD_OFFSET + window + b"a different tail"
    (tmp_path / "a.ckpt").write_bytes(a)
    (tmp_path / "b.ckpt").write_bytes(b)
    expected = sha(window)[:8]
    assert model_hash_old(tmp_path / "a.ckpt") == expected
    assert model_hash_old(tmp_path / "b.ckpt") == expected
    assert calculate_sha256(tmp_path / "a.ckpt") != calculate_sha256(tmp_path / "b.ckpt")


def test_old_hash_of_small_and_missing_files_matches_a1111(tmp_path):
    write_random(tmp_path / "small.safetensors", 1000, seed=2)
    # Nothing lies at offset 1 MiB: A1111 hashes empty input.
    assert model_hash_old(tmp_path / "small.safetensors") == sha(b"")[:8] == "e3b0c442"
    assert model_hash_old(tmp_path / "missing.safetensors") == "NOFILE"


def test_addnet_hash_ignores_the_metadata_header(tmp_path):
    from safetensors.numpy import save_file
    import numpy as np

    tensors = {"lora_up.weight": np.arange(64, dtype=np.float32).reshape(8, 8)}
    save_file(tensors, tmp_path / "a.safetensors", metadata={"ss_output_name": "a"})
    save_file(tensors, tmp_path / "b.safetensors", metadata={"ss_output_name": "a much longer name"})
    raw = (tmp_path / "a.safetensors").read_bytes()
    header_length = struct.unpack("<Q", raw[:8])[0]
    assert addnet_hash_safetensors(tmp_path / "a.safetensors") == sha(raw[8 + header_length:])
    assert addnet_hash_safetensors(tmp_path / "a.safetensors") == addnet_hash_safetensors(tmp_path / "b.safetensors")
    assert calculate_sha256(tmp_path / "a.safetensors") != calculate_sha256(tmp_path / "b.safetensors")


def test_addnet_hash_rejects_a_file_that_is_not_safetensors(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(ValueError, match="not a valid safetensors"):
        addnet_hash_safetensors(tmp_path / "bad.safetensors")


# --- names, titles, aliases ----------------------------------------------------------------

def test_checkpoint_names_titles_and_hashes(dirs):
    ckpt, _, _ = dirs
    data = write_random(ckpt / "sub" / "Model v2.safetensors", BIG, seed=3)
    info = make_registry(dirs).checkpoints[0]
    assert info.filename == str(ckpt / "sub" / "Model v2.safetensors")
    assert info.name == "sub/Model v2.safetensors"
    assert info.name_for_extra == "Model v2"
    assert info.model_name == "sub_Model v2"
    assert info.sha256 == sha(data)
    assert info.shorthash == sha(data)[:10]
    assert info.title == f"sub/Model v2.safetensors [{sha(data)[:10]}]"
    assert info.hash_old == old_hash_of(data)
    assert info.size == BIG
    assert not info.is_diffusers_folder


def test_every_alias_finds_its_checkpoint(dirs):
    ckpt, _, _ = dirs
    a = write_random(ckpt / "alpha.safetensors", BIG, seed=4)
    write_random(ckpt / "nested" / "beta.ckpt", BIG, seed=5)
    registry = make_registry(dirs)
    info = registry.find_checkpoint("alpha.safetensors")
    expected_aliases = {
        f"alpha.safetensors [{sha(a)[:10]}]", "alpha.safetensors", "alpha", old_hash_of(a),
        f"alpha.safetensors [{old_hash_of(a)}]", sha(a)[:10], sha(a), f"alpha [{sha(a)[:10]}]",
    }
    assert set(info.aliases()) == expected_aliases
    for checkpoint in registry.checkpoints:
        for alias in checkpoint.aliases():
            assert registry.find_checkpoint(alias) == checkpoint, alias
    beta = registry.find_checkpoint("nested_beta")  # model_name: slashes become underscores
    assert beta.name == "nested/beta.ckpt" and registry.find_checkpoint("beta") == beta


def test_closest_match_like_a1111(dirs):
    ckpt, _, _ = dirs
    write_random(ckpt / "anime.safetensors", 2000, seed=6)
    write_random(ckpt / "anime-final-v3.safetensors", 2000, seed=7)
    registry = make_registry(dirs)
    # No exact alias: the shortest title containing the text wins.
    assert registry.find_checkpoint("nime").name == "anime.safetensors"
    assert registry.find_checkpoint("final").name == "anime-final-v3.safetensors"
    # A pasted title whose hash is stale still finds the file by name.
    assert registry.find_checkpoint("anime-final-v3.safetensors [0123456789]").name == "anime-final-v3.safetensors"
    assert registry.find_checkpoint("nothing like it") is None
    assert registry.find_checkpoint("") is None


def test_checkpoints_sorted_case_insensitively_with_numbers_in_order(dirs):
    ckpt, _, _ = dirs
    for i, name in enumerate(["b.ckpt", "A.safetensors", "model10.pt", "model9.pt", "c/z.safetensors"]):
        write_random(ckpt / name, 100, seed=10 + i)
    names = [c.name for c in make_registry(dirs, hashing=False).checkpoints]
    assert names == ["A.safetensors", "b.ckpt", "c/z.safetensors", "model9.pt", "model10.pt"]


# --- what gets listed ------------------------------------------------------------------------

def test_hidden_partial_and_foreign_files_are_not_listed(dirs):
    ckpt, _, _ = dirs
    write_random(ckpt / "real.safetensors", 100, seed=20)
    write_random(ckpt / ".hidden.safetensors", 100, seed=21)
    write_random(ckpt / ".trash" / "deleted.safetensors", 100, seed=22)
    write_random(ckpt / "downloading.safetensors.part", 100, seed=23)
    write_random(ckpt / "downloading.safetensors.tmp", 100, seed=24)
    write_random(ckpt / "notes.txt", 100, seed=25)
    write_random(ckpt / "real.yaml", 100, seed=26)
    write_random(ckpt / "real.vae.safetensors", 100, seed=27)  # a VAE beside it, not a checkpoint
    registry = make_registry(dirs, hashing=False)
    assert [c.name for c in registry.checkpoints] == ["real.safetensors"]
    assert [v.name for v in registry.vaes] == ["real.vae.safetensors"]


def test_diffusers_folder_is_one_checkpoint(dirs):
    ckpt, _, _ = dirs
    make_diffusers_folder(ckpt / "pipelines" / "sd-v1.5", seed=30)
    write_random(ckpt / "single.safetensors", 100, seed=31)
    registry = make_registry(dirs)
    folder = registry.find_checkpoint("pipelines/sd-v1.5")
    assert folder.is_diffusers_folder
    assert folder.filename == str(ckpt / "pipelines" / "sd-v1.5")
    assert folder.name_for_extra == "sd-v1.5"  # no extension stripped from a folder
    assert folder.model_name == "pipelines_sd-v1.5"
    assert len(folder.sha256) == 64 and folder.title == f"pipelines/sd-v1.5 [{folder.sha256[:10]}]"
    # The weights inside the folder are not listed as checkpoints of their own.
    assert [c.name for c in registry.checkpoints] == ["pipelines/sd-v1.5", "single.safetensors"]


def test_diffusers_folder_hash_follows_its_content(dirs):
    ckpt, _, _ = dirs
    make_diffusers_folder(ckpt / "pipe", seed=32)
    registry = make_registry(dirs)
    before = registry.checkpoints[0].sha256
    write_random(ckpt / "pipe" / "unet" / "diffusion_pytorch_model.safetensors", 5000, seed=33)
    registry.refresh()
    assert registry.checkpoints[0].sha256 != before


def test_vae_listing(dirs):
    ckpt, vae, _ = dirs
    data = write_random(vae / "kl-f8.safetensors", 3000, seed=40)
    write_random(vae / "sdxl" / "sdxl_vae.pt", 100, seed=41)
    write_random(vae / "old.ckpt", 100, seed=42)
    write_random(vae / "readme.md", 100, seed=43)
    write_random(vae / ".cache.safetensors", 100, seed=44)
    (vae / "taesd-like").mkdir()
    (vae / "taesd-like" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    write_random(vae / "taesd-like" / "diffusion_pytorch_model.safetensors", 100, seed=45)
    (vae / "not-a-vae").mkdir()
    (vae / "not-a-vae" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    registry = make_registry(dirs)
    assert [v.name for v in registry.vaes] == ["kl-f8.safetensors", "old.ckpt", "sdxl_vae.pt", "taesd-like"]
    kl = registry.find_vae("kl-f8.safetensors")
    assert kl.model_name == "kl-f8.safetensors" and kl.filename == str(vae / "kl-f8.safetensors")
    assert kl.sha256 == sha(data) and kl.shorthash == sha(data)[:10]
    assert registry.find_vae("sdxl_vae.pt").filename == str(vae / "sdxl" / "sdxl_vae.pt")
    assert registry.find_vae(str(vae / "old.ckpt")).name == "old.ckpt"
    assert registry.find_vae("taesd-like").is_diffusers_folder
    assert registry.find_vae("missing.pt") is None
    assert registry.checkpoints == []  # VAEs are never offered as checkpoints


def test_refresh_picks_up_added_and_removed_files(dirs):
    ckpt, vae, _ = dirs
    write_random(ckpt / "first.safetensors", 100, seed=50)
    registry = make_registry(dirs)
    assert [c.name for c in registry.checkpoints] == ["first.safetensors"]
    write_random(ckpt / "second.ckpt", 100, seed=51)
    write_random(vae / "new.vae.pt", 100, seed=52)
    (ckpt / "first.safetensors").unlink()
    assert [c.name for c in registry.checkpoints] == ["first.safetensors"]  # nothing changes until refresh
    registry.refresh()
    assert [c.name for c in registry.checkpoints] == ["second.ckpt"]
    assert registry.find_checkpoint("first") is None
    assert [v.name for v in registry.vaes] == ["new.vae.pt"]


def test_extra_checkpoint_outside_the_folder_is_listed(dirs, tmp_path):
    ckpt, _, _ = dirs
    write_random(ckpt / "inside.safetensors", 100, seed=60)
    outside = tmp_path / "elsewhere" / "mine.ckpt"
    data = write_random(outside, 200, seed=61)
    registry = make_registry(dirs, extra_checkpoint=outside)
    extra = registry.extra_checkpoint
    assert extra.name == "mine.ckpt" and extra.filename == str(outside) and extra.sha256 == sha(data)
    assert [c.name for c in registry.checkpoints] == ["inside.safetensors", "mine.ckpt"]
    assert registry.find_checkpoint("mine") == extra


def test_extra_checkpoint_inside_the_folder_is_listed_once(dirs):
    ckpt, _, _ = dirs
    write_random(ckpt / "sub" / "inside.safetensors", 100, seed=62)
    registry = make_registry(dirs, extra_checkpoint=ckpt / "sub" / "inside.safetensors")
    assert [c.name for c in registry.checkpoints] == ["sub/inside.safetensors"]
    assert registry.extra_checkpoint.name == "sub/inside.safetensors"


def test_missing_extra_checkpoint_is_not_listed(dirs, tmp_path):
    registry = make_registry(dirs, extra_checkpoint=tmp_path / "gone.safetensors")
    assert registry.extra_checkpoint is None and registry.checkpoints == []


def test_hashing_off_gives_plain_titles_and_reads_no_whole_file(dirs, count_hashing):
    ckpt, _, cache = dirs
    data = write_random(ckpt / "m.safetensors", BIG, seed=70)
    registry = make_registry(dirs, hashing=False)
    info = registry.checkpoints[0]
    assert info.title == "m.safetensors" and info.sha256 is None and info.shorthash is None
    assert info.hash_old == old_hash_of(data)  # the cheap old hash is still there, as in A1111
    assert registry.find_checkpoint(old_hash_of(data)) == info
    assert registry.find_checkpoint("m.safetensors") == info
    assert count_hashing == [] and not cache.exists()


def test_symlinked_files_are_followed_and_folder_loops_are_not(dirs, tmp_path):
    ckpt, _, _ = dirs
    data = write_random(tmp_path / "store" / "real.safetensors", 300, seed=80)
    write_random(tmp_path / "shared" / "other.ckpt", 100, seed=81)
    (ckpt / "link.safetensors").symlink_to(tmp_path / "store" / "real.safetensors")
    (ckpt / "shared").symlink_to(tmp_path / "shared", target_is_directory=True)
    (ckpt / "loop").mkdir()
    (ckpt / "loop" / "back").symlink_to(ckpt, target_is_directory=True)
    (ckpt / "broken.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    registry = make_registry(dirs)
    assert [c.name for c in registry.checkpoints] == ["link.safetensors", "shared/other.ckpt"]
    assert registry.find_checkpoint("link").sha256 == sha(data)


# --- the hash cache ---------------------------------------------------------------------------

def test_second_refresh_and_new_instance_hash_nothing(dirs, count_hashing):
    ckpt, vae, cache = dirs
    write_random(ckpt / "a.safetensors", BIG, seed=90)
    write_random(ckpt / "b.ckpt", 500, seed=91)
    write_random(vae / "v.pt", 500, seed=92)
    registry = make_registry(dirs)
    assert len(count_hashing) == 3
    registry.refresh()
    assert len(count_hashing) == 3
    # A restart: a new cache object and registry read the same file and hash nothing.
    titles = [c.title for c in registry.checkpoints]
    restarted = make_registry(dirs)
    assert len(count_hashing) == 3
    assert [c.title for c in restarted.checkpoints] == titles
    stored = json.loads(cache.read_text())
    assert str(ckpt / "a.safetensors") in stored["hashes"]["checkpoint"]


def test_changed_size_or_mtime_means_rehash(dirs, count_hashing):
    ckpt, _, _ = dirs
    path = ckpt / "m.safetensors"
    write_random(path, 1000, seed=100)
    registry = make_registry(dirs)
    first = registry.checkpoints[0].sha256
    assert len(count_hashing) == 1

    new_data = write_random(path, 1001, seed=101)  # size changes
    registry.refresh()
    assert len(count_hashing) == 2 and registry.checkpoints[0].sha256 == sha(new_data) != first

    same_size = bytearray(new_data)
    same_size[0] ^= 0xFF
    stat = path.stat()
    path.write_bytes(bytes(same_size))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # only mtime changes
    registry.refresh()
    assert len(count_hashing) == 3 and registry.checkpoints[0].sha256 == sha(bytes(same_size))


def test_hash_cache_get_put_and_kinds(tmp_path):
    target = tmp_path / "lora.safetensors"
    write_random(target, 100, seed=110)
    cache = HashCache(tmp_path / "c" / "hashes.json")
    assert cache.get("addnet", target) is None
    cache.put("addnet", target, "ab" * 32)
    assert cache.get("addnet", target) == "ab" * 32
    assert cache.get("checkpoint", target) is None  # kinds are kept apart
    assert HashCache(tmp_path / "c" / "hashes.json").get("addnet", target) == "ab" * 32
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["hashes.json"]  # no temp file left


def test_corrupt_cache_file_is_rebuilt(dirs):
    ckpt, _, cache = dirs
    data = write_random(ckpt / "m.safetensors", 100, seed=120)
    cache.parent.mkdir(parents=True)
    cache.write_text("{ not json")
    assert make_registry(dirs).checkpoints[0].sha256 == sha(data)
    assert json.loads(cache.read_text())["hashes"]["checkpoint"]


def test_two_caches_on_one_file_keep_each_others_entries(tmp_path):
    files = [tmp_path / f"f{i}.pt" for i in range(2)]
    for i, f in enumerate(files):
        write_random(f, 100, seed=130 + i)
    first, second = HashCache(tmp_path / "h.json"), HashCache(tmp_path / "h.json")
    first.put("checkpoint", files[0], "0" * 64)
    second.put("vae", files[1], "1" * 64)
    fresh = HashCache(tmp_path / "h.json")
    assert fresh.get("checkpoint", files[0]) == "0" * 64 and fresh.get("vae", files[1]) == "1" * 64


def test_concurrent_reads_during_refresh_always_see_a_whole_list(dirs):
    ckpt, _, _ = dirs
    for i in range(20):
        write_random(ckpt / f"m{i}.safetensors", 100, seed=140 + i)
    registry = make_registry(dirs)
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            seen.append(len(registry.checkpoints))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(5):
            registry.refresh()
    finally:
        stop.set()
        thread.join()
    assert seen and set(seen) == {20}


def test_reading_before_any_refresh_scans_once(dirs):
    ckpt, vae, cache = dirs
    write_random(ckpt / "m.safetensors", 100, seed=150)
    registry = ModelRegistry(ckpt, vae, HashCache(cache))
    assert isinstance(registry.checkpoints[0], CheckpointInfo)
    assert registry.find_checkpoint("m") is not None
