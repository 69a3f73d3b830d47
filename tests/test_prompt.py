import pytest

from lora_train.prompt import LoraLibrary, PromptError, parse_prompt, with_strength


def test_plain_and_default_weight():
    text, tags = parse_prompt("a cat <lora:style:0.8>, sitting")
    assert text == "a cat, sitting"
    assert [(t.name, t.te, t.unet) for t in tags] == [("style", 0.8, 0.8)]
    _, tags = parse_prompt("<lora:style>")
    assert (tags[0].te, tags[0].unet) == (1.0, 1.0)


def test_several_negative_and_split():
    text, tags = parse_prompt("<lora:a:0.5> photo <lora:b:-0.7> of <lora:c:te=0.25:unet=0.75> <lora:d:0.2:0.9>")
    assert text == "photo of"
    got = [(t.name, t.te, t.unet) for t in tags]
    assert got == [("a", 0.5, 0.5), ("b", -0.7, -0.7), ("c", 0.25, 0.75), ("d", 0.2, 0.9)]
    _, tags = parse_prompt("<lora:e:0.3:unet=1>")
    assert (tags[0].te, tags[0].unet) == (0.3, 1.0)


def test_other_extra_networks_untouched():
    text, tags = parse_prompt("x <hypernet:h:1> y")
    assert text == "x <hypernet:h:1> y" and tags == []


@pytest.mark.parametrize("bad,msg", [
    ("<lora:>", "needs a LoRA name"),
    ("<lora::0.5>", "needs a LoRA name"),
    ("<lora:x:abc>", "not a number"),
    ("<lora:x:te=abc>", "not a number"),
    ("<lora:x:foo=1>", "unknown option"),
    ("a <lora:x:0.5", "not closed"),
])
def test_malformed(bad, msg):
    with pytest.raises(PromptError, match=msg):
        parse_prompt(bad)


def test_with_strength():
    assert with_strength("a <lora:x:0.8> b", "x", 0.5) == "a <lora:x:0.5> b"
    assert with_strength("a <lora:x:0.8> b", "x", 0) == "a b"
    assert with_strength("a b", "x", 1) == "a b <lora:x:1>"
    assert with_strength("a <lora:y:0.3>", "x", 1) == "a <lora:y:0.3> <lora:x:1>"


def test_library_resolution(tmp_path):
    (tmp_path / "sub").mkdir()
    for n in ("MyStyle.safetensors", "sub/face_v2.safetensors", "run-000002.safetensors", "run.safetensors"):
        (tmp_path / n).write_bytes(b"x")
    lib = LoraLibrary([str(tmp_path)])
    assert lib.resolve("MyStyle").endswith("MyStyle.safetensors")
    assert lib.resolve("mystyle").endswith("MyStyle.safetensors")
    assert lib.resolve("face_v2").endswith("face_v2.safetensors")
    with pytest.raises(PromptError) as e:
        lib.resolve("MyStyl")
    assert "MyStyle" in str(e.value) and "unknown LoRA" in str(e.value)
    assert [e for e, _ in lib.epochs_of("run")] == [2, None]


def test_number_lists_typed_by_users():
    from lora_train.prompt import parse_floats, parse_ints

    assert parse_floats("0, 0.5;0.8 1", "strengths") == [0.0, 0.5, 0.8, 1.0]
    assert parse_ints("1, 2,3", "seeds") == [1, 2, 3]
    for bad, what, fn in (("0.5, x", "not a number", parse_floats), ("", "is empty", parse_floats),
                          ("1, 2.5", "not a whole number", parse_ints)):
        with pytest.raises(ValueError, match=what):
            fn(bad, "strengths")
