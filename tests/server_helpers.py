"""Serving an App's FastAPI server in-process for tests: uvicorn in a thread on a free loopback port."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Serving:
    port: int
    uvicorn_server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.uvicorn_server.should_exit = True
        self.thread.join(10)


def serve_in_thread(server: Any, *, log_level: str = "warning", timeout: float = 60) -> Serving:
    """Start `server` (create_server's FastAPI app) as app.main runs it (uvicorn's proxy headers off)."""
    import uvicorn

    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(server, host="127.0.0.1", port=port, log_level=log_level,
                                       proxy_headers=False))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + timeout
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    assert uv.started, "the server did not start"
    return Serving(port, uv, thread)
