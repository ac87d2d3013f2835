"""Load on the A1111 API against the job path called in-process, same server, same run.

An App with the tiny SD1 checkpoint serves `/sdapi/v1` on a free loopback port (uvicorn in a thread).
N client threads each send R txt2img requests (size x size, a few steps, Euler, own seeds) over HTTP;
then the same N x R jobs go straight to `app.submit(...).wait()` from N threads. Rounds alternate
which path goes first, to cancel drift. Printed: throughput (images/s), p50/p95 latency of both,
and the ratio API throughput / in-process throughput (1.0 = the HTTP layer costs nothing).

    .venv/bin/python bench/api_load.py [--clients 8] [--requests 4] [--rounds 6] [--steps 2] [--size 64]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_clients(clients: int, per_client: int, one) -> tuple[float, list[float]]:
    """Run `one(client, i)` per_client times from each of `clients` threads; (wall seconds, latencies)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for i in range(per_client):
            started = time.perf_counter()
            one(c, i)
            with lock:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client, c) for c in range(clients)]:
            future.result()
    return time.perf_counter() - started, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    import requests
    import uvicorn

    import app as appmod
    from modules import tiny_models
    from modules.request import GenerationRequest

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        (data / "models" / "Stable-diffusion").mkdir(parents=True)
        tiny_models.write_tiny_checkpoint("sd1", data / "models" / "Stable-diffusion" / "tiny.safetensors", seed=0)
        flags = appmod.build_parser().parse_args(["--data-dir", tmp, "--nowebui", "--api", "--max-queued-per-user",
                                                  str(args.clients * args.requests + 10)])
        app = appmod.App(args=flags, paths=appmod.Paths.from_args(flags))
        app.load_initial_model()
        app.queue.start()
        server = appmod.create_server(app)
        port = free_port()
        uv = uvicorn.Server(uvicorn.Config(server, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=uv.run, daemon=True).start()
        while not uv.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"
        sessions = [requests.Session() for _ in range(args.clients)]

        def payload(c: int, i: int) -> dict:
            return {"prompt": "a photo of a cat", "steps": args.steps, "width": args.size, "height": args.size,
                    "sampler_name": "Euler", "seed": 1000 * c + i, "save_images": False}

        def over_http(c: int, i: int) -> None:
            response = sessions[c].post(url, json=payload(c, i), timeout=600)
            response.raise_for_status()
            assert len(response.json()["images"]) == 1

        def in_process(c: int, i: int) -> None:
            fields = payload(c, i)
            job = app.submit(GenerationRequest(**fields), f"client-{c}")
            job.wait()
            assert job.status == "done", job.error

        for c in range(min(2, args.clients)):  # warm up both paths
            over_http(c, 0)
            in_process(c, 0)

        api_lat: list[float] = []
        local_lat: list[float] = []
        api_images = local_images = 0
        api_wall = local_wall = 0.0
        ratios = []
        for round_no in range(args.rounds):
            # alternate which path goes first, so drift and neighbours' load hit both alike
            order = (over_http, in_process) if round_no % 2 == 0 else (in_process, over_http)
            rates = {}
            for one in order:
                wall, lat = run_clients(args.clients, args.requests, one)
                rates[one] = len(lat) / wall
                if one is over_http:
                    api_wall, api_lat, api_images = api_wall + wall, api_lat + lat, api_images + len(lat)
                else:
                    local_wall, local_lat, local_images = local_wall + wall, local_lat + lat, local_images + len(lat)
            ratios.append(rates[over_http] / rates[in_process])

        uv.should_exit = True
        app.queue.shutdown(wait=5)

    api_rate, local_rate = api_images / api_wall, local_images / local_wall
    print(f"{args.clients} clients x {args.requests} requests x {args.rounds} rounds, {args.size}x{args.size}, "
          f"{args.steps} steps, tiny SD1 model, {os.cpu_count()} CPUs")
    print(f"{'path':<12}{'images/s':>10}{'p50 ms':>10}{'p95 ms':>10}")
    for name, rate, lat in (("HTTP API", api_rate, api_lat), ("in-process", local_rate, local_lat)):
        print(f"{name:<12}{rate:>10.2f}{percentile(lat, 0.5) * 1000:>10.0f}{percentile(lat, 0.95) * 1000:>10.0f}")
    print(f"ratio API / in-process throughput: {api_rate / local_rate:.3f} overall, "
          f"{statistics.median(ratios):.3f} median of {len(ratios)} rounds")
    print(f"p50 latency API / in-process: {statistics.median(api_lat) / statistics.median(local_lat):.3f}")


if __name__ == "__main__":
    main()
