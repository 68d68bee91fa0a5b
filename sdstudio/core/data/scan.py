"""Find the usable images of a dataset folder, their captions and repeats, and everything wrong with it.

Read-only: a scan never creates, changes or deletes anything in the folder.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdstudio.core.data.captions import apply_template, choose_caption, process_caption, read_caption_file
from sdstudio.core.data.duplicates import (
    NEAR_DUPLICATE_BITS,
    NEAR_DUPLICATE_CORRELATION,
    Fingerprint,
    duplicate_problems,
)
from sdstudio.core.data.images import (
    ImageInfo,
    ImageProblem,
    difference_hash,
    load_with_info,
    normalized_thumbnail,
    probe_image,
    verify_decodes,
)
from sdstudio.core.data.mask_files import is_mask_file
from sdstudio.core.data.metadata import path_key, read_metadata
from sdstudio.core.data.problems import KIND_ORDER, PROBLEM_KINDS, Problem, ProblemList
from sdstudio.core.data.training_masks import MASKS_FOLDER
from sdstudio.core.errors import DatasetError, UserError

__all__ = [  # the public names, importable from here as before the split
    "EXTREME_ASPECT", "IMAGE_EXTENSIONS", "LAYOUTS", "NEAR_DUPLICATE_BITS", "NEAR_DUPLICATE_CORRELATION",
    "PROBLEM_KINDS", "Fingerprint", "ImageRecord", "Problem", "ProblemList", "ScanResult", "choose_caption",
    "duplicate_problems", "process_caption", "read_metadata", "scan_dataset",
]

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}

LAYOUTS = ("plain", "kohya", "imagefolder")
EXTREME_ASPECT = 4.0

_SKIPPED_FIX = ("To train on these images, put them in a folder named <repeats>_<caption> (e.g. '1_photo') "
                "in the dataset folder; otherwise move them out of it.")
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
# Folders and files that operating systems and NAS boxes drop everywhere; never part of a dataset.
_JUNK = {"thumbs.db", "desktop.ini", "__macosx", "$recycle.bin", "system volume information", "@eadir"}


@dataclass(frozen=True)
class ImageRecord:
    path: Path  # absolute
    captions: tuple[str, ...]  # alternatives, one per line; () = no caption at all
    repeats: int  # kohya repeats, 1 otherwise
    concept: str  # kohya subfolder name ("10_sks dog"), "" otherwise
    width: int  # as displayed, after EXIF rotation
    height: int
    caption_source: str = "none"  # "sidecar" | "metadata" | "folder" | "instance_prompt" | "none"


@dataclass
class ScanResult:
    root: Path
    layout: str  # "plain" | "kohya" | "imagefolder"
    records: list[ImageRecord]  # usable images, sorted by path
    problems: list[Problem]
    concepts: dict[str, int] = field(default_factory=dict)  # kohya folder name -> repeats

    @property
    def images_per_epoch(self) -> int:
        return sum(r.repeats for r in self.records)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


@dataclass
class _Folder:
    """One directory's relevant files, as found by the walk."""

    path: Path
    images: list[Path]
    captions: dict[tuple[str, str], Path]  # (stem, lower-case extension) -> caption file


@dataclass
class _Candidate:
    path: Path
    caption_file: Path | None
    concept: str = ""
    repeats: int = 1
    fallback: str = ""  # the kohya folder's caption


@dataclass
class _Inspected:
    info: ImageInfo | None = None
    problem: ImageProblem | None = None
    sha256: str = ""
    dhash: int = 0
    thumbnail: np.ndarray | None = None
    caption_lines: tuple[str, ...] | None = None  # None: no caption file, or it could not be read
    caption_error: str = ""


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in _JUNK


def _walk(top: Path, caption_exts: Sequence[str], visited: set[tuple[int, int]],
          problems: ProblemList) -> Iterator[_Folder]:
    """Folders under ``top`` (symlinks followed, each real folder once, so link cycles end)."""
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in visited:
                continue  # a symlink back to a folder already scanned (a link cycle ends here)
            visited.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            problems.add("unreadable_folder", folder, f"folder {problems.rel(folder)} cannot be read "
                         f"({exc.strerror or exc}); its images are not used.",
                         "Check that the folder exists and that you have permission to read it.")
            continue
        found = _Folder(folder, [], {})
        subfolders: list[Path] = []
        for entry in entries:
            if _ignored(entry.name):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if entry.name.lower() != MASKS_FOLDER:  # training masks (masked loss), not images
                    subfolders.append(Path(entry.path))
                continue
            stem, ext = os.path.splitext(entry.name)
            ext = ext.lower()
            if ext in IMAGE_EXTENSIONS and not is_mask_file(entry.name):
                found.images.append(Path(entry.path))
            elif ext in caption_exts:
                found.captions[(stem, ext)] = Path(entry.path)
        yield found
        stack.extend(reversed(subfolders))


def _inspect(candidate: _Candidate, decode: bool, fingerprint: bool) -> _Inspected:
    result = _Inspected()
    path = candidate.path
    try:
        if fingerprint:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ImageProblem("unreadable", path, f"cannot be read ({exc.strerror or exc})") from exc
            result.sha256 = hashlib.sha256(data).hexdigest()
            result.info, img = load_with_info(path, data)
            result.dhash = difference_hash(img)
            result.thumbnail = normalized_thumbnail(img)
        elif decode:
            result.info = verify_decodes(path)
        else:
            result.info = probe_image(path)
    except ImageProblem as exc:
        result.problem = exc
    if candidate.caption_file is not None:
        result.caption_lines, result.caption_error = read_caption_file(candidate.caption_file)
    return result


def _detect_layout(root: Path) -> tuple[str, list[os.DirEntry[str]]]:
    try:
        with os.scandir(root) as it:
            entries = sorted((e for e in it if not _ignored(e.name)), key=lambda e: e.name)
    except FileNotFoundError as exc:
        raise DatasetError(f"Dataset folder {root} does not exist. Check the path.") from exc
    except NotADirectoryError as exc:
        raise DatasetError(f"{root} is a file, not a folder: point at the folder of images.") from exc
    except OSError as exc:
        raise DatasetError(f"Dataset folder {root} cannot be read ({exc.strerror or exc}). "
                           "Check that you have permission to read it.") from exc
    names = {e.name for e in entries}
    if "metadata.jsonl" in names or "metadata.csv" in names:
        return "imagefolder", entries
    if any(_KOHYA_FOLDER.match(e.name) and _is_dir(e) for e in entries):
        return "kohya", entries
    return "plain", entries


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _candidates(folder: _Folder, caption_exts: Sequence[str], concept: str = "", repeats: int = 1,
                fallback: str = "") -> list[_Candidate]:
    out = []
    for image in folder.images:
        stem = os.path.splitext(image.name)[0]
        found = [folder.captions[(stem, e)] for e in caption_exts if (stem, e) in folder.captions]
        caption = found[0] if found else None
        out.append(_Candidate(image, caption, concept, repeats, fallback))
    return out


def _orphans(folder: _Folder, problems: ProblemList) -> None:
    stems = {os.path.splitext(i.name)[0] for i in folder.images}
    for (stem, _ext), caption in sorted(folder.captions.items()):
        if stem not in stems:
            problems.add("orphan_caption", caption,
                         f"caption {problems.rel(caption)} has no image named {stem}.* next to it.",
                         "Rename it to match its image, or delete it if the image is gone.")


def _kohya_candidates(root: Path, entries: list[os.DirEntry[str]], caption_exts: Sequence[str],
                      visited: set[tuple[int, int]], problems: ProblemList,
                      concepts: dict[str, int]) -> list[_Candidate]:
    out: list[_Candidate] = []
    kohya_names = [e.name for e in entries if _is_dir(e) and _KOHYA_FOLDER.match(e.name)]
    example = next((n for n in kohya_names if not n.startswith("0")), kohya_names[0])
    root_images = [e.name for e in entries if not _is_dir(e) and os.path.splitext(e.name)[1].lower()
                   in IMAGE_EXTENSIONS and not is_mask_file(e.name)]
    if root_images:
        problems.add("skipped_folder", root,
                     f"{len(root_images)} image(s) directly in {root} are ignored: the folder looks like a "
                     f"kohya parent (it has <repeats>_<name> subfolders such as '{example}').",
                     _SKIPPED_FIX)
    for entry in entries:
        if not _is_dir(entry):
            continue
        match = _KOHYA_FOLDER.match(entry.name)
        folder = Path(entry.path)
        if match is None or int(match.group(1)) == 0:
            why = "has 0 repeats, so it would never be used" if match else \
                "is not named <repeats>_<name> (e.g. '10_sks dog')"
            problems.add("skipped_folder", folder,
                         f"folder {problems.rel(folder)} is skipped: it {why}, and the dataset folder is a "
                         "kohya parent.",
                         _SKIPPED_FIX)
            continue
        repeats, name = int(match.group(1)), match.group(2).strip()
        concepts[entry.name] = repeats
        for found in _walk(folder, caption_exts, visited, problems):
            out += _candidates(found, caption_exts, entry.name, repeats, name)
            _orphans(found, problems)
    return out


def scan_dataset(
    root: Path | str,
    *,
    resolution: int = 0,
    caption_extensions: Sequence[str] = (".txt", ".caption"),
    instance_prompt: str | None = None,
    caption_template: str | None = None,
    decode: bool = False,
    find_duplicates: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ScanResult:
    """Scan a plain, kohya (``N_name`` subfolders) or Hugging Face imagefolder dataset folder.

    decode: fully decode every image (finds truncated files; slower). find_duplicates: hash every file's
    content and pixels (decodes them too). Raises DatasetError when ``root`` cannot be read.
    """
    if caption_template and "{caption}" not in caption_template:
        raise UserError(f"caption template {caption_template!r} has no {{caption}} placeholder: write it "
                        "like 'a photo of {caption}'.")
    root = Path(root).expanduser().absolute()
    caption_exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in caption_extensions)
    layout, entries = _detect_layout(root)
    problems = ProblemList(root)
    concepts: dict[str, int] = {}
    visited: set[tuple[int, int]] = set()
    metadata: dict[str, tuple[str, tuple[str, ...]]] = {}
    if layout == "kohya":
        st = os.stat(root)
        visited.add((st.st_dev, st.st_ino))
        candidates = _kohya_candidates(root, entries, caption_exts, visited, problems, concepts)
    else:
        if layout == "imagefolder":
            metadata = read_metadata(root, problems)
        candidates = []
        for found in _walk(root, caption_exts, visited, problems):
            candidates += _candidates(found, caption_exts)
            _orphans(found, problems)
    found_keys = {path_key(c.path) for c in candidates}
    for key in sorted(set(metadata) - found_keys):
        name = metadata[key][0]
        problems.add("metadata_error", root / name, f"metadata lists {name}, but there is no such image.",
                     "Fix the file_name in the metadata file, or put the image back.")

    candidates.sort(key=lambda c: c.path)
    inspected = _inspect_all(candidates, decode or find_duplicates, find_duplicates, progress)
    records: list[ImageRecord] = []
    fingerprints: list[Fingerprint] = []
    for cand, result in zip(candidates, inspected, strict=True):
        if result.problem is not None or result.info is None:
            exc = result.problem
            assert exc is not None
            problems.add(exc.kind, cand.path, f"{problems.rel(cand.path)} {exc.reason}.", exc.fix)
            continue
        record = _record(cand, result, metadata, instance_prompt, caption_template, problems)
        _size_problems(record, resolution, problems)
        records.append(record)
        if find_duplicates:
            fingerprints.append(Fingerprint(cand.path, result.sha256, result.dhash, result.thumbnail))
    if find_duplicates:
        duplicate_problems(fingerprints, problems)
    problems.sort(key=lambda p: (KIND_ORDER[p.kind], p.path))
    return ScanResult(root, layout, records, list(problems), concepts)


def _inspect_all(candidates: list[_Candidate], decode: bool, fingerprint: bool,
                 progress: Callable[[int, int], None] | None) -> list[_Inspected]:
    total = len(candidates)
    results: list[_Inspected] = []
    if progress:
        progress(0, total)
    # Threads, not processes: the work is file I/O and Pillow decoding, which release the GIL.
    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
        for done, result in enumerate(pool.map(lambda c: _inspect(c, decode, fingerprint), candidates), 1):
            results.append(result)
            if progress:
                progress(done, total)
    return results


def _record(cand: _Candidate, result: _Inspected, metadata: dict[str, tuple[str, tuple[str, ...]]],
            instance_prompt: str | None, template: str | None, problems: ProblemList) -> ImageRecord:
    assert result.info is not None
    rel = problems.rel(cand.path)
    own: tuple[str, ...] = ()
    source = "none"
    key = path_key(cand.path)
    if key in metadata:
        own, source = metadata[key][1], "metadata"
    elif cand.caption_file is not None:
        if result.caption_lines is None:
            problems.add("undecodable_caption", cand.caption_file,
                         f"caption {problems.rel(cand.caption_file)} {result.caption_error}; {rel} is used "
                         "without it.",
                         "Re-save the caption file as UTF-8 (any text editor's 'Save as... UTF-8').")
        else:
            own, source = result.caption_lines, "sidecar"
    captions = apply_template(own, template)
    if not own:
        if source == "sidecar" or source == "metadata":
            why = "an empty caption"
        elif result.caption_lines is None and cand.caption_file is not None:
            why = ""  # already reported as undecodable_caption
        else:
            why = "no caption file"
        if cand.fallback:
            captions, source, used = apply_template((cand.fallback,), template), "folder", "its folder's name"
        elif instance_prompt:
            captions, source, used = (instance_prompt,), "instance_prompt", "the instance prompt"
        else:
            captions, source, used = (), "none", "an empty caption"
        if why:
            problems.add("missing_caption", cand.path, f"{rel} has {why}; {used} is used instead.",
                         "Add a caption file with the image's name and .txt next to it (one caption per "
                         "line), or ignore this if the fallback caption is what you want.")
    return ImageRecord(cand.path, captions, cand.repeats, cand.concept, result.info.width,
                       result.info.height, source)


def _size_problems(record: ImageRecord, resolution: int, problems: ProblemList) -> None:
    rel = problems.rel(record.path)
    short, long = sorted((record.width, record.height))
    if resolution > 0 and short < resolution / 2:
        problems.add("too_small", record.path,
                     f"{rel} is {record.width}x{record.height}: its shorter side is under half the "
                     f"training resolution ({resolution}), so it is upscaled a lot and looks blurry.",
                     "Replace it with a larger version, or remove it.")
    if short > 0 and long / short > EXTREME_ASPECT:
        problems.add("extreme_aspect", record.path,
                     f"{rel} is {record.width}x{record.height} (aspect ratio {long / short:.1f}:1); a crop "
                     "at the training size shows only a small part of it.",
                     "Crop it to the part that matters, or remove it.")


