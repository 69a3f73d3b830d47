"""The one reader of a dataset folder: images, caption sidecars, metadata.csv / metadata.jsonl, kohya `N_name`.

Both the trainer's dataset (`dataset.load_dataset`) and the caption table / captioning (`captions`) list a
folder through `scan_folder`, so they always agree on which images there are and which caption each has.
Host-free and light: standard library only (no torch, no PIL).

What is read:
- images: IMAGE_EXTS, any case (`A.PNG`); hidden files (`.name`) and hidden folders are skipped;
- the folder itself and its kohya `N_name` subfolders (`10_mychar/` = 10 repeats, class "mychar"); other
  subfolders are not read (listed in `unused_dirs` when they hold images) unless a metadata row names a file
  in them;
- caption sidecars `<stem><caption_extension>` (`.txt` by default; the extension's case may differ): UTF-8,
  UTF-8 with BOM, UTF-16 LE/BE with BOM. Anything else is decoded as cp1252 (else latin-1) so it can be shown
  and fixed, and flagged in `FolderRow.problem`: the trainer does not train on a guessed encoding;
- `metadata.csv` (columns file_name,text; `caption` accepted for text) or else `metadata.jsonl` (keys
  file_name + text / caption), as Hugging Face's imagefolder: names may start with `./` or name files in
  subfolders (`sub/c.png`); a row with text wins over the sidecar. Absolute or `..` names are refused.
Captions are whitespace-normalised (newlines, CRLF, runs of spaces -> one space).
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")  # read in this order: the first one present is used
REPEAT_RE = re.compile(r"^(\d+)_(.+)$")
TEXT_KEYS = ("text", "caption")  # metadata column / key holding the caption (diffusers / HF imagefolder)
FALLBACK_ENCODINGS = ("cp1252", "latin-1")


class FolderError(ValueError):
    """The folder (or its metadata file) cannot be read; the message says which path and what to do."""


# ----------------------------------------------------------------------------- text files
def decode_text(data: bytes) -> Tuple[str, str, bool]:
    """(text, encoding, guessed). encoding is one that `encode_text` writes back byte-compatibly: "utf-8",
    "utf-8-sig" (BOM), "utf-16-le-bom" / "utf-16-be-bom"; else the text is a fallback reading ("cp1252" or
    "latin-1", which never fails) and guessed is True."""
    if data.startswith(codecs.BOM_UTF8):
        try:
            return data[len(codecs.BOM_UTF8):].decode("utf-8"), "utf-8-sig", False
        except UnicodeDecodeError:
            pass
    elif data.startswith(codecs.BOM_UTF16_LE) or data.startswith(codecs.BOM_UTF16_BE):
        le = data.startswith(codecs.BOM_UTF16_LE)
        try:
            return data[2:].decode("utf-16-le" if le else "utf-16-be"), ("utf-16-le-bom" if le else "utf-16-be-bom"), False
        except UnicodeDecodeError:
            pass
    else:
        try:
            return data.decode("utf-8"), "utf-8", False
        except UnicodeDecodeError:
            pass
    for enc in FALLBACK_ENCODINGS:
        try:
            return data.decode(enc), enc, True
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1"), "latin-1", True  # unreachable: latin-1 maps every byte


def encode_text(text: str, encoding: str = "utf-8") -> bytes:
    """Bytes of `text` in an encoding `decode_text` reported. The Unicode ones are kept (BOM included); a
    guessed legacy encoding is not: such a file is written back as UTF-8 (the fix the user wants)."""
    if encoding == "utf-8-sig":
        return codecs.BOM_UTF8 + text.encode("utf-8")
    if encoding == "utf-16-le-bom":
        return codecs.BOM_UTF16_LE + text.encode("utf-16-le")
    if encoding == "utf-16-be-bom":
        return codecs.BOM_UTF16_BE + text.encode("utf-16-be")
    return text.encode("utf-8")


def split_tags(caption: str) -> List[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def normalize_caption(text: str) -> str:
    return " ".join((text or "").split())


@dataclass
class CaptionFile:
    path: str
    exists: bool = False
    raw: Optional[bytes] = None      # the bytes read (None: absent or unreadable)
    text: str = ""                   # decoded, not normalised ("" when absent)
    encoding: str = "utf-8"          # see decode_text; what a save keeps
    problem: str = ""                # "" or why the text is not trustworthy (not Unicode text, cannot be read)


def read_caption_file(path: str) -> CaptionFile:
    if not os.path.isfile(path):
        return CaptionFile(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        return CaptionFile(path, exists=True, problem=f"cannot be read ({exc.strerror or exc})")
    text, enc, guessed = decode_text(raw)
    problem = f"is not UTF-8 text (shown as {enc})" if guessed else ""
    return CaptionFile(path, exists=True, raw=raw, text=text, encoding=enc, problem=problem)


# ----------------------------------------------------------------------------- metadata
def meta_key(name: str) -> Optional[str]:
    """Normalised relative path of a metadata file_name (`./a.png` -> `a.png`, `sub\\b.png` -> `sub/b.png`), or
    None if it is empty, absolute or leaves the folder."""
    if not isinstance(name, str):
        return None
    n = name.strip().replace("\\", "/")
    if not n or n.startswith("/") or re.match(r"^[A-Za-z]:", n) or os.path.isabs(n):
        return None
    norm = os.path.normpath(n).replace("\\", "/")
    if norm == ".." or norm.startswith("../") or norm == ".":
        return None
    return norm


def metadata_path(folder: str) -> Optional[str]:
    """The metadata file of `folder` that is read (metadata.csv before metadata.jsonl), or None."""
    return next((os.path.join(folder, n) for n in METADATA_NAMES if os.path.isfile(os.path.join(folder, n))), None)


def _text_of(row: dict, keys=TEXT_KEYS):
    for k in keys:
        if k in row:
            return row[k]
    return None


def read_metadata(folder: str, problems: Optional[List[str]] = None) -> Optional[Dict[str, Optional[str]]]:
    """{normalised relative path: caption or None} from the folder's metadata file, or None without one.
    Row problems go to `problems`; an unreadable file or a csv header without file_name + text raises FolderError."""
    problems = problems if problems is not None else []
    path = metadata_path(folder)
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise FolderError(f"{path}: cannot be read ({exc.strerror or exc}).") from exc
    text, enc, guessed = decode_text(raw)
    if guessed:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FolderError(f"{path}: is not UTF-8 text ({exc.reason} at byte {exc.start}). Save it as UTF-8 "
                              f"(in Excel: Save As -> CSV UTF-8).") from exc
    rows: Dict[str, Optional[str]] = {}
    base = os.path.basename(path)

    def add(where: str, name, caption) -> None:
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{base} {where}: no file_name")
            return
        key = meta_key(name)
        if key is None:
            problems.append(f"{base} {where}: '{name}' is outside the dataset folder (absolute or '..' paths are "
                            f"refused; use a path relative to {folder})")
            return
        if isinstance(caption, (list, tuple)):
            caption = ", ".join(str(c) for c in caption)
        if caption is None or not str(caption).strip():
            problems.append(f"{base} {where}: '{name}' has no text (its .txt caption or the fallback is used)")
            caption = None
        rows[key] = None if caption is None else normalize_caption(str(caption))

    if path.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = reader.fieldnames or []
        text_col = next((k for k in TEXT_KEYS if k in fields), None)
        if "file_name" not in fields or text_col is None:
            raise FolderError(f"{path}: needs the columns file_name,text (found {','.join(fields)}). Fix the header "
                              f"line.")
        for row in reader:
            where = f"line {reader.line_num}"
            if row.get(None):
                problems.append(f"{base} {where}: more columns than the header (extra ignored; quote captions that "
                                f"contain commas)")
            if row.get("file_name") is None and row.get(text_col) is None and not any(v for v in row.values() if v):
                continue  # blank line
            add(where, row.get("file_name"), row.get(text_col))
        return rows
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{base} line {n}: not valid JSON ({exc.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{base} line {n}: not a JSON object")
            continue
        add(f"line {n}", row.get("file_name"), _text_of(row))
    return rows


# ----------------------------------------------------------------------------- scanning
@dataclass
class FolderRow:
    """One image of a dataset folder and the caption the trainer would read for it."""
    path: str                  # absolute image path
    caption: Optional[str]     # normalised caption; None = no caption (none, empty, or unusable: see problem)
    source: str                # where the caption lives: "metadata" | "txt" | "none"
    caption_file: str          # the sidecar path (source txt / none) or the metadata file (source metadata)
    folder: str                # the scanned folder the image belongs to (holds the metadata file)
    folder_name: str           # kohya class ("mychar" of 10_mychar) or the root folder's name
    repeats: int = 1
    meta_key: str = ""         # the image's file_name in `folder`'s metadata ("b.png", "sub/c.png")
    meta_file: str = ""        # `folder`'s metadata file, "" when it has none
    encoding: str = "utf-8"    # of the sidecar (see decode_text)
    problem: str = ""          # sidecar present but unusable (e.g. not UTF-8); `shown` holds a best-effort reading
    shown: str = ""            # what an editor shows: the caption, or the fallback reading of an unusable sidecar

    @property
    def sidecar(self) -> str:
        return self.caption_file if self.source != "metadata" else ""


@dataclass
class FolderScan:
    root: str
    caption_extension: str
    rows: List[FolderRow] = field(default_factory=list)
    broken: List[Tuple[str, str]] = field(default_factory=list)   # (path, reason): image names that are not files
    orphans: List[str] = field(default_factory=list)              # caption files without an image (relative)
    shared: List[str] = field(default_factory=list)               # stems shared by several images (message parts)
    meta_problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    unused_dirs: List[str] = field(default_factory=list)          # subfolders with images that are not read
    folders: List[Tuple[str, int, str]] = field(default_factory=list)  # (folder, repeats, folder_name) read


def _listdir(folder: str) -> List[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted(it, key=lambda e: e.name)


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTS


def _has_images(folder: str) -> bool:
    try:
        with os.scandir(folder) as it:
            return any(is_image_name(e.name) for e in it)
    except OSError:
        return False


def rel(root: str, path: str) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path


def _sidecar_for(image_path: str, ext: str, lower_names: Dict[str, str]) -> str:
    """`<stem><ext>` beside the image; an existing file whose name differs only in the extension's case wins."""
    d, name = os.path.split(image_path)
    want = os.path.splitext(name)[0] + ext
    if os.path.isfile(os.path.join(d, want)):
        return os.path.join(d, want)
    other = lower_names.get(want.lower())
    return os.path.join(d, other) if other else os.path.join(d, want)


def _scan_one(st: FolderScan, folder: str, repeats: int, folder_name: str) -> None:
    try:
        entries = _listdir(folder)
    except OSError as exc:
        st.notes.append(f"folder {folder} cannot be listed ({exc.strerror or exc}) and was skipped: check its "
                        f"permissions.")
        return
    st.folders.append((folder, repeats, folder_name))
    meta = read_metadata(folder, st.meta_problems)
    meta_file = metadata_path(folder) or ""
    names = {e.name for e in entries}
    lower_names = {e.name.lower(): e.name for e in entries if not e.name.startswith(".")}
    images: List[str] = []
    for e in entries:
        if not is_image_name(e.name):
            continue
        try:
            is_file = e.is_file()  # follows links; a looping / dangling link is simply not a file
        except OSError:
            is_file = False
        if is_file:
            images.append(e.name)
        elif e.is_symlink():
            st.broken.append((e.path, "is a broken or looping symbolic link: point it at a real image or remove "
                                      "the link"))
    # metadata rows naming files in subfolders (Hugging Face imagefolder style) or files that do not exist
    extra: List[str] = []
    if meta:
        for key in meta:
            if key in names:
                continue
            full = os.path.join(folder, key)
            if "/" in key and is_image_name(os.path.basename(key)) and os.path.isfile(full):
                extra.append(key)
            else:
                st.meta_problems.append(f"metadata in {rel(st.root, folder) or '.'}: '{key}' is not in the folder "
                                        f"(row ignored; check the name)")
    ext = st.caption_extension
    # stems shared by several images (a.png + a.jpg): all kept, all use the same caption file
    by_stem: Dict[str, List[str]] = {}
    for n in images:
        by_stem.setdefault(os.path.splitext(n)[0], []).append(n)
    for stem, group in by_stem.items():
        if len(group) > 1:
            cap = stem + ext
            uses = f"both use the caption {cap}" if cap in names else f"a caption {cap} would apply to all of them"
            st.shared.append(f"{' and '.join(rel(st.root, os.path.join(folder, g)) for g in group)} ({uses})")
    image_stems = {os.path.splitext(n)[0].lower() for n in names if is_image_name(n)}
    for e in entries:  # caption files without an image
        stem, e_ext = os.path.splitext(e.name)
        if e_ext.lower() == ext.lower() and not e.name.startswith(".") and stem.lower() not in image_stems:
            st.orphans.append(rel(st.root, e.path))
    for name in images + sorted(extra):
        path = os.path.join(folder, name)
        key = name.replace(os.sep, "/")
        row = FolderRow(path=path, caption=None, source="none", caption_file="", folder=folder,
                        folder_name=folder_name, repeats=repeats, meta_key=key, meta_file=meta_file)
        if meta is not None and meta.get(key) is not None:
            row.caption, row.source, row.caption_file = meta[key], "metadata", meta_file
        else:
            cf = read_caption_file(_sidecar_for(path, ext, lower_names if "/" not in key else {}))
            row.caption_file, row.encoding, row.problem = cf.path, cf.encoding, cf.problem
            text = normalize_caption(cf.text)
            if cf.exists and text:
                row.source = "txt"
                row.caption = None if cf.problem else text
            elif meta is not None and key in meta:  # a metadata row without text: a new caption goes there
                row.source, row.caption_file = "none", cf.path
            row.shown = text
        if row.caption is not None:
            row.shown = row.caption
        st.rows.append(row)


def scan_folder(root: str, caption_extension: str = ".txt") -> FolderScan:
    """List `root` and its kohya `N_name` subfolders: one FolderRow per image, in a stable order (root first,
    then the subfolders by name; files by name, metadata subfolder rows after them). Raises FolderError when
    `root` is not a readable folder or a metadata file is unusable."""
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    if not root or not os.path.isdir(root):
        raise FolderError(f"'{root}' is not a folder.")
    root = os.path.abspath(root)
    st = FolderScan(root=root, caption_extension=caption_extension)
    seen = {os.path.realpath(root)}
    _scan_one(st, root, 1, os.path.basename(root))
    try:
        subs = _listdir(root)
    except OSError as exc:
        raise FolderError(f"dataset folder '{root}' cannot be listed ({exc.strerror or exc}): check its "
                          f"permissions.") from exc
    for e in subs:
        if e.name.startswith("."):
            continue
        try:
            is_dir = e.is_dir()
        except OSError:
            is_dir = False
        if not is_dir:
            continue
        m = REPEAT_RE.match(e.name)
        if not m:
            if _has_images(e.path) and not any(r.path.startswith(e.path + os.sep) for r in st.rows):
                st.unused_dirs.append(e.name)
            continue
        real = os.path.realpath(e.path)
        if real in seen:
            st.notes.append(f"subfolder {e.name} is a link to a folder already read ({real}): skipped so that its "
                            f"images are not counted twice.")
            continue
        seen.add(real)
        _scan_one(st, e.path, max(1, int(m.group(1))), m.group(2))
    return st

