"""A1111's prompt language, as pure text functions (no torch, no model, no I/O).

Public functions keep A1111's names, signatures and return shapes, because extensions call them:

- ``get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None, use_old_scheduling=False)``
  gives, for each prompt, ``[[end_at_step, text], ...]`` (prompt editing ``[from:to:when]`` and alternation ``[a|b]``).
- ``parse_prompt_attention(text)`` gives ``[[text, weight], ...]`` with ``["BREAK", -1]`` markers.
- ``get_multicond_prompt_list(prompts)`` splits prompts on ``AND`` (composable diffusion).

Typed helpers for Athanor's own code: ``split_and``, ``prompt_schedule``, ``schedule_index_for_step``,
``scheduling_modes_differ``.

Where A1111 has no single answer: its grammar is ambiguous and Lark 1.1.2's Earley parser keeps the competing
parse trees in a plain ``set``, so for some prompts the reading changes with ``PYTHONHASHSEED``, from one process
to the next. In ``[cat:dog:0.5]))``, ``[a:3]::`` or ``x[:3]::`` the edit is sometimes an edit and sometimes
literal text. We always choose one reading: every bracket group that is well formed is structure. This is the
reading A1111's doctests show. In a differential fuzz against A1111's grammar under Lark 1.1.2 (4,000 prompts,
several hash seeds), every prompt where we differed from some seed was one whose A1111 reading changes with the
seed, and our reading was always one that A1111 gives under some seed.

Deliberate differences from A1111 (it raises on these; we never raise on prompt text):

- ``(a:1.2.3)`` (a weight that is not a float) raises ``ValueError`` in A1111. Here the weight is kept as text and
  the parenthesis counts as a plain one, exactly as for ``(a:b)``: ``[["a:1.2.3", 1.1]]``.
- ``[a:b:1e400]`` (a ``when`` that overflows to infinity) raises ``OverflowError`` in A1111. Here +inf means
  ``from`` for the whole pass and -inf means ``to`` from the start.
- Nesting deeper than Python's recursion limit: A1111's tree walk raises ``RecursionError``; our walks are
  iterative.

Everything else, including which malformed prompts come back as literal text, matches A1111 v1.10
(see modules/prompt_grammar.lark for how the unambiguous grammar reproduces A1111's ambiguous one).
"""

from __future__ import annotations

import math
import re
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Union

import lark
from lark import Token
from lark.exceptions import LarkError

GRAMMAR_PATH = Path(__file__).with_name("prompt_grammar.lark")


# ---------------------------------------------------------------------------------------------------------------
# Parse result: a prompt is a tuple of pieces; plain text is a str, edits and alternations are nodes.


@dataclass(frozen=True, slots=True)
class Scheduled:
    """``[before:after:when]`` (``before`` is empty for ``[after:when]``).

    ``when`` is the number exactly as written (stripped): whether it contains a '.' decides if it is a fraction
    of the steps or an absolute step, so the text matters, not only the value.
    """

    before: tuple["Piece", ...]
    after: tuple["Piece", ...]
    when: str


@dataclass(frozen=True, slots=True)
class Alternate:
    """``[a|b|...]``: step t uses ``options[(t - 1) % len(options)]``. Options may be empty (``[fe|]male``)."""

    options: tuple[tuple["Piece", ...], ...]


Piece = Union[str, Scheduled, Alternate]


@dataclass(frozen=True, slots=True)
class ParsedPrompt:
    """A prompt after parsing: its pieces plus what the step computation needs to know about them."""

    pieces: tuple[Piece, ...]
    whens: tuple[str, ...] = field(default=())  # every edit's number, in any branch (each adds a boundary)
    has_alternate: bool = False


@dataclass(frozen=True, slots=True)
class _Group:
    """A bracket pair whose text is kept as written: emphasis, or brackets that turned out to be literal.

    ``well_formed`` is False when A1111's grammar could not read the group as a prompt; its parent group then
    cannot be read either (A1111 allows literal brackets and colons only at the top level).
    """

    pieces: tuple[Piece, ...]
    well_formed: bool


class _Unparsable(LarkError):
    """A1111's grammar rejects the whole prompt (a '|' outside a well-formed alternation)."""


def _append_pieces(out: list[Piece], items: Iterable[object]) -> None:
    """Append items (tokens, groups, nodes) to ``out`` as pieces, merging adjacent text."""
    for item in items:
        if isinstance(item, str):  # a Token (any type: text, number, separator or stray bracket) is its text
            if out and type(out[-1]) is str:
                out[-1] += item
            else:
                out.append(str(item))
        elif isinstance(item, _Group):
            pieces = item.pieces
            if pieces and type(pieces[0]) is str and out and type(out[-1]) is str:
                out[-1] += pieces[0]
                out.extend(pieces[1:])
            else:
                out.extend(pieces)
        else:
            out.append(item)  # type: ignore[arg-type]


def _pieces(items: Iterable[object]) -> tuple[Piece, ...]:
    out: list[Piece] = []
    _append_pieces(out, items)
    return tuple(out)


def _split(items: Sequence[object], separator: str) -> list[list[object]]:
    """Split group content on separator tokens of one type ('COLON' or 'PIPE')."""
    parts: list[list[object]] = [[]]
    for item in items:
        if isinstance(item, Token) and item.type == separator:
            parts.append([])
        else:
            parts[-1].append(item)
    return parts


def _survey(content: Sequence[object]) -> tuple[int, int, bool]:
    """Count a group's own colons and pipes, and tell whether it holds anything A1111 keeps only at top level."""
    colons = pipes = 0
    broken = False
    for item in content:
        if isinstance(item, Token):
            kind = item.type
            if kind == "COLON":
                colons += 1
            elif kind == "PIPE":
                pipes += 1
            elif kind == "STRAY":
                broken = True
        elif isinstance(item, _Group) and not item.well_formed:
            broken = True
    return colons, pipes, broken


class PromptTransformer(lark.Transformer):
    """Decides what each bracket group means, as A1111's grammar would read it.

    A group is structure only if its whole content is well formed (no stray bracket, no literal group inside);
    otherwise its text is kept. A '|' is allowed only as the separator of a well-formed ``[a|b]``; anywhere else
    A1111's parse fails, and so the whole prompt becomes literal text.
    """

    def square(self, items: list[object]) -> Piece | _Group:
        content = items[1:-1]
        colons, pipes, broken = _survey(content)
        if pipes:
            if broken or colons:
                raise _Unparsable("'|' outside a well-formed alternation")
            return Alternate(tuple(_pieces(option) for option in _split(content, "PIPE")))
        if not broken and colons in (1, 2):
            last = content[-1]
            # The lexer makes a NUMBER only right after ':' and right before ']', so a NUMBER here is the
            # whole last segment.
            if isinstance(last, Token) and last.type == "NUMBER":
                segments = _split(content[:-1], "COLON")
                when = last.strip()
                if colons == 1:
                    return Scheduled((), _pieces(segments[0]), when)
                return Scheduled(_pieces(segments[0]), _pieces(segments[1]), when)
        return _Group(_pieces(items), well_formed=not broken and colons == 0)

    def round(self, items: list[object]) -> _Group:
        content = items[1:-1]
        colons, pipes, broken = _survey(content)
        if pipes:
            raise _Unparsable("'|' inside parentheses")
        # "(text)" and "(text:weight)" are emphasis, passed through verbatim; the weight is read later.
        return _Group(_pieces(items), well_formed=not broken and colons <= 1)

    def start(self, items: list[object]) -> ParsedPrompt:
        for item in items:
            if isinstance(item, Token) and item.type == "PIPE":
                raise _Unparsable("'|' outside brackets")
        pieces = _pieces(items)
        whens, has_alternate = _survey_nodes(pieces)
        return ParsedPrompt(pieces, whens, has_alternate)


def _survey_nodes(pieces: tuple[Piece, ...]) -> tuple[tuple[str, ...], bool]:
    """Every edit's number and whether any alternation exists, in any branch (iterative: nesting may be deep)."""
    whens: list[str] = []
    has_alternate = False
    stack: list[tuple[Piece, ...]] = [pieces]
    while stack:
        for piece in stack.pop():
            if type(piece) is Scheduled:
                whens.append(piece.when)
                stack.append(piece.before)
                stack.append(piece.after)
            elif type(piece) is Alternate:
                has_alternate = True
                stack.extend(piece.options)
    return tuple(whens), has_alternate


class BracketPairing:
    """Lark post-lexer: pairs brackets with a stack and re-types each bracket without a partner as STRAY.

    A closer pairs with the nearest open bracket of its kind; open brackets of the other kind above that one can
    never be closed well and become STRAY. This keeps the grammar LALR and unambiguous while treating unbalanced
    brackets as text, like A1111. Linear time.
    """

    always_accept: tuple[str, ...] = ()
    _OPENER_OF = {"RSQ": "LSQ", "RPAR": "LPAR"}

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        tokens = list(stream)
        open_at: list[int] = []  # indexes of open brackets, innermost last
        open_count = {"LSQ": 0, "LPAR": 0}
        for index, token in enumerate(tokens):
            kind = token.type
            if kind in open_count:
                open_at.append(index)
                open_count[kind] += 1
            elif kind in self._OPENER_OF:
                opener = self._OPENER_OF[kind]
                if not open_count[opener]:
                    tokens[index] = _stray(token)
                    continue
                while True:
                    top = open_at.pop()
                    open_count[tokens[top].type] -= 1
                    if tokens[top].type == opener:
                        break
                    tokens[top] = _stray(tokens[top])
        for index in open_at:
            tokens[index] = _stray(tokens[index])
        return iter(tokens)


def _stray(token: Token) -> Token:
    return Token.new_borrow_pos("STRAY", token.value, token)


def _build_parser() -> lark.Lark:
    return lark.Lark(
        GRAMMAR_PATH.read_text(encoding="utf-8"),
        parser="lalr",
        lexer="basic",  # the post-lexer reads all tokens first, so the lexer cannot depend on parser state
        postlex=BracketPairing(),
        transformer=PromptTransformer(),  # applied while parsing: no tree is built
        maybe_placeholders=False,
    )


# Built once at import; immutable (Lark parsers are reusable and keep no state between parses).
PROMPT_PARSER: lark.Lark = _build_parser()


def parse_prompt(prompt: str) -> ParsedPrompt | None:
    """Parse a prompt's editing/alternation syntax; ``None`` if A1111's grammar would reject it.

    A rejected prompt is used as literal text by the schedule functions.
    """
    try:
        return PROMPT_PARSER.parse(prompt)
    except LarkError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Prompt editing schedules (reference §2.3)


def _resolve_when(literal: str, steps: int, int_offset: int, flt_offset: float, use_old_scheduling: bool) -> int:
    """The last step at which an edit still shows ``before`` (A1111's ``when``)."""
    value = float(literal)
    if use_old_scheduling:
        value = value * steps if value < 1 else value
    elif "." in literal:
        value = (value - flt_offset) * steps  # a fraction of the pass (1.5 in a hires pass: halfway)
    else:
        value = value - int_offset  # an absolute step, counted from the start of the first pass
    if math.isnan(value):  # only from infinity times zero steps
        return steps
    if math.isinf(value):  # A1111 raises here; +inf: from for the whole run, -inf: to from the start
        return steps if value > 0 else min(steps, 0) - 1
    return min(steps, int(value))


def _render(pieces: tuple[Piece, ...], step: int, when_of: dict[str, int]) -> str:
    """The prompt text at one boundary step (iterative: nesting may be deep)."""
    out: list[str] = []
    stack: list[Iterator[Piece]] = [iter(pieces)]
    while stack:
        for piece in stack[-1]:
            if type(piece) is str:
                out.append(piece)
            elif type(piece) is Scheduled:
                stack.append(iter(piece.before if step <= when_of[piece.when] else piece.after))
                break
            else:
                options = piece.options  # type: ignore[union-attr]
                stack.append(iter(options[(step - 1) % len(options)]))
                break
        else:
            stack.pop()
    return "".join(out)


def _schedule(prompt: str, steps: int, int_offset: int, flt_offset: float, use_old_scheduling: bool) -> list[list]:
    parsed = parse_prompt(prompt)
    if parsed is None:
        return [[steps, prompt]]
    when_of = {w: _resolve_when(w, steps, int_offset, flt_offset, use_old_scheduling) for w in parsed.whens}
    boundaries = {steps}
    boundaries.update(w for w in when_of.values() if w >= 1)
    if parsed.has_alternate:
        boundaries.update(range(1, steps + 1))
    return [[t, _render(parsed.pieces, t, when_of)] for t in sorted(boundaries)]


def _pass_parameters(base_steps: int, hires_steps: int | None, use_old_scheduling: bool) -> tuple[int, int, float]:
    if hires_steps is None or use_old_scheduling:
        return base_steps, 0, 0.0
    # The hires pass: fractions count from 1.0 (the end of the first pass), step numbers from base_steps.
    return hires_steps, base_steps, 1.0


def get_learned_conditioning_prompt_schedules(
    prompts: Sequence[str],
    base_steps: int,
    hires_steps: int | None = None,
    use_old_scheduling: bool = False,
) -> list[list[list]]:
    """For each prompt, its schedule ``[[end_at_step, text], ...]`` (A1111's function, same results).

    ``[from:to:when]`` shows ``from`` up to step ``when`` and ``to`` after it; ``[to:when]`` and ``[from::when]``
    leave one side empty; ``[a|b]`` cycles a, b, a, ... from step 1. ``when`` with a '.' is a fraction of the
    steps (``0.25``, ``.5``, ``3.``), without one it is a step number (``3``, ``1e1``). With ``hires_steps`` the
    schedule is for the hires pass: fractions count from 1.0 and step numbers from ``base_steps``.
    ``use_old_scheduling`` restores A1111's old rule (numbers below 1 are fractions, others step numbers).
    A prompt the grammar cannot read is used as it is: ``[[steps, prompt]]``.

    >>> get_learned_conditioning_prompt_schedules(["a [b:3]"], 10)
    [[[3, 'a '], [10, 'a b']]]
    """
    steps, int_offset, flt_offset = _pass_parameters(base_steps, hires_steps, use_old_scheduling)
    computed: dict[str, list[list]] = {}
    result = []
    for prompt in prompts:
        if prompt not in computed:
            computed[prompt] = _schedule(prompt, steps, int_offset, flt_offset, use_old_scheduling)
        result.append([list(entry) for entry in computed[prompt]])
    return result


def prompt_schedule(
    prompt: str, base_steps: int, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """Typed form of the schedule of one prompt: ``[(end_at_step, text), ...]``, sorted by step."""
    steps, int_offset, flt_offset = _pass_parameters(base_steps, hires_steps, use_old_scheduling)
    return [(end, text) for end, text in _schedule(prompt, steps, int_offset, flt_offset, use_old_scheduling)]


def schedule_index_for_step(end_at_steps: Sequence[int], step: int) -> int:
    """Which schedule entry the denoiser uses at 0-based call counter ``step`` (A1111's ``reconstruct_cond_batch``).

    The first entry with ``step <= end_at_step``; past the last entry A1111 falls back to the first one, and so
    do we (this only happens when a sampler calls the model more often than the step count).
    """
    for index, end_at_step in enumerate(end_at_steps):
        if step <= end_at_step:
            return index
    return 0


def scheduling_modes_differ(prompts: Sequence[str], base_steps: int, hires_steps: int | None = None) -> bool:
    """Whether old and new prompt editing timelines give different schedules (A1111 then writes
    ``Old prompt editing timelines: True`` to the infotext when the old mode is on)."""
    old = get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps, use_old_scheduling=True)
    new = get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps, use_old_scheduling=False)
    return old != new


# ---------------------------------------------------------------------------------------------------------------
# AND (composable diffusion, reference §2.1 step 3)

re_AND = re.compile(r"\bAND\b")
# Text (any characters, newlines included), then an optional ":weight" (a signed int or decimal), then
# trailing whitespace, which is dropped.
re_weight = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split a positive prompt on the word ``AND`` into ``(text, weight)`` pairs.

    ``"a AND b:0.5"`` gives ``[("a", 1.0), (" b", 0.5)]``: trailing whitespace goes, leading whitespace stays.
    """
    result = []
    for subprompt in re_AND.split(prompt):
        match = re_weight.search(subprompt)
        if match is None:  # cannot happen with this pattern; kept so odd input never raises
            result.append((subprompt, 1.0))
            continue
        text, weight = match.groups()
        result.append((text, float(weight) if weight is not None else 1.0))
    return result


class SdConditioning(list):
    """A list of prompts for the conditioner, with the image size (SDXL needs it) and whether they are negative.

    Same constructor as A1111's, which extensions use.
    """

    def __init__(
        self,
        prompts: Iterable[str],
        is_negative_prompt: bool = False,
        width: int | None = None,
        height: int | None = None,
        copy_from: object = None,
    ) -> None:
        super().__init__()
        self.extend(prompts)
        if copy_from is None:
            copy_from = prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


def get_multicond_prompt_list(
    prompts: Sequence[str],
) -> tuple[list[list[tuple[int, float]]], SdConditioning, dict[str, int]]:
    """Split each prompt on ``AND``; identical subprompt texts are stored once (A1111's function).

    Returns ``(res_indexes, prompt_flat_list, prompt_indexes)``: for each prompt a list of
    ``(index into prompt_flat_list, weight)``, the distinct texts, and text -> index.
    ``prompt_flat_list`` keeps the size and negative flag of ``prompts`` when it is an ``SdConditioning``.
    """
    res_indexes: list[list[tuple[int, float]]] = []
    prompt_flat_list = SdConditioning([], copy_from=prompts)
    prompt_indexes: dict[str, int] = {}
    for prompt in prompts:
        indexes = []
        for text, weight in split_and(prompt):
            index = prompt_indexes.get(text)
            if index is None:
                index = len(prompt_flat_list)
                prompt_flat_list.append(text)
                prompt_indexes[text] = index
            indexes.append((index, weight))
        res_indexes.append(indexes)
    return res_indexes, prompt_flat_list, prompt_indexes


# Data holders A1111 defines here; the conditioning code fills them with tensors.
ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])


class ComposableScheduledPromptConditioning:
    """One AND subprompt: its schedule of conditionings and its weight."""

    def __init__(self, schedules: list, weight: float = 1.0) -> None:
        self.schedules: list = schedules
        self.weight: float = weight


class MulticondLearnedConditioning:
    """Per prompt of the batch, its AND subprompts. ``shape`` is ``(batch size,)``."""

    def __init__(self, shape: tuple, batch: list) -> None:
        self.shape: tuple = shape
        self.batch: list = batch


# ---------------------------------------------------------------------------------------------------------------
# Emphasis (reference §2.4)

re_attention = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\    # an escaped bracket or backslash: that character
    | \\                                # a lone backslash: dropped
    | \( | \[                           # openers
    | :\s*([+-]?[.\d]+)\s*\)            # ":weight)" closes a round bracket with that weight
    | \) | \]                           # closers
    | [^\\()\[\]:]+                     # text
    | :                                 # a colon that is not a weight
    """,
    re.X,
)
re_break = re.compile(r"\s*\bBREAK\b\s*", re.S)

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1


def _append_text(res: list[list], text: str) -> None:
    """Append plain text, turning each BREAK (and the whitespace around it) into a ``["BREAK", -1]`` marker."""
    for index, part in enumerate(re_break.split(text)):
        if index:
            res.append(["BREAK", -1])
        res.append([part, 1.0])


def parse_prompt_attention(text: str) -> list[list]:
    """Split a prompt into ``[text, weight]`` runs (A1111's function, same results).

    ``(x)`` multiplies by 1.1, ``[x]`` by 1/1.1, ``(x:w)`` by w; nesting multiplies. ``\\(`` ``\\)`` ``\\[`` ``\\]``
    ``\\\\`` are literal characters, a lone backslash is dropped. An unclosed bracket applies to the rest of the
    prompt; an unmatched closer is text. ``BREAK`` gives ``["BREAK", -1]``. Adjacent runs of equal weight are
    merged; an empty prompt gives ``[["", 1.0]]``. A weight that is not a number, like ``(a:1.2.3)``, is kept as
    text and the parenthesis counts as a plain one (A1111 raises ValueError there).

    >>> parse_prompt_attention("an (important) word")
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]
    """
    res: list[list] = []
    round_starts: list[int] = []
    square_starts: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        # One multiplication per enclosing bracket, in closing order, like A1111: floats must come out identical.
        for position in range(start, len(res)):
            res[position][1] *= multiplier

    for match in re_attention.finditer(text):
        token = match.group(0)
        weight = match.group(1)
        if token[0] == "\\":
            res.append([token[1:], 1.0])
        elif token == "(":
            round_starts.append(len(res))
        elif token == "[":
            square_starts.append(len(res))
        elif weight is not None and round_starts:
            try:
                multiplier = float(weight)
            except ValueError:  # "1.2.3", ".", "+": keep ":1.2.3" as text, close as a plain parenthesis
                _append_text(res, token[:-1])
                multiplier = ROUND_BRACKET_MULTIPLIER
            multiply_range(round_starts.pop(), multiplier)
        elif token == ")" and round_starts:
            multiply_range(round_starts.pop(), ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and square_starts:
            multiply_range(square_starts.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            _append_text(res, token)

    for position in round_starts:
        multiply_range(position, ROUND_BRACKET_MULTIPLIER)
    for position in square_starts:
        multiply_range(position, SQUARE_BRACKET_MULTIPLIER)

    if not res:
        return [["", 1.0]]
    merged: list[list] = [res[0]]
    for item in res[1:]:
        if merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return merged
