"""Speed of the prompt parser: schedules (editing + alternation) and emphasis parsing per prompt.

Two prompts: (a) about 200-250 CLIP tokens with edits, alternations, nested weights and BREAK; (b) 200
comma-separated tags, some weighted. For each, two timings: parsing and scheduling the prompt
(``get_learned_conditioning_prompt_schedules``), and that plus the emphasis parse of every scheduled text
(``parse_prompt_attention``), which is what the conditioning code does per prompt. Prints the median time per prompt
in ms and its ratio to the 2 ms target (A1111's Earley parser takes about 178 ms on a prompt like (a)).

    .venv/bin/python bench/prompt_parser.py [--runs 300] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.prompt_parser import get_learned_conditioning_prompt_schedules, parse_prompt_attention  # noqa: E402

TARGET_MS = 2.0

_SCENE = (
    "masterpiece, best quality, (ultra detailed:1.2), a [young:old:0.4] [wizard|witch] standing on a "
    "[rocky cliff:grassy hill:8] above a ((stormy sea)), [lightning:0.6], glowing [blue|purple|green] runes, "
    "(flowing robes:1.1), [[dramatic]] lighting, [a:[raven:owl:12]:4] on the shoulder, \\(signed\\), "
    "cinematic composition, volumetric fog BREAK sharp focus, intricate details, [ornate staff::0.8], "
    "(glowing eyes:1.3), [wind-swept:calm:0.5] hair, "
)
EDITED_PROMPT = _SCENE * 2  # ~200 CLIP tokens
TAG_PROMPT = ", ".join(f"(tag{i}:1.1)" if i % 10 == 0 else f"tag number {i}" for i in range(200))


def time_per_prompt_ms(prompt: str, steps: int, runs: int, with_emphasis: bool) -> tuple[float, int]:
    samples = []
    entries = 0
    for _ in range(runs):
        start = time.perf_counter()
        schedule = get_learned_conditioning_prompt_schedules([prompt], steps)[0]
        if with_emphasis:
            for _, text in schedule:
                parse_prompt_attention(text)
        samples.append((time.perf_counter() - start) * 1000)
        entries = len(schedule)
    return statistics.median(samples), entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    prompts = [("(a) ~200-token prompt with edits", EDITED_PROMPT), ("(b) 200 comma-separated tags", TAG_PROMPT)]
    for name, prompt in prompts:
        time_per_prompt_ms(prompt, args.steps, 20, with_emphasis=True)  # warm-up
        for label, with_emphasis in [("schedule", False), ("schedule + emphasis", True)]:
            median_ms, entries = time_per_prompt_ms(prompt, args.steps, args.runs, with_emphasis)
            print(
                f"{name} ({len(prompt)} chars, {entries} schedule entries at {args.steps} steps), {label}: "
                f"median {median_ms:.3f} ms per prompt, target {TARGET_MS} ms, "
                f"ratio to target {median_ms / TARGET_MS:.2f}"
            )


if __name__ == "__main__":
    main()
