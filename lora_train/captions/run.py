"""Captioning a folder: ``caption_folder`` runs a captioner over a dataset folder (the folder and its kohya
``N_name`` subfolders, read like the trainer reads them) with modes skip / overwrite / append, trigger prefix,
find-and-replace, tag dedupe and ordering with ``keep_tokens`` fixed, and writes ``.txt`` sidecars or
``metadata.csv`` atomically. Existing captions are never touched unless the mode says so.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from ..data.dataset import load_image
from ..data.folder import IMAGE_EXTS, METADATA_NAMES
from ..io_utils import atomic_write_bytes
from .backends import Captioner, CaptionerError, Tags, caption_text, result_tags
from .table import CaptionTable, ImageEntry, MetadataFile, _sidecar_bytes, list_images
from .text import Pairs, append_caption, process_caption, tag_frequency_of

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, str], None]
MODES = ("skip", "overwrite", "append")


# ============================================================================ caption_folder
@dataclass
class CaptionReport:
    written: List[str] = field(default_factory=list)                 # image paths whose caption was written
    skipped: List[str] = field(default_factory=list)                 # kept their existing caption
    failed: List[Tuple[str, str]] = field(default_factory=list)      # (image path, reason)
    captions: Dict[str, str] = field(default_factory=dict)           # image path -> caption it now has
    tags: Dict[str, Tags] = field(default_factory=dict)              # image path -> (tag, confidence), taggers
    folders: Dict[str, str] = field(default_factory=dict)            # image path -> folder label
    files: List[str] = field(default_factory=list)                   # caption files written
    warnings: List[str] = field(default_factory=list)
    stopped: bool = False
    dry_run: bool = False

    @property
    def total(self) -> int:
        return len(self.written) + len(self.skipped) + len(self.failed)

    def tag_frequency(self) -> Dict[str, Dict[str, int]]:
        return tag_frequency_of((self.folders.get(p, ""), c) for p, c in self.captions.items())

    def summary(self) -> str:
        verb = "would write" if self.dry_run else "wrote"
        s = f"{verb} {len(self.written)}, skipped {len(self.skipped)} (already captioned), failed {len(self.failed)}"
        if self.stopped:
            s += " (stopped early)"
        return s

    def failure_lines(self, limit: int = 5) -> List[str]:
        """The failures grouped by reason, most frequent first: 'reason (7 images: a.png, b.png, ...)'; a
        captioner that fails on every image is said once, not once per file."""
        by_reason: Dict[str, List[str]] = {}
        for path, why in self.failed:
            by_reason.setdefault(why, []).append(os.path.basename(path))
        out = []
        for why, names in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))[:limit]:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            out.append(f"{why} ({len(names)} image(s): {shown})" if len(names) > 1 else f"{names[0]}: {why}")
        return out


def _resolve_out(out: str) -> str:
    """'txt' or the metadata file's base name ('metadata.csv' / 'metadata.jsonl')."""
    if out in (None, "", "txt", ".txt", "sidecar"):
        return "txt"
    base = os.path.basename(out)
    if base not in METADATA_NAMES:
        raise ValueError(f"out must be 'txt' or metadata.csv / metadata.jsonl, not '{out}' (the dataset loader only "
                         f"reads those names, from the image folder itself)")
    return base


def caption_folder(folder: str, captioner: Captioner, mode: str = "skip", trigger: Optional[str] = None,
                   replace: Pairs = (), dedupe: bool = False, keep_tokens: Optional[int] = None, out: str = "txt",
                   caption_extension: str = ".txt", progress: Optional[ProgressFn] = None, *,
                   replace_tags: Pairs = (), remove_tags: Iterable[str] = (), add_tags: Iterable[str] = (),
                   sort: Optional[str] = None, batch_size: int = 1, should_stop: Optional[Callable[[], bool]] = None,
                   dry_run: bool = False, limit: Optional[int] = None) -> CaptionReport:
    """Caption every image of `folder` (and its kohya `N_name` subfolders) with `captioner`.

    mode: ``skip`` leaves images that already have a caption alone (their files byte for byte, and the
    captioner is not even run on them); ``overwrite`` replaces captions; ``append`` adds the new caption after
    the existing one. "Existing caption" is what the dataset loader would read: a metadata.csv/jsonl row,
    else a non-empty ``.txt`` sidecar (an empty sidecar counts as no caption).
    out: ``"txt"`` writes ``<stem><caption_extension>`` sidecars; ``"metadata.csv"`` (or a path ending in it)
    writes/updates ``metadata.csv`` in each image folder, keeping its other rows and columns.
    Each caption goes through ``process_caption`` (trigger, replace, dedupe, keep_tokens, ...). Unreadable
    images and captioner errors are reported in ``report.failed`` and the run goes on. ``progress(i, n,
    path)`` is called once per image after it is handled (i = 1..n). ``should_stop()`` -> True stops after
    the current image (what was done is saved). ``dry_run`` computes everything and writes nothing.
    ``limit``: only the first N images (a preview, with dry_run, before the whole folder).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not '{mode}'")
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    entries = list_images(folder, caption_extension)
    if limit is not None:
        entries = entries[:max(0, int(limit))]
    report = CaptionReport(dry_run=dry_run)
    if not entries:
        report.warnings.append(f"no images in '{os.path.abspath(folder)}' (looked for {', '.join(IMAGE_EXTS)} "
                               f"in the folder and its kohya N_name subfolders)")
        return report
    opts = dict(trigger=trigger, replace=replace, dedupe=dedupe, keep_tokens=keep_tokens, replace_tags=replace_tags,
                remove_tags=remove_tags, add_tags=add_tags, sort=sort)
    run = _CaptionRun(captioner, mode, _resolve_out(out), caption_extension, opts, report, entries, progress,
                      dry_run)
    run.go(max(1, int(batch_size)), should_stop)
    return report


class _CaptionRun:
    """caption_folder's work: which images to caption, the captioner called in batches, the captions written
    (sidecars or metadata rows), and what the report says."""

    def __init__(self, captioner: Captioner, mode: str, target: str, caption_extension: str, opts: Dict[str, Any],
                 report: CaptionReport, entries: List[ImageEntry], progress: Optional[ProgressFn], dry_run: bool):
        self.captioner, self.mode, self.target, self.ext, self.opts = captioner, mode, target, caption_extension, opts
        self.report, self.entries, self.progress, self.dry_run = report, entries, progress, dry_run
        self.metas: Dict[str, MetadataFile] = {}
        self.shadowed: Dict[str, int] = Counter()
        self.done = 0
        self.todo: List[Tuple[ImageEntry, Optional[str]]] = []
        # what the loader reads now, per folder: its metadata file (csv before jsonl), then .txt sidecars
        self.readers: Dict[str, Optional[MetadataFile]] = {}
        for e in entries:
            if e.folder not in self.readers:
                name = next((n for n in METADATA_NAMES if os.path.isfile(os.path.join(e.folder, n))), None)
                self.readers[e.folder] = MetadataFile(e.folder, name) if name else None
                if target != "txt" and name and name != target:
                    report.warnings.append(f"{os.path.join(e.folder, name)} exists and is what the dataset loader "
                                           f"reads, so the captions go there instead of {target}")

    def go(self, batch_size: int, should_stop: Optional[Callable[[], bool]]) -> None:
        report, mode = self.report, self.mode
        try:
            for e in self.entries:
                if should_stop is not None and should_stop():
                    report.stopped = True
                    break
                report.folders[e.path] = e.folder_name
                existing, problem = self.existing_caption(e)
                if problem and mode == "append":
                    report.failed.append((e.path, problem + ": convert it to UTF-8 or use mode overwrite"))
                    self.finish(e)
                    continue
                if existing is not None and mode == "skip":
                    report.skipped.append(e.path)
                    report.captions[e.path] = existing
                    self.finish(e)
                    continue
                self.todo.append((e, existing if mode == "append" else None))
                if len(self.todo) >= batch_size:
                    self.flush()
            if self.todo and not report.stopped:
                self.flush()
        finally:
            self.todo.clear()
            for m in self.metas.values():  # metadata rows computed so far are saved even on an interrupt
                if m.changed:
                    if not self.dry_run:
                        m.save()
                    report.files.append(m.path)
        for path, count in self.shadowed.items():
            report.warnings.append(f"{path} has captions for {count} of the images written as {self.ext} files; "
                                   f"the dataset loader reads metadata first, so those {self.ext} files are not "
                                   f"used (caption with --out {os.path.basename(path)})")

    def meta_for(self, d: str) -> MetadataFile:
        if d not in self.metas:  # the folder's own metadata file if it has one (the one the loader reads)
            have = next((n for n in METADATA_NAMES if os.path.isfile(os.path.join(d, n))), None)
            self.metas[d] = MetadataFile(d, have or self.target)
        return self.metas[d]

    @staticmethod
    def existing_caption(e: ImageEntry) -> Tuple[Optional[str], Optional[str]]:
        """(caption or None, problem or None), as lora_train.data.folder read it."""
        r = e.row
        if r is None or r.source == "none":
            return None, None
        if r.problem:
            return "", "its caption file is not UTF-8 text"
        return r.caption, None

    def finish(self, e: ImageEntry) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, len(self.entries), e.path)

    def write(self, e: ImageEntry, caption: str) -> None:
        name = e.key or os.path.basename(e.path)
        if self.target == "txt":
            reader = self.readers[e.folder]
            if reader is not None and reader.get(name) is not None:
                self.shadowed[reader.path] += 1
            dest = (e.row.sidecar if e.row is not None else "") or os.path.splitext(e.path)[0] + self.ext
            if not self.dry_run:
                atomic_write_bytes(dest, _sidecar_bytes(e.row, caption))
            self.report.files.append(dest)
        else:
            self.meta_for(e.folder).set(name, caption)

    def handle(self, e: ImageEntry, existing: Optional[str], result: Any) -> None:
        report = self.report
        new = caption_text(result)
        tags = result_tags(result)
        if not new.strip():
            report.failed.append((e.path, "the captioner returned an empty caption"))
            return
        text = append_caption(existing, new) if (self.mode == "append" and existing) else new
        text = process_caption(text, **self.opts)
        try:
            self.write(e, text)
        except OSError as exc:
            report.failed.append((e.path, f"cannot write the caption ({exc})"))
            return
        report.written.append(e.path)
        report.captions[e.path] = text
        if tags is not None:
            report.tags[e.path] = tags

    def flush(self) -> None:
        report, captioner = self.report, self.captioner
        batch = list(self.todo)
        self.todo.clear()
        images, ok = [], []
        for e, existing in batch:
            try:
                images.append(load_image(e.path))
                ok.append((e, existing))
            except Exception as exc:  # corrupt / truncated / not an image: report and go on
                cause = exc.__cause__ or exc  # load_image wraps decoder errors in a training-time message
                report.failed.append((e.path, f"cannot read the image ({type(cause).__name__}: {cause}); "
                                              f"replace or remove the file"))
                self.finish(e)
        if not ok:
            return
        results: Optional[List[Any]] = None
        if len(ok) > 1:
            try:
                results = captioner.caption_batch(images, [e.path for e, _ in ok])
            except Exception as exc:  # retry one by one to find the image at fault
                log.debug("batch failed (%s); captioning one by one", exc)
        for k, (e, existing) in enumerate(ok):
            try:
                result = results[k] if results is not None else captioner.caption(images[k], e.path)
            except CaptionerError as exc:  # names the backend and the fix itself
                report.failed.append((e.path, str(exc)))
            except Exception as exc:
                report.failed.append((e.path, f"{captioner.name} failed ({type(exc).__name__}: {exc})"))
            else:
                self.handle(e, existing, result)
            self.finish(e)


def tag_frequency(folder: str, caption_extension: str = ".txt") -> Dict[str, Dict[str, int]]:
    """{folder label: {tag: count}} over the captions the dataset loader would read (images with none skipped)."""
    return CaptionTable(folder, caption_extension).tag_frequency()
