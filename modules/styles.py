"""Prompt styles: A1111's `styles.csv` (name, prompt, negative_prompt) and its merge rules.

Applying a style: when its text holds `{prompt}`, the user's prompt replaces that placeholder; otherwise the
style is appended as `prompt + ", " + style` (empty parts dropped). The negative prompt works the same way.
Pasting an infotext can take styles back out of a prompt (`extract_styles`), as A1111 does.
"""
from __future__ import annotations

import csv
import io
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

PLACEHOLDER = "{prompt}"
FIELDNAMES = ("name", "prompt", "negative_prompt")


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """One style applied to one prompt (A1111's `merge_prompts`)."""
    if PLACEHOLDER in style_prompt:
        return style_prompt.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply_styles(prompt: str, style_texts: Iterable[str]) -> str:
    """Apply style texts in order: each wraps the result of the previous ones."""
    for text in style_texts:
        prompt = merge_prompts(text, prompt)
    return prompt


def _extract_style_text(style_text: str, prompt: str) -> tuple[bool, str]:
    """Whether `prompt` is `style_text` applied to something, and that something."""
    stripped = prompt.strip()
    style = style_text.strip()
    if PLACEHOLDER in style:
        left, _, right = style.partition(PLACEHOLDER)
        if stripped.startswith(left) and stripped.endswith(right) and len(stripped) >= len(left) + len(right):
            return True, stripped[len(left):len(stripped) - len(right)]
        return False, prompt
    if stripped.endswith(style):
        rest = stripped[:len(stripped) - len(style)]
        if rest.endswith(", "):
            rest = rest[:-2]
        return True, rest
    return False, prompt


def extract_styles(styles: Sequence[PromptStyle], prompt: str, negative_prompt: str) -> tuple[list[str], str, str]:
    """Take styles back out of a prompt pair: (style names in application order, prompt, negative prompt).

    A style counts only when both its prompt and its negative prompt are found (A1111's rule). The last applied
    style is the outermost, so styles are peeled from the outside in and returned reversed.
    """
    remaining = [s for s in styles if s.prompt or s.negative_prompt]
    found: list[str] = []
    while True:
        for style in remaining:
            ok_pos, new_prompt = _extract_style_text(style.prompt, prompt)
            if not ok_pos:
                continue
            ok_neg, new_negative = _extract_style_text(style.negative_prompt, negative_prompt)
            if not ok_neg:
                continue
            prompt, negative_prompt = new_prompt, new_negative
            remaining.remove(style)
            found.append(style.name)
            break
        else:
            break
    return list(reversed(found)), prompt, negative_prompt


def parse_styles_csv(text: str) -> list[PromptStyle]:
    """Rows of a styles.csv text. A1111's older files call the prompt column `text`; rows without a name are skipped."""
    reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)
    out: dict[str, PromptStyle] = {}
    for row in reader:
        name = (row.get("name") or "").strip()
        if not name:
            continue
        prompt = row.get("prompt") if "prompt" in row else row.get("text", "")
        out[name] = PromptStyle(name, prompt or "", row.get("negative_prompt") or "")
    return list(out.values())


def format_styles_csv(styles: Iterable[PromptStyle]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDNAMES, lineterminator="\n")
    writer.writeheader()
    for style in styles:
        writer.writerow({"name": style.name, "prompt": style.prompt, "negative_prompt": style.negative_prompt})
    return buffer.getvalue()


class StyleDatabase:
    """The styles of one data dir. The file is read again when it changed on disk, so an edit by hand shows up."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._styles: list[PromptStyle] = []
        self._signature: tuple[float, int] | None = None

    def _reload_if_changed(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._styles, self._signature = [], None
            return
        signature = (stat.st_mtime, stat.st_size)
        if signature != self._signature:
            try:
                text = self.path.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"Could not read the styles file {self.path}: {exc}") from exc
            self._styles = parse_styles_csv(text)
            self._signature = signature

    def all(self) -> list[PromptStyle]:
        with self._lock:
            self._reload_if_changed()
            return list(self._styles)

    def names(self) -> list[str]:
        return [s.name for s in self.all()]

    def get(self, name: str) -> PromptStyle | None:
        return next((s for s in self.all() if s.name == name), None)

    def apply(self, names: Sequence[str], prompt: str, negative_prompt: str) -> tuple[str, str]:
        """(prompt, negative prompt) with the named styles applied in order; unknown names raise ValueError."""
        chosen = []
        known = {s.name: s for s in self.all()}
        for name in names:
            if name not in known:
                raise ValueError(f"Style {name!r} is not in {self.path.name}")
            chosen.append(known[name])
        return (apply_styles(prompt, [s.prompt for s in chosen]),
                apply_styles(negative_prompt, [s.negative_prompt for s in chosen]))

    def save(self, style: PromptStyle) -> None:
        """Add a style, or replace the one with the same name (its position is kept)."""
        if not style.name.strip():
            raise ValueError("A style needs a name")
        with self._lock:
            self._reload_if_changed()
            styles = [style if s.name == style.name else s for s in self._styles]
            if not any(s.name == style.name for s in self._styles):
                styles.append(style)
            self._write(styles)

    def delete(self, name: str) -> None:
        with self._lock:
            self._reload_if_changed()
            if not any(s.name == name for s in self._styles):
                raise ValueError(f"There is no style named {name!r}")
            self._write([s for s in self._styles if s.name != name])

    def _write(self, styles: list[PromptStyle]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".styles-", suffix=".tmp", dir=self.path.parent)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(format_styles_csv(styles))
        os.replace(tmp, self.path)
        self._styles = styles
        stat = self.path.stat()
        self._signature = (stat.st_mtime, stat.st_size)
