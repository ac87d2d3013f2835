"""Overhead of Athanor's job path against a plain diffusers pipeline on the same tiny model.

Both sides use the same UNet, VAE and text encoder modules (the tiny SD1 model, loaded from a
single-file checkpoint written to a temporary folder), the same size, steps and sampler (Euler,
CFG 7). Runs alternate to cancel drift; the median ratio ours/diffusers is printed (target <= 1.10).

    .venv/bin/python bench/overhead.py [--runs 15] [--steps 20] [--size 128]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()

    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from modules import model_loader, tiny_models
    from modules.jobs import JobQueue
    from modules.model_manager import ModelRef
    from modules.options import Options
    from modules.processing import ProcessingContext, process_txt2img
    from modules.plan import make_plan
    from modules.request import GenerationRequest

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny-sd1.safetensors"
        tiny_models.write_tiny_checkpoint("sd1", path, seed=0)
        model = model_loader.load_checkpoint(path)

        opts = Options(None).snapshot({"live_previews_enable": False})

        def runner(job):
            ctx = ProcessingContext(model=model, model_ref=ModelRef("tiny-sd1", None), opts=opts,
                                    device=torch.device("cpu"), dtype=torch.float32, outputs_dir=Path(tmp),
                                    control=job.control, progress=job.progress)
            return process_txt2img(make_plan(job.request), ctx)

        queue = JobQueue(runner)
        queue.start()
        request = GenerationRequest(prompt="a photo of a cat, masterpiece", negative_prompt="blurry",
                                    sampler_name="Euler", scheduler="Uniform", steps=args.steps, cfg_scale=7.0,
                                    width=args.size, height=args.size, seed=1, save_images=False)

        p = model.pipeline
        pipe = StableDiffusionPipeline(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet,
                                       scheduler=EulerDiscreteScheduler.from_config(model.scheduler_config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)

        def ours() -> float:
            start = time.perf_counter()
            job = queue.submit(request, "bench")
            job.wait()
            if job.status != "done":
                raise RuntimeError(job.error)
            return time.perf_counter() - start

        def baseline() -> float:
            start = time.perf_counter()
            pipe(request.prompt, negative_prompt=request.negative_prompt, num_inference_steps=args.steps,
                 guidance_scale=7.0, height=args.size, width=args.size,
                 generator=torch.Generator().manual_seed(1), output_type="pil")
            return time.perf_counter() - start

        ours(), baseline()  # warm-up
        ratios, t_ours, t_base = [], [], []
        for _ in range(args.runs):
            a, b = ours(), baseline()
            t_ours.append(a)
            t_base.append(b)
            ratios.append(a / b)
        queue.shutdown()

    print(f"tiny SD1, {args.size}x{args.size}, {args.steps} steps Euler, CFG 7, CPU, {args.runs} alternating runs")
    print(f"  diffusers pipeline : median {statistics.median(t_base) * 1000:8.1f} ms")
    print(f"  athanor job path   : median {statistics.median(t_ours) * 1000:8.1f} ms")
    print(f"  ratio athanor/diffusers: median {statistics.median(ratios):.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
