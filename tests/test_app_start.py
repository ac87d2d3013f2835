"""The app as a user starts it: a real process on loopback, no checkpoint present."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.server_helpers import free_port

REPO = Path(__file__).resolve().parent.parent


def start_app(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    log = tmp_path / "app.log"
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--data-dir", str(tmp_path), "--port", str(port),
                             *extra], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    return proc, port, log


def wait_for(port: int, proc: subprocess.Popen, log: Path, path: str = "/", timeout: float = 120) -> requests.Response:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"app exited with {proc.returncode}:\n{log.read_text()}")
        try:
            return requests.get(f"http://127.0.0.1:{port}{path}", timeout=5)
        except requests.ConnectionError:
            time.sleep(0.5)
    raise AssertionError(f"app did not answer within {timeout}s:\n{log.read_text()}")


@contextlib.contextmanager
def tiny_api_server(data_dir: Path, *extra: str):
    """app.py with --api on a data dir holding one tiny SD1 checkpoint; yields the /sdapi/v1 base URL."""
    from tests.tiny_checkpoints import tiny_checkpoint_path

    models = data_dir / "models" / "Stable-diffusion"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_checkpoint_path("sd1", 0), models / "tiny.safetensors")
    proc, port, log = start_app(data_dir, "--api", *extra)
    try:
        wait_for(port, proc, log, path="/sdapi/v1/samplers", timeout=180)
        yield f"http://127.0.0.1:{port}/sdapi/v1"
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_starts_without_checkpoint_and_serves_page(tmp_path):
    proc, port, log = start_app(tmp_path)
    try:
        response = wait_for(port, proc, log)
        assert response.status_code == 200
        assert "<html" in response.text.lower()
        # the server binds loopback only
        assert "127.0.0.1" in log.read_text()
        text = log.read_text()
        assert "random weights" in text
        assert str(tmp_path / "models" / "Stable-diffusion") in text
        # the folders a user needs were created in the data dir
        for sub in ("models/Stable-diffusion", "models/VAE", "models/embeddings", "models/Lora", "outputs"):
            assert (tmp_path / sub).is_dir()
        config = requests.get(f"http://127.0.0.1:{port}/config", timeout=5)
        assert config.status_code == 200
        assert "Built-in tiny model" in config.text
    finally:
        stop(proc)


def test_listen_without_auth_refuses_to_start(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "app.py"), "--data-dir", str(tmp_path), "--listen",
                             "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--auth" in result.stderr


def test_help_documents_flags():
    result = subprocess.run([sys.executable, str(REPO / "app.py"), "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    for flag in ("--port", "--listen", "--api", "--ckpt", "--ckpt-dir", "--vae-dir", "--embeddings-dir",
                 "--hypernetwork-dir", "--lora-dir", "--data-dir", "--device", "--precision", "--no-half"):
        assert flag in result.stdout


def test_starts_even_when_the_first_checkpoint_is_broken(tmp_path):
    from tests.tiny_checkpoints import tiny_checkpoint_path

    ckpts = tmp_path / "models" / "Stable-diffusion"
    ckpts.mkdir(parents=True)
    (ckpts / "aaa-broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    (ckpts / "bbb-good.safetensors").write_bytes(tiny_checkpoint_path("sd1").read_bytes())
    proc, port, log = start_app(tmp_path)
    try:
        assert wait_for(port, proc, log).status_code == 200
        text = log.read_text()
        assert "aaa-broken.safetensors" in text and "Model ready: bbb-good.safetensors" in text
    finally:
        stop(proc)
