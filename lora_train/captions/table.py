"""The caption table for the UIs and the caption storage it shares with captioning: images listed through
lora_train.data.folder (the trainer's reader), metadata.csv / metadata.jsonl editing, sidecar writes that keep the
file's Unicode encoding (UTF-8 with BOM, UTF-16 LE/BE) and write UTF-8 otherwise.

``CaptionTable`` lists, edits and bulk-edits the captions of a folder and saves only the files that changed
(atomic, with a check that nobody changed them on disk meanwhile).
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple

from PIL import Image

from ..data.dataset import load_image
from ..data.folder import METADATA_NAMES, FolderRow, decode_text, encode_text, meta_key, metadata_path, scan_folder
from ..io_utils import atomic_write_bytes
from .text import Pairs, process_caption, same_caption, tag_frequency_of

class CaptionConflict(RuntimeError):
    """CaptionTable.save found caption files changed on disk since they were read."""

    def __init__(self, paths: List[str]):
        self.paths = paths
        shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        super().__init__(f"{len(paths)} caption file(s) changed on disk since they were loaded: {shown}. "
                         f"Reload the table (your edits would overwrite them) or save with force=True.")


# ============================================================================ folder scanning and storage
@dataclass
class ImageEntry:
    path: str            # absolute image path
    folder: str          # the scanned folder it belongs to (holds the metadata file; absolute)
    folder_name: str     # label as the dataset loader uses it (kohya prefix removed)
    key: str = ""        # its file_name in the folder's metadata ("a.png", "sub/b.png")
    row: Optional[FolderRow] = None  # what lora_train.data.folder read for it (caption, source, sidecar, encoding)


def list_images(root: str, caption_extension: str = ".txt") -> List[ImageEntry]:
    """Images of `root` and of its kohya `N_name` subfolders, as the dataset loader reads them (lora_train.data.folder)."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"caption folder '{root}' does not exist or is not a folder")
    return [ImageEntry(r.path, r.folder, r.folder_name, r.meta_key, r)
            for r in scan_folder(root, caption_extension).rows]


class MetadataFile:
    """A folder's metadata.csv / metadata.jsonl (file_name,text), rows kept in order, other columns kept."""

    def __init__(self, folder: str, name: Optional[str] = None):
        self.folder = folder
        if name is None:
            name = next((n for n in METADATA_NAMES if os.path.isfile(os.path.join(folder, n))), "metadata.csv")
        self.path = os.path.join(folder, name)
        self.jsonl = name.endswith(".jsonl")
        self.rows: Dict[str, Dict[str, Any]] = {}
        self.fieldnames: List[str] = ["file_name", "text"]
        self.exists = os.path.isfile(self.path)
        self.raw: Optional[bytes] = None
        self.text_col = ""       # csv: the caption column ("text" or "caption")
        self.encoding = "utf-8"  # kept on save when the file was UTF-8 with a BOM or UTF-16; else UTF-8
        self.changed = False
        if self.exists:
            self._read()

    def _read(self) -> None:
        with open(self.path, "rb") as fh:
            self.raw = fh.read()
        text, enc, guessed = decode_text(self.raw)
        if guessed:
            raise ValueError(f"{self.path}: is not UTF-8 text; save it as UTF-8 (in Excel: Save As -> CSV UTF-8)")
        self.encoding = enc
        if self.jsonl:
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{self.path}, line {n}: not valid JSON ({exc})") from exc
                    if isinstance(row, dict) and meta_key(row.get("file_name")):
                        self.rows[meta_key(row["file_name"])] = row
            return
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = list(reader.fieldnames or [])
        self.text_col = "text" if "text" in fields else "caption" if "caption" in fields else ""
        if "file_name" not in fields or not self.text_col:
            raise ValueError(f"{self.path}: needs the columns file_name,text (found "
                             f"{','.join(fields)}); fix the header line")
        self.fieldnames = fields
        for row in reader:
            if meta_key(row.get("file_name")):
                self.rows[meta_key(row["file_name"])] = row

    def _text_key(self, row: Dict[str, Any]) -> str:
        """"text", or "caption" where the file uses that column / key (Hugging Face imagefolder accepts both)."""
        if "text" in row:
            return "text"
        return "caption" if ("caption" in row or getattr(self, "text_col", "") == "caption") else "text"

    def get(self, file_name: str) -> Optional[str]:
        row = self.rows.get(meta_key(file_name) or file_name)
        if row is None:
            return None
        return str(row.get(self._text_key(row)) or "")

    def set(self, file_name: str, text: str) -> None:
        key = meta_key(file_name) or file_name
        row = self.rows.get(key)
        if row is None:
            self.rows[key] = {"file_name": key, getattr(self, "text_col", "") or "text": text}
            self.changed = True
        elif row.get(self._text_key(row)) != text:
            row[self._text_key(row)] = text
            self.changed = True

    def on_disk_changed(self) -> bool:
        now = None
        if os.path.isfile(self.path):
            with open(self.path, "rb") as fh:
                now = fh.read()
        return now != self.raw

    def render(self) -> str:
        if self.jsonl:
            return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows.values())
        if not self.fieldnames:
            self.fieldnames = ["file_name", "text"]
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=self.fieldnames, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows.values():
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in self.fieldnames})
        return buf.getvalue()

    def save(self) -> bool:
        if not self.changed:
            return False
        data = encode_text(self.render(), self.encoding)
        atomic_write_bytes(self.path, data)
        self.raw, self.exists, self.changed = data, True, False
        return True


def _read_sidecar(path: str) -> Tuple[Optional[bytes], Optional[str]]:
    """(raw bytes or None when absent, decoded text or None when not Unicode text (lora_train.data.folder.decode_text))."""
    if not os.path.isfile(path):
        return None, None
    with open(path, "rb") as fh:
        raw = fh.read()
    text, _, guessed = decode_text(raw)
    return raw, (None if guessed else text)


def _sidecar_bytes(row: Optional[FolderRow], text: str) -> bytes:
    """A caption written over an existing sidecar keeps that file's encoding when it was UTF-8 with a BOM or UTF-16
    (Windows Notepad "Unicode"); everything else (new files, plain UTF-8, undecodable legacy files) is UTF-8."""
    keep = row is not None and row.source == "txt" and not row.problem
    return encode_text(text, row.encoding if keep else "utf-8")


# ============================================================================ caption table
class CaptionRow(NamedTuple):
    path: str      # absolute image path
    caption: str   # current text (with unsaved edits)
    source: str    # where it lives: "txt" | "metadata" | "none" (no caption yet; saved as .txt)


class CaptionTable:
    """The captions of a dataset folder, for the UIs: list, edit one, bulk edit, save the changed files.

    Rows follow the dataset loader (root + kohya `N_name` subfolders; metadata.csv/jsonl row before the
    ``.txt`` sidecar). ``save`` writes only the changed captions, atomically, into where each lives (a new
    caption goes to its ``.txt`` sidecar, or to the folder's metadata file when the folder has one), and
    refuses (CaptionConflict) when a file changed on disk since it was read, unless ``force=True``.
    """

    def __init__(self, folder: str, caption_extension: str = ".txt"):
        if not caption_extension.startswith("."):
            caption_extension = "." + caption_extension
        self.folder = os.path.abspath(folder)
        self.caption_extension = caption_extension
        self.reload()

    def reload(self) -> None:
        """Read the rows through lora_train.data.folder (the trainer's reader): same images, same captions."""
        self._entries = list_images(self.folder, self.caption_extension)
        self._metas: Dict[str, Optional[MetadataFile]] = {}
        self._orig: Dict[str, str] = {}
        self._raw: Dict[str, Optional[bytes]] = {}
        self._source: Dict[str, str] = {}
        self._edits: Dict[str, str] = {}
        self._by_path = {e.path: e for e in self._entries}
        for e in self._entries:
            if e.folder not in self._metas:
                name = metadata_path(e.folder)
                self._metas[e.folder] = MetadataFile(e.folder, os.path.basename(name)) if name else None
            r, meta = e.row, self._metas[e.folder]
            self._orig[e.path] = r.shown  # an undecodable sidecar shows its cp1252 reading, to be fixed and saved
            if r.source == "metadata":
                self._source[e.path] = "metadata"
                continue
            raw, _ = _read_sidecar(r.sidecar)
            self._raw[e.path] = raw
            self._source[e.path] = r.source if r.source == "txt" or meta is None or meta.get(e.key) is None \
                else "metadata"

    def _sidecar(self, path: str) -> str:
        e = self._by_path.get(path)
        return (e.row.sidecar if e is not None and e.row is not None else "") or \
            os.path.splitext(path)[0] + self.caption_extension

    def _key(self, path: str) -> str:
        p = os.path.abspath(path if os.path.isabs(path) else os.path.join(self.folder, path))
        if p not in self._by_path:
            raise KeyError(f"'{path}' is not an image of {self.folder}")
        return p

    # -- views
    def __len__(self) -> int:
        return len(self._entries)

    def rows(self) -> List[CaptionRow]:
        return [CaptionRow(e.path, self.get(e.path), self._source[e.path]) for e in self._entries]

    def paths(self) -> List[str]:
        return [e.path for e in self._entries]

    def get(self, path: str) -> str:
        p = self._key(path)
        return self._edits.get(p, self._orig[p])

    def folder_name(self, path: str) -> str:
        return self._by_path[self._key(path)].folder_name

    @property
    def dirty(self) -> List[str]:
        """Images whose caption differs from what was read."""
        return [e.path for e in self._entries
                if e.path in self._edits and not same_caption(self._edits[e.path], self._orig[e.path])]

    def tag_frequency(self) -> Dict[str, Dict[str, int]]:
        return tag_frequency_of((e.folder_name, self.get(e.path)) for e in self._entries if self.get(e.path).strip())

    # -- edits
    def edit(self, path: str, text: str) -> None:
        self._edits[self._key(path)] = " ".join((text or "").split())

    def revert(self, path: Optional[str] = None) -> None:
        if path is None:
            self._edits.clear()
        else:
            self._edits.pop(self._key(path), None)

    def bulk_edit(self, paths: Optional[Iterable[str]] = None, *, replace: Pairs = (), replace_tags: Pairs = (),
                  add_tags: Iterable[str] = (), remove_tags: Iterable[str] = (), trigger: Optional[str] = None,
                  dedupe: bool = False, keep_tokens: Optional[int] = None, sort: Optional[str] = None) -> int:
        """Apply ``process_caption`` edits to the given images (all by default); returns how many changed."""
        targets = [self._key(p) for p in paths] if paths is not None else self.paths()
        changed = 0
        add_tags, remove_tags = list(add_tags or ()), list(remove_tags or ())
        for p in targets:
            old = self.get(p)
            new = process_caption(old, trigger=trigger, replace=replace, dedupe=dedupe, keep_tokens=keep_tokens,
                                  replace_tags=replace_tags, remove_tags=remove_tags, add_tags=add_tags, sort=sort)
            if not same_caption(new, old):
                self._edits[p] = new
                changed += 1
        return changed

    # -- saving
    def save(self, force: bool = False) -> List[str]:
        """Write the changed captions; returns the files written. Nothing is written on a conflict."""
        dirty = self.dirty
        if not dirty:
            return []
        conflicts, metas, sidecars = [], {}, []
        for p in dirty:
            e = self._by_path[p]
            meta = self._metas.get(e.folder)
            if self._source[p] == "metadata" or (self._source[p] == "none" and meta is not None):
                metas.setdefault(e.folder, []).append(p)
                if meta is not None and meta.on_disk_changed():
                    conflicts.append(meta.path)
            else:
                sidecars.append(p)
                raw, _ = _read_sidecar(self._sidecar(p))
                if raw != self._raw.get(p):
                    conflicts.append(self._sidecar(p))
        if conflicts and not force:
            raise CaptionConflict(sorted(set(conflicts)))
        written = []
        for p in sidecars:
            dest = self._sidecar(p)
            data = _sidecar_bytes(self._by_path[p].row, self._edits[p])
            atomic_write_bytes(dest, data)
            self._raw[p] = data
            self._orig[p], self._source[p] = self._edits.pop(p), "txt"
            written.append(dest)
        for d, ps in metas.items():
            meta = self._metas.get(d)
            if meta is None or meta.on_disk_changed():  # force: re-read, then apply our rows on top
                meta = MetadataFile(d, os.path.basename(meta.path) if meta is not None else None)
                self._metas[d] = meta
            for p in ps:
                meta.set(self._by_path[p].key or os.path.basename(p), self._edits[p])
            if meta.save():
                written.append(meta.path)
            for p in ps:
                self._orig[p], self._source[p] = self._edits.pop(p), "metadata"
        return written


def thumbnail(path: str, size: int = 256) -> Optional[Image.Image]:
    """A small RGB copy of an image for the UIs, or None when it cannot be read."""
    try:
        im = load_image(path)
    except Exception:
        return None
    im.thumbnail((size, size))
    return im
