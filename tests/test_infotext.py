"""Infotext: A1111's exact text format, its parser, and where it lives inside image files."""
import io
import json
import struct

import pytest
from PIL import Image, PngImagePlugin, TiffImagePlugin

from modules.infotext import (
    FIELD_ORDER,
    create_infotext,
    decode_user_comment,
    encode_user_comment,
    infotext_to_exif,
    infotext_to_png_info,
    parse_generation_parameters,
    read_info_from_image,
)

A1111_EXAMPLE = (
    "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, "
    "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
)

# The example in the docstring of A1111's parse_generation_parameters.
A1111_DOCSTRING_EXAMPLE = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, "
    "by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, "
    "mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)


def _png_with_text(items: dict, size=(64, 48)) -> Image.Image:
    info = PngImagePlugin.PngInfo()
    for key, value in items.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", size, "gray").save(buffer, format="PNG", pnginfo=info)
    return Image.open(io.BytesIO(buffer.getvalue()))


# --- create_infotext -------------------------------------------------------------------------

def test_create_matches_the_a1111_example_byte_for_byte():
    fields = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7, "Seed": 1,
              "Size": "512x512", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "Version": "v1.10.1"}
    assert create_infotext("a cat", "blurry", fields) == A1111_EXAMPLE


def test_fixed_fields_come_first_then_extras_in_insertion_order_then_version_and_user():
    fields = {"User": "alice", "Version": "v1.10.1", "Hires upscale": 2, "Seed": 5, "Lora hashes": "x: 1",
              "Steps": 30, "Mask blur": 4, "Clip skip": 2, "Size": (640, 512)}
    line = create_infotext("p", "", fields).split("\n")[-1]
    keys = [part.split(":")[0] for part in line.split(", ")]
    assert keys == ["Steps", "Seed", "Size", "Clip skip", "Hires upscale", "Lora hashes", "Mask blur", "Version", "User"]
    assert [k for k in keys if k in FIELD_ORDER] == sorted((k for k in keys if k in FIELD_ORDER), key=FIELD_ORDER.index)


def test_none_values_are_left_out_and_an_empty_negative_prompt_has_no_line():
    text = create_infotext("a dog", "", {"Steps": 20, "Sampler": "Euler", "Seed": 3, "Clip skip": None, "RNG": None})
    assert text == "a dog\nSteps: 20, Sampler: Euler, Seed: 3"


def test_a_value_equal_to_its_key_is_written_as_the_key_alone():
    text = create_infotext("x", "", {"Steps": 1, "Seed": 2, "Size": "8x8", "NGMS": "NGMS"})
    assert text.endswith("Size: 8x8, NGMS")


def test_values_with_comma_colon_or_newline_are_json_quoted_and_non_ascii_is_kept():
    fields = {"Steps": 20, "Lora hashes": "a: 123, b: 456", "Hires prompt": "line one\nline two",
              "TI hashes": 'say "hi", ok', "Styles": "ünï猫 plain", "Note": "naïve, café"}
    line = create_infotext("p", "", fields).split("\n")[-1]
    assert 'Lora hashes: "a: 123, b: 456"' in line
    assert 'Hires prompt: "line one\\nline two"' in line
    assert 'TI hashes: "say \\"hi\\", ok"' in line
    assert "Styles: ünï猫 plain" in line
    assert 'Note: "naïve, café"' in line


def test_values_are_str_of_what_the_caller_passed():
    assert "CFG scale: 7," in create_infotext("p", "", {"CFG scale": 7, "Seed": 1})
    assert "CFG scale: 7.0," in create_infotext("p", "", {"CFG scale": 7.0, "Seed": 1})
    assert "Denoising strength: 0.75" in create_infotext("p", "", {"Denoising strength": 0.75})


def test_size_tuples_are_written_as_width_x_height():
    text = create_infotext("p", "", {"Size": (512, 768), "Seed resize from": (256, 320), "Hires resize": (1024, 1536)})
    assert text == "p\nSize: 512x768, Seed resize from: 256x320, Hires resize: 1024x1536"


def test_create_strips_surrounding_whitespace_like_a1111():
    assert create_infotext("", "", {"Steps": 20, "Seed": 1, "Size": "8x8"}) == "Steps: 20, Seed: 1, Size: 8x8"
    assert create_infotext("  cat  ", "", {}) == "cat"


# --- parse_generation_parameters -------------------------------------------------------------

def test_parse_the_a1111_example():
    res = parse_generation_parameters(A1111_EXAMPLE)
    assert res["Prompt"] == "a cat"
    assert res["Negative prompt"] == "blurry"
    assert res["Steps"] == "20"
    assert res["Sampler"] == "DPM++ 2M"
    assert res["Schedule type"] == "Karras"
    assert res["CFG scale"] == "7"
    assert res["Seed"] == "1"
    assert (res["Size-1"], res["Size-2"]) == ("512", "512")
    assert "Size" not in res
    assert res["Model hash"] == "6ce0161689"
    assert res["Model"] == "v1-5-pruned-emaonly"
    assert res["Version"] == "v1.10.1"


def test_parse_the_example_from_a1111s_docstring():
    res = parse_generation_parameters(A1111_DOCSTRING_EXAMPLE)
    assert res["Prompt"].startswith("girl with an artist's beret") and res["Prompt"].endswith("detailed, intricate")
    assert res["Negative prompt"].startswith("ugly, fat") and res["Negative prompt"].endswith("messy drawing")
    assert res["Sampler"] == "Euler a"
    assert res["Seed"] == "965400086"
    assert res["Model hash"] == "45dee52b"
    assert res["Emphasis"] == "Original"  # the prompt uses (( )) emphasis


def test_round_trip_create_then_parse_gives_back_every_value_as_text():
    fields = {"Steps": 28, "Sampler": "DPM++ SDE", "Schedule type": "Karras", "CFG scale": 6.5, "Seed": 4294967295,
              "Size": (832, 1216), "Model hash": "31e35c80fc", "Model": "sd_xl_base_1.0", "Denoising strength": 0.45,
              "Clip skip": 2, "Hires upscale": 1.5, "Hires upscaler": "Latent (nearest-exact)",
              "Lora hashes": "detail: 1a2b3c4d5e6f, style: 9f8e7d6c5b4a", "Hires prompt": "a, b\nc",
              "Version": "v1.10.1"}
    prompt = "a castle on a hill,\n(masterpiece:1.2), best quality"
    negative = "lowres,\nbad hands"
    res = parse_generation_parameters(create_infotext(prompt, negative, fields))
    assert res["Prompt"] == prompt
    assert res["Negative prompt"] == negative
    for key, value in fields.items():
        if key == "Size":
            assert (res["Size-1"], res["Size-2"]) == ("832", "1216")
        else:
            assert res[key] == str(value), key


def test_lora_hashes_in_quotes_come_back_unquoted():
    text = 'a <lora:detail:0.8>\nSteps: 20, Seed: 7, Lora hashes: "detail: 1a2b3c4d5e6f, style: 9f8e", Version: v1.10.1'
    res = parse_generation_parameters(text)
    assert res["Lora hashes"] == "detail: 1a2b3c4d5e6f, style: 9f8e"
    assert res["Version"] == "v1.10.1"


def test_quoted_value_with_escaped_quote_and_newline():
    text = 'p\nSteps: 1, Seed: 2, Hires prompt: "say \\"hi\\", then\\nbye", Size: 8x8'
    res = parse_generation_parameters(text)
    assert res["Hires prompt"] == 'say "hi", then\nbye'
    assert res["Size-1"] == "8"


def test_multi_line_prompt_and_negative_prompt_are_joined_with_newlines():
    text = "line one\n  line two  \nNegative prompt: bad one\nbad two\nSteps: 20, Seed: 1, Size: 512x512"
    res = parse_generation_parameters(text)
    assert res["Prompt"] == "line one\nline two"
    assert res["Negative prompt"] == "bad one\nbad two"


def test_text_without_a_parameter_line_is_all_prompt():
    res = parse_generation_parameters("a photo of a cat\nsitting on a mat")
    assert res["Prompt"] == "a photo of a cat\nsitting on a mat"
    assert res["Negative prompt"] == ""
    assert "Steps" not in res and "Seed" not in res


def test_a_last_line_with_fewer_than_three_parameters_stays_prompt_text():
    res = parse_generation_parameters("a cat\nstyle: watercolor, mood: calm")
    assert res["Prompt"] == "a cat\nstyle: watercolor, mood: calm"
    assert "style" not in res and "mood" not in res


def test_negative_prompt_only_then_parameters():
    res = parse_generation_parameters("Negative prompt: blurry\nSteps: 10, Seed: 3, Size: 64x64")
    assert res["Prompt"] == ""
    assert res["Negative prompt"] == "blurry"
    assert res["Steps"] == "10"


def test_defaults_fill_missing_keys_and_never_override_present_ones():
    res = parse_generation_parameters("p\nSteps: 20, Seed: 1, Size: 512x512")
    assert res["Clip skip"] == "1"
    assert res["RNG"] == "GPU"
    assert res["Schedule type"] == "Automatic"
    assert (res["Hires resize-1"], res["Hires resize-2"]) == (0, 0)
    assert res["Hires sampler"] == "Use same sampler"
    assert res["Hires schedule type"] == "Use same scheduler"
    assert res["Hires checkpoint"] == "Use same checkpoint"
    assert res["Hires prompt"] == "" and res["Hires negative prompt"] == ""
    assert res["Mask mode"] == "Inpaint masked"
    assert res["Masked content"] == "original"
    assert res["Inpaint area"] == "Whole picture"
    assert res["Masked area padding"] == 32
    assert res["Schedule max sigma"] == 0 and res["Schedule min sigma"] == 0 and res["Schedule rho"] == 0
    assert res["VAE Encoder"] == "Full" and res["VAE Decoder"] == "Full"
    assert res["FP8 weight"] == "Disable"
    assert "Cache FP16 weight for LoRA" not in res
    assert res["Refiner switch by sampling steps"] is False
    assert "Emphasis" not in res

    res = parse_generation_parameters("p\nSteps: 20, Clip skip: 2, RNG: CPU, Schedule type: Karras, FP8 weight: Enable")
    assert (res["Clip skip"], res["RNG"], res["Schedule type"]) == ("2", "CPU", "Karras")
    assert res["Cache FP16 weight for LoRA"] is False


def test_legacy_hypernet_field_becomes_a_prompt_token():
    res = parse_generation_parameters("a knight\nSteps: 20, Seed: 1, Hypernet: anime_3, Hypernet strength: 0.6")
    assert res["Prompt"] == "a knight<hypernet:anime_3:0.6>"
    res = parse_generation_parameters("a knight\nSteps: 20, Seed: 1, Hypernet: anime_3")
    assert res["Prompt"] == "a knight<hypernet:anime_3:1.0>"


def test_old_hires_first_pass_size_is_converted():
    res = parse_generation_parameters("p\nSteps: 20, Seed: 1, Size: 1024x1024, First pass size: 512x384")
    assert (res["Size-1"], res["Size-2"]) == (512, 384)
    assert (res["Hires resize-1"], res["Hires resize-2"]) == (1024, 1024)


def test_old_hires_first_pass_size_zero_uses_the_old_automatic_size():
    # The old rule: scale to about 512*512 pixels, then round each side up to a multiple of 64.
    res = parse_generation_parameters("p\nSteps: 20, Seed: 1, Size: 1024x768, First pass size: 0x0")
    assert (res["Size-1"], res["Size-2"]) == (640, 448)
    assert (res["Hires resize-1"], res["Hires resize-2"]) == (1024, 768)


def test_emphasis_default_only_when_a_prompt_uses_weights():
    assert parse_generation_parameters("(cat:1.3)\nSteps: 1, Seed: 1, Size: 8x8")["Emphasis"] == "Original"
    assert parse_generation_parameters("cat\nNegative prompt: [ugly]\nSteps: 1, Seed: 1, Size: 8x8")["Emphasis"] == "Original"
    assert "Emphasis" not in parse_generation_parameters("cat BREAK dog \\(escaped\\)\nSteps: 1, Seed: 1, Size: 8x8")
    assert "Emphasis" not in parse_generation_parameters("(cat:1.0)\nSteps: 1, Seed: 1, Size: 8x8")
    res = parse_generation_parameters("(cat:1.3)\nSteps: 1, Seed: 1, Emphasis: No norm")
    assert res["Emphasis"] == "No norm"
    # A malformed weight makes A1111 raise here; we still read the parameters.
    assert parse_generation_parameters("(cat:1.2.3)\nSteps: 1, Seed: 7, Size: 8x8")["Seed"] == "7"


def test_version_backcompat_flags():
    old = parse_generation_parameters("[a:b:5]\nSteps: 20, Sampler: DDIM, Version: v1.5.1")
    assert old["Old prompt editing timelines"] is True
    assert old["Pad conds v0"] is True
    assert old["Downcast alphas_cumprod"] is True
    between = parse_generation_parameters("[a:b:5]\nSteps: 20, Sampler: DDIM, Version: v1.7.0-133-gde03882d")
    assert "Old prompt editing timelines" not in between and "Pad conds v0" not in between
    assert between["Downcast alphas_cumprod"] is True
    new = parse_generation_parameters("[a:b:5]\nSteps: 20, Sampler: DDIM, Refiner: x, Version: v1.10.1")
    assert not {"Old prompt editing timelines", "Pad conds v0", "Downcast alphas_cumprod"} & set(new)
    assert new["Refiner switch by sampling steps"] is False
    refiner = parse_generation_parameters("p\nSteps: 20, Seed: 1, Refiner: sdxl_refiner, Version: v1.7.0")
    assert refiner["Refiner switch by sampling steps"] is True
    unknown = parse_generation_parameters("[a:b:5]\nSteps: 20, Seed: 1, Version: f2.0.1v1.10.1-previous-1-g1")
    assert "Old prompt editing timelines" not in unknown


def test_skip_fields_are_removed():
    res = parse_generation_parameters(A1111_EXAMPLE, skip_fields=["Seed", "Clip skip", "Size-1"])
    assert "Seed" not in res and "Clip skip" not in res and "Size-1" not in res
    assert res["Size-2"] == "512"


def test_a_key_with_nothing_after_the_colon_is_left_out_as_in_a1111():
    res = parse_generation_parameters("p\nSteps: 20, Sampler: , Seed: 1, Size: 8x8")
    assert "Sampler" not in res
    assert res["Seed"] == "1"


# --- image metadata --------------------------------------------------------------------------

def test_png_parameters_chunk_round_trip_with_unicode():
    text = "猫, ünïcode\nNegative prompt: bad\nSteps: 20, Seed: 1, Size: 64x48"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buffer, format="PNG", pnginfo=infotext_to_png_info(text, {"extras": "upscaled"}))
    geninfo, items = read_info_from_image(Image.open(io.BytesIO(buffer.getvalue())))
    assert geninfo == text
    assert items == {"extras": "upscaled"}


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_exif_user_comment_round_trip(fmt):
    text = "a lake, 湖\nNegative prompt: fog\nSteps: 20, Sampler: Euler a, Seed: 42, Size: 32x32"
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(buffer, format=fmt, exif=infotext_to_exif(text))
    geninfo, items = read_info_from_image(Image.open(io.BytesIO(buffer.getvalue())))
    assert geninfo == text
    assert parse_generation_parameters(geninfo)["Seed"] == "42"
    assert not {"exif", "jfif", "jfif_version", "dpi", "jfif_unit", "jfif_density"} & set(items)


def test_exif_is_laid_out_as_piexif_writes_it_so_a1111_can_read_it():
    text = "hello\nSteps: 1, Seed: 2, Size: 8x8"
    raw = infotext_to_exif(text)
    assert raw.startswith(b"Exif\x00\x00MM")
    tiff = raw[6:]
    stream = io.BytesIO(tiff)
    ifd0 = TiffImagePlugin.ImageFileDirectory_v2(tiff[:8])
    stream.seek(8)
    ifd0.load(stream)
    exif_ifd = TiffImagePlugin.ImageFileDirectory_v2(tiff[:8])
    stream.seek(ifd0[0x8769])
    exif_ifd.load(stream)
    assert exif_ifd.tagtype[0x9286] == 7  # UNDEFINED: piexif returns bytes for it
    assert exif_ifd[0x9286] == b"UNICODE\x00" + text.encode("utf-16-be")


def test_user_comment_codecs():
    assert decode_user_comment(encode_user_comment("ü猫 text")) == "ü猫 text"
    assert decode_user_comment(b"ASCII\x00\x00\x00plain words") == "plain words"
    assert decode_user_comment(b"UNICODE\x00\xff\xfe" + "le text".encode("utf-16-le")) == "le text"
    with pytest.raises(ValueError):
        decode_user_comment(b"\x00" * 8 + b"abc")
    with pytest.raises(ValueError):
        decode_user_comment(b"short")


def test_jpeg_with_ascii_user_comment_written_by_another_tool():
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"ASCII\x00\x00\x00prompt text\nSteps: 5, Seed: 9, Size: 16x16"
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="JPEG", exif=exif)
    geninfo, _ = read_info_from_image(Image.open(io.BytesIO(buffer.getvalue())))
    assert geninfo == "prompt text\nSteps: 5, Seed: 9, Size: 16x16"


def test_image_without_metadata_has_no_infotext():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    geninfo, items = read_info_from_image(Image.open(io.BytesIO(buffer.getvalue())))
    assert geninfo is None
    assert "jfif" not in items


def test_gif_comment_is_read():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF", comment="gif prompt\nSteps: 3, Seed: 4, Size: 8x8")
    geninfo, _ = read_info_from_image(Image.open(io.BytesIO(buffer.getvalue())))
    assert geninfo == "gif prompt\nSteps: 3, Seed: 4, Size: 8x8"


def _novelai_image(sampler: str) -> Image.Image:
    comment = {"steps": 28, "sampler": sampler, "seed": 1234567, "strength": 0.7, "noise": 0.2, "scale": 11.0,
               "uc": "lowres, bad anatomy"}
    return _png_with_text({"Title": "AI generated image", "Description": "masterpiece, 1girl, red hair",
                           "Software": "NovelAI", "Source": "Stable Diffusion 1D44365E", "Comment": json.dumps(comment)},
                          size=(512, 768))


def test_novelai_png_is_converted_to_a1111_infotext():
    geninfo, items = read_info_from_image(_novelai_image("k_euler_ancestral"))
    assert geninfo == ("masterpiece, 1girl, red hair\nNegative prompt: lowres, bad anatomy\n"
                       "Steps: 28, Sampler: Euler a, CFG scale: 11.0, Seed: 1234567, Size: 512x768, Clip skip: 2, ENSD: 31337")
    assert items["Software"] == "NovelAI"
    res = parse_generation_parameters(geninfo)
    assert (res["Size-1"], res["Size-2"], res["ENSD"]) == ("512", "768", "31337")


@pytest.mark.parametrize("sampler, label", [("k_euler", "Euler"), ("k_dpmpp_2m", "DPM++ 2M"), ("ddim", "DDIM"),
                                            ("k_dpm_2_ancestral", "Euler a"), ("nai_smea", "Euler a")])
def test_novelai_sampler_names_are_mapped_with_euler_a_as_fallback(sampler, label):
    geninfo, _ = read_info_from_image(_novelai_image(sampler))
    assert f"Sampler: {label}," in geninfo


def test_broken_novelai_metadata_does_not_raise():
    image = _png_with_text({"Software": "NovelAI", "Description": "x", "Comment": "{not json"})
    geninfo, items = read_info_from_image(image)
    assert geninfo is None
    assert items["Description"] == "x"


def test_png_text_chunk_bytes_are_what_a1111_stores():
    # A1111 stores the infotext under the tEXt/iTXt keyword "parameters".
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG", pnginfo=infotext_to_png_info("plain ascii"))
    data = buffer.getvalue()
    assert b"tEXtparameters\x00plain ascii" in data
    length = struct.unpack(">I", data[data.index(b"tEXtparameters") - 4:data.index(b"tEXtparameters")])[0]
    assert length == len(b"parameters\x00plain ascii")
