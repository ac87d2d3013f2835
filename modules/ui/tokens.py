"""The token counter on the prompt boxes: `count/75·k`, counted the way A1111 does.

Extra-network tags are removed, the positive prompt is split on AND, each prompt-editing schedule entry is
counted and the longest wins, so the counter shows the worst chunk count any step will see. Only the tokenizer
is used (no model lock), so counting never waits for a running generation.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Mapping

from modules import extra_networks, prompt_parser

CHUNK = 75


def prompts_to_count(text: str, steps: int, *, is_positive: bool = True) -> list[str]:
    """Every text the encoder will see for this prompt over `steps` steps (A1111's update_token_counter)."""
    try:
        text, _ = extra_networks.parse_prompt(text)
        flat = [t for t, _ in prompt_parser.split_and(text)] if is_positive else [text]
        schedules = prompt_parser.get_learned_conditioning_prompt_schedules(flat, max(1, int(steps)))
    except Exception:  # noqa: BLE001 - a half-typed prompt must still get a count
        schedules = [[[steps, text]]]
    return [entry_text for schedule in schedules for _, entry_text in schedule] or [text]


def format_count(count: int, capacity: int) -> str:
    return f"{count}/{capacity}"


def count_tokens(text: str, steps: int, token_count: Callable[[str], tuple[int, int]], *,
                 is_positive: bool = True) -> tuple[int, int]:
    """(tokens, capacity) of the longest scheduled prompt; capacity is 75 times the number of chunks."""
    return max((token_count(p) for p in prompts_to_count(text, steps, is_positive=is_positive)),
               key=lambda pair: pair[0])


class TokenCounter:
    """Counts with the active model's tokenizer; the PromptEncoder is rebuilt only when the model changes."""

    def __init__(self, models: Any, opts: Any):
        self._models = models
        self._opts = opts
        self._lock = threading.Lock()
        self._encoder: Any = None
        self._encoder_key: tuple | None = None

    def _encoder_for(self, settings: Mapping[str, Any]):
        from modules.conditioning import PromptEncoder

        active = self._models.active
        if active is None:
            return None
        key = (id(active.model), settings.get("emphasis"), settings.get("comma_padding_backtrack"))
        with self._lock:
            if key != self._encoder_key:
                self._encoder = PromptEncoder(active.model, settings, device=None, dtype=None)
                self._encoder_key = key
            return self._encoder

    def __call__(self, text: str, steps: int = 20, *, is_positive: bool = True) -> str:
        settings = self._opts.snapshot()
        encoder = self._encoder_for(settings)
        if encoder is None:
            return format_count(0, CHUNK)
        with self._lock:
            for attempt in range(3):
                try:
                    count, capacity = count_tokens(text or "", steps, encoder.token_count, is_positive=is_positive)
                    break
                except RuntimeError:
                    # A Rust tokenizer in use by the job thread says "Already borrowed": try again shortly.
                    if attempt == 2:
                        raise
                    threading.Event().wait(0.02)
        return format_count(count, capacity)
