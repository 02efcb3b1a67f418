"""Finding images, repeats and captions in kohya's folder layout or a flat folder.

Layouts:
  dataset/10_mychar/*.png   kohya: each `N_name` sub-folder repeats N times per epoch and `name`
  dataset/5_style/*.jpg     is the class / trigger text of images that have no caption
  dataset/*.png             flat: repeats from `DataConfig.repeats`, no class name
Sub-folders that are not `N_name` (N >= 1) are reported as `bad_repeat_folder` and skipped;
hidden folders (".x") are ignored. Images directly in a kohya-layout root are used with
`DataConfig.repeats` and a note. Sub-folders are not searched recursively.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .captions import split_tags
from .images import ImageReadError, inspect_image, is_image_file, stem_of

REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")


@dataclass
class Problem:
    path: str
    kind: str  # duplicate_stem | unreadable | missing_caption | empty_caption | too_small |
    #            bad_repeat_folder | long_caption | missing_mask
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "kind": self.kind, "detail": self.detail}


@dataclass
class ImageItem:
    """One readable image. Sizes are after EXIF orientation; `caption` is the base caption
    (from the caption file, the default caption or the folder's class name) before the random
    caption rules."""

    path: str
    folder: str  # kohya folder key, e.g. "10_mychar" (the root's own name for a flat folder)
    repeats: int
    class_name: str
    caption: str
    caption_source: str  # file | default | class | none
    width: int
    height: int
    has_alpha: bool = False
    is_reg: bool = False
    mask_path: str | None = None


@dataclass
class FolderInfo:
    key: str
    path: str
    repeats: int
    class_name: str
    is_reg: bool
    images: list[ImageItem] = field(default_factory=list)


@dataclass
class ScanResult:
    folders: list[FolderInfo]
    problems: list[Problem]
    notes: list[str]

    @property
    def items(self) -> list[ImageItem]:
        return [item for f in self.folders for item in f.images]


def normalize_extension(ext: str) -> str:
    ext = (ext or ".txt").strip()
    return ext if ext.startswith(".") else "." + ext


def _list_dir(path: str) -> tuple[list[str], list[str]]:
    """(image file names, sub-folder names), sorted for a stable order on every OS."""
    files, dirs = [], []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            dirs.append(entry.name)
        elif entry.is_file() and is_image_file(entry.name):
            files.append(entry.name)
    return files, dirs


def scan_dataset(root: str, *, repeats: int, caption_extension: str, default_caption: str,
                 trigger_word: str = "", is_reg: bool = False, decode: bool = True,
                 mask_dir: str = "", want_masks: bool = False, workers: int = 1) -> ScanResult:
    """Scan one dataset root (train or regularization). The caller checks `root` exists.
    decode: decode every image (catches truncated files; JPEGs at 1/8 scale, so it is cheap);
    workers: threads decoding in parallel (Pillow releases the GIL while decoding)."""
    problems: list[Problem] = []
    notes: list[str] = []
    folders: list[FolderInfo] = []
    root = os.path.abspath(root)
    files, dirs = _list_dir(root)
    root_name = os.path.basename(root.rstrip(os.sep)) or root
    kind = "regularization" if is_reg else "dataset"
    repeat_dirs = []
    for name in dirs:
        m = REPEAT_FOLDER.match(name)
        sub = os.path.join(root, name)
        if m and int(m.group(1)) >= 1:
            repeat_dirs.append((name, int(m.group(1)), m.group(2).strip()))
            continue
        sub_files, _ = _list_dir(sub)
        if not sub_files:
            continue  # an unrelated folder (logs, outputs, caches): nothing to say
        why = ("repeat count 0 trains nothing" if m else
               "not in the N_name form (e.g. 10_mychar), so it is skipped")
        problems.append(Problem(sub, "bad_repeat_folder",
                                f"{why}; it holds {len(sub_files)} image(s)"))
    if files:
        if repeat_dirs:
            notes.append(f"{len(files)} image(s) directly in the {kind} folder {root} are used "
                         f"with repeats={repeats} beside its N_name sub-folders")
        elif REPEAT_FOLDER.match(root_name) and not is_reg:
            notes.append(f"{root} is a flat folder named like N_name: its images use "
                         f"repeats={repeats}; point at its parent to use the repeats in the name")
        folders.append(FolderInfo(root_name, root, repeats, "", is_reg))
    for name, n, class_name in repeat_dirs:
        folders.append(FolderInfo(name, os.path.join(root, name), n, class_name, is_reg))
    ext = normalize_extension(caption_extension)
    for folder in folders:
        names = files if folder.path == root else _list_dir(folder.path)[0]
        _scan_folder(folder, names, ext, default_caption, trigger_word, decode, problems,
                     mask_dir if want_masks else "", workers)
    return ScanResult(folders, problems, notes)


# (path, inode, mtime_ns, size, decode) -> (w, h, has_alpha): the tab's check before a run and
# the run's own scan decode each image once per process; any change to the file changes the key.
_INSPECTED: dict[tuple[str, int, int, int, bool], tuple[int, int, bool]] = {}
_INSPECTED_MAX = 200_000


def _inspect_cached(path: str, decode: bool) -> tuple[int, int, bool]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImageReadError(str(e)) from None
    key = (path, st.st_ino, st.st_mtime_ns, st.st_size, decode)
    found = _INSPECTED.get(key)
    if found is None and not decode:
        found = _INSPECTED.get(key[:-1] + (True,))
    if found is not None:
        return found
    found = inspect_image(path, decode=decode)
    if len(_INSPECTED) >= _INSPECTED_MAX:
        _INSPECTED.clear()
    _INSPECTED[key] = found
    return found


def _read_caption(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    # caption files are one line by convention; several lines are joined as tags
    return ", ".join(line.strip() for line in text.splitlines() if line.strip())


def _scan_folder(folder: FolderInfo, names: list[str], ext: str, default_caption: str,
                 trigger_word: str, decode: bool, problems: list[Problem], mask_dir: str,
                 workers: int = 1) -> None:
    def inspect(name: str):
        try:
            return _inspect_cached(os.path.join(folder.path, name), decode)
        except ImageReadError as e:
            return e

    if workers > 1 and len(names) > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="lora-scan") as pool:
            inspected = list(pool.map(inspect, names))
    else:
        inspected = [inspect(name) for name in names]
    seen_stems: dict[str, str] = {}
    for name, info in zip(names, inspected):
        path = os.path.join(folder.path, name)
        stem = stem_of(name)
        if stem in seen_stems:
            problems.append(Problem(path, "duplicate_stem",
                                    f"same name as {seen_stems[stem]}; both share the caption "
                                    f"{stem}{ext}; rename or remove one"))
        else:
            seen_stems[stem] = name
        if isinstance(info, ImageReadError):
            problems.append(Problem(path, "unreadable", f"skipped: {info}"))
            continue
        width, height, has_alpha = info
        caption, source = _caption_for(path, stem, ext, folder, default_caption, trigger_word,
                                       problems)
        mask_path = None
        if mask_dir:
            for mext in (".png", ".webp", ".jpg", ".jpeg", ".bmp"):
                candidate = os.path.join(mask_dir, stem + mext)
                if os.path.isfile(candidate):
                    mask_path = candidate
                    break
        folder.images.append(ImageItem(path, folder.key, folder.repeats, folder.class_name,
                                       caption, source, width, height, has_alpha,
                                       folder.is_reg, mask_path))


def _caption_for(path: str, stem: str, ext: str, folder: FolderInfo, default_caption: str,
                 trigger_word: str, problems: list[Problem]) -> tuple[str, str]:
    caption_path = os.path.join(folder.path, stem + ext)
    fallback, source = "", "none"
    if default_caption.strip():
        fallback, source = default_caption.strip(), "default"
    elif folder.class_name:
        fallback, source = folder.class_name, "class"
    used = (f"uses the default caption {fallback!r}" if source == "default" else
            f"uses the folder's class {fallback!r}" if source == "class" else
            "uses the trigger word only" if trigger_word else "trains with an empty caption")
    if not os.path.isfile(caption_path):
        problems.append(Problem(path, "missing_caption", f"no {stem}{ext}; {used}"))
        return fallback, source
    try:
        text = _read_caption(caption_path)
    except OSError as e:
        problems.append(Problem(caption_path, "missing_caption", f"cannot read ({e}); {used}"))
        return fallback, source
    if not split_tags(text):
        problems.append(Problem(caption_path, "empty_caption", f"the file is empty; {used}"))
        return fallback, source
    return text, "file"
