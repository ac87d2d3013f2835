"""Extra network tags in prompts: ``<name:arg1:arg2...>`` (``<lora:NAME:0.8>``, ``<hypernet:NAME>``).

Pure text: the tags are found and removed here; which networks exist and what they do belongs to the hook
system. Names, signatures and return shapes follow A1111's ``modules/extra_networks.py`` because extensions
use them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Iterable, Sequence

# name is a word; the arguments are any text up to the first '>'
re_extra_net = re.compile(r"<(\w+):([^>]+)>")


class ExtraNetworkParams:
    """The arguments of one tag: ``<lora:NAME:0.8:te=1>`` gives ``items = ["NAME", "0.8", "te=1"]``.

    ``positional`` holds the items without a ``key=value`` form, ``named`` the others. As in A1111, an item
    with two or more '=' (``a=b=c``) counts as positional, and items that are not strings are positional.
    Two params are equal when their items are.
    """

    def __init__(self, items: Sequence[Any] | None = None) -> None:
        self.items: Sequence[Any] = items or []  # the caller's list itself, as in A1111
        self.positional: list[Any] = []
        self.named: dict[str, str] = {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExtraNetworkParams):
            return NotImplemented
        return self.items == other.items

    def __repr__(self) -> str:
        return f"ExtraNetworkParams(items={self.items!r})"


def parse_prompt(prompt: str) -> tuple[str, defaultdict[str, list[ExtraNetworkParams]]]:
    """Remove every ``<name:args>`` tag from the prompt; return the prompt and ``{name: [params, ...]}``.

    The tags are deleted, nothing else changes (the spaces around a tag stay). The dict is a ``defaultdict(list)``
    like A1111's, in order of first appearance; a name used twice gets two params.

    >>> text, nets = parse_prompt("a cat <lora:catstyle:0.8>")
    >>> text, nets["lora"][0].items
    ('a cat ', ['catstyle', '0.8'])
    """
    found: defaultdict[str, list[ExtraNetworkParams]] = defaultdict(list)

    def remove_tag(match: re.Match[str]) -> str:
        found[match.group(1)].append(ExtraNetworkParams(items=match.group(2).split(":")))
        return ""

    return re_extra_net.sub(remove_tag, prompt), found


def parse_prompts(
    prompts: Iterable[str],
) -> tuple[list[str], defaultdict[str, list[ExtraNetworkParams]] | None]:
    """Remove the tags from every prompt of a batch; the networks of the first prompt decide for the batch.

    Returns ``(cleaned prompts, networks of the first prompt)``; the networks are ``None`` for an empty batch,
    as in A1111.
    """
    cleaned: list[str] = []
    first_networks: defaultdict[str, list[ExtraNetworkParams]] | None = None
    for prompt in prompts:
        text, networks = parse_prompt(prompt)
        if first_networks is None:
            first_networks = networks
        cleaned.append(text)
    return cleaned, first_networks
