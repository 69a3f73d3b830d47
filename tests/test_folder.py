"""One folder reader (lora_train.data.folder): the trainer's dataset and the caption table see the same rows."""
import codecs
import json
import os

from PIL import Image

from lora_train.captions import CaptionTable, caption_folder, TemplateCaptioner
from lora_train.data.dataset import load_dataset
from lora_train.data.folder import decode_text, encode_text, scan_folder


def _img(path, color=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ext = os.path.splitext(path)[1].lower()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".gif": "GIF"}.get(ext, "PNG")
    Image.new("RGB", (32, 32), color).save(path, format=fmt)
    return path


def _odd_corpus(root):
    """Every kind of folder layout and caption file the reader must handle. Returns {relative image: caption}
    the trainer must read (without trigger word)."""
    r = str(root)
    want = {}
    _img(f"{r}/utf8.png"); open(f"{r}/utf8.txt", "wb").write("café, plain".encode("utf-8"))
    want["utf8.png"] = "café, plain"
    _img(f"{r}/bom.png"); open(f"{r}/bom.txt", "wb").write(codecs.BOM_UTF8 + "bom, caf\u00e9".encode("utf-8"))
    want["bom.png"] = "bom, café"
    _img(f"{r}/u16le.png"); open(f"{r}/u16le.txt", "wb").write(codecs.BOM_UTF16_LE + "sixteen, le \u00e9".encode("utf-16-le"))
    want["u16le.png"] = "sixteen, le é"
    _img(f"{r}/u16be.png"); open(f"{r}/u16be.txt", "wb").write(codecs.BOM_UTF16_BE + "sixteen, be".encode("utf-16-be"))
    want["u16be.png"] = "sixteen, be"
    _img(f"{r}/crlf.png"); open(f"{r}/crlf.txt", "wb").write(b"line one,\r\nline two\r\n")
    want["crlf.png"] = "line one, line two"
    _img(f"{r}/empty.png"); open(f"{r}/empty.txt", "wb").write(b"  \r\n")
    want["empty.png"] = None
    _img(f"{r}/nocap.png")
    want["nocap.png"] = None
    _img(f"{r}/UPPER.PNG"); open(f"{r}/UPPER.txt", "wb").write(b"upper case ext")
    want["UPPER.PNG"] = "upper case ext"
    _img(f"{r}/Shout.JPG"); open(f"{r}/Shout.TXT", "wb").write(b"upper case caption ext")
    want["Shout.JPG"] = "upper case caption ext"
    _img(f"{r}/.hidden.png"); open(f"{r}/.hidden.txt", "wb").write(b"never read")
    # metadata.csv at the root: `./` rows, a subfolder row, a row without text (the sidecar is used then)
    _img(f"{r}/a.png"); _img(f"{r}/b.png"); _img(f"{r}/sub/c.png"); _img(f"{r}/d.png")
    open(f"{r}/d.txt", "wb").write(b"d from txt")
    open(f"{r}/b.txt", "wb").write(b"b sidecar loses to metadata")
    with open(f"{r}/metadata.csv", "w", encoding="utf-8", newline="") as fh:
        fh.write('file_name,text,extra\na.png,"meta a, tags",1\n./b.png,meta b,2\nsub/c.png,"meta c",3\nd.png,,4\n')
    want.update({"a.png": "meta a, tags", "b.png": "meta b", "sub/c.png": "meta c", "d.png": "d from txt"})
    # kohya N_name folders: one with a jsonl (with "caption" as HF allows and a ./ name), one with sidecars
    _img(f"{r}/10_mychar/m1.png"); _img(f"{r}/10_mychar/m2.webp")
    with open(f"{r}/10_mychar/metadata.jsonl", "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"file_name": "./m1.png", "text": "jsonl one"}) + "\n")
        fh.write(json.dumps({"file_name": "m2.webp", "caption": "jsonl two"}) + "\n")
    want.update({"10_mychar/m1.png": "jsonl one", "10_mychar/m2.webp": "jsonl two"})
    _img(f"{r}/2_style/s1.jpeg"); open(f"{r}/2_style/s1.txt", "wb").write(codecs.BOM_UTF8 + b"style one")
    _img(f"{r}/2_style/s2.bmp")
    want.update({"2_style/s1.jpeg": "style one", "2_style/s2.bmp": None})
    # nested folders that are not kohya folders (and a kohya folder nested in one): not read
    _img(f"{r}/extras/x.png"); _img(f"{r}/2_style/deeper/y.png"); _img(f"{r}/.cache/5_z/z.png")
    return want


def test_dataset_and_caption_table_read_the_same_rows(tmp_path):
    root = tmp_path / "data"
    want = _odd_corpus(root)
    scan = scan_folder(str(root))
    got = {os.path.relpath(r.path, root).replace(os.sep, "/"): r.caption for r in scan.rows}
    assert got == want
    reps = {os.path.relpath(r.path, root).replace(os.sep, "/"): (r.repeats, r.folder_name) for r in scan.rows}
    assert reps["10_mychar/m1.png"] == (10, "mychar") and reps["2_style/s2.bmp"] == (2, "style")
    assert reps["sub/c.png"] == (1, "data") and reps["a.png"] == (1, "data")

    ds = load_dataset(str(root), resolution=32)
    table = CaptionTable(str(root))
    # the trainer puts a fallback (folder name) where there is no caption; the table shows an empty caption
    trainer_rows = [(it.path, it.caption if it.caption_source != "fallback" else "") for it in ds.items]
    table_rows = [(r.path, r.caption) for r in table.rows()]
    assert trainer_rows == table_rows
    assert [(p, c) for p, c in table_rows] == [(r.path, r.caption or "") for r in scan.rows]
    src = {os.path.relpath(r.path, root).replace(os.sep, "/"): r.source for r in table.rows()}
    assert src["b.png"] == "metadata" and src["d.png"] == "txt" and src["nocap.png"] == "none"
    assert "extras" in " ".join(ds.warnings)  # the unread subfolder is named


def test_undecodable_caption_shown_in_table_not_trained(tmp_path):
    root = tmp_path / "data"
    _img(str(root / "a.png"))
    (root / "a.txt").write_bytes("caf\xe9 au lait".encode("cp1252"))
    ds = load_dataset(str(root), resolution=32, trigger_word="tok")
    assert ds.items[0].caption == "tok" and ds.items[0].caption_source == "fallback"
    t = CaptionTable(str(root))
    assert t.rows()[0].caption == "café au lait"  # shown (cp1252 reading) so the user can fix and save it
    t.edit(str(root / "a.png"), "café au lait, fixed")
    t.save()
    assert (root / "a.txt").read_bytes() == "café au lait, fixed".encode("utf-8")  # saved as UTF-8
    assert load_dataset(str(root), resolution=32).items[0].caption == "café au lait, fixed"


def test_saving_keeps_unicode_encodings_and_metadata_names(tmp_path):
    root = tmp_path / "data"
    for n in ("le", "be", "bom", "plain"):
        _img(str(root / f"{n}.png"))
    (root / "le.txt").write_bytes(codecs.BOM_UTF16_LE + "old".encode("utf-16-le"))
    (root / "be.txt").write_bytes(codecs.BOM_UTF16_BE + "old".encode("utf-16-be"))
    (root / "bom.txt").write_bytes(codecs.BOM_UTF8 + b"old")
    (root / "plain.txt").write_bytes(b"old")
    _img(str(root / "2_m" / "m.png"))
    (root / "2_m" / "metadata.csv").write_bytes(codecs.BOM_UTF8 + b"file_name,text\n./m.png,old meta\n")
    t = CaptionTable(str(root))
    for p in t.paths():
        t.edit(p, "new \u00e9")
    assert len(t.save()) == 5
    assert (root / "le.txt").read_bytes() == codecs.BOM_UTF16_LE + "new \u00e9".encode("utf-16-le")
    assert (root / "be.txt").read_bytes() == codecs.BOM_UTF16_BE + "new \u00e9".encode("utf-16-be")
    assert (root / "bom.txt").read_bytes() == codecs.BOM_UTF8 + "new \u00e9".encode("utf-8")
    assert (root / "plain.txt").read_bytes() == "new \u00e9".encode("utf-8")
    # the `./m.png` row is updated in place (no second row), the Excel BOM kept
    assert (root / "2_m" / "metadata.csv").read_bytes() == codecs.BOM_UTF8 + "file_name,text\n./m.png,new \u00e9\n".encode()
    assert {it.caption for it in load_dataset(str(root), resolution=32).items} == {"new \u00e9"}
    # caption_folder (overwrite) keeps the UTF-16 file's encoding too
    caption_folder(str(root), TemplateCaptioner("{stem} x"), mode="overwrite")
    assert (root / "le.txt").read_bytes() == codecs.BOM_UTF16_LE + "le x".encode("utf-16-le")


def test_decode_encode_round_trip():
    for data in (b"plain", codecs.BOM_UTF8 + b"bom", codecs.BOM_UTF16_LE + "x\u00e9".encode("utf-16-le"),
                 codecs.BOM_UTF16_BE + "x\u00e9".encode("utf-16-be")):
        text, enc, guessed = decode_text(data)
        assert not guessed and encode_text(text, enc) == data
    text, enc, guessed = decode_text(b"\x81\x8d\xe9")  # undefined in cp1252: latin-1, never an exception
    assert guessed and enc in ("cp1252", "latin-1") and len(text) == 3
    assert decode_text(b"caf\xe9") == ("café", "cp1252", True)
    assert encode_text("café", "cp1252") == "café".encode("utf-8")
