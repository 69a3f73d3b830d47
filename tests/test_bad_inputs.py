"""Issue 9 item 5: every kind of bad input gives a message naming the file and what to do, never a crash, never a
changed user file; training goes on with the valid images, and a clear DatasetError when none remain.
Every input is built here at run time."""
import hashlib
import json
import os
import struct
import sys
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from lora_train.data.dataset import IMAGE_EXTS, MIN_IMAGE_SIDE, DatasetError, load_dataset


# ------------------------------------------------------------------ builders
def good(path, size=(64, 48), color=(255, 0, 0)):
    Image.new("RGB", size, color).save(path)
    return path


def noisy_jpeg(path, size=(96, 96)):
    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=95)
    return path


def truncated_jpeg(path):
    noisy_jpeg(path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return path


def _chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def raw_png(path, width, height, bit_depth, color_type, raw_rows: bytes):
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw_rows)) + _chunk(b"IEND", b"")
    open(path, "wb").write(data)
    return path


def png16_rgb(path, value=0x8000, size=8):
    row = b"\0" + struct.pack(">H", value) * 3 * size  # filter byte + 16-bit big-endian RGB
    return raw_png(path, size, size, 16, 2, row * size)


def png16_gray(path, value=32768, size=(24, 16)):
    Image.fromarray(np.full((size[1], size[0]), value, np.uint16)).save(path)
    return path


def bomb_png(path, side=30000):
    """A tiny file whose header claims side x side pixels (900 MP: past Pillow's 2x limit)."""
    return raw_png(path, side, side, 8, 0, b"\0" * 33)


def cmyk_jpeg(path):
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    return path


def palette_png(path):
    im = Image.new("P", (32, 32), 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))  # index 0 black (transparent), 1 blue
    for x in range(16, 32):
        for y in range(32):
            im.putpixel((x, y), 1)
    im.save(path, transparency=0)
    return path


def animated(path, fmt):
    frames = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def snapshot(folder):
    """Every file and link under `folder` (links not followed): content hash, size, mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if os.path.islink(p):
                out[p] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                out[p] = (hashlib.sha256(open(p, "rb").read()).hexdigest(), st.st_size, st.st_mtime_ns)
            else:
                out[p] = ("dir",)
    return out


def pixel(ds, i, xy):
    arr = ((ds.load_pixels(i).permute(1, 2, 0).numpy() + 1) * 127.5).round()
    return tuple(arr[xy[1], xy[0]])


def reasons(ds):
    return {os.path.basename(p): r for p, r in ds.skipped}


def load(folder, res=32, **kw):
    return load_dataset(str(folder), res, **kw)


# ------------------------------------------------------------------ bad image files (skipped)
BAD_FILES = [
    ("trunc.jpg", truncated_jpeg, "truncated"),
    ("zero.png", lambda p: open(p, "wb").close() or p, "empty file (0 bytes)"),
    ("text.png", lambda p: open(p, "w").write("hello, I am not a picture\n") and p, "text file, not an image"),
    ("tiny.png", lambda p: good(p, (1, 1)), f"1x1 px, too small: the minimum is {MIN_IMAGE_SIDE} px"),
    ("bomb.png", bomb_png, "decompression-bomb"),
]


@pytest.mark.parametrize("name,make,why", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_file_is_skipped_with_reason(tmp_path, name, make, why):
    good(tmp_path / "ok.png")
    make(str(tmp_path / name))
    before = snapshot(tmp_path)
    ds = load(tmp_path)
    assert [os.path.basename(it.path) for it in ds.items] == ["ok.png"]
    r = reasons(ds)[name]
    assert why in r, r
    assert "remove" in r or "downscale" in r  # says what to do
    assert len([w for w in ds.warnings if "skipped" in w]) == 1
    summary = next(w for w in ds.warnings if "skipped" in w)
    assert name in summary and why in summary and "training goes on with the other 1" in summary
    ds.load_pixels(0)
    assert snapshot(tmp_path) == before


def test_all_bad_in_one_folder_one_summary_and_nothing_changed(tmp_path):
    good(tmp_path / "ok1.png")
    good(tmp_path / "ok2.jpg")
    for name, make, _ in BAD_FILES:
        make(str(tmp_path / name))
    before = snapshot(tmp_path)
    ds = load(tmp_path)
    assert sorted(os.path.basename(it.path) for it in ds.items) == ["ok1.png", "ok2.jpg"]
    assert sorted(reasons(ds)) == sorted(b[0] for b in BAD_FILES)
    summaries = [w for w in ds.warnings if w.startswith("skipped")]
    assert len(summaries) == 1 and f"skipped {len(BAD_FILES)} of {len(BAD_FILES) + 2}" in summaries[0]
    for i in range(len(ds.items)):
        ds.load_pixels(i)
    assert snapshot(tmp_path) == before


def test_no_valid_image_left_is_a_clear_error(tmp_path):
    truncated_jpeg(str(tmp_path / "t.jpg"))
    open(tmp_path / "z.png", "wb").close()
    with pytest.raises(DatasetError) as ei:
        load(tmp_path)
    msg = str(ei.value)
    assert "no usable images" in msg and "t.jpg" in msg and "z.png" in msg and "truncated" in msg


def test_bomb_limit_not_raised_and_between_1x_and_2x_refused(tmp_path, monkeypatch):
    limit = Image.MAX_IMAGE_PIXELS
    bomb_png(str(tmp_path / "huge.png"))
    good(tmp_path / "ok.png", (20, 20))  # 400 px: under both limits below
    ds = load(tmp_path)
    assert "huge.png" in reasons(ds) and Image.MAX_IMAGE_PIXELS == limit
    # Pillow only *warns* between 1x and 2x its limit: we refuse there too
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    good(tmp_path / "big40.png", (40, 40))  # 1600 px: > 1000, < 2000
    ds = load(tmp_path)
    assert "40x40 = 1,600 pixels" in reasons(ds)["big40.png"]
    assert Image.MAX_IMAGE_PIXELS == 1000


# ------------------------------------------------------------------ odd but valid images (kept, converted right)
def test_16bit_png_is_scaled_not_clipped(tmp_path):
    png16_gray(str(tmp_path / "g16.png"), 32768)
    png16_rgb(str(tmp_path / "rgb16.png"), 0x8000)
    ds = load(tmp_path, res=16)
    assert not ds.skipped
    for i in range(2):
        px = pixel(ds, i, (4, 4))
        assert all(abs(c - 128) <= 1 for c in px), (ds.items[i].path, px)  # mid grey, not white


def test_cmyk_jpeg(tmp_path):
    cmyk_jpeg(str(tmp_path / "cmyk.jpg"))
    ds = load(tmp_path, res=16)
    r, g, b = pixel(ds, 0, (8, 8))
    assert r > 230 and g < 25 and b < 25


def test_palette_png_with_transparency_composited_on_white(tmp_path):
    palette_png(str(tmp_path / "pal.png"))
    ds = load(tmp_path, res=32)
    assert pixel(ds, 0, (4, 4)) == (255.0, 255.0, 255.0)  # transparent -> white
    assert pixel(ds, 0, (28, 4)) == (0.0, 0.0, 255.0)


@pytest.mark.parametrize("name,fmt", [("anim.gif", "GIF"), ("anim.webp", "WEBP")])
def test_animated_first_frame_with_warning(tmp_path, name, fmt):
    from PIL import features

    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    try:
        animated(str(tmp_path / name), fmt)
    except (OSError, ValueError, KeyError) as exc:  # a libwebp without animation support
        pytest.skip(f"this Pillow cannot write animated {fmt}: {exc}")
    assert ".gif" in IMAGE_EXTS
    ds = load(tmp_path, res=16)
    assert ds.items[0].frames == 3
    r, g, b = pixel(ds, 0, (8, 8))
    assert r > 200 and g < 60 and b < 60  # first frame (red)
    w = [w for w in ds.warnings if "animated" in w]
    assert len(w) == 1 and name in w[0] and "first frame" in w[0]


# ------------------------------------------------------------------ captions
def test_non_utf8_caption_is_skipped_with_warning(tmp_path):
    good(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("café au lait".encode("cp1252"))
    good(tmp_path / "b.png")
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfbom utf8")              # UTF-8 with BOM: fine
    good(tmp_path / "c.png")
    (tmp_path / "c.txt").write_bytes("utf16 caf\u00e9".encode("utf-16"))   # Notepad "Unicode": fine
    before = snapshot(tmp_path)
    ds = load(tmp_path, trigger_word="tok")
    caps = {os.path.basename(it.path): (it.caption, it.caption_source) for it in ds.items}
    assert caps["a.png"] == ("tok", "fallback")
    assert caps["b.png"] == ("tok, bom utf8", "txt")
    assert caps["c.png"] == ("tok, utf16 café", "txt")
    w = [w for w in ds.warnings if "a.txt" in w]
    assert len(w) == 1 and "not UTF-8" in w[0] and "save it as UTF-8" in w[0]
    assert not any("no caption" in x for x in ds.warnings)  # not double-reported as missing
    assert snapshot(tmp_path) == before


def test_caption_without_image_and_image_without_caption(tmp_path):
    good(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a cat")
    (tmp_path / "lonely.txt").write_text("no picture here")
    good(tmp_path / "nocap.png")
    ds = load(tmp_path, trigger_word="tok")
    caps = {os.path.basename(it.path): it.caption for it in ds.items}
    assert caps == {"a.png": "tok, a cat", "nocap.png": "tok"}
    assert any("lonely.txt" in w and "no image" in w for w in ds.warnings)
    assert any("nocap.png" in w and "no caption" in w for w in ds.warnings)


def test_two_images_one_stem_both_kept_same_caption(tmp_path):
    good(tmp_path / "a.png", color=(255, 0, 0))
    good(tmp_path / "a.jpg", color=(0, 255, 0))
    (tmp_path / "a.txt").write_text("shared caption")
    ds = load(tmp_path)
    assert sorted(os.path.basename(it.path) for it in ds.items) == ["a.jpg", "a.png"]
    assert {it.caption for it in ds.items} == {"shared caption"}
    w = [w for w in ds.warnings if "shared" in w and "a.png" in w and "a.jpg" in w]
    assert len(w) == 1 and "a.txt" in w[0] and "Rename one" in w[0]


# ------------------------------------------------------------------ folders
def test_empty_missing_and_file_as_folder(tmp_path):
    with pytest.raises(DatasetError, match="no images found"):
        load(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load(tmp_path / "nope")
    f = tmp_path / "f.png"
    good(f)
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        load(f)


def test_images_only_in_unprefixed_subfolder_hint(tmp_path):
    (tmp_path / "images").mkdir()
    good(tmp_path / "images" / "a.png")
    with pytest.raises(DatasetError, match="rename e.g. 'images' to '1_images'"):
        load(tmp_path)


# ------------------------------------------------------------------ metadata
def test_metadata_rows_missing_columns_unknown_and_escaping(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    outside = good(tmp_path / "x.png")  # exists, but outside the dataset folder
    for n in ["a.png", "b.png", "c.png"]:
        good(data / n)
    (data / "c.txt").write_text("from txt")
    (data / "sub").mkdir()
    good(data / "sub" / "d.png")
    rows = ("file_name,text\n"
            "a.png,from meta\n"
            "b.png\n"                       # missing text column
            "c.png,\n"                      # empty text -> .txt caption
            "ghost.png,not there\n"         # unknown file
            "../x.png,escape\n"             # leaves the folder
            f"{outside},absolute\n"         # absolute
            "sub/d.png,in a subfolder\n")   # HF imagefolder-style relative path: allowed
    (data / "metadata.csv").write_text(rows)
    before = snapshot(tmp_path)
    ds = load(data, trigger_word="")
    caps = {os.path.relpath(it.path, data): (it.caption, it.caption_source) for it in ds.items}
    assert caps == {"a.png": ("from meta", "metadata"), "b.png": ("data", "fallback"), "c.png": ("from txt", "txt"),
                    os.path.join("sub", "d.png"): ("in a subfolder", "metadata")}
    assert all(not it.path.startswith(str(tmp_path / "x")) for it in ds.items)
    w = next(w for w in ds.warnings if "metadata row(s) ignored" in w)
    assert "'b.png' has no text" in w and "ghost.png" in w and "'../x.png' is outside" in w and str(outside) in w
    assert snapshot(tmp_path) == before


def test_metadata_jsonl_bad_rows_and_header_error(tmp_path):
    good(tmp_path / "a.png")
    good(tmp_path / "b.png")
    lines = [json.dumps({"file_name": "a.png", "text": "ja"}), json.dumps({"text": "no name"}), "{not json",
             json.dumps({"file_name": "/etc/passwd", "text": "abs"}), json.dumps({"file_name": "b.png"})]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    ds = load(tmp_path)
    assert [it.caption for it in ds.items] == ["ja", tmp_path.name]
    w = next(w for w in ds.warnings if "metadata row(s) ignored" in w)
    assert "line 2: no file_name" in w and "line 3: not valid JSON" in w and "/etc/passwd" in w and "line 5" in w
    os.remove(tmp_path / "metadata.jsonl")
    (tmp_path / "metadata.csv").write_bytes("\ufefffile_name,text\na.png,excel bom\n".encode("utf-8"))  # Excel BOM
    assert load(tmp_path).items[0].caption == "excel bom"
    (tmp_path / "metadata.csv").write_text("image,caption\na.png,x\n")
    with pytest.raises(DatasetError, match="file_name,text"):
        load(tmp_path)


# ------------------------------------------------------------------ symlinks
@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")
def test_symlink_loops_do_not_hang(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    good(root / "a.png")
    (root / "a.txt").write_text("a")
    os.symlink(str(root), str(root / "5_loop"))               # subfolder that is the root itself
    (root / "2_real").mkdir()
    good(root / "2_real" / "b.png")
    os.symlink("..", str(root / "2_real" / "up"))              # loop inside a subfolder
    os.symlink(str(root / "2_real"), str(root / "3_again"))     # same folder twice
    os.symlink("self.png", str(root / "self.png"))             # link to itself (ELOOP)
    os.symlink("l2.png", str(root / "l1.png"))
    os.symlink("l1.png", str(root / "l2.png"))                 # two links in a cycle
    os.symlink("missing.png", str(root / "dangling.png"))
    before = snapshot(tmp_path)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("ds", load(root)), daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "load_dataset hung on a symlink loop"
    ds = result["ds"]
    assert sorted(os.path.relpath(it.path, root) for it in ds.items) == ["2_real/b.png", "a.png"]
    assert len(ds) == 1 + 2
    r = reasons(ds)
    assert set(r) == {"self.png", "l1.png", "l2.png", "dangling.png"}
    assert all("symbolic link" in v for v in r.values())
    assert any("5_loop" in w and "already read" in w for w in ds.warnings)
    assert any("3_again" in w and "already read" in w for w in ds.warnings)
    assert snapshot(tmp_path) == before
    loop = tmp_path / "loop"
    os.symlink(str(loop), str(loop))  # the dataset folder itself is a looping link
    with pytest.raises(DatasetError, match="broken or looping symbolic link"):
        load(loop)
