"""Vision-language captions (#30): caption styles as data, the chat-VLM captioner on tiny random models built here
(LLaVA-style: CLIP vision + Llama text, JoyCaption's family; Qwen2-VL-style where torchvision is installed, which its
processor needs), and the caption checks on a corpus of bad captions."""
import json
import os

import pytest
import torch
from PIL import Image

from lora_train.captions import checks, styles
from lora_train.captions import CaptionerError, make_captioner

from tiny_vlm import TEMPLATE

import transformers

#: chat VLMs need transformers >= 4.45 (the WebUI-versions run has 4.30.2: test_old_transformers_get_a_message)
needs_vlm = pytest.mark.skipif(not hasattr(transformers, "AutoModelForImageTextToText"),
                               reason=f"transformers {transformers.__version__} has no chat VLMs")


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    from tiny_vlm import write_tiny_llava

    return write_tiny_llava(str(tmp_path_factory.mktemp("vlm") / "tiny-llava"))


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    for i, c in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40 + 8 * i, 32), c).save(folder / f"img{i}.png")
    return str(folder)


def test_styles_are_data_users_can_edit(tmp_path):
    s = styles.load()
    assert {"tags", "short", "detailed", "edit"} <= set(s) and s["tags"].form == "tags" and s["edit"].images == 2
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"detailed": {"prompt": "Say everything.", "max_new_tokens": 9},
                                "product": {"prompt": "Describe the product.", "form": "sentence"}}), encoding="utf-8")
    s2 = styles.load(str(mine))
    assert s2["detailed"].prompt == "Say everything." and s2["product"].form == "sentence" and "tags" in s2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": {"form": "tags"}}), encoding="utf-8")
    with pytest.raises(ValueError, match="'x' .* has no prompt"):
        styles.load(str(bad))
    with pytest.raises(ValueError, match="cannot be read"):
        styles.load(str(tmp_path / "nope.json"))
    assert styles.for_family("flux") == "detailed" and styles.for_family("qwen_image") == "detailed"
    assert styles.for_family("sd1") == "short" and styles.for_family(None) == "detailed"


@needs_vlm
def test_vlm_captions_a_folder_batched_with_the_style_and_unloads(llava_folder, images):
    from lora_train.captions import caption_folder

    cap = make_captioner("vlm", model=llava_folder, style="detailed", max_new_tokens=6, device="cpu")
    assert cap.instruction == styles.get("detailed").prompt
    text = cap.prompt_text()
    assert "<image>" in text and styles.get("detailed").prompt in text and text.endswith("assistant\n")
    calls = []
    real = cap.model.generate
    cap.model.generate = lambda **kw: calls.append(kw["input_ids"].shape[0]) or real(**kw)
    report = caption_folder(images, cap, mode="overwrite", trigger="zq", batch_size=2)
    assert len(report.written) == 3 and sorted(calls) == [1, 2]  # 3 images in batches of 2
    for path in report.written:
        with open(os.path.splitext(path)[0] + ".txt", encoding="utf-8") as fh:
            caption = fh.read()
        assert caption.startswith("zq") and "\n" not in caption
    # batched captions are the ones made one at a time (left padding, greedy)
    ims = [Image.open(os.path.join(images, f"img{i}.png")) for i in range(2)]
    assert cap.caption_batch(ims, ["a", "b"]) == [cap.caption_batch([im], [p])[0] for im, p in zip(ims, "ab")]
    cap.unload()
    assert cap.model is None and cap.processor is None
    with pytest.raises(CaptionerError, match="unloaded"):
        cap.caption_batch(ims[:1], ["a"])


@needs_vlm
def test_vlm_errors_name_the_folder_and_the_fix(tmp_path, llava_folder):
    with pytest.raises(CaptionerError, match="no model given"):
        make_captioner("vlm")
    with pytest.raises(CaptionerError, match="does not exist"):
        make_captioner("vlm", model=str(tmp_path / "Qwen2.5-VL-7B-Instruct"))
    with pytest.raises(CaptionerError, match="style 'poem' is not known"):
        make_captioner("vlm", model=llava_folder, style="poem")
    with pytest.raises(CaptionerError, match="quantize"):
        make_captioner("vlm", model=llava_folder, quantize="2bit")
    with pytest.raises(CaptionerError, match="8bit loading needs"):
        make_captioner("vlm", model=llava_folder, quantize="8bit", device="cpu")
    import shutil

    plain = str(tmp_path / "no-template")
    shutil.copytree(llava_folder, plain)
    for name in os.listdir(plain):
        if name.startswith("chat_template"):
            os.remove(os.path.join(plain, name))
    for name in ("processor_config.json", "tokenizer_config.json"):
        p = os.path.join(plain, name)
        if os.path.isfile(p):
            d = json.load(open(p, encoding="utf-8"))
            d.pop("chat_template", None)
            json.dump(d, open(p, "w", encoding="utf-8"))
    with pytest.raises(CaptionerError, match="no chat template"):
        make_captioner("vlm", model=plain)


@needs_vlm
def test_qwen2_vl_style_model(tmp_path, images):
    """A tiny Qwen2-VL through AutoProcessor / AutoModelForImageTextToText (its processor needs torchvision)."""
    pytest.importorskip("torchvision", reason="Qwen2-VL's processor needs torchvision (its video processor)")
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor

    from lora_train.models.qwen_image import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                          "<|video_pad|>"]})
    qt = TEMPLATE.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
    from transformers import Qwen2VLVideoProcessor

    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56),
                            tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=qt)
    cfg = Qwen2VLConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tok),
                                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
                        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, in_chans=3,
                                           spatial_merge_size=2, patch_size=14, temporal_patch_size=2),
                        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"))
    folder = str(tmp_path / "tiny-qwen2-vl")
    proc.save_pretrained(folder)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(folder)
    cap = make_captioner("vlm", model=folder, style="tags", max_new_tokens=5, device="cpu")
    ims = [Image.open(os.path.join(images, f"img{i}.png")) for i in range(2)]  # two sizes: two image grids
    out = cap.caption_batch(ims, ["a", "b"])
    assert len(out) == 2 and all("\n" not in t for t in out)
    assert out == [cap.caption_batch([im], [p])[0] for im, p in zip(ims, "ab")]


def test_answers_are_cleaned_into_the_styles_form():
    from lora_train.captions.vlm import clean

    assert clean("Here are the tags: 1girl, Red Hair,\n- smile, red hair.", "tags") == "1girl, red hair, smile"
    assert clean('"A woman\n  in a  park."', "paragraph") == "A woman in a park."


CORPUS = [("empty.png", ""), ("trig.png", "zq"), ("dup1.png", "zq, a woman in a red dress in a park"),
          ("dup2.png", "zq, a woman in a red dress in a park"),
          ("near1.png", "zq, woman red dress standing park bench sunny afternoon smiling"),
          ("near2.png", "zq, woman red dress standing park bench sunny afternoon smiling happily"),
          ("notrig.png", "a woman with red hair at the beach"), ("long.png", "zq, " + " ".join(["word"] * 90)),
          ("hair.png", "zq, red hair, freckles, green eyes")]


def test_caption_checks_find_each_problem_by_file():
    found = checks.check_captions(CORPUS, trigger="zq", kind="sd1", concept="red hair")
    by = {}
    for f in found:
        by.setdefault(f.check, []).append(f)
    assert by["empty"][0].files == ["empty.png", "trig.png"]
    assert by["duplicate"][0].files == ["dup1.png", "dup2.png"]
    assert by["near_duplicate"][0].files == ["near1.png", "near2.png"]
    assert by["too_long"][0].files == ["long.png"] and "75 tokens" in by["too_long"][0].problem
    assert "max_token_length 225" in by["too_long"][0].fix
    assert by["trigger_missing"][0].files == ["notrig.png"]
    named = by["concept_named"][0].files
    assert "hair.png" in named and "notrig.png" in named and "Leave what the LoRA should learn out" in \
        by["concept_named"][0].fix
    assert all(f.fix for f in found) and "dup1.png" in str(by["duplicate"][0])
    # the family's own limit: T5 reads 512 tokens, so the 90 words pass for Flux
    assert not [f for f in checks.check_captions(CORPUS, "zq", "flux") if f.check == "too_long"]
    # clean captions: nothing
    ok = [(f"{i}.png", f"zq, a {c} cat on a {p}") for i, (c, p) in enumerate([("black", "sofa"), ("white", "roof"),
                                                                               ("grey", "car"), ("orange", "box")])]
    assert checks.check_captions(ok, "zq", "sd1") == []


def test_words_in_nearly_every_caption_are_pointed_out():
    caps = [(f"{i}.png", f"zq, freckled woman, {x}") for i, x in enumerate(["park", "beach", "snow", "city", "cafe"])]
    found = [f for f in checks.check_captions(caps, "zq", "sd1") if f.check == "concept_named"]
    assert found and "freckled" in found[0].problem and found[0].severity == "info"


def test_cli_check_only_and_the_trainer_report_findings(tmp_path, capsys):
    from lora_train.cli.main import main

    folder = tmp_path / "ds"
    folder.mkdir()
    for name, cap in CORPUS[2:5]:
        Image.new("RGB", (32, 32), "red").save(folder / name)
        (folder / name).with_suffix(".txt").write_text(cap, encoding="utf-8")
    rc = main(["caption", str(folder), "--check-only", "--family", "sd1", "--trigger", "zq"])
    out = capsys.readouterr().out
    assert rc == 1 and "same caption" in out and "dup1.png" in out


@needs_vlm
def test_tab_previews_three_images_then_captions_and_checks(llava_folder, tmp_path):
    from lora_train.ui import logic

    class Host:
        def captioners(self):
            return {}

        def loaded_checkpoint(self):
            return None
    folder = tmp_path / "ds"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(folder / f"p{i}.png")
    label = next(k for k, v in logic.caption_backends(Host()).items() if v == "vlm")
    assert "Qwen2.5-VL" in label
    msg = logic.auto_caption(Host(), str(folder), "vlm", llava_folder, "skip", "zq", style="short", preview=3)
    assert msg.startswith("**Preview**") and msg.count("\n- `") == 3
    assert not [n for n in os.listdir(folder) if n.endswith(".txt")]  # a preview writes nothing
    msg = logic.auto_caption(Host(), str(folder), "vlm", llava_folder, "skip", "zq", style="short")
    assert len([n for n in os.listdir(folder) if n.endswith(".txt")]) == 5
    assert logic.caption_style(Host(), "auto") == "detailed"  # no model loaded: the default style


@needs_vlm
def test_auto_mode_picks_the_vlm_in_the_familys_style(llava_folder):
    from lora_train.auto.pipeline import pick_captioner

    cap, name, why = pick_captioner(None, "auto", "zq", llava_folder, "qwen_image")
    assert cap.name == "vlm" and cap.style.name == "detailed" and "detailed" in why and name.startswith("vlm")
    cap.unload()
    cap, _, _ = pick_captioner(None, "vlm", "zq", llava_folder, "sdxl")
    assert cap.style.name == "short"
    cap.unload()


@needs_vlm
def test_edit_style_writes_one_instruction_per_image_pair(llava_folder):
    cap = make_captioner("vlm", model=llava_folder, style="edit", max_new_tokens=5, device="cpu")
    assert cap.prompt_text().count("<image>") == 2
    pairs = [(Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue"))] * 2
    out = cap.caption_pairs(pairs)
    assert len(out) == 2 and all("\n" not in t for t in out)
    with pytest.raises(CaptionerError, match="takes 2 images"):
        cap.caption_batch([pairs[0][0]], ["a"])
    cap.unload()


@needs_vlm
def test_tab_lists_the_captioning_models_found_on_this_machine(llava_folder, tmp_path, monkeypatch):
    import shutil

    from lora_train.ui import logic

    models = tmp_path / "models" / "VLM"
    models.mkdir(parents=True)
    shutil.copytree(llava_folder, models / "JoyCaption-tiny")
    (models / "not-a-model").mkdir()
    hub = tmp_path / "hub"
    (hub / "models--Qwen--Qwen2.5-VL-7B-Instruct").mkdir(parents=True)
    (hub / "models--some--unet").mkdir()
    monkeypatch.setattr("lora_train.io_utils.hf_cache_dir", lambda: str(hub))

    class Host:
        def caption_model_dirs(self):
            return [str(models)]
    assert logic.caption_models(Host()) == [str(models / "JoyCaption-tiny"), "Qwen/Qwen2.5-VL-7B-Instruct"]


def test_old_transformers_get_a_message(tmp_path, monkeypatch):
    """Without AutoModelForImageTextToText (AUTOMATIC1111's transformers 4.30.2) the vlm backend says what to do."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    import sys

    monkeypatch.setattr(sys.modules["transformers"], "AutoModelForImageTextToText", None, raising=False)
    with pytest.raises(CaptionerError, match="need transformers >= 4.45"):
        make_captioner("vlm", model=str(tmp_path / "m"))
