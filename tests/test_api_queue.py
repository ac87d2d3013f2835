"""The APIs under load and attack: an in-process server (uvicorn in a thread, Gradio page mounted) with
three logins (carol is an admin), the tiny SD1 model, 64x64 images and 1-2 steps.

Fair queue, ownership of jobs, a failing job, logins on every route (API, files, Gradio's own), path
traversal, cross-site requests and fuzzed payloads.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import re
import shutil
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import app as appmod
from modules.auth import is_public_page_path
from tests.server_helpers import serve_in_thread
from tests.tiny_checkpoints import tiny_checkpoint_path

USERS = {"alice": "apw", "bob": "bpw", "carol": "cpw"}
SECRET = "TOP-SECRET-NOT-IN-OUTPUTS-7f3a"


@dataclass
class Server:
    app: Any
    server: Any
    port: int
    data_dir: Path
    order: list[str]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def post(self, path: str, user: str | None, payload: Any = None, **kwargs) -> requests.Response:
        auth = (user, USERS[user]) if user else None
        return requests.post(self.url(path), json=payload, auth=auth, timeout=120, **kwargs)

    def get(self, path: str, user: str | None, **kwargs) -> requests.Response:
        auth = (user, USERS[user]) if user else None
        return requests.get(self.url(path), auth=auth, timeout=60, **kwargs)

    def delete(self, path: str, user: str | None) -> requests.Response:
        return requests.delete(self.url(path), auth=(user, USERS[user]) if user else None, timeout=60)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    data = tmp_path_factory.mktemp("queue")
    (data / "models" / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(tiny_checkpoint_path("sd1"), data / "models" / "Stable-diffusion" / "tiny.safetensors")
    (data / "secret.txt").write_text(SECRET)
    (data / "outputs").mkdir()
    (data / "outputs" / "kept.png").write_bytes(_png_bytes())
    (data / "outputs" / "link.png").symlink_to(data / "secret.txt")
    logins = ",".join(f"{u}:{p}" for u, p in USERS.items())
    args = appmod.build_parser().parse_args(["--data-dir", str(data), "--api", "--auth", logins,
                                             "--admin-users", "carol", "--max-steps", "40", "--max-images", "16"])
    app = appmod.App(args=args, paths=appmod.Paths.from_args(args), logins=dict(USERS))
    app.load_initial_model()
    order: list[str] = []

    def record_and_fail(params):
        order.append(params.prompts[0])
        if params.prompts[0] == "boom":
            raise RuntimeError("injected fault")

    app.hooks.register("before_prompt_parse", record_and_fail, extension="fault-injector")
    app.queue.start()
    server = appmod.create_server(app)
    serving = serve_in_thread(server)
    try:
        yield Server(app, server, serving.port, data, order)
    finally:
        serving.stop()
        app.queue.shutdown(wait=5)


def _png_bytes(color=(10, 20, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _wait_until(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


def _tiny(prompt: str, seed: int, **extra) -> dict:
    return {"prompt": prompt, "seed": seed, "steps": 1, "width": 64, "height": 64, "sampler_name": "Euler", **extra}


# ---------------------------------------------------------------------------------------------
# fairness and isolation

def test_thirty_concurrent_requests_from_three_users_served_round_robin(srv):
    users = list(USERS)
    requests_ = [(user, i, 1000 + 10 * n + i) for i in range(10) for n, user in enumerate(users)]
    srv.order.clear()
    lock = srv.app.models.lock
    lock.acquire()  # the worker blocks on the model, so all thirty are queued before the first runs
    released = False
    try:
        with ThreadPoolExecutor(len(requests_)) as pool:
            futures = [pool.submit(srv.post, "/sdapi/v1/txt2img", user, _tiny(f"{user}-{i}", seed))
                       for user, i, seed in requests_]
            queue = srv.app.queue
            _wait_until(lambda: len(queue.order()) + (queue.running() is not None) == len(requests_))
            lock.release()
            released = True
            responses = [f.result() for f in futures]
    finally:
        if not released:
            lock.release()

    pixels = set()
    for (user, i, seed), response in zip(requests_, responses):
        assert response.status_code == 200, response.text
        body = response.json()
        info = json.loads(body["info"])
        assert info["all_seeds"] == [seed]
        assert info["infotexts"][0].startswith(f"{user}-{i}\n")
        image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
        assert f"Seed: {seed}," in image.info["parameters"]
        pixels.add(np.asarray(image).tobytes())
    assert len(pixels) == len(requests_)  # every request got its own image

    served = [prompt.split("-")[0] for prompt in srv.order]
    print("served in order:", " ".join(served))
    assert len(served) == len(requests_)
    # Round robin: at no point is any user two jobs ahead of another, including the first job's user,
    # who was alone in the queue when the worker took it (newcomers go before the user served last).
    counts: Counter = Counter()
    for user in served:
        counts[user] += 1
        assert max(counts[u] for u in users) - min(counts[u] for u in users) <= 1, served


def test_a_user_cannot_see_or_cancel_another_users_job(srv):
    lock = srv.app.models.lock
    lock.acquire()
    try:
        first = srv.post("/api/v1/jobs", "bob", _tiny("bob-first", 1)).json()["id"]
        second = srv.post("/api/v1/jobs", "bob", _tiny("bob-second", 2))
        assert second.status_code == 202
        second_id = second.json()["id"]
        _wait_until(lambda: srv.app.queue.running() is not None)
        for job_id in (first, second_id):
            for path in (f"/api/v1/jobs/{job_id}", f"/api/v1/jobs/{job_id}/result", f"/api/v1/jobs/{job_id}/events",
                         f"/api/v1/jobs/{job_id}/images/0"):
                assert srv.get(path, "alice").status_code == 404
            assert srv.delete(f"/api/v1/jobs/{job_id}", "alice").status_code == 404
        # the answer for someone else's job is the answer for a job that does not exist
        mine = srv.get(f"/api/v1/jobs/{second_id}", "alice").json()
        none = srv.get("/api/v1/jobs/" + "0" * 32, "alice").json()
        assert mine["detail"].replace(second_id, "X") == none["detail"].replace("0" * 32, "X")
        # A1111 routes act on the caller's own job only
        assert srv.post("/sdapi/v1/interrupt", "alice").status_code == 200
        assert srv.post("/sdapi/v1/skip", "alice").status_code == 200
        assert srv.get("/sdapi/v1/progress", "alice").json()["state"]["job_count"] == 0
        assert srv.get("/sdapi/v1/progress", "bob").json()["state"]["job_count"] == 1
        alices = srv.get("/api/v1/jobs", "alice").json()
        assert {first, second_id}.isdisjoint(j["id"] for j in alices) and {j["owner"] for j in alices} <= {"user:alice"}
        assert {first, second_id} <= {j["id"] for j in srv.get("/api/v1/jobs", "bob").json()}
        # ?all=true is for admins only
        assert {j["owner"] for j in srv.get("/api/v1/jobs?all=true", "alice").json()} <= {"user:alice"}
        assert {first, second_id} <= {j["id"] for j in srv.get("/api/v1/jobs?all=true", "carol").json()}
        assert srv.get(f"/api/v1/jobs/{second_id}", "carol").status_code == 200
        assert srv.get(f"/api/v1/jobs/{second_id}", "bob").json()["position"] == 1
        cancelled = srv.delete(f"/api/v1/jobs/{second_id}", "bob")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    finally:
        lock.release()
    job = srv.app.queue.get(first)
    assert job.wait(30) and job.status == "done" and not job.control.interrupted.is_set()
    result = srv.get(f"/api/v1/jobs/{first}/result", "bob").json()
    assert result["status"] == "done" and result["seeds"] == [1] and len(result["images"]) == 1
    image = srv.get(f"/api/v1/jobs/{first}/images/0", "bob")
    assert image.headers["content-type"] == "image/png"
    assert "Seed: 1," in Image.open(io.BytesIO(image.content)).info["parameters"]


def test_events_stream_progress_then_end(srv):
    job_id = srv.post("/api/v1/jobs", "alice", _tiny("streamed", 5, steps=10)).json()["id"]
    with requests.get(srv.url(f"/api/v1/jobs/{job_id}/events"), auth=("alice", USERS["alice"]), stream=True,
                      timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = []
        for block in response.iter_content(chunk_size=None, decode_unicode=True):
            events.append(block)
        text = "".join(events)
    kinds = re.findall(r"^event: (\w+)$", text, flags=re.M)
    assert kinds[-1] == "end" and "progress" in kinds
    last = json.loads(text.strip().split("data: ")[-1])
    assert last["status"] == "done" and last["progress"] == 1.0 and last["steps"] == 10


def test_a_failing_job_fails_alone(srv):
    boom = srv.post("/sdapi/v1/txt2img", "alice", _tiny("boom", 1))
    assert boom.status_code == 500
    assert "fault-injector" in boom.json()["detail"] and "injected fault" in boom.json()["detail"]
    fine = srv.post("/sdapi/v1/txt2img", "alice", _tiny("fine", 2))
    assert fine.status_code == 200
    job_id = srv.post("/api/v1/jobs", "bob", _tiny("boom", 3)).json()["id"]
    _wait_until(lambda: srv.app.queue.get(job_id).done.is_set())
    status = srv.get(f"/api/v1/jobs/{job_id}", "bob").json()
    assert status["status"] == "failed" and "injected fault" in status["error"]
    assert srv.post("/sdapi/v1/txt2img", "bob", _tiny("after", 4)).status_code == 200


# ---------------------------------------------------------------------------------------------
# logins on every route

def _routes(routes, prefix=""):
    from starlette.routing import Mount

    for route in routes:
        if isinstance(route, Mount):
            yield from _routes(getattr(route.app, "routes", []), prefix + route.path)
        elif hasattr(route, "effective_candidates"):  # FastAPI's included routers (Gradio's /gradio_api)
            yield from _routes(route.effective_candidates(), prefix)
        elif getattr(route, "path", None):
            yield prefix + route.path, set(getattr(route, "methods", None) or {"GET"})


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def test_every_route_needs_a_login(srv):
    routes = sorted(set((_concrete(p), m) for p, methods in _routes(srv.server.routes) for m in methods
                        if m != "HEAD"))
    assert any(p.startswith("/gradio_api/queue") for p, _ in routes)  # the Gradio routes were found
    assert ("/sdapi/v1/progress", "GET") in routes and ("/outputs/x", "GET") in routes
    public = []
    for path, method in routes:
        response = requests.request(method, srv.url(path), timeout=30, json={} if method == "POST" else None)
        if is_public_page_path(path):
            public.append(path)
            continue
        assert response.status_code == 401, f"{method} {path} answered {response.status_code} without a login"
        wrong = requests.request(method, srv.url(path), timeout=30, auth=("alice", "wrong"))
        assert wrong.status_code == 401, f"{method} {path} accepted a wrong password"
    # what is open is the login page and its static files: the page carries no components
    page = requests.get(srv.url("/"), timeout=30).text
    assert '"auth_required":true' in page.replace(" ", "") and "txt2img_prompt" not in page
    assert set(public) <= {"/", "/login", "/login/", "/logout", "/favicon.ico", "/theme.css", "/robots.txt",
                           "/manifest.json", "/pwa_icon", "/pwa_icon/x", "/gradio_api/theme.css",
                           "/gradio_api/login_check", "/gradio_api/login_check/", "/static/x", "/assets/x",
                           "/svelte/x"}
    # API routes take Basic credentials
    assert srv.get("/sdapi/v1/options", "alice").status_code == 200
    assert srv.get("/openapi.json", "alice").status_code == 200


def test_a_browser_session_reaches_the_page_but_not_the_api(srv):
    session = requests.Session()
    assert session.post(srv.url("/login"), data={"username": "alice", "password": "wrong"}, timeout=30).status_code == 400
    assert session.post(srv.url("/login"), data={"username": "alice", "password": USERS["alice"]},
                        timeout=30).status_code == 200
    assert session.get(srv.url("/config"), timeout=30).status_code == 200
    assert session.get(srv.url("/gradio_api/queue/status"), timeout=30).status_code != 401
    # the Gradio cookie is no key to the API (a page on another site could make the browser send it)
    assert session.get(srv.url("/sdapi/v1/options"), timeout=30).status_code == 401
    assert session.post(srv.url("/api/v1/jobs"), json=_tiny("x", 1), timeout=30).status_code == 401
    assert session.get(srv.url("/outputs/kept.png"), timeout=30).status_code == 401


def test_cross_site_requests_are_refused(srv):
    evil = {"Origin": "http://evil.example"}
    assert srv.post("/sdapi/v1/options", "carol", {"send_seed": False}, headers=evil).status_code == 403
    assert srv.post("/sdapi/v1/interrupt", "alice", headers={"Origin": "null"}).status_code == 403
    same = {"Origin": f"http://127.0.0.1:{srv.port}"}
    assert srv.post("/sdapi/v1/interrupt", "alice", headers=same).status_code == 200
    assert srv.get("/sdapi/v1/options", "alice", headers=evil).status_code == 200  # reads are not mutations
    assert "access-control-allow-origin" not in {k.lower() for k in srv.get("/sdapi/v1/options", "alice",
                                                                            headers=evil).headers}
    # Gradio would let pages on any localhost port read its routes; without --cors-allow-origins nobody may
    session = requests.Session()
    session.post(srv.url("/login"), data={"username": "alice", "password": USERS["alice"]}, timeout=30)
    local_page = {"Origin": "http://localhost:3000"}
    config = session.get(srv.url("/config"), headers=local_page, timeout=30)
    assert config.status_code == 200
    preflight = session.options(srv.url("/gradio_api/info"), timeout=30,
                                headers={**local_page, "Access-Control-Request-Method": "GET"})
    for response in (config, preflight):
        assert not any(k.lower().startswith("access-control-allow") for k in response.headers)


def test_settings_are_for_admins_and_never_paths(srv):
    assert srv.post("/sdapi/v1/options", "alice", {"send_seed": False}).status_code == 403
    refused = srv.post("/sdapi/v1/options", "carol", {"outdir_samples": "/tmp/elsewhere"})
    assert refused.status_code == 403 and "outdir_samples" in refused.json()["detail"]
    unknown = srv.post("/sdapi/v1/options", "carol", {"sd_model_checkpoint": "missing.safetensors"})
    assert unknown.status_code == 422 and "sd_model_checkpoint" in unknown.json()["errors"]
    per_request = srv.post("/sdapi/v1/txt2img", "alice", _tiny("x", 1, override_settings={"outdir_samples": "/tmp"}))
    assert per_request.status_code == 403
    assert srv.app.opts.get("outdir_samples") == ""


# ---------------------------------------------------------------------------------------------
# files

TRAVERSALS = ["../secret.txt", "%2e%2e/secret.txt", "%2E%2E%2Fsecret.txt", "..%2fsecret.txt", "..%5csecret.txt",
              "..\\secret.txt", "/etc/passwd", "%2fetc%2fpasswd", "....//secret.txt", "./../secret.txt",
              "sub/../../secret.txt", "C:/Windows/win.ini", "C:%5cWindows%5cwin.ini", "%00../secret.txt",
              "link.png", "..%252fsecret.txt", "~/secret.txt", "%2e%2e%2f%2e%2e%2fsecret.txt"]


def _raw_get(port: int, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest("GET", target, skip_accept_encoding=True)
        for key, value in headers.items():
            connection.putheader(key, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_traversal_never_reads_outside_outputs(srv):
    basic = {"Authorization": "Basic " + base64.b64encode(b"carol:" + USERS["carol"].encode()).decode()}
    status, body = _raw_get(srv.port, "/outputs/kept.png", basic)
    assert status == 200 and body == _png_bytes()
    session = requests.Session()
    session.post(srv.url("/login"), data={"username": "carol", "password": USERS["carol"]}, timeout=30)
    cookie = {"Cookie": "; ".join(f"{c.name}={c.value}" for c in session.cookies)}
    for attempt in TRAVERSALS:
        for prefix, headers in (("/outputs/", basic), ("/gradio_api/file=", cookie), ("/file=", cookie),
                                ("/gradio_api/file/", cookie), ("/static/", {}), ("/assets/", {})):
            status, body = _raw_get(srv.port, prefix + attempt, headers)
            assert SECRET.encode() not in body, f"{prefix}{attempt} leaked a file outside outputs"
            assert b"root:" not in body
            if prefix == "/outputs/":
                assert status == 404, f"{prefix}{attempt} -> {status}"
    # outputs hold every user's images: only admins may list files there
    alice = {"Authorization": "Basic " + base64.b64encode(b"alice:" + USERS["alice"].encode()).decode()}
    assert _raw_get(srv.port, "/outputs/kept.png", alice)[0] == 404


# ---------------------------------------------------------------------------------------------
# fuzzed payloads

_junk = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10 ** 30), max_value=10 ** 30),
                  st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
                  st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
_small_ints = st.sampled_from([1, 2, 0, -1, 7, 63, 64, 10 ** 12, 2 ** 63])
_broken_images = st.sampled_from(["", "!!!!", "aGVsbG8=", "data:image/png;base64,AAAA", "data:text/plain;base64,aGk=",
                                  "https://example.com/x.png", "http://127.0.0.1/x.png",
                                  base64.b64encode(_png_bytes())[:40].decode(), 12, None, ["x"]])


@st.composite
def _payloads(draw):
    route = draw(st.sampled_from(["/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/png-info", "/api/v1/jobs",
                                  "/sdapi/v1/options"]))
    payload: dict[str, Any] = {"steps": draw(st.sampled_from([1, 2])), "width": 64, "height": 64}
    for key in draw(st.lists(st.sampled_from(["steps", "width", "height", "batch_size", "n_iter", "seed",
                                              "cfg_scale", "sampler_name", "prompt", "denoising_strength",
                                              "override_settings", "styles", "subseed_strength"]),
                             min_size=1, max_size=3, unique=True)):
        payload[key] = draw(st.one_of(_junk, _small_ints))
    if route in ("/sdapi/v1/img2img", "/sdapi/v1/png-info"):
        payload["init_images" if route.endswith("img2img") else "image"] = (
            draw(st.lists(_broken_images, min_size=0, max_size=2)) if route.endswith("img2img")
            else draw(_broken_images))
    if draw(st.booleans()):
        payload.pop(draw(st.sampled_from(sorted(payload))), None)  # a missing field
    body = payload if draw(st.integers(0, 9)) else draw(st.sampled_from([[], "x", 3, None]))
    return route, body


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(case=_payloads())
def test_fuzzed_payloads_get_4xx_naming_the_field_never_500(srv, case):
    route, body = case
    user = "carol" if route.endswith("options") else "alice"
    if route.endswith("options") and isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ("steps", "width", "height")} | {"send_seed": body.get("steps")}
    response = srv.post(route, user, body)
    assert response.status_code < 500, (route, body, response.text)
    if response.status_code >= 400:
        error = response.json()
        assert set(error) >= {"error", "detail", "body", "errors"}
        if response.status_code == 422:
            assert isinstance(error["detail"], list) and error["detail"][0]["loc"][0] == "body"
            assert error["errors"]


def test_broken_bodies_and_huge_uploads(srv):
    raw = requests.post(srv.url("/sdapi/v1/txt2img"), data=b"{not json", auth=("alice", USERS["alice"]),
                        headers={"Content-Type": "application/json"}, timeout=30)
    assert raw.status_code == 422
    deep = requests.post(srv.url("/sdapi/v1/txt2img"), data=b"[" * 50_000, auth=("alice", USERS["alice"]),
                         headers={"Content-Type": "application/json"}, timeout=30)
    assert 400 <= deep.status_code < 500
    huge = "A" * int(srv.app.args.max_upload_mb * 1024 * 1024 * 4 / 3 + 4096)
    too_big = srv.post("/sdapi/v1/png-info", "alice", {"image": huge})
    assert too_big.status_code == 413 and too_big.json()["detail"][0]["loc"] == ["body", "image"]
    # a PNG header claiming 100000 x 100000 pixels is refused before any pixel is decompressed
    bomb = bytearray(_png_bytes())
    bomb[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width and height
    bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")  # a valid chunk checksum
    refused = srv.post("/sdapi/v1/png-info", "alice", {"image": base64.b64encode(bytes(bomb)).decode()})
    assert refused.status_code in (413, 422) and refused.json()["detail"][0]["loc"] == ["body", "image"]
    over = srv.post("/sdapi/v1/txt2img", "alice", _tiny("x", 1, steps=41))
    assert over.status_code == 422 and over.json()["detail"][0]["loc"] == ["body", "steps"]
    many = srv.post("/sdapi/v1/txt2img", "alice", _tiny("x", 1, batch_size=20, n_iter=6))
    assert many.status_code == 422 and many.json()["detail"][0]["loc"] == ["body", "batch_size"]
    wide = srv.post("/sdapi/v1/txt2img", "alice", _tiny("x", 1, width=4096, height=4096))
    assert wide.status_code == 422 and wide.json()["detail"][0]["loc"] == ["body", "width"]
    script = srv.post("/sdapi/v1/txt2img", "alice", _tiny("x", 1, script_name="no such script"))
    assert script.status_code == 422 and script.json()["detail"][0]["loc"] == ["body", "script_name"]
    always = srv.post("/sdapi/v1/txt2img", "alice", _tiny("x", 1, alwayson_scripts={"Nope": {"args": []}}))
    assert always.status_code == 422 and always.json()["detail"][0]["loc"] == ["body", "alwayson_scripts", "Nope"]
    sampler = srv.post("/sdapi/v1/txt2img", "alice", _tiny("x", 1, sampler_name="Euler z"))
    assert sampler.status_code == 422 and "Valid samplers" in sampler.json()["errors"]
    url = srv.post("/sdapi/v1/img2img", "alice", _tiny("x", 1, init_images=["https://example.com/a.png"]))
    assert url.status_code == 422 and "not fetched" in url.json()["errors"]
    assert url.json()["detail"][0]["loc"] == ["body", "init_images", 0]


# ---------------------------------------------------------------------------------------------
# the pieces, without a server

def test_origin_check_compares_scheme_host_and_port():
    from modules.auth import origin_allowed

    assert origin_allowed("http://127.0.0.1:7860", "127.0.0.1:7860")
    assert origin_allowed("https://studio.lan", "studio.lan:443")
    assert origin_allowed("http://[::1]:7860", "[::1]:7860")
    assert not origin_allowed("http://127.0.0.1:7861", "127.0.0.1:7860")
    assert not origin_allowed("http://evil.example", "127.0.0.1:7860")
    assert not origin_allowed("null", "127.0.0.1:7860")
    assert not origin_allowed("file://", "127.0.0.1:7860")
    assert origin_allowed("https://app.example", "127.0.0.1:7860", allowed=("https://app.example",))
    assert origin_allowed("https://a.example", "x", allowed_regex=r"https://\w+\.example")


def test_logins_and_basic_credentials():
    from modules.auth import AuthConfig, parse_basic_authorization

    auth = AuthConfig({"alice": "pa:ss", "bob": "x"}, frozenset({"bob"}))
    header = "Basic " + base64.b64encode("alice:pa:ss".encode()).decode()
    assert parse_basic_authorization(header) == ("alice", "pa:ss")
    assert auth.verify(*parse_basic_authorization(header))
    assert not auth.verify("alice", "pa:s") and not auth.verify("bob", "pa:ss") and not auth.verify("", "")
    assert parse_basic_authorization("Bearer abc") is None and parse_basic_authorization("Basic !!!") is None
    assert auth.is_admin("bob") and not auth.is_admin("alice") and not auth.is_admin(None)
    assert AuthConfig({}).is_admin(None)  # without logins the local user owns everything


def test_flag_mistakes_stop_the_start_with_the_flag_named(tmp_path, capsys):
    assert appmod.main(["--data-dir", str(tmp_path), "--auth", "a:b", "--admin-users", "zed"]) == 2
    assert "--admin-users" in capsys.readouterr().err
    assert appmod.main(["--data-dir", str(tmp_path), "--tls-keyfile", str(tmp_path / "key.pem")]) == 2
    assert "--tls-certfile" in capsys.readouterr().err
