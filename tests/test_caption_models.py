"""Model backends with tiny random models built here (nothing downloaded): transformers BLIP, WD14 ONNX."""
import os
import struct

import pytest

from lora_train.captions import backends as caption_mod  # where the captioners live (lora_train.caption was a shim)
from lora_train.captions import CaptionerError, TransformersCaptioner, WD14Tagger, caption_folder, make_captioner
from lora_train.cli.main import main
from lora_train.data.dataset import load_dataset
from lora_train.data.demo import procedural_images

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "red", "blue", "green",
         "circle", "square", "stripes", "on", "background", "with", "and", "the"]


def make_images(folder, n=3, size=32):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, im in enumerate(procedural_images(n, size)):
        p = os.path.join(folder, f"img_{i:03d}.png")
        im.save(p)
        paths.append(p)
    return paths


def read(path):
    with open(path, "rb") as fh:
        return fh.read()


# ------------------------------------------------------------------ tiny BLIP from a config
@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = str(tmp_path_factory.mktemp("tiny_blip"))
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(WORDS) + "\n")
    tok = BertTokenizer(os.path.join(folder, "vocab.txt"), bos_token="[DEC]")
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    v = len(WORDS)
    cfg = BlipConfig(
        text_config=dict(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=WORDS.index("[DEC]"),
                         eos_token_id=WORDS.index("[SEP]"), sep_token_id=WORDS.index("[SEP]"), pad_token_id=0,
                         encoder_hidden_size=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(cfg).eval()
    # make "[SEP]" (end) unlikely so that every caption has a few words
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[WORDS.index("[SEP]")] = -100.0
        for special in range(6):
            if special != WORDS.index("[SEP]"):
                model.text_decoder.cls.predictions.bias[special] = -100.0
    model.save_pretrained(folder, safe_serialization=True)
    proc.save_pretrained(folder)
    return folder


def test_transformers_backend_mechanics(tiny_blip, tmp_path):
    paths = make_images(str(tmp_path / "data"), n=3)
    cap = make_captioner("transformers", model=tiny_blip, device="cpu", max_new_tokens=6)
    assert isinstance(cap, TransformersCaptioner) and cap.model_type == "blip"
    calls = []
    rep = caption_folder(str(tmp_path / "data"), cap, trigger="sks", progress=lambda i, n, p: calls.append((i, n, p)))
    assert sorted(rep.written) == paths and not rep.failed
    assert [c[:2] for c in calls] == [(1, 3), (2, 3), (3, 3)]
    first = {}
    for p in paths:
        text = read(os.path.splitext(p)[0] + ".txt").decode()
        assert text.startswith("sks, ") and len(text) > len("sks, ")  # gibberish from random weights, but words
        assert set(text[len("sks, "):].split()) <= set(WORDS)
        first[p] = text
    # skip mode: the model is not run and nothing changes
    calls.clear()
    rep = caption_folder(str(tmp_path / "data"), cap, mode="skip", progress=lambda i, n, p: calls.append(i))
    assert rep.skipped == paths and not rep.written and calls == [1, 2, 3]
    assert {p: read(os.path.splitext(p)[0] + ".txt").decode() for p in paths} == first
    # overwrite in batches gives the same deterministic captions (greedy decoding)
    rep = caption_folder(str(tmp_path / "data"), cap, mode="overwrite", trigger="sks", batch_size=2)
    assert sorted(rep.written) == paths
    assert {p: read(os.path.splitext(p)[0] + ".txt").decode() for p in paths} == first
    # append keeps the old caption in front
    rep = caption_folder(str(tmp_path / "data"), cap, mode="append", out="txt")
    for p in paths:
        assert read(os.path.splitext(p)[0] + ".txt").decode().startswith(first[p] + ", ")
    # a text prompt (BLIP conditional captioning) is passed through
    cap.prompt = "a photo of"
    assert cap.caption(procedural_images(1, 32)[0]).startswith("a photo of")
    cap.unload()


def test_transformers_backend_git(tmp_path):
    """GIT (a decoder-only captioner: AutoModelForCausalLM on old transformers) through the same class."""
    import torch
    from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    folder = str(tmp_path / "tiny_git")
    os.makedirs(folder)
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(WORDS) + "\n")
    proc = GitProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                           crop_size={"height": 32, "width": 32}),
                        tokenizer=BertTokenizer(os.path.join(folder, "vocab.txt")))
    cfg = GitConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8),
                    vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    model = GitForCausalLM(cfg).eval()
    with torch.no_grad():  # no early end, no special tokens: every caption has words
        model.output.bias[:5] = -100.0
    model.save_pretrained(folder, safe_serialization=True)
    proc.save_pretrained(folder)
    cap = make_captioner("git", model=folder, device="cpu", max_new_tokens=4)
    assert cap.model_type == "git"
    paths = make_images(str(tmp_path / "d"), n=2)
    rep = caption_folder(str(tmp_path / "d"), cap, out="metadata.csv", batch_size=2)
    assert sorted(rep.written) == paths and all(rep.captions[p] for p in paths)


def test_transformers_backend_from_the_local_cache(tiny_blip, tmp_path, monkeypatch):
    # a repo id resolves through the local Hugging Face cache (stand-in: the tiny model's snapshot folder)
    monkeypatch.setattr(caption_mod, "_cached_file", lambda repo, name: os.path.join(tiny_blip, name)
                        if repo == "someone/tiny-blip" else None)
    cap = TransformersCaptioner("someone/tiny-blip", device="cpu", max_new_tokens=3)
    assert cap.folder == tiny_blip
    paths = make_images(str(tmp_path / "d"), n=2)
    rep = caption_folder(str(tmp_path / "d"), cap, out="metadata.csv")
    assert len(rep.written) == 2
    ds = load_dataset(str(tmp_path / "d"), resolution=32)
    assert [it.caption_source for it in ds.items] == ["metadata", "metadata"]
    assert [it.caption for it in ds.items] == [rep.captions[p] for p in paths]
    with pytest.raises(CaptionerError, match="not in the local Hugging Face cache"):
        TransformersCaptioner("someone/other-model")


def test_transformers_missing_weights_file(tiny_blip, tmp_path):
    import shutil

    broken = str(tmp_path / "broken")
    shutil.copytree(tiny_blip, broken)
    os.remove(os.path.join(broken, "model.safetensors"))
    with pytest.raises(CaptionerError) as e:
        TransformersCaptioner(broken, device="cpu")
    assert broken in str(e.value) and e.value.backend == "transformers" and "no weights" in str(e.value)
    # pickled weights only: refused unless allowed explicitly
    (tmp_path / "broken" / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(CaptionerError, match="allow_pickle=True"):
        TransformersCaptioner(broken, device="cpu")


def test_cli_transformers_backend(tiny_blip, tmp_path, capsys):
    make_images(str(tmp_path / "d"), n=2)
    assert main(["caption", str(tmp_path / "d"), "--backend", "blip", "--model", tiny_blip, "--device", "cpu",
                 "--max-new-tokens", "4", "--trigger", "sks"]) == 0
    out = capsys.readouterr().out
    assert "wrote 2" in out and "sks" in out
    assert len(load_dataset(str(tmp_path / "d"), resolution=32).items) == 2


# ------------------------------------------------------------------ tiny WD14 ONNX model, written by hand
# A minimal protobuf writer for the few ONNX messages needed (so the test needs onnxruntime only, not onnx).
def _varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def _f(num, value):
    if isinstance(value, int):
        return _varint(num << 3) + _varint(value)
    if isinstance(value, str):
        value = value.encode()
    return _varint(num << 3 | 2) + _varint(len(value)) + value


def _tensor(name, dims, values):
    return b"".join(_f(1, d) for d in dims) + _f(2, 1) + _f(8, name) + _f(9, struct.pack(f"<{len(values)}f", *values))


def _value_info(name, dims):
    shape = b"".join(_f(1, _f(1, d) if isinstance(d, int) else _f(2, d)) for d in dims)
    return _f(1, name) + _f(2, _f(1, _f(1, 1) + _f(2, shape)))


def _node(op, inputs, outputs):
    return b"".join(_f(1, i) for i in inputs) + b"".join(_f(2, o) for o in outputs) + _f(3, op + "_0") + _f(4, op)


def need_onnxruntime():
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:  # absent, or present but broken: the WD14 backend is optional
        pytest.skip(f"onnxruntime is not available ({exc}); the WD14 backend is optional")


SIDE = 8
# name, category (0 general, 4 character, 9 rating), bias (logit); "red_theme" also looks at the red channel
TAGS = [("general", 9, 2.2), ("explicit", 9, -2.0), ("1girl", 0, 2.2), ("^_^", 0, 0.4), ("long_hair", 0, -1.4),
        ("red_theme", 0, -5.0), ("hatsune_miku", 4, 0.85), ("some_character", 4, 3.0)]


def write_tiny_wd14(folder):
    n_in, n_out = SIDE * SIDE * 3, len(TAGS)
    w = [0.0] * (n_in * n_out)
    red = [name for name, _, _ in TAGS].index("red_theme")
    for px in range(SIDE * SIDE):  # input is BGR: red is channel 2
        w[(px * 3 + 2) * n_out + red] = 10.0 / (SIDE * SIDE * 255.0)
    graph = (_f(1, _node("Flatten", ["input"], ["flat"])) + _f(1, _node("MatMul", ["flat", "W"], ["mm"])) +
             _f(1, _node("Add", ["mm", "B"], ["logits"])) + _f(1, _node("Sigmoid", ["logits"], ["output"])) +
             _f(2, "tiny_wd14") + _f(5, _tensor("W", [n_in, n_out], w)) +
             _f(5, _tensor("B", [n_out], [b for _, _, b in TAGS])) +
             _f(11, _value_info("input", ["batch", SIDE, SIDE, 3])) + _f(12, _value_info("output", ["batch", n_out])))
    model = _f(1, 7) + _f(2, "lora_train-test") + _f(7, graph) + _f(8, _f(1, "") + _f(2, 13))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "model.onnx"), "wb") as fh:
        fh.write(model)
    with open(os.path.join(folder, "selected_tags.csv"), "w", encoding="utf-8") as fh:
        fh.write("tag_id,name,category,count\n")
        for i, (name, cat, _) in enumerate(TAGS):
            fh.write(f"{i},{name},{cat},{100 - i}\n")
    return folder


def test_wd14_tagger(tmp_path):
    need_onnxruntime()
    from PIL import Image

    folder = write_tiny_wd14(str(tmp_path / "wd14"))
    tagger = make_captioner("wd14", model=folder, device="cpu")
    assert isinstance(tagger, WD14Tagger) and tagger.size == SIDE
    tags = tagger.caption(Image.new("RGB", (40, 20), (255, 0, 0)))
    names = [t for t, _ in tags]
    # characters first (over 0.85), then general tags by falling confidence; kaomoji keep "_"; no ratings
    assert names == ["some character", "red theme", "1girl", "^_^"]
    conf = dict(tags)
    assert conf["red theme"] > 0.99 and abs(conf["1girl"] - 0.9002) < 1e-3 and abs(conf["^_^"] - 0.5987) < 1e-3
    assert [t for t, _ in tagger.caption(Image.new("RGB", (16, 16), (0, 0, 255)))] == ["some character", "1girl",
                                                                                         "^_^"]
    strict = WD14Tagger(folder, threshold=0.7, character_threshold=0.5, include_ratings=True,
                        replace_underscores=False, exclude_tags=["some character"])
    assert [t for t, _ in strict.caption(Image.new("RGB", (16, 16), (0, 0, 255)))] == ["general", "hatsune_miku",
                                                                                        "1girl"]
    # through caption_folder: tags with confidences in the report, text in the sidecar
    paths = make_images(str(tmp_path / "d"), n=2)
    rep = caption_folder(str(tmp_path / "d"), tagger, trigger="sks", remove_tags=["^_^"])
    assert sorted(rep.written) == paths and rep.tags[paths[0]][0][0] == "some character"
    text = read(os.path.splitext(paths[0])[0] + ".txt").decode()
    assert text.startswith("sks, some character") and "^_^" not in text
    # a tags file that does not match the model
    with open(os.path.join(folder, "selected_tags.csv"), "a", encoding="utf-8") as fh:
        fh.write("99,extra,0,1\n")
    with pytest.raises(CaptionerError, match="same model"):
        WD14Tagger(folder)


def test_cli_wd14(tmp_path, capsys):
    need_onnxruntime()
    folder = write_tiny_wd14(str(tmp_path / "wd14"))
    make_images(str(tmp_path / "d"), n=2)
    assert main(["caption", str(tmp_path / "d"), "--backend", "wd14", "--model", folder, "--threshold", "0.7",
                 "--out", "metadata.csv"]) == 0
    out = capsys.readouterr().out
    assert "1girl" in out and "^_^" not in out
    assert {it.caption for it in load_dataset(str(tmp_path / "d"), resolution=32).items} == {"some character, 1girl"}
