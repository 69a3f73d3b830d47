"""Atomic writes: temp file + rename in the same folder, and the mode a plain write would give (umask), not 0600."""
import os
import stat

import pytest

from lora_train import io_utils


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_follow_umask(tmp_path, umask, mask):
    umask(mask)
    want = 0o666 & ~mask
    text, raw = tmp_path / "cfg.yaml", tmp_path / "sub" / "x.bin"
    io_utils.atomic_write_text(str(text), "a: 1\n")
    io_utils.atomic_write_bytes(str(raw), b"\x00\x01")
    assert _mode(text) == want and _mode(raw) == want
    assert text.read_text() == "a: 1\n" and raw.read_bytes() == b"\x00\x01"
    io_utils.atomic_write_text(str(text), "a: 2\n")  # replacing keeps the umask mode
    assert _mode(text) == want and text.read_text() == "a: 2\n"
    from PIL import Image

    img = tmp_path / "p.png"
    io_utils.save_image(Image.new("RGB", (4, 4)), str(img))
    assert _mode(img) == want
    cp = io_utils.atomic_copy(str(raw), str(tmp_path / "copy.bin"))
    assert _mode(cp) == want and open(cp, "rb").read() == b"\x00\x01"
    with pytest.raises(FileExistsError):
        io_utils.atomic_copy(str(raw), cp)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml", "copy.bin", "p.png", "sub"]  # no temp left


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_safetensors_follow_umask(tmp_path, umask):
    torch = pytest.importorskip("torch")
    umask(0o002)
    path = tmp_path / "lora.safetensors"
    io_utils.save_safetensors({"w": torch.zeros(2)}, str(path), {"k": "v"})
    assert _mode(path) == 0o664


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with io_utils.atomic_path(str(target)) as tmp:
            with open(tmp, "w") as fh:
                fh.write("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
