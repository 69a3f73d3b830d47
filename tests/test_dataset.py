import json
import os

import numpy as np
import pytest
from PIL import Image

from lora_train.data.dataset import DatasetError, load_dataset


def _img(path, size=(80, 60), color=(255, 0, 0), mode="RGB"):
    Image.new(mode, size, color).save(path)


def test_txt_captions_trigger_and_missing(tmp_path, caplog):
    _img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red thing")
    _img(tmp_path / "b.jpg")
    (tmp_path / "c.webp").write_bytes(b"")  # not decodable, still listed as an image file
    os.remove(tmp_path / "c.webp")
    _img(tmp_path / "d.bmp")
    (tmp_path / "d.txt").write_text("mytok, already there")
    ds = load_dataset(str(tmp_path), 64, trigger_word="mytok")
    caps = {os.path.basename(it.path): it.caption for it in ds.items}
    assert caps["a.png"] == "mytok, a red thing"
    assert caps["b.jpg"] == "mytok"  # fallback
    assert caps["d.bmp"] == "mytok, already there"  # not prepended twice
    assert len(ds.warnings) == 1 and "b.jpg" in ds.warnings[0]


def test_metadata_csv_and_jsonl(tmp_path):
    _img(tmp_path / "x.png")
    _img(tmp_path / "y.png")
    (tmp_path / "metadata.csv").write_text('file_name,text\nx.png,"one, two"\ny.png,three\n')
    ds = load_dataset(str(tmp_path), 64)
    assert [it.caption for it in ds.items] == ["one, two", "three"]
    os.remove(tmp_path / "metadata.csv")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "jx"}) + "\n")
    ds = load_dataset(str(tmp_path), 64)
    assert ds.items[0].caption == "jx" and ds.items[1].caption_source == "fallback"


def test_metadata_bad_columns(tmp_path):
    _img(tmp_path / "x.png")
    (tmp_path / "metadata.csv").write_text("name,caption\nx.png,hi\n")
    with pytest.raises(DatasetError, match="file_name,text"):
        load_dataset(str(tmp_path), 64)


def test_kohya_repeats(tmp_path):
    sub = tmp_path / "5_cat"
    sub.mkdir()
    _img(sub / "a.png")
    (sub / "a.txt").write_text("cat")
    _img(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("dog")
    ds = load_dataset(str(tmp_path), 64)
    assert ds.image_count == 2 and len(ds) == 6
    assert ds.tag_frequency() == {tmp_path.name: {"dog": 1}, "cat": {"cat": 1}}


def test_exif_alpha_crop(tmp_path):
    # 40x20 image: left half red, right half transparent; EXIF orientation 6 (rotate 90 cw)
    im = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    for x in range(20):
        for y in range(20):
            im.putpixel((x, y), (255, 0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "e.png", exif=exif)
    ds = load_dataset(str(tmp_path), 16)
    px = ds.load_pixels(0)
    assert tuple(px.shape) == (3, 16, 16)
    arr = ((px.permute(1, 2, 0).numpy() + 1) * 127.5).round()
    # rotated: the image becomes 20 wide, 40 tall; the centre crop shows the boundary row-wise
    top, bottom = arr[0, 8], arr[-1, 8]
    assert {tuple(top), tuple(bottom)} == {(255.0, 0.0, 0.0), (255.0, 255.0, 255.0)}


@pytest.mark.parametrize("make,msg", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "is a file"),
    (lambda p: p, "no images found"),
])
def test_bad_folders(tmp_path, make, msg):
    with pytest.raises(DatasetError, match=msg):
        load_dataset(str(make(tmp_path)), 64)
