"""Extra network tags (<lora:NAME:0.8>): removal from the prompt and argument parsing, as in A1111 (reference §2.6)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from modules.extra_networks import ExtraNetworkParams, parse_prompt, parse_prompts


def test_lora_tag_is_removed_and_recorded():
    text, networks = parse_prompt("a cat <lora:catStyle_v2:0.8>, sitting")
    assert text == "a cat , sitting"
    assert list(networks) == ["lora"]
    params = networks["lora"][0]
    assert params.items == ["catStyle_v2", "0.8"]
    assert params.positional == ["catStyle_v2", "0.8"]
    assert params.named == {}


def test_several_tags_and_names_in_order():
    text, networks = parse_prompt("<hypernet:agm:1.1> 1girl <extrasupernet:master:12:13:14> <hypernet:ray>")
    assert text == " 1girl  "
    assert list(networks) == ["hypernet", "extrasupernet"]
    assert [p.items for p in networks["hypernet"]] == [["agm", "1.1"], ["ray"]]
    assert networks["extrasupernet"][0].items == ["master", "12", "13", "14"]


def test_named_arguments():
    _, networks = parse_prompt("<lora:name:te=0.5:unet=1:dyn=16>")
    params = networks["lora"][0]
    assert params.positional == ["name"]
    assert params.named == {"te": "0.5", "unet": "1", "dyn": "16"}


def test_item_with_two_equals_signs_is_positional_like_a1111():
    params = ExtraNetworkParams(items=["a=b=c", "k=v", "=x"])
    assert params.positional == ["a=b=c"]
    assert params.named == {"k": "v", "": "x"}


def test_params_equality_and_defaults():
    assert ExtraNetworkParams(items=["x", "1"]) == ExtraNetworkParams(items=["x", "1"])
    assert ExtraNetworkParams(items=["x"]) != ExtraNetworkParams(items=["y"])
    empty = ExtraNetworkParams()
    assert (empty.items, empty.positional, empty.named) == ([], [], {})
    assert ExtraNetworkParams(items=[1.5]).positional == [1.5]  # non-strings are positional


def test_unknown_network_names_missing_lookup_gives_empty_list():
    _, networks = parse_prompt("no tags here")
    assert networks["lora"] == []  # a defaultdict(list), like A1111's


def test_text_that_is_not_a_tag_stays():
    for prompt in ["<lora>", "<lora:>", "<:name:1>", "<lo-ra:x>", "a < b > c", "<lora:a", "lora:a>"]:
        text, networks = parse_prompt(prompt)
        assert text == prompt and dict(networks) == {}


def test_arguments_stop_at_the_first_closing_angle_bracket():
    text, networks = parse_prompt("<lora:a<b:1> tail")
    assert text == " tail"
    assert networks["lora"][0].items == ["a<b", "1"]


def test_only_the_first_prompt_decides_the_networks():
    prompts, networks = parse_prompts(["a <lora:x:1>", "b <lora:y:0.5> <hypernet:h>"])
    assert prompts == ["a ", "b  "]
    assert {name: [p.items for p in params] for name, params in networks.items()} == {"lora": [["x", "1"]]}


def test_empty_batch_gives_no_networks():
    assert parse_prompts([]) == ([], None)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="<>:=ab _-1.\n", max_size=40))
def test_random_text_never_raises_and_keeps_text_outside_tags(prompt):
    text, networks = parse_prompt(prompt)
    assert len(text) <= len(prompt)
    if "<" not in prompt:
        assert text == prompt and not networks
    for params_list in networks.values():
        for params in params_list:
            assert len(params.positional) + len(params.named) <= len(params.items)
