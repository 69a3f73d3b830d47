"""Captioning without models: template / host backends, modes, caption edits, metadata.csv, table, CLI."""
import csv
import os

import pytest

from lora_train.captions import (CaptionConflict, CaptionerError, CaptionTable, HostCaptioner, TemplateCaptioner,
                                 TransformersCaptioner, WD14Tagger, caption_folder, make_captioner, parse_pairs,
                                 process_caption, tag_frequency)
from lora_train.cli.main import main
from lora_train.data.dataset import load_dataset
from lora_train.data.demo import procedural_images


def make_images(folder, n=4, size=32, prefix="img"):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, im in enumerate(procedural_images(n, size)):
        p = os.path.join(folder, f"{prefix}_{i:03d}.png")
        im.save(p)
        paths.append(p)
    return paths


def read(path):
    with open(path, "rb") as fh:
        return fh.read()


def sidecar(p):
    return os.path.splitext(p)[0] + ".txt"


# ------------------------------------------------------------------ template backend
def test_template_captioner_fields(tmp_path):
    paths = make_images(str(tmp_path / "10_red_dress"), n=1)
    cap = TemplateCaptioner("{trigger}, {folder}, {stem}", trigger="sks")
    assert cap.caption(None, paths[0]) == "sks, red dress, img_000"
    assert TemplateCaptioner("{trigger}, {folder}, {words}").caption(None, paths[0]) == "red dress, img"
    assert TemplateCaptioner("photo of {words} ({width}x{height})").caption(
        procedural_images(1, 32)[0], str(tmp_path / "blue-shirt_07.png")) == "photo of blue shirt (32x32)"
    with pytest.raises(CaptionerError, match="did you mean {stem}"):
        TemplateCaptioner("{trigger}, {stme}")
    assert isinstance(make_captioner("filename", trigger="x"), TemplateCaptioner)


def test_template_folder_kohya_subfolders_and_progress(tmp_path):
    root = tmp_path / "data"
    a = make_images(str(root), n=2)
    b = make_images(str(root / "5_cat"), n=2, prefix="c")
    make_images(str(root / "not_a_repeat_folder"), n=1)  # the loader ignores it, so do we
    calls = []
    rep = caption_folder(str(root), make_captioner("template", template="{folder}, {stem}"), trigger="sks",
                         progress=lambda i, n, p: calls.append((i, n, p)))
    assert sorted(rep.written) == sorted(a + b) and not rep.skipped and not rep.failed
    assert [c[0] for c in calls] == [1, 2, 3, 4] and {c[1] for c in calls} == {4}
    assert sorted(c[2] for c in calls) == sorted(a + b)
    assert read(sidecar(b[0])) == b"sks, cat, c_000"
    assert read(sidecar(a[1])) == b"sks, data, img_001"
    ds = load_dataset(str(root), resolution=32)
    assert {it.caption for it in ds.items} == {"sks, data, img_000", "sks, data, img_001", "sks, cat, c_000",
                                               "sks, cat, c_001"}
    assert rep.tag_frequency() == ds.tag_frequency() == tag_frequency(str(root))
    assert ds.tag_frequency()["cat"] == {"sks": 2, "cat": 2, "c_000": 1, "c_001": 1}


# ------------------------------------------------------------------ modes
def test_skip_mode_leaves_existing_captions_byte_for_byte(tmp_path):
    paths = make_images(str(tmp_path), n=5)
    odd = b"\xef\xbb\xbfsks,  1girl ,red\r\nsecond line  \n"  # BOM, CRLF, odd spacing: must survive as is
    latin1 = "caf\xe9, tag".encode("latin-1")               # not UTF-8: still an existing caption
    with open(sidecar(paths[0]), "wb") as fh:
        fh.write(odd)
    with open(sidecar(paths[1]), "wb") as fh:
        fh.write(latin1)
    open(sidecar(paths[2]), "wb").close()                  # empty file = no caption: gets written
    before = {p: os.stat(sidecar(p)).st_mtime_ns for p in paths[:2]}
    rep = caption_folder(str(tmp_path), TemplateCaptioner("{stem}"), mode="skip", trigger="sks")
    assert sorted(rep.skipped) == sorted(paths[:2])
    assert sorted(rep.written) == sorted(paths[2:])
    assert read(sidecar(paths[0])) == odd and read(sidecar(paths[1])) == latin1
    assert {p: os.stat(sidecar(p)).st_mtime_ns for p in paths[:2]} == before
    assert read(sidecar(paths[2])) == b"sks, img_002"
    # a second skip run touches nothing at all and does not even call the captioner
    snapshot = {f: read(os.path.join(tmp_path, f)) for f in os.listdir(tmp_path)}
    called = []
    rep2 = caption_folder(str(tmp_path), HostCaptioner(lambda im: called.append(1) or "x"), mode="skip")
    assert len(rep2.skipped) == 5 and not rep2.written and not called
    assert {f: read(os.path.join(tmp_path, f)) for f in os.listdir(tmp_path)} == snapshot
    assert sorted(os.listdir(tmp_path)) == sorted(snapshot)  # no temp files left behind


def test_overwrite_and_append_modes(tmp_path):
    paths = make_images(str(tmp_path), n=2)
    with open(sidecar(paths[0]), "w", encoding="utf-8") as fh:
        fh.write("old caption, red")
    caption_folder(str(tmp_path), HostCaptioner(lambda im: "red, new tag"), mode="append", dedupe=True)
    assert read(sidecar(paths[0])) == b"old caption, red, new tag"
    assert read(sidecar(paths[1])) == b"red, new tag"
    caption_folder(str(tmp_path), HostCaptioner(lambda im: "replaced"), mode="overwrite", trigger="sks")
    assert read(sidecar(paths[0])) == read(sidecar(paths[1])) == b"sks, replaced"
    with open(sidecar(paths[0]), "wb") as fh:
        fh.write("caf\xe9".encode("latin-1"))
    rep = caption_folder(str(tmp_path), HostCaptioner(lambda im: "x"), mode="append")
    assert [p for p, _ in rep.failed] == [paths[0]] and "UTF-8" in rep.failed[0][1]
    assert read(sidecar(paths[0])) == "caf\xe9".encode("latin-1")
    with pytest.raises(ValueError, match="mode must be"):
        caption_folder(str(tmp_path), TemplateCaptioner(), mode="replace")


def test_corrupt_images_and_captioner_errors_are_reported(tmp_path):
    paths = make_images(str(tmp_path), n=3)
    with open(tmp_path / "broken.png", "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\nnot really")

    def flaky(im):
        if im.getpixel((0, 0)) == procedural_images(3, 32)[1].getpixel((0, 0)):
            raise RuntimeError("model exploded")
        return {"b": 0.4, "a": 0.9}  # a tagger-style result: sorted by confidence

    calls = []
    rep = caption_folder(str(tmp_path), HostCaptioner(flaky, name="webui-deepbooru"), batch_size=2,
                         progress=lambda i, n, p: calls.append(i))
    failed = dict(rep.failed)
    assert "cannot read the image" in failed[str(tmp_path / "broken.png")]
    assert "webui-deepbooru failed" in failed[paths[1]] and "model exploded" in failed[paths[1]]
    assert sorted(rep.written) == [paths[0], paths[2]] and read(sidecar(paths[0])) == b"a, b"
    assert rep.tags[paths[0]] == [("a", 0.9), ("b", 0.4)]
    assert sorted(calls) == [1, 2, 3, 4]
    assert not os.path.exists(tmp_path / "broken.txt")


def test_should_stop_and_dry_run(tmp_path):
    paths = make_images(str(tmp_path), n=4)
    seen = []
    rep = caption_folder(str(tmp_path), TemplateCaptioner("{stem}"), progress=lambda i, n, p: seen.append(i),
                         should_stop=lambda: len(seen) >= 2)
    assert rep.stopped and len(rep.written) == 2
    assert [os.path.exists(sidecar(p)) for p in paths] == [True, True, False, False]
    rep = caption_folder(str(tmp_path), TemplateCaptioner("{stem}"), mode="overwrite", trigger="t", dry_run=True)
    assert len(rep.written) == 4 and rep.captions[paths[3]] == "t, img_003"
    assert not os.path.exists(sidecar(paths[3])) and read(sidecar(paths[0])) == b"img_000"


# ------------------------------------------------------------------ caption edits
def test_trigger_prefix_is_never_duplicated():
    assert process_caption("a cat, sitting", trigger="sks") == "sks, a cat, sitting"
    assert process_caption("sks, a cat", trigger="sks") == "sks, a cat"
    assert process_caption("a cat, SKS, sitting", trigger="sks") == "sks, a cat, sitting"  # moved first
    assert process_caption("sks person on a beach", trigger="sks") == "sks person on a beach"
    assert process_caption("sksx, cat", trigger="sks") == "sks, sksx, cat"
    assert process_caption("", trigger="sks") == "sks"


def test_find_replace_and_tag_edits():
    assert process_caption("a girl with a  red hat", replace=[("red", "blue"), ("girl", "woman")]) == \
        "a woman with a blue hat"
    assert parse_pairs(["a=b", "c=", "x=y=z"]) == [("a", "b"), ("c", ""), ("x", "y=z")]
    with pytest.raises(ValueError, match="OLD=NEW"):
        parse_pairs(["nothing"])
    assert process_caption("1girl, girls, Red Hat", replace_tags=[("red hat", "hat"), ("1girl", "")]) == "girls, hat"
    assert process_caption("a, b, c", remove_tags=["B"], add_tags=["d", "a"]) == "a, c, d"


def test_dedupe_keep_tokens_and_sort():
    assert process_caption("b, a, B, c, a", dedupe=True) == "b, a, c"
    assert process_caption("zeta, alpha, mid, alpha", dedupe=True, sort="alpha") == "alpha, mid, zeta"
    # keep_tokens: the first N tags stay where they are; the rest are sorted / deduped
    assert process_caption("zeta, mid, beta, alpha, zeta", dedupe=True, keep_tokens=2, sort="alpha") == \
        "zeta, mid, alpha, beta"
    # the trigger is always fixed first and counts as one of the kept tokens
    assert process_caption("zeta, beta, alpha", trigger="sks", keep_tokens=2, sort="alpha") == \
        "sks, zeta, alpha, beta"
    assert process_caption("zeta, beta, alpha", trigger="sks", sort="alpha") == "sks, alpha, beta, zeta"


def test_caption_folder_applies_edits(tmp_path):
    make_images(str(tmp_path), n=1)
    caption_folder(str(tmp_path), HostCaptioner(lambda im: "girl, Red, hat, red, ugly"), trigger="sks",
                   replace=[("girl", "woman")], replace_tags=[("hat", "cap")], remove_tags=["ugly"],
                   dedupe=True, keep_tokens=2, sort="alpha")
    assert read(str(tmp_path / "img_000.txt")) == b"sks, woman, cap, Red"


# ------------------------------------------------------------------ metadata.csv
def test_metadata_csv_round_trip(tmp_path):
    paths = make_images(str(tmp_path), n=3)
    names = [os.path.basename(p) for p in paths]
    with open(tmp_path / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        fh.write('file_name,text,score\nother.png,"kept, row",7\n' + f'{names[0]},"existing, caption",5\n')
    before = read(str(tmp_path / "metadata.csv"))
    rep = caption_folder(str(tmp_path), TemplateCaptioner("{stem}, with \"quotes\", comma"), trigger="sks",
                         out=str(tmp_path / "metadata.csv"))
    assert rep.skipped == [paths[0]] and sorted(rep.written) == paths[1:]
    assert not any(os.path.exists(sidecar(p)) for p in paths)
    with open(tmp_path / "metadata.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file_name"] for r in rows] == ["other.png", names[0], names[1], names[2]]
    assert rows[0] == {"file_name": "other.png", "text": "kept, row", "score": "7"}
    ds = load_dataset(str(tmp_path), resolution=32)
    got = {os.path.basename(it.path): (it.caption, it.caption_source) for it in ds.items}
    assert got == {names[0]: ("existing, caption", "metadata"),
                   names[1]: ('sks, img_001, with "quotes", comma', "metadata"),
                   names[2]: ('sks, img_002, with "quotes", comma', "metadata")}
    assert rep.tag_frequency() == ds.tag_frequency()
    # skip mode again: the file stays byte for byte
    after = read(str(tmp_path / "metadata.csv"))
    assert after != before
    caption_folder(str(tmp_path), TemplateCaptioner("{stem}"), out="metadata.csv")
    assert read(str(tmp_path / "metadata.csv")) == after
    caption_folder(str(tmp_path), TemplateCaptioner("new"), out="metadata.csv", mode="overwrite")
    ds = load_dataset(str(tmp_path), resolution=32)
    assert {it.caption for it in ds.items} == {"new"}
    with pytest.raises(ValueError, match="metadata.csv"):
        caption_folder(str(tmp_path), TemplateCaptioner(), out="captions.csv")


def test_metadata_out_uses_the_folders_own_metadata_file(tmp_path):
    paths = make_images(str(tmp_path), n=2)
    with open(tmp_path / "metadata.jsonl", "w", encoding="utf-8") as fh:
        fh.write('{"file_name": "%s", "text": "from jsonl", "extra": 1}\n' % os.path.basename(paths[0]))
    rep = caption_folder(str(tmp_path), TemplateCaptioner("{stem}"), out="metadata.csv")
    assert not os.path.exists(tmp_path / "metadata.csv") and any("metadata.jsonl" in w for w in rep.warnings)
    ds = load_dataset(str(tmp_path), resolution=32)
    assert [it.caption for it in ds.items] == ["from jsonl", "img_001"]
    assert '"extra": 1' in (tmp_path / "metadata.jsonl").read_text()


def test_txt_under_existing_metadata_warns(tmp_path):
    paths = make_images(str(tmp_path), n=2)
    with open(tmp_path / "metadata.csv", "w", encoding="utf-8") as fh:
        fh.write(f"file_name,text\n{os.path.basename(paths[0])},from meta\n")
    rep = caption_folder(str(tmp_path), TemplateCaptioner("{stem}"), mode="overwrite")
    assert any("reads metadata first" in w for w in rep.warnings)


# ------------------------------------------------------------------ missing models, factory
def test_missing_weights_messages(tmp_path, monkeypatch):
    where = tmp_path / "models" / "blip"
    with pytest.raises(CaptionerError) as e:
        make_captioner("transformers", model=str(where))
    msg = str(e.value)
    assert "transformers captioner" in msg and str(where) in msg and "hf download" in msg
    assert e.value.backend == "transformers" and e.value.path == str(where) and e.value.fix
    os.makedirs(where)
    with pytest.raises(CaptionerError, match="config.json"):
        TransformersCaptioner(str(where))
    with pytest.raises(CaptionerError) as e:
        make_captioner("blip", model="nobody-xyz/no-such-captioner")
    msg = str(e.value)
    assert "not in the local Hugging Face cache" in msg and "models--nobody-xyz--no-such-captioner" in msg
    assert "hf download nobody-xyz/no-such-captioner" in msg
    with pytest.raises(CaptionerError) as e:
        make_captioner("wd14", model=str(tmp_path / "tagger"))
    msg = str(e.value)
    assert "wd14 captioner" in msg and str(tmp_path / "tagger") in msg and "selected_tags.csv" in msg
    os.makedirs(tmp_path / "tagger")
    (tmp_path / "tagger" / "model.onnx").write_bytes(b"")
    with pytest.raises(CaptionerError, match="selected_tags.csv not found"):
        WD14Tagger(str(tmp_path / "tagger"))
    # onnxruntime missing: the message says how to install it
    (tmp_path / "tagger" / "selected_tags.csv").write_text("tag_id,name,category,count\n1,a,0,1\n")
    import builtins

    real_import = builtins.__import__

    def no_ort(name, *a, **k):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(CaptionerError, match="pip install onnxruntime"):
        WD14Tagger(str(tmp_path / "tagger"))


def test_factory_errors():
    with pytest.raises(CaptionerError, match="did you mean 'template'"):
        make_captioner("tempate")
    with pytest.raises(CaptionerError, match="unknown option"):
        make_captioner("template", threshold=0.3)
    with pytest.raises(CaptionerError, match="interrogator"):
        make_captioner("host", fn=None)
    cap = make_captioner("host", fn=lambda im: ["a_b", "c"], name="webui-blip")
    assert cap.caption(procedural_images(1, 8)[0]) == "a_b, c" and cap.name == "webui-blip"


# ------------------------------------------------------------------ caption table
def test_caption_table_edit_bulk_edit_save(tmp_path):
    root = tmp_path / "data"
    a = make_images(str(root), n=3)
    sub = make_images(str(root / "2_cat"), n=2, prefix="c")
    with open(sidecar(a[0]), "w", encoding="utf-8") as fh:
        fh.write("red, circle")
    with open(sidecar(a[1]), "w", encoding="utf-8") as fh:
        fh.write("blue,  square")
    with open(root / "2_cat" / "metadata.csv", "w", encoding="utf-8") as fh:
        fh.write(f"file_name,text\n{os.path.basename(sub[0])},\"cat, sitting\"\n")
    t = CaptionTable(str(root))
    # the table shows what the trainer reads (lora_train.data.folder): whitespace collapsed as in training
    assert t.rows() == [(a[0], "red, circle", "txt"), (a[1], "blue, square", "txt"), (a[2], "", "none"),
                        (sub[0], "cat, sitting", "metadata"), (sub[1], "", "none")]
    assert t.tag_frequency() == {"data": {"red": 1, "circle": 1, "blue": 1, "square": 1},
                                 "cat": {"cat": 1, "sitting": 1}}
    untouched = read(sidecar(a[1]))
    mtime = os.stat(sidecar(a[1])).st_mtime_ns
    t.edit(a[0], "red,  circle, shiny")
    t.edit("img_002.png", "new one")  # relative to the folder works too
    assert t.get(a[0]) == "red, circle, shiny"
    n = t.bulk_edit([a[0], sub[0], sub[1]], trigger="sks", replace_tags=[("circle", "ring")], remove_tags=["sitting"])
    assert n == 3
    assert t.get(sub[1]) == "sks" and t.get(sub[0]) == "sks, cat" and t.get(a[0]) == "sks, red, ring, shiny"
    assert set(t.dirty) == {a[0], a[2], sub[0], sub[1]}
    written = t.save()
    assert sorted(written) == sorted([sidecar(a[0]), sidecar(a[2]), str(root / "2_cat" / "metadata.csv")])
    assert read(sidecar(a[1])) == untouched and os.stat(sidecar(a[1])).st_mtime_ns == mtime
    assert read(sidecar(a[2])) == b"new one" and not os.path.exists(sidecar(sub[1]))
    assert t.dirty == [] and t.save() == []
    ds = load_dataset(str(root), resolution=32)
    caps = {os.path.basename(it.path): it.caption for it in ds.items}
    assert caps == {"img_000.png": "sks, red, ring, shiny", "img_001.png": "blue, square", "img_002.png": "new one",
                    "c_000.png": "sks, cat", "c_001.png": "sks"}
    # somebody else changes a caption on disk: save refuses, then force wins
    t.edit(a[2], "mine")
    with open(sidecar(a[2]), "w", encoding="utf-8") as fh:
        fh.write("theirs")
    with pytest.raises(CaptionConflict, match="changed on disk"):
        t.save()
    assert read(sidecar(a[2])) == b"theirs"
    assert t.save(force=True) == [sidecar(a[2])] and read(sidecar(a[2])) == b"mine"
    t.edit(a[1], "x")
    t.revert(a[1])
    assert t.dirty == []
    # edits that change nothing but spacing do not count, so no file is rewritten for them
    with open(sidecar(a[1]), "w", encoding="utf-8") as fh:
        fh.write("blue,  square ,red")
    t.reload()
    assert t.bulk_edit(replace=[("not there", "x")]) == 0 and t.bulk_edit(dedupe=True) == 0
    t.edit(a[1], "blue, square, red")
    assert t.dirty == [] and t.save() == []
    with pytest.raises(KeyError):
        t.edit(str(tmp_path / "elsewhere.png"), "x")


# ------------------------------------------------------------------ CLI
def test_cli_caption(tmp_path, capsys):
    paths = make_images(str(tmp_path / "d"), n=3)
    with open(sidecar(paths[0]), "wb") as fh:
        fh.write(b"keep me")
    rc = main(["caption", str(tmp_path / "d"), "--backend", "template", "--template", "{trigger}, {stem}, photo",
               "--trigger", "sks", "--replace", "photo=picture", "--dedupe", "--keep-tokens", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "wrote 2, skipped 1" in out and "tag frequency" in out and "picture" in out
    assert read(sidecar(paths[0])) == b"keep me" and read(sidecar(paths[1])) == b"sks, img_001, picture"
    rc = main(["caption", str(tmp_path / "d"), "--mode", "overwrite", "--template", "{stem}", "--out",
               "metadata.csv"])
    assert rc == 0 and len(load_dataset(str(tmp_path / "d"), 32).items) == 3
    assert {it.caption for it in load_dataset(str(tmp_path / "d"), 32).items} == {"img_000", "img_001", "img_002"}
    capsys.readouterr()
    assert main(["caption", str(tmp_path / "d"), "--backend", "transformers", "--model",
                 str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "transformers captioner" in err and "nope" in err and "Traceback" not in err
    assert main(["caption", str(tmp_path / "d"), "--backend", "host"]) == 2
    assert main(["caption", str(tmp_path / "missing")]) == 2
    assert main(["caption", str(tmp_path / "d"), "--replace", "oops"]) == 2
