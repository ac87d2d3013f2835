"""Prompt language: editing schedules, alternation, emphasis and AND, checked against A1111 v1.10 behaviour.

Expected values are A1111's (its doctests in modules/prompt_parser.py, and the rules of reference §2.1-2.4).
"""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lark.parsers.lalr_analysis import LALR_Analyzer

from modules import prompt_parser
from modules.prompt_parser import (
    SdConditioning,
    get_learned_conditioning_prompt_schedules,
    get_multicond_prompt_list,
    parse_prompt_attention,
    prompt_schedule,
    schedule_index_for_step,
    scheduling_modes_differ,
    split_and,
)


def schedule(prompt: str, steps: int = 10, hires_steps: int | None = None, old: bool = False) -> list[list]:
    return get_learned_conditioning_prompt_schedules([prompt], steps, hires_steps, old)[0]


def every_step(*texts: str, steps: int = 10) -> list[list]:
    """The schedule of an alternation: one entry per step, cycling through texts."""
    return [[t, texts[(t - 1) % len(texts)]] for t in range(1, steps + 1)]


# ---------------------------------------------------------------------------------------------------------------
# A1111's doctests of get_learned_conditioning_prompt_schedules (10 steps)

A1111_SCHEDULE_DOCTESTS = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", every_step("a", "(b:1.1)")),
    ("[fe|]male", every_step("female", "male")),
    ("[fe|||]male", every_step("female", "male", "male", "male")),
]


@pytest.mark.parametrize("prompt,expected", A1111_SCHEDULE_DOCTESTS)
def test_a1111_schedule_doctests(prompt, expected):
    assert schedule(prompt) == expected


def test_stale_a1111_doctest_comes_back_unchanged():
    # A1111's doctest expects [[5, 'a  c'], [10, 'a {b|d{ c']], written before alternation existed; since then the
    # '|' makes the parse fail, so the prompt is used as it is (reference §8).
    assert schedule("a [{b|d{:.5] c") == [[10, "a [{b|d{:.5] c"]]


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("a [b:.5] c", [[10, "a b c"]]),  # 0.5 is in the first pass: 'b' for the whole hires pass
        ("a [b:1.5] c", [[5, "a  c"], [10, "a b c"]]),  # halfway through the hires pass
    ],
)
def test_a1111_hires_doctests(prompt, expected):
    assert schedule(prompt, 10, hires_steps=10) == expected


# ---------------------------------------------------------------------------------------------------------------
# Prompt editing rules (reference §2.3)


def test_from_to_when_switches_after_step():
    assert schedule("a [cat:dog:4] b") == [[4, "a cat b"], [10, "a dog b"]]


def test_from_with_empty_to_removes_text_after_step():
    assert schedule("a [red::6] car") == [[6, "a red car"], [10, "a  car"]]


def test_to_only_adds_text_after_step():
    assert schedule("[red :6]car") == [[6, "car"], [10, "red car"]]


def test_nested_edit_inside_the_to_part():
    assert schedule("[a:[b:c:2]:5]") == [[2, "a"], [5, "a"], [10, "c"]]


def test_nested_edit_inside_the_from_part():
    assert schedule("[[a:b:2]:c:3]") == [[2, "a"], [3, "b"], [10, "c"]]


def test_boundaries_of_edits_in_branches_not_taken_still_count():
    # The inner edit is never shown (its branch ends at step 1) but its step still splits the schedule.
    assert schedule("[x:[a:b:7]:1]") == [[1, "x"], [7, "a"], [10, "b"]]


def test_several_edits_from_a1111_comment_example():
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]"
    )
    assert schedule(prompt, 100) == [
        [25, "fantasy landscape with a mountain and an oak in foreground shoddy"],
        [50, "fantasy landscape with a lake and an oak in foreground in background shoddy"],
        [60, "fantasy landscape with a lake and an oak in foreground in background masterful"],
        [75, "fantasy landscape with a lake and an oak in background masterful"],
        [100, "fantasy landscape with a lake and a christmas tree in background masterful"],
    ]


@pytest.mark.parametrize(
    "when,expected_switch",
    [
        ("3", 3),
        ("+3", 3),
        ("1e1", None),  # '1e1' has no '.', so it is step 10 = the last step: 'a' throughout
        (".5", 5),
        ("0.25", 2),  # int(2.5) truncates
        ("3.", None),  # has a '.', so a fraction: 3.0 * 10 = 30, capped to 10
        ("0.3", 3),  # 0.3 * 10 = 3.0000000000000004, truncated
        ("2e-1", 2),  # no '.': an integer step; float('2e-1') = 0.2 -> int 0 -> 'b' from the start
    ],
)
def test_number_forms(when, expected_switch):
    result = schedule(f"[a:b:{when}]")
    if when == "2e-1":
        assert result == [[10, "b"]]
    elif expected_switch is None:
        assert result == [[10, "a"]]
    else:
        assert result == [[expected_switch, "a"], [10, "b"]]


@pytest.mark.parametrize("when", ["0", "-1", "-.5", "-2e1"])
def test_when_zero_or_negative_means_to_from_the_start(when):
    assert schedule(f"x [a:b:{when}]") == [[10, "x b"]]


@pytest.mark.parametrize("when", ["10", "25", "1.0", "7.5"])
def test_when_at_or_past_the_end_means_from_throughout(when):
    assert schedule(f"x [a:b:{when}]") == [[10, "x a"]]


def test_fraction_truncation_matches_float_arithmetic():
    # 0.29 * 100 = 28.999999999999996 -> step 28, as in A1111.
    assert schedule("[a:b:0.29]", 100) == [[28, "a"], [100, "b"]]


@pytest.mark.parametrize("spaced", ["[a:b: 3]", "[a:b:3 ]", "[a:b:  3  ]", "[a:b:\t3\n]"])
def test_whitespace_around_the_number_is_dropped(spaced):
    assert schedule(spaced) == [[3, "a"], [10, "b"]]


def test_whitespace_in_the_prompts_is_kept():
    assert schedule("[ a : b :3]") == [[3, " a "], [10, " b "]]


@pytest.mark.parametrize(
    "prompt",
    [
        "[a:b:c]",  # not a number
        "[a:b:3x]",
        "[a:b:1e]",
        "[a:b:.]",
        "[a:b:- 3]",
        "[a:b:\u0663]",  # an Arabic-Indic digit: Lark's NUMBER is ASCII only
        "[a:b:c:3]",  # three colons
        "[a:]",
        "(a:b)",
        "a:b",
        "[a:b:3",  # unclosed
        "a:b:3]",  # no opener
        "(a:3]",
        "[a ( b:3]",  # a stray bracket inside makes the group literal
        "[a:3)]",
    ],
)
def test_malformed_edits_are_literal_text(prompt):
    assert schedule(prompt) == [[10, prompt]]


def test_stray_brackets_do_not_stop_later_edits():
    assert schedule("(( a] [b:2] c)") == [[2, "(( a]  c)"], [10, "(( a] b c)"]]
    assert schedule("[a:b:2]]") == [[2, "a]"], [10, "b]"]]


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("[cat:dog:5]))", [[5, "cat))"], [10, "dog))"]]),
        ("[a:3]::", [[3, "::"], [10, "a::"]]),
        ("x[:3]::", [[3, "x::"], [10, "x::"]]),
    ],
)
def test_ambiguous_prompts_read_every_well_formed_group_as_structure(prompt, expected):
    # A1111's reading of these changes with PYTHONHASHSEED (see the module docstring); ours does not.
    assert schedule(prompt) == expected


def test_literal_outer_group_keeps_inner_edit():
    # The outer brackets cannot be an edit (':x' is not a number) but the inner one is.
    assert schedule("[[a:2]:x]") == [[2, "[:x]"], [10, "[a:x]"]]


def test_emphasis_is_passed_through_verbatim():
    assert schedule("((a:1.2)) [b:c:5] [d]") == [[5, "((a:1.2)) b [d]"], [10, "((a:1.2)) c [d]"]]


@pytest.mark.parametrize("prompt", ["\\[a:b:3\\]", "\\(a\\) \\[b\\]"])
def test_escaped_brackets_are_plain_text_kept_verbatim(prompt):
    assert schedule(prompt) == [[10, prompt]]


def test_escapes_inside_an_edit_are_kept_verbatim():
    assert schedule("[\\(a\\):b\\]:3]") == [[3, "\\(a\\)"], [10, "b\\]"]]


@pytest.mark.parametrize(
    "prompt",
    [
        "a | b [c:d:3]",  # '|' outside an alternation
        "[a|b:3]",  # '|' and ':' together
        "(a|b) [c:d:3]",  # '|' inside parentheses
        "[a|b]]|",
        "[c:d:3] ends with a lone backslash \\",
        "[c:d:3] backslash before newline \\\nx",
    ],
)
def test_prompt_the_grammar_rejects_is_used_as_is(prompt):
    assert schedule(prompt) == [[10, prompt]]


# ---------------------------------------------------------------------------------------------------------------
# Alternation


def test_alternation_with_edit_inside():
    result = schedule("[a|[b:c:4]]", 6)
    assert result == [[1, "a"], [2, "b"], [3, "a"], [4, "b"], [5, "a"], [6, "c"]]


def test_empty_alternation_options():
    assert schedule("x[|]y", 3) == [[1, "xy"], [2, "xy"], [3, "xy"]]
    assert schedule("[|a]", 3) == [[1, ""], [2, "a"], [3, ""]]


def test_alternation_inside_emphasis():
    assert schedule("([a|b]:1.2)", 2) == [[1, "(a:1.2)"], [2, "(b:1.2)"]]


# ---------------------------------------------------------------------------------------------------------------
# Hires pass offsets and old scheduling


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("[a:b:15]", [[5, "a"], [10, "b"]]),  # step 15 of 10 + 10 = hires step 5
        ("[a:b:5]", [[10, "b"]]),  # step 5 is in the first pass: 'b' throughout the hires pass
        ("[a:b:1.2]", [[1, "a"], [10, "b"]]),  # (1.2 - 1) * 10 = 1.9999999999999996, truncated like A1111
        ("[a:b:0.5]", [[10, "b"]]),
        ("[a:b:2.0]", [[10, "a"]]),
    ],
)
def test_hires_pass_offsets(prompt, expected):
    assert schedule(prompt, 10, hires_steps=10) == expected


def test_hires_pass_with_different_step_counts():
    assert schedule("[a:b:25]", 20, hires_steps=8) == [[5, "a"], [8, "b"]]
    assert schedule("[a:b:1.25]", 20, hires_steps=8) == [[2, "a"], [8, "b"]]


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("[a:b:0.5]", [[5, "a"], [10, "b"]]),
        ("[a:b:3.0]", [[3, "a"], [10, "b"]]),  # old rule: >= 1 is a step number even with a '.'
        ("[a:b:3]", [[3, "a"], [10, "b"]]),
    ],
)
def test_old_scheduling(prompt, expected):
    assert schedule(prompt, 10, old=True) == expected


def test_old_scheduling_ignores_hires_offsets():
    assert schedule("[a:b:0.5]", 10, hires_steps=4, old=True) == [[5, "a"], [10, "b"]]


def test_scheduling_modes_differ_only_when_results_differ():
    assert scheduling_modes_differ(["[a:b:3.0]"], 10)
    assert not scheduling_modes_differ(["[a:b:0.5]", "plain"], 10)


# ---------------------------------------------------------------------------------------------------------------
# Batches, typed helpers, robustness


def test_batch_keeps_order_and_gives_independent_lists():
    result = get_learned_conditioning_prompt_schedules(["[a:b:2]", "x", "[a:b:2]"], 4)
    assert result == [[[2, "a"], [4, "b"]], [[4, "x"]], [[2, "a"], [4, "b"]]]
    result[0][0][1] = "changed"
    assert result[2][0][1] == "a"


def test_prompt_schedule_typed_helper():
    assert prompt_schedule("a [b:3]", 10) == [(3, "a "), (10, "a b")]


def test_schedule_index_for_step_follows_reconstruct_cond_batch():
    ends = [end for end, _ in schedule("a [b:3]")]  # [3, 10]
    assert [schedule_index_for_step(ends, step) for step in range(12)] == [0, 0, 0, 0] + [1] * 7 + [0]


def test_huge_when_does_not_raise():
    assert schedule("[a:b:1e400]") == [[10, "a"]]
    assert schedule("[a:b:-1e400]") == [[10, "b"]]


def test_deep_nesting_does_not_raise():
    depth = 3000
    nested = "[" * depth + "x" + ":1]" * depth
    assert schedule(nested, 2) == [[1, ""], [2, "x"]]
    brackets = "(" * depth + "[" * depth + "x"
    assert schedule(brackets) == [[10, brackets]]
    assert parse_prompt_attention("(" * depth + "x")[0][0] == "x"


def test_grammar_is_lalr_without_conflicts():
    # strict=True raises GrammarError on any shift/reduce or reduce/reduce conflict.
    LALR_Analyzer(prompt_parser.PROMPT_PARSER.parser.parser_conf, strict=True).compute_lalr()


# ---------------------------------------------------------------------------------------------------------------
# Emphasis (reference §2.4), A1111's doctests first


def test_a1111_attention_doctests():
    assert parse_prompt_attention("normal text") == [["normal text", 1.0]]
    assert parse_prompt_attention("an (important) word") == [["an ", 1.0], ["important", 1.1], [" word", 1.0]]
    assert parse_prompt_attention("(unbalanced") == [["unbalanced", 1.1]]
    assert parse_prompt_attention("\\(literal\\]") == [["(literal]", 1.0]]
    assert parse_prompt_attention("(unnecessary)(parens)") == [["unnecessaryparens", 1.1]]
    assert parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ["a ", 1.0],
        ["house", 1.5730000000000004],
        [" ", 1.1],
        ["on", 1.0],
        [" a ", 1.1],
        ["hill", 0.55],
        [", sun, ", 1.1],
        ["sky", 1.4641000000000006],
        [".", 1.1],
    ]


def test_brackets_multiply_in_closing_order():
    assert parse_prompt_attention("((x))") == [["x", 1.1 * 1.1]]
    assert parse_prompt_attention("(((x:1.3)))") == [["x", 1.3 * 1.1 * 1.1]]
    assert parse_prompt_attention("[x]") == [["x", 1 / 1.1]]
    assert parse_prompt_attention("[[x]]") == [["x", 1 / 1.1 / 1.1]]


@pytest.mark.parametrize(
    "prompt,weight",
    [("(x:1.5)", 1.5), ("(x: 1.5 )", 1.5), ("(x:-1)", -1.0), ("(x:+2)", 2.0), ("(x:.5)", 0.5), ("(x:2.)", 2.0)],
)
def test_explicit_weights(prompt, weight):
    assert parse_prompt_attention(prompt) == [["x", weight]]


def test_weight_needs_a_round_bracket():
    assert parse_prompt_attention("[x:0.5]") == [["x:0.5", 1 / 1.1]]
    assert parse_prompt_attention("a:1.2) b") == [["a:1.2) b", 1.0]]


def test_non_numeric_weight_is_text():
    assert parse_prompt_attention("(a:b)") == [["a:b", 1.1]]
    assert parse_prompt_attention("(a:1e5)") == [["a:1e5", 1.1]]


@pytest.mark.parametrize("prompt", ["(a:1.2.3) b", "(a: 1..2 ) b", "(a:.) b", "(a:+) b"])
def test_malformed_weight_is_text_and_does_not_raise(prompt):
    # A1111 raises ValueError here; we keep the weight as text and close the parenthesis as a plain one.
    inner = prompt[1 : prompt.index(")")]
    assert parse_prompt_attention(prompt) == [[inner, 1.1], [" b", 1.0]]


def test_escapes_and_lone_backslash():
    assert parse_prompt_attention("a \\\\ b") == [["a \\ b", 1.0]]
    assert parse_prompt_attention("a\\b") == [["ab", 1.0]]
    assert parse_prompt_attention("(a \\) b)") == [["a ) b", 1.1]]


def test_unmatched_closers_are_text_and_unclosed_openers_apply_to_the_rest():
    assert parse_prompt_attention("a) b]") == [["a) b]", 1.0]]
    assert parse_prompt_attention("a (b [c") == [["a ", 1.0], ["b ", 1.1], ["c", 1.1 / 1.1]]


def test_break_markers():
    assert parse_prompt_attention("a BREAK b") == [["a", 1.0], ["BREAK", -1], ["b", 1.0]]
    assert parse_prompt_attention("aBREAKb BREAKING") == [["aBREAKb BREAKING", 1.0]]
    assert parse_prompt_attention("BREAK") == [["", 1.0], ["BREAK", -1], ["", 1.0]]
    # Inside brackets the marker's weight is multiplied too (A1111 quirk).
    assert parse_prompt_attention("(a BREAK b)") == [["a", 1.1], ["BREAK", -1.1], ["b", 1.1]]


def test_adjacent_equal_weights_merge_and_empty_prompt():
    assert parse_prompt_attention("(a)(b) c") == [["ab", 1.1], [" c", 1.0]]
    assert parse_prompt_attention("") == [["", 1.0]]
    assert parse_prompt_attention("()") == [["", 1.0]]


def test_regex_constants_are_exported():
    assert prompt_parser.re_attention.match(":1.5)").group(1) == "1.5"
    assert prompt_parser.re_break.split("a BREAK b") == ["a", "b"]
    assert prompt_parser.re_AND.split("a AND b") == ["a ", " b"]
    assert prompt_parser.re_weight.search("cat :1.5 ").groups() == ("cat", "1.5")


# ---------------------------------------------------------------------------------------------------------------
# AND (reference §2.1 step 3)


def test_and_splits_keeps_leading_whitespace_and_strips_trailing():
    assert split_and("a AND b") == [("a", 1.0), (" b", 1.0)]


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("a:1.5 AND b :-0.5 AND c: .5", [("a", 1.5), (" b", -0.5), (" c", 0.5)]),
        ("a : 2. AND b:+3", [("a", 2.0), (" b", 3.0)]),
        ("cat:b", [("cat:b", 1.0)]),  # not a number: part of the text
        ("(cat:1.2) AND dog", [("(cat:1.2)", 1.0), (" dog", 1.0)]),  # ':1.2)' is not at the end
        ("line one\nline two:0.5", [("line one\nline two", 0.5)]),
        ("a and b ANDROID _AND_", [("a and b ANDROID _AND_", 1.0)]),
        ("AND", [("", 1.0), ("", 1.0)]),
    ],
)
def test_and_weights(prompt, expected):
    assert split_and(prompt) == expected


def test_multicond_prompt_list_deduplicates_texts():
    res_indexes, flat, indexes = get_multicond_prompt_list(["a AND b:0.5", "b:2 AND a", "c"])
    assert flat == ["a", " b", "b", " a", "c"]
    assert res_indexes == [[(0, 1.0), (1, 0.5)], [(2, 2.0), (3, 1.0)], [(4, 1.0)]]
    assert indexes == {"a": 0, " b": 1, "b": 2, " a": 3, "c": 4}
    res_indexes, flat, _ = get_multicond_prompt_list(["x AND x:3", "x"])
    assert flat == ["x", " x"] and res_indexes == [[(0, 1.0), (1, 3.0)], [(0, 1.0)]]


def test_multicond_flat_list_keeps_conditioning_attributes():
    prompts = SdConditioning(["a AND b"], is_negative_prompt=True, width=768, height=512)
    _, flat, _ = get_multicond_prompt_list(prompts)
    assert isinstance(flat, SdConditioning) and list(flat) == ["a", " b"]
    assert (flat.is_negative_prompt, flat.width, flat.height) == (True, 768, 512)


# ---------------------------------------------------------------------------------------------------------------
# Properties over random prompts

SPECIAL_PIECES = ["[", "]", "(", ")", ":", "|", "\\", ",", ".", " ", "\n", "AND", "BREAK"]
pieces = st.one_of(
    st.sampled_from(SPECIAL_PIECES),
    st.text(alphabet="0123456789", min_size=1, max_size=3),
    st.sampled_from(["cat", "a", "blue sky", "-", "+", "e", "1.5", ".5"]),
)
random_prompts = st.lists(pieces, max_size=40).map("".join)
plain_prompts = st.text(alphabet=string.ascii_letters + string.digits + " ,.-'!?éü", max_size=60).filter(
    lambda text: "BREAK" not in text and "AND" not in text
)


@settings(max_examples=300, deadline=None)
@given(random_prompts, st.integers(1, 30), st.one_of(st.none(), st.integers(1, 20)), st.booleans())
def test_random_prompts_never_raise(prompt, steps, hires_steps, old):
    result = get_learned_conditioning_prompt_schedules([prompt], steps, hires_steps, old)[0]
    pass_steps = steps if hires_steps is None or old else hires_steps
    ends = [end for end, _ in result]
    assert ends == sorted(set(ends)) and ends[-1] == pass_steps
    assert all(isinstance(text, str) for _, text in result)
    for text, weight in parse_prompt_attention(prompt):
        assert isinstance(text, str) and isinstance(weight, (int, float))
    for text, weight in split_and(prompt):
        assert isinstance(text, str) and isinstance(weight, float)


@settings(max_examples=200, deadline=None)
@given(plain_prompts, st.integers(1, 50))
def test_prompt_without_special_characters_is_unchanged(prompt, steps):
    assert schedule(prompt, steps) == [[steps, prompt]]
    assert parse_prompt_attention(prompt) == [[prompt, 1.0]]
    assert split_and(prompt)[0][0] == prompt.rstrip()
