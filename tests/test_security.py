"""DNS rebinding, forwarded headers and cross-site requests against a real server on loopback.

A page on evil.example that makes its own name resolve to 127.0.0.1 sends `Host: evil.example:PORT` with a
matching `Origin`: same origin for the browser, so only the server can refuse it. Every route family is
tried: the A1111 API, native jobs, output files, the Gradio page and its internals, the docs.
"""
from __future__ import annotations

import http.client
import io
import json
import shutil
import socket
from argparse import Namespace

import pytest
from PIL import Image

import app as appmod
from modules.auth import HostPolicy, split_host
from tests.server_helpers import serve_in_thread
from tests.tiny_checkpoints import tiny_checkpoint_path

# (method, path, JSON body or None): one or more routes of every family the server has
ROUTES = [
    ("GET", "/sdapi/v1/options", None),
    ("POST", "/sdapi/v1/options", {"send_seed": False}),
    ("GET", "/sdapi/v1/cmd-flags", None),
    ("POST", "/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "width": 64, "height": 64}),
    ("POST", "/api/v1/jobs", {"prompt": "x", "steps": 1, "width": 64, "height": 64}),
    ("GET", "/api/v1/jobs", None),
    ("GET", "/outputs/kept.png", None),
    ("GET", "/", None),
    ("GET", "/config", None),
    ("GET", "/gradio_api/info", None),
    ("POST", "/gradio_api/queue/join", {"fn_index": 0, "data": [], "session_hash": "x"}),
    ("GET", "/docs", None),
    ("GET", "/openapi.json", None),
]


class Server:
    def __init__(self, port: int, app):
        self.port, self.app = port, app

    def request(self, method: str, path: str, body=None, headers: dict[str, str] | None = None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = json.dumps(body).encode() if body is not None else None
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for key, value in {"Host": f"127.0.0.1:{self.port}", **(headers or {})}.items():
                connection.putheader(key, value)
            if data is not None:
                connection.putheader("Content-Type", "application/json")
                connection.putheader("Content-Length", str(len(data)))
            connection.endheaders(data)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


def _start(tmp_path_factory, *flags: str):
    data = tmp_path_factory.mktemp("security")
    (data / "models" / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(tiny_checkpoint_path("sd1"), data / "models" / "Stable-diffusion" / "tiny.safetensors")
    (data / "outputs").mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    (data / "outputs" / "kept.png").write_bytes(buffer.getvalue())
    args = appmod.build_parser().parse_args(["--data-dir", str(data), "--api", "--max-steps", "2", *flags])
    app = appmod.App(args=args, paths=appmod.Paths.from_args(args))
    app.load_initial_model()
    app.queue.start()
    serving = serve_in_thread(appmod.create_server(app))
    return Server(serving.port, app), serving


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    server, serving = _start(tmp_path_factory)
    yield server
    serving.stop()
    server.app.queue.shutdown(wait=5)


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    server, serving = _start(tmp_path_factory, "--forwarded-allow-ips", "127.0.0.1", "--allowed-hosts",
                             "studio.example")
    yield server
    serving.stop()
    server.app.queue.shutdown(wait=5)


@pytest.mark.parametrize("method,path,body", ROUTES)
def test_dns_rebinding_is_refused_on_every_route(local, method, path, body):
    evil = {"Host": f"evil.example:{local.port}", "Origin": f"http://evil.example:{local.port}"}
    status, text = local.request(method, path, body, evil)
    assert status == 403, (method, path, status, text[:200])
    assert b"evil.example" in text and b"--allowed-hosts" in text
    # without Origin (a plain navigation, an <img>) too
    status, _ = local.request(method, path, body, {"Host": f"evil.example:{local.port}"})
    assert status == 403


def test_nothing_changed_through_a_rebinding_attack(local):
    before = local.app.opts.get("send_seed")
    jobs_before = len(local.app.queue.all_jobs())
    evil = {"Host": f"attacker.localhost.evil.example:{local.port}", "Origin": f"http://x:{local.port}"}
    assert local.request("POST", "/sdapi/v1/options", {"send_seed": not before}, evil)[0] == 403
    assert local.request("POST", "/api/v1/jobs", {"prompt": "x", "steps": 1, "width": 64, "height": 64},
                         evil)[0] == 403
    assert local.app.opts.get("send_seed") == before and len(local.app.queue.all_jobs()) == jobs_before


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "[::1]:{port}",
                                  "127.0.0.2:{port}", "app.localhost:{port}", "localhost."])
def test_loopback_names_are_served(local, host):
    status, _ = local.request("GET", "/sdapi/v1/options", None, {"Host": host.format(port=local.port)})
    assert status == 200


def test_same_origin_posts_pass_and_foreign_origins_do_not(local):
    same = {"Origin": f"http://127.0.0.1:{local.port}"}
    assert local.request("POST", "/sdapi/v1/interrupt", None, same)[0] == 200
    assert local.request("POST", "/sdapi/v1/interrupt", None, {"Origin": "http://evil.example"})[0] == 403
    # another local port is another site (a dev server, a different app): not this server either
    assert local.request("POST", "/sdapi/v1/interrupt", None, {"Origin": "http://127.0.0.1:1"})[0] == 403


def test_forwarded_headers_are_ignored_from_clients(local):
    # any client could claim to be a proxy: X-Forwarded-Host must not make evil.example "same origin"
    spoof = {"X-Forwarded-Host": "evil.example", "Origin": "http://evil.example"}
    assert local.request("POST", "/sdapi/v1/interrupt", None, spoof)[0] == 403
    # ... nor reach Gradio, which builds its root URL from it
    status, body = local.request("GET", "/config", None, {"X-Forwarded-Host": "evil.example",
                                                          "X-Forwarded-Proto": "https"})
    assert status == 200 and b"evil.example" not in body


def test_a_trusted_proxy_forwards_an_allowed_host(proxied):
    behind = {"Host": f"127.0.0.1:{proxied.port}", "X-Forwarded-Host": "studio.example",
              "X-Forwarded-Proto": "https", "X-Forwarded-For": "10.1.2.3"}
    assert proxied.request("GET", "/sdapi/v1/options", None, behind)[0] == 200
    assert proxied.request("POST", "/sdapi/v1/interrupt", None, {**behind, "Origin": "https://studio.example"})[0] == 200
    status, body = proxied.request("GET", "/config", None, behind)
    assert status == 200 and b"studio.example" in body  # Gradio sees the proxy's public name
    # the proxy passing on a rebinding request: its Host is not allowed
    assert proxied.request("GET", "/sdapi/v1/options", None,
                           {**behind, "X-Forwarded-Host": "evil.example"})[0] == 403
    assert proxied.request("POST", "/sdapi/v1/interrupt", None,
                           {**behind, "Origin": "https://evil.example"})[0] == 403
    # and the allowed name works directly as Host too
    assert proxied.request("GET", "/sdapi/v1/options", None, {"Host": "studio.example"})[0] == 200
    assert proxied.request("GET", "/sdapi/v1/options", None, {"Host": "other.example"})[0] == 403


def _policy(**flags) -> HostPolicy:
    return HostPolicy.from_args(Namespace(**{"allowed_hosts": None, "forwarded_allow_ips": None, "listen": False,
                                             **flags}))


def test_host_policy_rules():
    default = _policy()
    for host in ("127.0.0.1:7860", "localhost", "[::1]:7860", "[::ffff:127.0.0.1]:80", "a.localhost:1"):
        assert default.allows(host), host
    for host in ("evil.example", "127.0.0.1.evil.example", "localhost.evil.example", "192.168.1.5:7860",
                 "0.0.0.0:7860", "", "[::2]"):
        assert not default.allows(host), host
    assert default.allows(None)  # HTTP/1.0 without Host: no browser sends that
    named = _policy(allowed_hosts="studio.lan, .example.com,10.0.0.5:7860")
    assert named.allows("studio.lan:7860") and named.allows("example.com") and named.allows("a.b.example.com")
    assert named.allows("10.0.0.5") and not named.allows("notexample.com") and not named.allows("studio.lan.x")
    assert _policy(allowed_hosts="*").allows("anything.example")
    assert split_host("[::1]:7860") == "::1" and split_host("Example.COM.:80") == "example.com"
    proxies = _policy(forwarded_allow_ips="10.0.0.0/8,127.0.0.1")
    assert proxies.trusts("10.2.3.4") and proxies.trusts("127.0.0.1") and not proxies.trusts("11.0.0.1")
    assert not default.trusts("127.0.0.1")  # no proxy is trusted unless named
    for bad in ({"allowed_hosts": "a b"}, {"allowed_hosts": "x/y"}, {"forwarded_allow_ips": "not-an-ip"}):
        with pytest.raises(ValueError):
            _policy(**bad)


def test_listening_allows_the_machines_own_addresses(monkeypatch):
    import psutil

    fake = [Namespace(family=socket.AF_INET, address="192.168.7.9"),
            Namespace(family=socket.AF_INET6, address="fe80::1%eth0")]
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: {"eth0": fake})
    monkeypatch.setattr(socket, "gethostname", lambda: "studio-box.lan")
    listening = _policy(listen=True)
    for host in ("192.168.7.9:7860", "[fe80::1]:7860", "studio-box:7860", "studio-box.lan", "studio-box.local:7860"):
        assert listening.allows(host), host
    assert not listening.allows("evil.example") and not listening.allows("192.168.7.10")
    assert not _policy().allows("192.168.7.9")  # loopback-only servers answer to loopback names only


def test_bad_host_flags_stop_the_start(tmp_path, capsys):
    assert appmod.main(["--data-dir", str(tmp_path), "--forwarded-allow-ips", "proxy"]) == 2
    assert "--forwarded-allow-ips" in capsys.readouterr().err


@pytest.mark.parametrize("route", ["/sdapi/v1/txt2img", "/api/v1/jobs"])
def test_script_cells_over_the_limits_are_a_422_naming_the_axis(local, route):
    body = {"prompt": "x", "steps": 1, "width": 64, "height": 64, "script_name": "X/Y/Z plot",
            "script_args": {"x_type": "Steps", "x_values": "1, 5"}}
    status, text = local.request("POST", route, body)
    error = json.loads(text)
    assert status == 422, text
    assert error["detail"][0]["loc"] == ["body", "script_args", "x_values"]
    assert "X axis Steps = 5" in error["errors"] and "at most 2 steps" in error["errors"]
    # a bad cell value, not only a limit: named too, never a 500 "extension failed"
    body["script_args"] = {"x_type": "CFG Scale", "x_values": "7, 1e308"}
    status, text = local.request("POST", route, body)
    assert status == 422 and json.loads(text)["detail"][0]["loc"] == ["body", "script_args", "x_values"]
