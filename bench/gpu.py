"""GPU benchmark: SD1.5-size model (random weights), our path vs raw diffusers, in the same run.

SD1.5's real UNet / VAE / text-encoder configs (shipped in modules/model_configs/sd1) with random
weights, fp16 on CUDA, 512x512, 20 steps Euler, CFG 7, batch 1 and 8. For each batch size both paths
run alternately; prints it/s (sampling steps per second) and the ratio ours/diffusers.

    .venv/bin/python bench/gpu.py                      # on a CUDA machine
    .venv/bin/python bench/gpu.py --device cpu --size 64 --steps 2 --batches 1 --runs 1   # smoke test

Record the figures with the card's name in bench/RESULTS.md.
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


def build_full_size(device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from modules import model_loader
    from modules.model_families import FAMILIES, ModelComponents, build_tokenizers, resolved_configs

    family = FAMILIES["sd1"]
    configs = resolved_configs(family)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(configs["unet/config.json"])
    vae = AutoencoderKL.from_config(configs["vae/config.json"])
    text = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder/config.json"]))
    components = ModelComponents(unet=unet, vae=vae, text_encoders=[text], tokenizers=build_tokenizers(family))
    model = model_loader.load_from_components(family, components)
    model.pipeline.to(device=device, dtype=dtype)
    for module in (model.unet, model.vae, text):
        module.eval()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from modules.model_manager import ModelRef
    from modules.options import Options
    from modules.processing import ProcessingContext, process_txt2img
    from modules.plan import make_plan
    from modules.request import GenerationRequest

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        card = torch.cuda.get_device_name(device)
    else:
        card = "CPU"
    model = build_full_size(device, dtype)
    p = model.pipeline
    pipe = StableDiffusionPipeline(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet,
                                   scheduler=EulerDiscreteScheduler.from_config(model.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    opts = Options(None).snapshot({"live_previews_enable": False})

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    print(f"{card}: SD1.5-size random weights, {str(dtype).replace('torch.', '')}, {args.size}x{args.size}, "
          f"{args.steps} steps Euler, CFG 7")
    with tempfile.TemporaryDirectory() as tmp:
        for batch in [int(b) for b in args.batches.split(",")]:
            req = GenerationRequest(prompt="a photo of a cat", negative_prompt="blurry", sampler_name="Euler",
                                    scheduler="Uniform", steps=args.steps, width=args.size, height=args.size,
                                    batch_size=batch, seed=1, save_images=False)

            def ours() -> float:
                ctx = ProcessingContext(model=model, model_ref=ModelRef("bench", None), opts=opts, device=device,
                                        dtype=dtype, outputs_dir=Path(tmp))
                sync()
                start = time.perf_counter()
                process_txt2img(make_plan(req), ctx)
                sync()
                return time.perf_counter() - start

            def baseline() -> float:
                sync()
                start = time.perf_counter()
                pipe(req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=args.steps,
                     guidance_scale=7.0, height=args.size, width=args.size, num_images_per_prompt=batch,
                     generator=torch.Generator(device).manual_seed(1), output_type="pil")
                sync()
                return time.perf_counter() - start

            ours(), baseline()  # warm-up (kernels, allocator)
            t_ours, t_base = [], []
            for _ in range(args.runs):
                t_ours.append(ours())
                t_base.append(baseline())
            mo, mb = statistics.median(t_ours), statistics.median(t_base)
            print(f"  batch {batch}: athanor {args.steps / mo:7.2f} it/s ({mo:.2f} s), "
                  f"diffusers {args.steps / mb:7.2f} it/s ({mb:.2f} s), ratio time ours/diffusers {mo / mb:.3f}")


if __name__ == "__main__":
    main()
